"""A run's records mirrored to Weights & Biases (the run directory's own files are gnp.rundir's).

Only the main process logs. W&B runs offline unless credentials are configured (or online is
asked for); an offline run leaves `wandb/offline-run-*` in the run directory for `wandb sync`.
W&B's own console output is silent unless `wandb.silent=false`.
"""
from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from gnp import io
from gnp.console import first_line
from gnp.rundir import Summary

# One row of the paper's results table; `scripts/make_tables.py` reads the same fields.
TABLE_COLUMNS = ("dataset", "model", "method", "aug", "seed", "epochs", "test_error", "best_test_error")


class TrackingError(RuntimeError):
    """W&B could not start; the message says why and how to log without it."""


def has_wandb_credentials() -> bool:
    """True when `wandb login` has been run or WANDB_API_KEY is set (no network needed to tell)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    if mode == "auto":
        return "online" if has_wandb_credentials() else "offline"
    return mode


def run_name(config: dict, label_settings: tuple[str, ...]) -> str:
    """dataset-model-method-aug-<the method's label settings>-lr-seed (`label_settings`, the method class's:
    r and alpha for GNP): what tells the runs of a sweep apart at a glance."""
    m = config["method"]
    settings = "".join(f"-{key}{m[key]}" for key in label_settings if key in m)
    return (f"{config['dataset']['name']}-{config['model']['name']}-{m['name']}-{config['aug']['name']}"
            f"{settings}-lr{config['optimizer']['lr']}-s{config['seed']}")


class Tracker:
    """The W&B run of a run directory (none with wandb.mode=disabled); `run_id` continues a resumed run's."""

    def __init__(self, run_dir: str | Path, config: dict, *, label_settings: tuple[str, ...] = (),
                 run_id: str | None = None):
        self.run_dir, self.run = Path(run_dir), None
        wandb_cfg = config["wandb"]
        mode = resolve_wandb_mode(wandb_cfg["mode"])
        if mode == "disabled":
            return
        import wandb

        tags = [config["dataset"]["name"], config["model"]["name"], config["method"]["name"], *wandb_cfg["tags"]]
        group = wandb_cfg["group"]
        if os.environ.get("WANDB_SWEEP_ID"):  # started by `wandb agent`: the sweep's runs belong together
            group, tags = group or f"sweep-{os.environ['WANDB_SWEEP_ID']}", [*tags, "wandb-sweep"]
        try:
            self.run = wandb.init(
                project=wandb_cfg["project"],
                entity=wandb_cfg["entity"],
                group=group,
                tags=list(dict.fromkeys(tags)),
                name=run_name(config, label_settings),
                config=config,
                dir=str(self.run_dir),
                mode=mode,
                id=run_id,
                resume="allow",
                settings=wandb.Settings(silent=bool(wandb_cfg["silent"])),
            )
        except (wandb.errors.Error, OSError, TimeoutError) as e:  # its own errors and the network's
            raise TrackingError(f"W&B could not start a {mode} run ({first_line(e)}); check the network and "
                                f"`wandb login`, or log locally with wandb.mode=offline") from e

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log_epoch(self, row: dict) -> None:
        """Send an epoch's row of metrics.jsonl to W&B."""
        if self.run is not None:
            self.run.log(io.strict_json(row), step=row["epoch"])

    def finish(self, summary: Summary, exit_code: int = 0, preempted: bool = False) -> None:
        """Close the W&B run with the run's summary (and, for a finished run, its row of the results table);
        called on failure too. A preempted run is marked so in W&B, which then expects it to resume."""
        if self.run is None:
            return
        import wandb

        record = summary.as_dict()
        if summary.finished:
            row = {**{c: record[c] for c in TABLE_COLUMNS},
                   **{f"method.{k}": v for k, v in summary.method_settings.items()}}
            self.run.log({"results": wandb.Table(columns=list(row), data=[list(row.values())])})
        self.run.summary.update(io.strict_json(record))
        if preempted:
            self.run.mark_preempting()
        self.run.finish(exit_code=exit_code)
        self.run = None
