"""Train one model: `python train.py method=gnp model=vit dataset=cifar100`.

The same command runs under `torchrun --nproc_per_node=N train.py ...` (DDP), as the tasks of a
SLURM job, and as a Hydra multirun (`python train.py -m method.alpha=0.5,0.8,1.0 seed=0,1,2`).
`--cfg job` prints the composed config; every option is documented in docs/ and conf/.
"""
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from gnp import cli

    return cli.run_job(cfg)


if __name__ == "__main__":
    from gnp import commandline

    # Every job of the command (all those of a sweep) must compose before torch is even imported: a typo
    # costs a second. Then their values, and the run directory before Hydra writes its record there.
    composed = commandline.check(sys.argv[1:])
    from gnp import cli

    cli.check_values(composed)
    cli.check_run_directory(sys.argv[1:])
    main()
