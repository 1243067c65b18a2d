"""Train one model: `python train.py method=gnp model=vit dataset=cifar100`.

The same command runs under `torchrun --nproc_per_node=N train.py ...` (DDP), as the tasks of a
SLURM job, and as a Hydra multirun (`python train.py -m method.alpha=0.5,0.8,1.0 seed=0,1,2`).
`--cfg job` prints the composed config; every option is documented in README.md and conf/.
"""
import sys

import hydra
from omegaconf import DictConfig

from gnp import cli


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return cli.run_job(cfg)


if __name__ == "__main__":
    cli.check_command_line(sys.argv[1:])  # every job of the command, before the first one starts
    cli.check_run_directory(sys.argv[1:])  # before Hydra writes its record there
    main()
