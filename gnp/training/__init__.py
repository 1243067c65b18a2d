"""The training loop, on a CPU, one GPU, under torchrun or as the tasks of a SLURM job.

`train(cfg, run_dir)` reads top to bottom in `Trainer.run`: resume from the run directory's
checkpoint if there is one, then for each epoch train, evaluate, log and checkpoint. Every random
draw of a step (data order, augmentation, dropout, ShakeDrop, hybrid steps) is keyed by (seed,
step, shard), so a run stopped at any step and resumed from its checkpoint ends exactly where an
uninterrupted run ends. Nothing in a step waits for the GPU: the loop reads the device's numbers
(NaN checks, stop requests, progress) every `train.sync_every` steps and at the end of each epoch.

One room per concern:

    build.py          the parts a run trains with, from its config (`build_parts`; no Trainer needed)
    epoch.py          one epoch: the step and its per-step work, the epoch's sums, the device's flags
    divergence.py     what is checked for NaN and inf, and where
    evaluate.py       the test set's loss and errors
    ema.py            the weight average
    checkpointing.py  the run's state in checkpoint.pt: saved at any step, restored, its file format
    records.py        the run's records (through gnp.rundir): what a run finds there, metrics, its summary
    trainer.py        `train` and `Trainer.run`: the whole story
"""
from gnp.training.build import (Parts, build_optimizer, build_parts, cosine_schedule, init_seed, resolve_precision,
                                use_channels_last)
from gnp.training.checkpointing import CheckpointError, Checkpoints, Start
from gnp.training.divergence import Diverged
from gnp.training.ema import WeightAverage
from gnp.training.epoch import EpochTotals, train_step
from gnp.training.evaluate import evaluate
from gnp.training.records import RESUMABLE_CHANGES, RunRecords, check_resumable, git_commit
from gnp.training.trainer import Stopped, Trainer, train

__all__ = ["CheckpointError", "Checkpoints", "Diverged", "EpochTotals", "Parts", "RESUMABLE_CHANGES", "RunRecords", "Start", "Stopped",
           "Trainer", "WeightAverage", "build_optimizer", "build_parts", "check_resumable", "cosine_schedule",
           "evaluate", "git_commit", "init_seed", "resolve_precision", "train", "train_step", "use_channels_last"]
