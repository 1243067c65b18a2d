"""Train one model: `python train.py method=gnp model=vit dataset=cifar100`.

The same command runs under `torchrun --nproc_per_node=N train.py ...` (DDP) and as a Hydra
multirun (`python train.py -m method.alpha=0.5,0.8,1.0 seed=0,1,2`). `--cfg job` prints the
composed config; every option is documented in README.md and conf/.
"""
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from gnp.config import ConfigError
from gnp.data import DataError
from gnp.training import train


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    try:
        summary = train(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigError, DataError) as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra records the failed job and goes on with the rest of the sweep
        # A problem with the input, not a bug: the message says what to change; no traceback.
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return summary["test_error"]  # the objective a Hydra sweeper minimises


if __name__ == "__main__":
    main()
