"""Analysing one finished run: read its directory, rebuild its model and loss on a seeded subset of
its training set, compute each quantity, and write analysis.json.

After each quantity the results so far are written atomically to analysis.partial.json with the
settings: a killed analysis started again with the same settings continues from there (it loses at
most the quantity in progress); other settings start afresh. Nothing else in the run directory is
written, except the figures of the landscape, the interpolation, the spectral density and the
blocks (analysis_*.png and .pdf).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from omegaconf import OmegaConf
from tqdm import tqdm

from gnp import io
from gnp.analysis import blocks, density, hessian, landscape, sharpness
from gnp.analysis.objective import SubsetLoss, describe_loss
from gnp.config import build_method, method_label, train_steps_per_epoch
from gnp.console import first_line
from gnp.data import CLASSES, BatchLoader, DataError, load_dataset
from gnp.methods import global_norm as norm
from gnp.models import build_model
from gnp import rundir
from gnp.rundir import (ANALYSIS as RESULT_FILE, ANALYSIS_FORMAT as FORMAT, ANALYSIS_PARTIAL as PARTIAL_FILE,
                        CHECKPOINT, CONFIG as CONFIG_FILE, Damaged, RunDir, Summary)
from gnp.training import build_optimizer, checkpointing, git_commit

DEFAULT_SUBSET = 5000
# The quantities `--only` chooses from, in the order they are computed; all but the OPT_IN ones by default.
QUANTITIES = ("train_loss", "train_error", "train_grad_norm", "hessian_top_eigenvalues", "hessian_trace",
              "sam_sharpness", "hessian_density")
OPT_IN = ("hessian_density",)  # --density: probes x steps products and steps x parameters of memory
DEFAULT_QUANTITIES = tuple(name for name in QUANTITIES if name not in OPT_IN)
LOW_PRECISION = ("bf16", "fp16")


class AnalysisError(RuntimeError):
    """Bad input (a run that cannot be analysed as asked); the message is one line with the fix."""


class Skipped(Exception):
    """The run did not finish (its status says why): nothing to analyse, and no error."""

    def __init__(self, status: str):
        super().__init__(status)
        self.status = status


@dataclass
class Options:
    """What the command line asks for; `Analysis.settings` is what it comes to for one run."""
    subset: int | None = None  # None: DEFAULT_SUBSET, or the whole of a smaller training set
    batch_size: int = 500
    seed: int = 0
    float64: bool = False
    quantities: tuple[str, ...] = DEFAULT_QUANTITIES
    top_k: int = 5
    trace_method: str = hessian.HUTCHPP
    trace_samples: int | None = None  # None: the method's default (hessian.TRACE_SAMPLES)
    hvp_method: str = "auto"  # objective.HVP_METHODS
    rho: float | None = None  # None: the run's method.r if > 0, else 0.05
    ascent_steps: int = sharpness.STEPS  # the cap of each ascent
    ascent_tol: float = sharpness.TOL
    sharpness_starts: int = sharpness.STARTS
    m_sharpness: int | None = None  # also SAM's m-sharpness with batches of m images
    landscape: bool = False
    landscape_points: int = 21
    landscape_range: float = 1.0
    between: Path | None = None  # the other run of the interpolation (this run is its t = 0 end)
    density_probes: int = 2
    density_steps: int = 64
    per_block: bool = False


@dataclass
class FinishedRun:
    """A finished run's directory, read: its config, summary and checkpoint."""
    dir: Path
    config: dict
    summary: Summary
    state: dict = field(repr=False)


# --- finding and reading runs --------------------------------------------------------------------

def runs_to_analyse(path: str | Path) -> list[Path]:
    """`path` itself when it is a run directory (it holds config.yaml), else every run directory
    under it that holds config.yaml."""
    path = Path(path)
    if not path.exists():
        raise AnalysisError(f"{path} does not exist: give a run directory that train.py wrote (its hydra.run.dir)")
    if (path / CONFIG_FILE).is_file():
        return [path]
    runs = [run for run in rundir.find_runs(path) if (run / CONFIG_FILE).is_file()]
    if not runs:
        raise AnalysisError(f"{path} is not a run directory (no {CONFIG_FILE}) and holds none: give a run directory "
                            f"that train.py wrote (its hydra.run.dir) or a folder of them")
    return runs


