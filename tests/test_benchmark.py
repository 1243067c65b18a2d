"""`make bench` (scripts/benchmark.py over gnp.bench): its hand-written two-pass step (the reference
GNP's step is timed against) is the GNP update, checked against GNP and a closed form; a tiny run
writes every field that the speed tables of docs/speed.md and the tables' time estimates read; the page's
tables are what the generator makes of the committed JSON. No timing is asserted."""
import copy
import importlib.util
import json
import math
import statistics
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gnp import tables
from gnp import measurements as files
from gnp.analysis import __main__ as analysis_command
from gnp.augment import STYLES, presets
from gnp.bench import speed_tables, timing
from gnp.bench.settings import FastPaths, ModelSpec, parse_model, run_overrides
from gnp.compose import compose_config
from gnp.bench.stages import loop as loop_stage, methods
from gnp.bench.steps import two_pass_step
from gnp.config import train_steps_per_epoch
from gnp.methods import GNP
from gnp.models import MODELS
from conftest import ROOT


def _load_command():
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark"] = module
    spec.loader.exec_module(module)
    return module


benchmark = _load_command()


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    return net.double()


def test_the_two_pass_step_is_gradient_norm_penaltys_step():
    """Three steps with SGD momentum, in-loss L2 and an active clip: parameters, BatchNorm statistics
    and momentum agree to float64 rounding."""
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    reference, suite = _tiny_net(), _tiny_net()
    settings = dict(r=0.1, alpha=0.8, l2=1e-3, max_grad_norm=0.05)
    base_ref = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    base = torch.optim.SGD(suite.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    opt = GNP(suite, base, **settings)
    for _ in range(3):
        two_pass_step(list(reference.parameters()), list(reference.buffers()), base_ref,
                                lambda: F.cross_entropy(reference(x), y), **settings)
        opt.step(lambda: F.cross_entropy(suite(x), y))
        assert opt.last_step.final_grad_norm.item() == pytest.approx(0.05, rel=1e-4)  # the clip was active
    for (name, a), b in zip(reference.state_dict().items(), suite.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)
    for a, b in zip(base_ref.state_dict()["state"].values(), base.state_dict()["state"].values()):
        torch.testing.assert_close(a["momentum_buffer"], b["momentum_buffer"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("max_grad_norm", [None, 0.1])
def test_the_two_pass_step_follows_the_formula_on_least_squares(max_grad_norm):
    """L(w) = 0.5 * mean((Xw - y)^2) has the gradient X^T (Xw - y) / n: one plain SGD step by hand."""
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(20, 5, dtype=torch.float64, generator=generator)
    y = torch.randn(20, dtype=torch.float64, generator=generator)
    w0 = torch.randn(5, dtype=torch.float64, generator=generator)
    r, alpha, l2, lr = 0.2, 0.7, 0.01, 0.5

    def grad(w):
        return X.T @ (X @ w - y) / len(y) + l2 * w

    d = grad(w0) / grad(w0).norm()
    g = (1 - alpha) * d + alpha * grad(w0 + r * d)
    if max_grad_norm is not None:
        g = g * min(1.0, max_grad_norm / (g.norm().item() + 1e-6))  # clip_grad_norm_'s documented coefficient
    expected = w0 - lr * g

    w = nn.Parameter(w0.clone())
    optimizer = torch.optim.SGD([w], lr=lr)
    two_pass_step([w], [], optimizer, lambda: 0.5 * ((X @ w - y) ** 2).mean(), r=r, alpha=alpha,
                            l2=l2, max_grad_norm=max_grad_norm)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_each_fast_path_pair_differs_in_that_path_alone(device):
    main = FastPaths("bf16" if device == "cuda" else "fp32", True, device == "cuda", device == "cuda")
    variants = methods.step_variants(main, ["fp32", "bf16", "fp16"])
    pairs = methods.fast_path_pairs(variants, main)
    key = {"compile": "compile", "channels_last": "channels_last", "fused": "fused", "bf16": "precision",
           "fp16": "precision"}
    assert {p["path"] for p in pairs} == set(key) - ({"compile"} if device == "cpu" else set())
    for pair in pairs:
        on, off = asdict(variants[pair["on"]].paths), asdict(variants[pair["off"]].paths)
        assert {k for k in on if on[k] != off[k]} == {key[pair["path"]]}
        assert variants[pair["on"]].method == variants[pair["off"]].method == "gnp"
        if pair["path"] in ("bf16", "fp16"):
            assert (on["precision"], off["precision"]) == (pair["path"], "fp32")
        else:
            assert on[pair["path"]] is True and off[pair["path"]] is False
    compiled = [name for name, v in variants.items() if v.paths.compile]
    main_setting = {*methods.METHODS, "two_pass", "gnp[fused=off]"}
    assert set(compiled) == (main_setting if device == "cuda" else set())


# Width 16: a narrower model's strided 1x1 convolutions are refused in the channels_last variant
# (onednn_nhwc_hazard).
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench_cpu.json"
    code = benchmark.main(["--device", "cpu", "--models", "resnet18:width=16,batch=8", "--steps", "1", "--repeats", "2",
                           "--warmup", "0", "--precisions", "fp32", "--loop-images", "16", "--test-images", "8",
                           "--loop-epochs", "2", "--loop-repeats", "1", "--loader-batches", "1", "--skip", "exact",
                           "--analysis-model", "resnet18:width=2,batch=8",
                           "--analysis-args", "--only train_loss,hessian_trace --trace-samples 2", "--out", str(out)])
    assert code == 0
    return out, json.loads(out.read_text())


@pytest.mark.slow
def test_a_tiny_run_records_its_measurements_consistently(tiny_run, tmp_path):
    _, data = tiny_run
    tmp_data = tmp_path
    assert data["format"] == files.FORMAT and data["complete"] is True
    assert {"device", "device_name", "device_count", "cpu_threads", "torch", "cuda"} <= data["environment"].keys()
    assert data["environment"]["device"] == "cpu" and "--steps 1" in data["command"]
    assert data["settings"]["models"] == [{"name": "resnet18", "options": {"width": 16}, "batch_size": 8, "steps": 1}]
    [model] = data["models"]
    assert (model["model"], model["options"], model["batch_size"]) == ("resnet18", {"width": 16}, 8)
    assert model["parameters"] == sum(p.numel() for p in MODELS["resnet18"](width=16).parameters())
    # every method of conf/method/ but those built on another's config (gnp_warmup), and GNP with hybrid steps
    assert set(methods.METHODS) == {"plain", "sam", "gnp", "asam", "gsam", "gam", "looksam", "friendlysam", "wsam",
                                    "hybrid"}
    assert set(model["variants"]) == {*methods.METHODS, "two_pass", "gnp[channels_last=on]", "gnp[fused=on]"}
    assert {name for name, v in model["variants"].items() if v["role"] == "method"} == set(methods.METHODS)
    assert model["variants"]["two_pass"]["role"] == "reference"
    assert all(v["role"] == "fast_path" for name, v in model["variants"].items() if name.startswith("gnp["))
    # what each method says it costs (its expected passes), and what its steps reported
    cfg = compose_config(*run_overrides(ModelSpec("resnet18", {"width": 2}, 8, 1), "looksam",
                                        FastPaths(**model["main"]), torch.device("cpu"), tmp_data), validated=True)
    total_steps = cfg.train.epochs * train_steps_per_epoch(cfg)
    looksam = 1 + math.ceil(total_steps / 5) / total_steps  # a SAM step every 5 steps of its run, the first one
    assert {name: v["passes_per_step"] for name, v in model["variants"].items() if v["role"] == "method"} == {
        "plain": 1, "sam": 2, "gnp": 2, "asam": 2, "gsam": 2, "friendlysam": 2, "wsam": 2, "gam": 4,
        "looksam": pytest.approx(looksam), "hybrid": 1.5}
    assert {name: v["label"] for name, v in model["variants"].items() if v["role"] == "method"} == {
        "plain": "Plain", "sam": "SAM", "gnp": "GNP", "asam": "ASAM", "gsam": "GSAM", "friendlysam": "FriendlySAM",
        "wsam": "WSAM", "gam": "GAM", "looksam": "LookSAM", "hybrid": "GNP"}
    assert model["variants"]["gam"]["passes_taken"] == 4
    for v in model["variants"].values():
        timing = v["ms_per_step"]
        assert len(timing["samples"]) == 2 and timing["median"] == statistics.median(timing["samples"])
        assert timing["min"] <= timing["q1"] <= timing["median"] <= timing["q3"] <= timing["max"]
        if "mean_ms_per_step" not in v:  # hybrid's rate is its mean's (below)
            assert v["images_per_second"] == pytest.approx(8 * 1000 / timing["median"])
    assert model["variants"]["plain"]["two_pass_fraction"] == 0
    assert all(model["variants"][name]["two_pass_fraction"] == 1
               for name in ("sam", "gnp", "asam", "gsam", "gam", "friendlysam", "wsam", "two_pass"))
    assert model["variants"]["looksam"]["passes_taken"] == 1 + model["variants"]["looksam"]["two_pass_fraction"]
    hybrid = model["variants"]["hybrid"]
    assert hybrid["two_pass_fraction"] in (0, 0.5, 1)  # over its 2 timed steps
    assert hybrid["images_per_second"] == pytest.approx(8000 / hybrid["mean_ms_per_step"])
    samples = {name: v["ms_per_step"]["samples"] for name, v in model["variants"].items()}
    median = {name: v["ms_per_step"]["median"] for name, v in model["variants"].items()}
    perturbing = ["sam", "gnp", "asam", "gsam", "gam", "looksam", "friendlysam", "wsam"]
    pairs = [(name, "plain") for name in [*perturbing, "two_pass"]] + [(name, "two_pass") for name in perturbing]
    assert set(model["ratios"]) == {f"{a}/{b}" for a, b in pairs} | {"hybrid/plain", "hybrid_expected/plain"}
    for a, b in pairs:  # paired by round, median of 2 rounds
        per_round = [samples[a][r] / samples[b][r] for r in range(2)]
        assert model["ratios"][f"{a}/{b}"] == pytest.approx(sum(per_round) / 2)
    assert model["ratios"]["hybrid/plain"] == pytest.approx(hybrid["mean_ms_per_step"] / median["plain"])
    # each method's limit against the two-pass step: its passes over 2, plus its class's element-wise allowance
    overhead = {"sam": 0, "gnp": 0, "asam": 0.05, "gsam": 0.05, "gam": 0.05, "looksam": 0.05, "friendlysam": 0.05,
                "wsam": 0.05}
    assert model["limits"] == {"gnp/plain": 2.05, **{
        f"{name}/two_pass": pytest.approx(1.02 * model["variants"][name]["passes_per_step"] / 2 + overhead[name])
        for name in perturbing}}
    assert model["within_limits"] == {key: model["ratios"][key] <= limit for key, limit in model["limits"].items()}
    channels_last = next(p for p in model["fast_paths"] if p["path"] == "channels_last")
    off, on = samples["gnp"], samples["gnp[channels_last=on]"]  # on the CPU the suite's choice is off
    assert channels_last["speedup"] == pytest.approx((off[0] / on[0] + off[1] / on[1]) / 2)
    memory = model["memory"]
    assert memory["parameter_bytes"] == 4 * model["parameters"] and memory["plain_bytes"] > 0
    assert memory["limit_bytes"] == pytest.approx((memory["plain_bytes"] + 2 * memory["parameter_bytes"]) * 1.05)
    assert model["evaluation"]["images"] == 8 and model["evaluation"]["images_per_second"] > 0
    assert set(data["loader"]["styles"]) == set(STYLES)
    assert all(set(measured) == set(presets()) for measured in data["loader"]["styles"].values())
    basic = data["loader"]["styles"]["official"]["basic"]
    assert basic["times_gnp_step"][model["label"]] == pytest.approx(
        basic["images_per_second"] / model["variants"]["gnp"]["images_per_second"])
    [loop] = data["loop"]
    for method in ("plain", "gnp"):
        run = loop["methods"][method]
        assert run["ok"] and len(run["epoch_images_per_second"]) == 1 and len(run["epoch_images_per_second"][0]) == 2
        assert run["images_per_second"] == run["epoch_images_per_second"][0][1]  # the first epoch is the warm-up
        assert len(run["bare_step_ms"]["samples"]) == 2  # one block before the run, one after
        assert run["bare_step_images_per_second"] == pytest.approx(8000 / run["bare_step_ms"]["median"])
        assert run["loop/bare_step"] == pytest.approx(run["images_per_second"] / run["bare_step_images_per_second"])
        summary = run["summaries"][0]
        assert summary["method"] == loop_stage.METHODS[method] and summary["status"] == "finished"
    assert "checks" not in data and data["checks_failed"] == []


@pytest.mark.slow
def test_a_tiny_run_records_the_cost_of_each_layout(tiny_run):
    """Batch 8 of a BatchNorm model: 1, 2 and 4 shards (8 would be shards of one image); each one's time is
    paired with one shard's by round, its peak memory divided by one shard's."""
    _, data = tiny_run
    layout = data["shards"]
    assert (layout["model"], layout["batch_size"], layout["method"]) == ("resnet18", 8, "gnp")
    assert list(layout["shards"]) == ["1", "2", "4"]
    one = layout["shards"]["1"]
    for record in layout["shards"].values():
        per_round = [a / b for a, b in zip(record["ms_per_step"]["samples"], one["ms_per_step"]["samples"])]
        assert record["time/one_shard"] == pytest.approx(statistics.median(per_round))
        assert record["peak_bytes"] > 0 and record["memory/one_shard"] == pytest.approx(
            record["peak_bytes"] / one["peak_bytes"])


@pytest.mark.slow
def test_a_tiny_run_records_what_an_analysis_costs(tiny_run):
    _, data = tiny_run
    analysis = data["analysis"]
    assert (analysis["model"], analysis["options"], analysis["batch_size"]) == ("resnet18", {"width": 2}, 8)
    hvp = analysis["hvp"]
    assert hvp["settings"] == {"precision": "fp32", "channels_last": False, "compile": False, "fused": False}
    samples = {name: hvp["ms"][name]["samples"] for name in ("hvp", "step")}
    assert len(samples["hvp"]) == len(samples["step"]) == 2  # --repeats 2
    assert hvp["hvp/step"] == pytest.approx(sum(a / b for a, b in zip(samples["hvp"], samples["step"])) / 2)
    # each product method of a ResNet (both exact), and the one --hvp auto picks is the one reported
    assert set(hvp["methods"]) == {"double-backward", "forward-over-reverse"} and hvp["unavailable"] == {}
    chosen = hvp["methods"][hvp["chosen"]["method"]]
    assert hvp["hvp/step"] == chosen["hvp/step"] and samples["hvp"] == chosen["ms"]["samples"]
    for method in hvp["methods"].values():
        assert method["hvp/step"] == pytest.approx(statistics.median(
            a / b for a, b in zip(method["ms"]["samples"], samples["step"])))
        block = method["block"]  # per product of a block taken together, as the trace estimators take them
        assert block["products"] == 4 and block["hvp/step"] == pytest.approx(statistics.median(
            a / b for a, b in zip(block["ms_per_product"]["samples"], samples["step"])))
    run = analysis["run"]
    assert run["summary"]["method"] == "plain" and run["summary"]["status"] == "finished"
    assert len(run["epoch_training_seconds"]) == 2 and run["epoch_seconds"] == run["epoch_training_seconds"][1]
    assert run["analysis/epoch"] == pytest.approx(run["analysis_seconds"] / run["epoch_seconds"])
    # on a tenth of the 16 training images, with the command's own defaults but for what is shrunk here
    defaults = analysis_command.parse_args(["run"])
    settings = run["analysis_settings"]
    assert run["analysis_arguments"] == ["--device", "cpu", "--subset", "1", "--only", "train_loss,hessian_trace",
                                         "--trace-samples", "2"]
    assert (settings["subset"], settings["quantities"], settings["trace_samples"]) == (
        1, ["train_loss", "hessian_trace"], 2)
    assert {k: settings[k] for k in ("batch_size", "top_k", "ascent_steps", "seed")} == {
        k: getattr(defaults, k) for k in ("batch_size", "top_k", "ascent_steps", "seed")}
    assert settings["landscape"] is None and run["hvp_count"] == 2  # the trace's products
    assert (settings["trace_method"], settings["hvp_method"]) == ("hutch++", "auto")
    # the previous defaults (a Hutchinson trace by double backward), with the options given still winning
    previous = run["previous"]
    assert previous["analysis_settings"]["trace_method"] == "hutchinson" and previous["hvp_count"] == 2
    assert previous["analysis_settings"]["hvp_method"] == "double-backward"
    assert run["analysis/previous"] == pytest.approx(run["analysis_seconds"] / previous["analysis_seconds"])
    trace, old = analysis["trace"], previous["details"]["hessian_trace"]
    assert trace["hutchinson_products_for_equal_error"] == pytest.approx(
        2 * (old["stderr"] / run["details"]["hessian_trace"]["stderr"]) ** 2)
    assert trace["products/hutchinson"] == pytest.approx(2 / trace["hutchinson_products_for_equal_error"])


@pytest.mark.slow
def test_the_step_ratios_are_printed_beside_their_limits(tiny_run, capsys):
    [model] = tiny_run[1]["models"]
    methods.show(model)
    out = capsys.readouterr().out
    for key, limit in model["limits"].items():
        verdict = "within" if model["ratios"][key] <= limit else "OVER"
        assert f"{key} {model['ratios'][key]:.3f} (limit {limit}: {verdict})" in out


@pytest.mark.slow
def test_the_speed_tables_and_the_time_estimates_read_a_tiny_run(tiny_run):
    out, data = tiny_run
    model = data["models"][0]
    text = speed_tables.tables(out.parent)
    row = next(line for line in text.splitlines() if "ResNet-18 (width 16), 8 |" in line)
    assert f"| {model['variants']['plain']['ms_per_step']['median']:.3g} |" in row
    header = next(line for line in text.splitlines() if line.startswith("| measured on | model, batch | setting"))
    cells = dict(zip(header.split(" | "), row.split(" | ")))
    for key, ratio in model["ratios"].items():  # a column per method and per comparison, labelled by its class
        name, _, against = key.partition("/")
        if name in ("two_pass", "hybrid_expected"):
            continue
        label = "hybrid p=0.5" if name == "hybrid" else model["variants"][name]["label"]
        assert cells[f"{label} ÷ {'plain' if against == 'plain' else 'two-pass'}"].startswith(f"{ratio:.2f}×"), key
    assert sum(line.startswith(f"| {data['environment']['cpu_threads']} CPU thread") for line in text.splitlines()) == 7  # steps, fast paths, loop, 2 augmentation styles, analysis, shards
    analysis = next(line for line in text.splitlines() if "products" in line and "CPU thread" in line)
    assert f"| {data['analysis']['hvp']['hvp/step']:.2f}× (" in analysis
    assert analysis.endswith(f"| {data['analysis']['run']['analysis/epoch']:,.0f}× |")
    # a shrunk model is a measurement of itself alone: the estimates match a run's model options exactly
    assert {(t.model, str(t.options)) for t in tables.read_throughput(out.parent)} == {("resnet18", "{'width': 16}")}

    full = copy.deepcopy(data)
    full["models"][0]["options"] = {}
    check = {"label": "pyramidnet272 bf16", "model": "pyramidnet272", "options": {}, "method": "gnp",
             "passes_per_step": 2.0, "batch_size": 128, "images_per_second": 100.0, "ok": True}  # as run_checks has it
    full["checks"] = {"runs": [check, {**check, "model": "vit_s", "ok": False}]}
    (out.parent / "full.json").write_text(json.dumps(full))
    [epoch] = [t for t in tables.read_throughput(out.parent) if t.upper_bound]  # a failed run is no measurement
    assert (epoch.model, epoch.method, epoch.images_per_second) == ("pyramidnet272", "gnp", 100.0)
    measured = {t.method: t for t in tables.read_throughput(out.parent) if not t.upper_bound and not t.options}
    assert set(measured) == set(methods.METHODS)
    assert {m: t.passes for m, t in measured.items()} == {
        m: model["variants"][m]["passes_taken"] for m in measured} and measured["gnp"].passes == 2
    assert measured["gam"].passes == 4 and measured["hybrid"].passes == 1 + model["variants"]["hybrid"]["two_pass_fraction"]
    for method, t in measured.items():
        assert t.model == "resnet18" and not t.upper_bound
        variant = model["variants"][method]  # a hybrid step is costed by its mean over its mix of step kinds
        ms = variant["mean_ms_per_step"] if method == "hybrid" else variant["ms_per_step"]["median"]
        assert t.images_per_second == pytest.approx(8000 / ms)
        threads = data["environment"]["cpu_threads"]
        assert t.device == {1: "cpu (1 thread)"}.get(threads, f"cpu ({threads} threads)")
        assert t.how == measured["plain"].how
    (out.parent / "full.json").unlink()


def test_the_speed_tables_of_the_docs_are_generated_from_the_committed_json():
    text = speed_tables.PAGE.read_text()
    assert speed_tables.current(text) == speed_tables.tables(), \
        "docs/speed.md's speed tables are stale: run python scripts/benchmark.py --docs"


@pytest.mark.slow
def test_the_speed_tables_are_replaced_between_their_markers(tmp_path, tiny_run):
    out, _ = tiny_run
    path = tmp_path / "speed.md"
    path.write_text(f"# x\n\n## Speed\nbefore\n{speed_tables.BEGIN}\nold table\n{speed_tables.END}\nafter\n")
    assert speed_tables.update(path, out.parent) is True
    generated = speed_tables.tables(out.parent)
    assert path.read_text() == f"# x\n\n## Speed\nbefore\n{speed_tables.BEGIN}\n{generated}\n{speed_tables.END}\nafter\n"
    assert speed_tables.current(path.read_text()) == speed_tables.tables(out.parent)
    assert speed_tables.update(path, out.parent) is False  # already current
    path.write_text("# x\n")
    with pytest.raises(tables.TableError, match=f"{path} has no '<!-- speed tables"):
        speed_tables.update(path, out.parent)
    assert path.read_text() == "# x\n"


@pytest.mark.parametrize("spec,message", [
    ("resnet18:widht=3", "has no option(s) widht"),
    ("resnet18:width", "expected NAME or NAME:KEY=VALUE"),
    ("resnet99", "is not a known model"),
    ("resnet18:batch=0", "batch=0 must be an integer >= 1"),
])
def test_bad_model_specs_are_one_line_errors(spec, message, capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--models", spec])
    assert message in capsys.readouterr().err


def test_analysis_options_are_checked_before_anything_is_measured(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--device", "cpu", "--analysis-args", "--top-k 0"])
    err = capsys.readouterr().err
    assert "--top-k: 0 is invalid: it must be an integer >= 1" in err
    assert "--analysis-args '--top-k 0' are not options of python -m gnp.analysis" in err


def test_default_options_are_dropped_from_a_model_spec():
    assert parse_model("resnet18:width=64,batch=128,steps=3") == ModelSpec("resnet18", {}, 128, 3)
    assert parse_model("vit_s:depth=1") == ModelSpec("vit_s", {"depth": 1}, None, None)


def test_a_mixed_variant_costs_the_mean_of_its_steps_whatever_one_block_did():
    """Blocks of 2 steps, a plain step 10 ms and a two-pass one 20 ms: the steps cost 15 ms on average
    (3 two-pass steps of 6), also when one block was slowed down by another process."""
    two_pass = [True, False, True, True, False, False]
    assert timing.mixed_step_ms([15.0, 20.0, 10.0], two_pass, 10.0, 20.0) == pytest.approx(15.0)
    assert timing.mixed_step_ms([15.0, 60.0, 10.0], two_pass, 10.0, 20.0) == pytest.approx(15.0)
    assert timing.mixed_step_ms([16.5, 22.0, 11.0], two_pass, 10.0, 20.0) == pytest.approx(16.5)  # all 10% slower


def test_a_failing_stage_is_recorded_and_fails_the_run_while_the_others_go_on(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(methods, "measure_model", broken)
    out = tmp_path / "bench.json"
    code = benchmark.main(["--device", "cpu", "--models", "resnet18:width=2,batch=8", "resnet18:width=3,batch=8",
                           "--skip", "memory", "evaluation", "shards", "exact", "loader", "loop", "analysis",
                           "--loop-images", "8", "--test-images", "8",
                           "--out", str(out)])
    data = json.loads(out.read_text())
    assert code == 1 and data["complete"] is True and data["models"] == []
    assert set(data["errors"]) == {"steps resnet18 (width=2)", "steps resnet18 (width=3)"}  # the second still ran
    assert all(e.startswith("RuntimeError: CUDA error: an illegal memory access (at ") for e in data["errors"].values())
    assert len(data["checks_failed"]) == 2