def load_finished_run(run_dir: Path) -> FinishedRun:
    """The run's config, summary and checkpoint; Skipped unless it finished, AnalysisError when a
    file is missing or damaged (a summary without a status too)."""
    files = RunDir(run_dir)
    try:
        config = files.read_config()
        summary = files.read_summary()
    except Damaged as e:
        raise AnalysisError(f"{e}: restore it, or train the run again") from None
    if config is None:
        raise AnalysisError(f"{files / CONFIG_FILE} is missing: it is not a run directory that train.py wrote")
    if summary is None:
        raise Skipped("no summary")  # still training, or killed before it could write one
    if not summary.finished:
        raise Skipped(str(summary.status))
    try:
        state = checkpointing.load(run_dir)
    except checkpointing.CheckpointError as e:
        raise AnalysisError(first_line(e)) from None
    if state is None:
        raise AnalysisError(f"{run_dir} has no {CHECKPOINT}: the analysis needs the run's final weights; "
                            f"restore the file or train the run again")
    return FinishedRun(run_dir, config, summary, state)


def build_network(run: FinishedRun, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The run's model (as gnp.training builds it, channels_last off) with its checkpoint's weights,
    in eval mode."""
    options = dict(run.config["model"])
    name = options.pop("name")
    try:
        net = build_model(name, CLASSES[run.config["dataset"]["name"]], **options)
    except ValueError as e:
        raise AnalysisError(f"{run.dir / CONFIG_FILE}: {first_line(e)}") from None
    check_fits(net, run.state["model"], run.dir / CHECKPOINT, run)
    net.load_state_dict(run.state["model"])
    return net.to(device=device, dtype=dtype).eval()


def check_fits(net: nn.Module, state_dict: dict, source: Path, run: FinishedRun) -> None:
    """AnalysisError naming `source` and the first tensor that does not fit `run`'s model `net`."""
    found = checkpointing.misfit(net.state_dict(), state_dict)
    if found:
        mismatch = (f"it has no tensor {found.key}" if found.saved is None else
                    f"it has a tensor {found.key} that the model lacks" if found.own is None else
                    f"its {found.key} has shape {found.saved}, not {found.own}")
        model = run.config["model"]
        options = ", ".join(f"{k}={v}" for k, v in model.items() if k != "name")
        raise AnalysisError(f"{source} holds another model than {run.dir}'s {model['name']}({options}): "
                            f"{mismatch}. Give runs of the same model")


def sub_seed(seed: int, purpose: str) -> int:
    """An independent seed for each random draw (subset, Lanczos, Hutchinson, directions, sharpness's
    starts, density probes) from --seed."""
    index = ("subset", "lanczos", "hutchinson", "directions", "sharpness", "density").index(purpose)
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def trained_l2(config: dict, net: nn.Module) -> list[tuple[float, list[nn.Parameter]]]:
    """The in-loss L2 groups of the run's method, built on `net` as training builds it: its base optimizer's
    param groups (`optimizer.decay_norm_and_bias`) and its l2 (`optimizer.weight_decay_mode=loss`)."""
    cfg = OmegaConf.create(config)
    base = build_optimizer(cfg.optimizer, net, torch.device("cpu"))
    return build_method(cfg, net, base, max(train_steps_per_epoch(cfg), 1)).l2_groups()


# --- the analysis of one run ---------------------------------------------------------------------

class Analysis:
    """The analysis of one finished run with `options` on `device`; `settings` is what it records
    and `execute()` writes analysis.json and returns its content."""

    def __init__(self, run: FinishedRun, options: Options, device: torch.device):
        self.run, self.options, self.device = run, options, device
        self.commit = git_commit()  # the code that does the work: read before it starts, not when it is written
        self.dtype = torch.float64 if options.float64 else torch.float32
        self.net = build_network(run, device, self.dtype)
        self.other = self._other_weights() if options.between else None
        self.l2 = trained_l2(run.config, self.net)
        self.label_smoothing = run.config["train"]["label_smoothing"]
        self.loss = SubsetLoss(self.net, self._subset_batches(), label_smoothing=self.label_smoothing, l2=self.l2,
                               on_pass=self._passed, hvp_method=options.hvp_method)
        self.trace_samples = options.trace_samples or hessian.TRACE_SAMPLES[options.trace_method]
        method_r = run.config["method"].get("r", 0)
        self.rho = options.rho if options.rho is not None else (method_r if method_r > 0 else 0.05)
        if options.m_sharpness is not None and options.m_sharpness > self.subset_size:
            raise AnalysisError(f"--m-sharpness {options.m_sharpness} is larger than the subset ({self.subset_size} "
                                f"images): use --m-sharpness {self.subset_size} or less")
        self.settings = self._settings()
        self.bar: tqdm | None = None
        self.current, self.passes = "", 0

    def _subset_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The seeded subset of the run's training images, normalised as the test loader does (no
        augmentation), in batches on the device."""
        d = self.run.config["dataset"]
        try:
            data = load_dataset(d["name"], d["root"], download=False, verify=d["verify"],
                                limit_train=d["limit_train"], limit_test=d["limit_test"])
        except DataError as e:
            raise AnalysisError(first_line(e)) from None
        available = len(data.train_labels)
        size = self.options.subset if self.options.subset is not None else min(DEFAULT_SUBSET, available)
        if size > available:
            raise AnalysisError(f"--subset {size} is larger than the training set of {self.run.dir} "
                                f"({available} images): use --subset {available} or less")
        generator = torch.Generator().manual_seed(sub_seed(self.options.seed, "subset"))
        index = torch.randperm(available, generator=generator)[:size].sort().values
        self.subset_size = size
        loader = BatchLoader(data.train_images[index], data.train_labels[index], batch_size=self.options.batch_size,
                             device=self.device, mean=d["mean"], std=d["std"], train=False)
        return [(images.to(self.dtype), labels) for images, labels in loader.epoch()]

    def _other_weights(self) -> dict[str, torch.Tensor]:
        """The weights of the run at the interpolation's other end (t = 1), of the same model."""
        other = load_other_run(self.options.between)
        check_fits(self.net, other.state["model"], other.dir / CHECKPOINT, self.run)
        return other.state["model"]

    def _settings(self) -> dict:
        o = self.options
        return {"subset": self.subset_size, "batch_size": o.batch_size, "seed": o.seed,
                "dtype": str(self.dtype).removeprefix("torch."), "device": self.device.type,
                "quantities": list(o.quantities), "top_k": o.top_k, "lanczos_tol": hessian.LANCZOS_TOL[self.dtype],
                "trace_method": o.trace_method, "trace_samples": self.trace_samples, "hvp_method": o.hvp_method,
                "rho": self.rho, "ascent_steps": o.ascent_steps,
                "ascent_tol": o.ascent_tol, "sharpness_starts": o.sharpness_starts, "m_sharpness": o.m_sharpness,
                "landscape": {"points": o.landscape_points, "range": o.landscape_range} if o.landscape else None,
                "between": {"run": str(o.between.resolve()), "points": o.landscape_points} if o.between else None,
                **self._opt_in_settings()}

    def _opt_in_settings(self) -> dict:
        """The settings of the opt-in quantities, recorded only when asked for (so that analyses made
        before these options existed stay up to date)."""
        o, settings = self.options, {}
        if "hessian_density" in o.quantities:
            settings["density"] = {"probes": o.density_probes, "steps": o.density_steps,
                                   "grid_points": density.GRID_POINTS, "sigma_of_span": density.SIGMA}
        if o.per_block:
            settings["per_block"] = True
        return settings

    def units(self) -> dict[str, Callable[[], tuple[dict, dict]]]:
        """Each piece of work by name, in order; each returns (flat quantities, details)."""
        units = {name: getattr(self, name) for name in self.options.quantities}
        if self.options.m_sharpness is not None:
            units["m_sharpness"] = self.m_sharpness
        if self.options.landscape:
            units["landscape"] = self.landscape
        if self.other is not None:
            units["interpolation"] = self.interpolation
        if self.options.per_block:
            units["hessian_blocks"] = self.hessian_blocks
        return units

    def execute(self) -> dict:
        """Compute what the cache lacks, writing the cache after each piece; then write analysis.json
        and remove the cache."""
        run_dir = self.run.dir
        done = read_partial(run_dir, self.settings)
        units = self.units()
        # A bar on a terminal only (tqdm's disable=None), on stderr.
        self.bar = tqdm(total=len(units), initial=sum(name in done for name in units), desc=run_dir.name,
                        unit="quantity", leave=False, dynamic_ncols=True, disable=None)
        try:
            for name, compute in units.items():
                if name in done:
                    continue
                self.current, self.passes = name, 0
                quantities, details = compute()
                done[name] = {"quantities": quantities, "details": details}
                io.write_json(run_dir / PARTIAL_FILE, {"format": FORMAT, "settings": self.settings, "done": done})
                self.bar.update()
        finally:
            self.bar.close()
        record = self.record(done)
        io.write_json(run_dir / RESULT_FILE, record)
        (run_dir / PARTIAL_FILE).unlink(missing_ok=True)
        return record

    def _passed(self) -> None:
        self.passes += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.current}: {self.passes} passes over the subset", refresh=False)

    def record(self, done: dict) -> dict:
        """analysis.json's content (the layout gnp's tables read)."""
        quantities, details = {}, {}
        for name in self.units():
            quantities.update(done[name]["quantities"])
            details.update(done[name]["details"])
        precision = self.run.summary.precision or self.run.config.get("precision")
        notes = [f"trained with {precision} autocast; analysed in {self.settings['dtype']}"] \
            if precision in LOW_PRECISION else []
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {
            "format": FORMAT, "quantities": quantities, "details": details, "settings": self.settings,
            "loss": describe_loss(self.label_smoothing, self.l2, self.net),
            "run": {"dir": str(self.run.dir), "epoch": self.run.state["epoch"],
                    "test_error": self.run.summary.test_error},
            "environment": {"commit": self.commit, "device": device_name, "torch_version": torch.__version__},
            "notes": notes,
        }

    # --- the quantities --------------------------------------------------------------------------

    def train_loss(self) -> tuple[dict, dict]:
        """L on the subset, and its two parts: the cross-entropy and the in-loss L2 term."""
        value, _ = self.loss.evaluate()
        l2 = float(self.loss.l2_value())
        return {"train_loss": value.item(), "train_cross_entropy": value.item() - l2, "train_l2": l2}, {}

    def train_error(self) -> tuple[dict, dict]:
        _, error = self.loss.evaluate()
        return {"train_error": error.item()}, {}

    def train_grad_norm(self) -> tuple[dict, dict]:
        _, grad = self.loss.gradient()
        return {"train_grad_norm": norm(grad).item()}, {}

    @contextmanager
    def _refused(self):
        """An estimator's refusal of its settings for this model (a ValueError: --top-k above the parameters,
        Lanczos vectors that do not fit) as this run's one-line error."""
        try:
            yield
        except ValueError as e:
            raise AnalysisError(f"{self.run.dir}: {first_line(e)}") from None

    def hessian_top_eigenvalues(self) -> tuple[dict, dict]:
        with self._refused():
            result = hessian.top_eigenvalues(self.loss, self.options.top_k, sub_seed(self.options.seed, "lanczos"))
        top = result["values"][0] if result["values"] else None
        return {"hessian_top_eigenvalue": top}, {"hessian_top_eigenvalues": {**result, "hvp": self.loss.hvp_choice}}

    def hessian_trace(self) -> tuple[dict, dict]:
        with self._refused():
            result = hessian.trace(self.loss, self.options.trace_method, self.trace_samples,
                                   sub_seed(self.options.seed, "hutchinson"))
        quantities = {"hessian_trace": result["value"], "hessian_trace_l2": self.loss.l2_trace()}
        return quantities, {"hessian_trace": {**result, "hvp": self.loss.hvp_choice}}

    def sam_sharpness(self) -> tuple[dict, dict]:
        result = sharpness.sam_sharpness(self.loss, self.rho, **self._ascent())
        return {"sam_sharpness": result["value"]}, {"sam_sharpness": result}

    def m_sharpness(self) -> tuple[dict, dict]:
        result = sharpness.m_sharpness(self.loss, self.rho, self.options.m_sharpness, **self._ascent())
        return {"m_sharpness": result["value"]}, {"m_sharpness": result}

    def _ascent(self) -> dict:
        o = self.options
        return {"steps": o.ascent_steps, "tol": o.ascent_tol, "starts": o.sharpness_starts,
                "seed": sub_seed(o.seed, "sharpness")}

    def hessian_density(self) -> tuple[dict, dict]:
        o = self.options
        with self._refused():
            result = density.hessian_density(self.loss, o.density_probes, o.density_steps, sub_seed(o.seed, "density"))
        figures = density.plot_density(self.run.dir / "analysis_density", self.title(), result)
        return {}, {"hessian_density": {**result, "figures": [p.name for p in figures]}}

    def hessian_blocks(self) -> tuple[dict, dict]:
        o = self.options
        result = blocks.per_block(self.loss, self.net, o.trace_method, self.trace_samples, sub_seed(o.seed, "lanczos"),
                                  sub_seed(o.seed, "hutchinson"))
        figures = blocks.plot_blocks(self.run.dir / "analysis_blocks", self.title(), result)
        return {}, {"hessian_blocks": {**result, "figures": [p.name for p in figures]}}

    def landscape(self) -> tuple[dict, dict]:
        o = self.options
        generator = torch.Generator(self.device).manual_seed(sub_seed(o.seed, "directions"))
        d1, d2 = (landscape.filter_normalized_direction(self.loss.params, generator) for _ in range(2))
        coords = landscape.coordinates(o.landscape_points, o.landscape_range)
        result = {"directions": landscape.DIRECTIONS, "coordinates": coords,
                  "1d": landscape.surface(self.loss, [d1], coords),
                  "2d": landscape.surface(self.loss, [d1, d2], coords)}
        figures = landscape.plot_landscape(self.run.dir / "analysis_landscape", self.title(), result)
        return {}, {"landscape": {**result, "figures": [p.name for p in figures]}}

    def interpolation(self) -> tuple[dict, dict]:
        coords = landscape.interpolation_coordinates(self.options.landscape_points)
        result = landscape.interpolation(self.loss, self.net, self.other, coords)
        title = f"{self.title()}\nto {self.options.between} (t = 1); loss on the first run's subset"
        figures = landscape.plot_interpolation(self.run.dir / "analysis_interpolation", title, result)
        return {}, {"interpolation": {**result, "other": str(self.options.between),
                                      "figures": [p.name for p in figures]}}

    def title(self) -> str:
        s = self.run.summary
        return " ".join(filter(None, [s.dataset, s.model, s.method, method_label(self.run.config["method"]),
                                      f"seed {s.seed}: {self.run.dir}"]))


def subset_loss(run_dir: str | Path, *, subset: int | None = None, batch_size: int = 500, seed: int = 0,
                float64: bool = False, hvp_method: str = "auto", device: str | torch.device = "cpu") -> SubsetLoss:
    """The loss that `python -m gnp.analysis RUN_DIR` with these options analyses, for checking its numbers
    with other tools: the run's model with its final weights in eval mode (`.model`), the seeded subset of
    its training images in batches on `device` (`.batches`: (images, labels) pairs), and the loss as a
    function of the parameters, `.loss_fn(params)` (params: tensors shaped as `.params`, named `.names`),
    which torch.func can differentiate. AnalysisError for a run that did not finish or cannot be read."""
    try:
        run = load_finished_run(Path(run_dir))
    except Skipped as skipped:
        raise AnalysisError(f"{run_dir} did not finish (status {skipped.status}): there is nothing to analyse") \
            from None
    options = Options(subset=subset, batch_size=batch_size, seed=seed, float64=float64, hvp_method=hvp_method)
    return Analysis(run, options, torch.device(device)).loss


def load_other_run(path: Path) -> FinishedRun:
    """The run at the other end of an interpolation: it must have finished too."""
    if not (path / CONFIG_FILE).is_file():
        raise AnalysisError(f"--between: {path} is not a run directory (no {CONFIG_FILE})")
    try:
        return load_finished_run(path)
    except Skipped as skipped:
        raise AnalysisError(f"--between: {path} did not finish (status {skipped.status}); give a finished run") \
            from None


def read_partial(run_dir: Path, settings: dict) -> dict:
    """The quantities a killed analysis with the same settings left, else nothing."""
    try:
        partial = json.loads((run_dir / PARTIAL_FILE).read_text())
    except (OSError, ValueError):
        return {}
    same = partial.get("format") == FORMAT and partial.get("settings") == json.loads(io.dumps(settings))
    return partial.get("done", {}) if same else {}


def is_up_to_date(run_dir: Path, settings: dict) -> bool:
    """analysis.json exists and was made with these settings."""
    try:
        saved = json.loads((run_dir / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return False
    return saved.get("format") == FORMAT and saved.get("settings") == json.loads(io.dumps(settings))
