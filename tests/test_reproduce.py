"""scripts/reproduce.py and the table files: every cell composes and each method's step runs on a
shrunk model, the recipes are the published ones, the state of each run directory is read right,
a second --launch skips finished runs and resumes interrupted ones, and time estimates follow the
measured throughput."""
import functools
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import TINY_MODELS, Forked, compose_config, train_py
from gnp import tables
from gnp.config import build_method
from gnp.data import CLASSES
from gnp.models import build_model
from gnp.training import build_optimizer
from test_tables import DIGITS, DIGITS_METHODS, load_script, write_run

reproduce = load_script("reproduce")
RUNNABLE = [name for name in tables.table_names() if tables.load_table(name).reason is None]


def _nested(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


@functools.cache
def _plans(name: str) -> tuple[tables.Plan, ...]:
    """Every cell of the table `name`, composed and validated once for the tests of this module that read them."""
    return tuple(tables.make_plans(tables.load_table(name)))


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNNABLE)
def test_every_cell_composes_and_each_method_takes_a_step(name):
    plans = _plans(name)  # composes and validates every cell
    assert len(plans) == len(tables.cells(tables.load_table(name)))
    steps = {}  # one step of each method on each model (with the settings of its first cell)
    for plan in plans:
        c = plan.config
        steps.setdefault((c["model.name"], c["method.name"], c["optimizer.name"]), c)
    for c in steps.values():
        cfg = OmegaConf.create(_nested(c))
        torch.manual_seed(0)
        options = {k: v for k, v in cfg.model.items() if k != "name"} | TINY_MODELS[cfg.model.name]
        model = build_model(cfg.model.name, CLASSES[cfg.dataset.name], **options)
        opt = build_method(cfg, model, build_optimizer(cfg.optimizer, model, torch.device("cpu")), steps_per_epoch=10)
        images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, CLASSES[cfg.dataset.name], (2,))
        before = [p.detach().clone() for p in model.parameters()]
        loss = opt.step(lambda: F.cross_entropy(model(images), labels))
        assert torch.isfinite(loss) and opt.last_step.g1_norm > 0
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNNABLE)
def test_every_table_shrinks_to_a_one_epoch_smoke_test(name):
    for plan in tables.make_plans(tables.load_table(name), shrink=tables.Shrink(limit_train=64, epochs=1)):
        config = plan.config  # composed and validated with the shrink's overrides
        assert config["train.epochs"] == 1 and config["dataset.limit_train"] == 64
        assert config["train.warmup_epochs"] == 0 and (config.get("method.warmup_epochs") or 0) <= 1
        assert plan.directory.parts[-5].endswith("-smoke-n64-e1")


def test_cells_follow_the_published_recipes():
    plans = _plans("cnn") + _plans("vit")
    recipes = {}
    for plan in plans:
        c, cell = plan.config, plan.cell
        expected = {"plain": ("plain", None, None), "gnp": ("gnp", 0.1, 0.8),
                    "sam": ("sam", 0.05 if cell.dataset == "cifar10" else 0.1, None)}[cell.method]
        assert (c["method.name"], c.get("method.r"), c.get("method.alpha")) == expected
        assert c["dataset.name"] == cell.dataset and c["model.name"] == cell.row
        assert c["aug.name"] == ("autoaugment_mixcut" if cell.row == "pyramidnet272" else cell.column)
        if cell.row not in recipes:  # epochs, batch, lr and l2 come from the model's config alone
            recipes[cell.row] = compose_config(f"model={cell.row}")
        recipe = recipes[cell.row]
        assert (c["train.epochs"], c["train.batch_size"], c["optimizer.name"], c["optimizer.lr"],
                c["optimizer.weight_decay"], c["optimizer.weight_decay_mode"]) == \
            (recipe.train.epochs, recipe.train.batch_size, recipe.optimizer.name, recipe.optimizer.lr,
             recipe.optimizer.weight_decay, recipe.optimizer.weight_decay_mode)
    assert recipes["vit_b"].optimizer.name == "adamw" and recipes["pyramidnet272"].train.epochs == 1800
    assert len(plans) == 2 * (4 * 3 + 1) * 3 + 2 * 3 * 3


def test_cells_that_cannot_run_yet_say_why_and_launch_nothing(tmp_path, monkeypatch):
    spec = yaml.safe_load((tables.TABLE_DIR / "digits.yaml").read_text())
    spec["methods"]["gnp"].update(runnable=False, reason="needs method.future_switch")
    (tmp_path / "future.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setattr(tables.spec, "TABLE_DIR", tmp_path)
    table = tables.load_table("future")
    cells = tables.cells(table)
    assert {c.reason for c in cells if c.method == "gnp"} == {"needs method.future_switch"}
    assert {c.reason for c in cells if c.method != "gnp"} == {None}
    assert {p.cell.method for p in tables.make_plans(table) if p.expected is None} == {"gnp"}


def test_the_gr_warmup_table_runs_the_follow_up_papers_recipe():
    configs = {plan.cell.method: plan.config for plan in _plans("vit_gr_warmup")}
    for method, (name, r, alpha, warmup) in {"adam": ("plain", None, None, None), "adam_gr": ("gnp", 0.1, 1.0, "none"),
                                             "adam_gr_zero_warmup": ("gnp_warmup", 0.1, 1.0, "zero")}.items():
        c = configs[method]
        assert (c["method.name"], c.get("method.r"), c.get("method.alpha"), c.get("method.warmup")) == \
            (name, r, alpha, warmup)
        assert (c["optimizer.name"], c["optimizer.lr"], c["optimizer.weight_decay"]) == ("adamw", 1e-3, 0.3)
        assert (c["train.warmup_epochs"], c["train.epochs"], c["train.batch_size"]) == (40, 300, 256)
    assert configs["adam_gr_zero_warmup"]["method.warmup_epochs"] == 40


def _dir(root, method, seed, table="digits"):
    return root / table / "digits" / "resnet18" / "none" / method / f"seed{seed}"


def test_every_command_with_the_state_of_its_run(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(_dir(root, "plain", 0), DIGITS + DIGITS_METHODS["plain"], 0, 2.0)
    write_run(_dir(root, "plain", 1), DIGITS + DIGITS_METHODS["plain"], 1, 2.0, status="stopped")
    write_run(_dir(root, "sam", 1), DIGITS + DIGITS_METHODS["sam"], 1, 2.0, summary=False)
    write_run(_dir(root, "sam", 2), DIGITS + DIGITS_METHODS["sam"], 2, 2.0, status="failed")
    write_run(_dir(root, "gnp", 0), DIGITS + DIGITS_METHODS["gnp"], 0, 2.0, status="diverged")
    write_run(_dir(root, "gnp", 1), DIGITS + ("method=gnp", "method.r=0.2", "method.alpha=0.8"), 1, 2.0)
    write_run(_dir(root, "gnp", 2), DIGITS + DIGITS_METHODS["gnp"], 2, 2.0)
    (_dir(root, "gnp", 2) / "summary.json").write_text('{"status": "fini')  # cut short by a copy
    write_run(_dir(root, "plain", 2), DIGITS + DIGITS_METHODS["plain"], 2, 2.0, status="stopped")
    (_dir(root, "plain", 2) / "checkpoint.pt").unlink()  # a second Ctrl-C before the first checkpoint:
    (_dir(root, "plain", 2) / "metrics.jsonl").write_text("")  # no epoch done, nothing saved
    assert reproduce.main(["digits", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "1 runs are unreadable: a file of theirs is damaged (named above)" in out
    lines = [line for line in out.splitlines() if line.startswith("  [")]
    states = {line.split("hydra.run.dir=")[1].split()[0].split("/digits/resnet18/none/")[1]: line[3:15].strip()
              for line in lines}
    assert states == {"plain/seed0": "finished", "plain/seed1": "partial", "plain/seed2": "interrupted",
                      "sam/seed0": "missing", "sam/seed1": "partial", "sam/seed2": "failed",
                      "gnp/seed0": "diverged", "gnp/seed1": "conflict", "gnp/seed2": "unreadable"}
    interrupted = next(line for line in lines if "plain/seed2" in line)
    assert interrupted.endswith("# no checkpoint to resume from: it starts again, stopped")
    conflict = next(line for line in lines if "gnp/seed1" in line)
    assert "holds another run (method.r: 0.2 -> 0.1)" in conflict
    damaged = next(line for line in lines if "gnp/seed2" in line)
    assert damaged.endswith(f"# {_dir(root, 'gnp', 2)}/summary.json: not valid JSON, cut short? (Unterminated string "
                            f"starting at: line 1 column 12 (char 11))")
    assert lines[0].endswith(f"method=plain seed=0 hydra.run.dir={_dir(root, 'plain', 0)}")


def test_a_launch_that_leaves_conflicting_runs_undone_fails(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(_dir(root, "plain", 1), DIGITS + DIGITS_METHODS["plain"], 1, 2.0)
    write_run(_dir(root, "sam", 1), DIGITS + DIGITS_METHODS["sam"], 1, 2.0)
    write_run(_dir(root, "gnp", 1), DIGITS + ("method=gnp", "method.r=0.2", "method.alpha=0.8"), 1, 2.0)
    assert reproduce.main(["digits", "--root", str(root), "--seeds", "1", "--launch"]) == 1
    out, err = capsys.readouterr()
    assert "1 runs conflict: their folders hold runs with other settings" in out and "== launch" not in out
    assert err.strip() == "1 runs were not launched: their folders hold other runs or damaged files (see above)"


def _launch_in_this_process(foreground, command: list[str]) -> int:
    """A launch's `python train.py -m ...` run in this process (conftest.train_py), its output printed: for tests of
    which runs a launch starts, not of its process (the signal tests below start one)."""
    assert command[:2] == [sys.executable, "train.py"], command
    done = train_py(*command[2:])
    print(done.stdout, end="")
    print(done.stderr, end="", file=sys.stderr)
    return done.returncode


@pytest.mark.slow
def test_a_second_launch_skips_finished_runs_and_resumes_interrupted_ones(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(reproduce.Foreground, "run", _launch_in_this_process)
    tiny = ["digits", "--root", str(tmp_path), "--seeds", "0", "--limit-train", "64", "--epochs", "1",
            "--override", "model.width=4", "--override", "wandb.mode=disabled", "--override", "device=cpu", "--launch"]
    assert reproduce.main(tiny) == 0
    smoke = tmp_path / "digits-smoke-n64-e1"
    summaries = {m: _dir(tmp_path, m, 0, smoke.name) / "summary.json" for m in DIGITS_METHODS}
    first = capfd.readouterr().out
    assert first.count("== launch") == 3 and all(s.exists() for s in summaries.values())
    assert json.loads(summaries["sam"].read_text())["epochs"] == 1
    finished = summaries["plain"].stat().st_mtime_ns

    summaries["sam"].unlink()  # as if killed after its last checkpoint: partial, resumable
    assert reproduce.main(tiny) == 0
    second = capfd.readouterr().out
    launches = [line for line in second.splitlines() if line.startswith("== launch")]
    assert len(launches) == 1 and "method=sam " in launches[0] and "seed=0 " in launches[0]
    assert "Resuming" in second and summaries["sam"].exists()
    assert summaries["plain"].stat().st_mtime_ns == finished


@pytest.mark.slow
def test_ctrl_c_during_a_launch_stops_its_run_with_a_checkpoint_and_launches_nothing_more(tmp_path):
    long = ["digits", "--root", str(tmp_path), "--seeds", "0", "--limit-train", "256", "--epochs", "40",
            "--override", "model.width=4", "--override", "wandb.mode=disabled", "--override", "device=cpu",
            "--override", "train.sync_every=1", "--launch"]
    process = Forked("scripts/reproduce.py", *long)
    run = _dir(tmp_path, "plain", 0, "digits-smoke-n256-e40")
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)  # to the script alone, as a Ctrl-C in a terminal
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in out + err, err
    assert err.strip().splitlines()[-1] == "launch 1/3 stopped by SIGINT; the same command resumes it and launches " \
                                           "the rest"
    assert out.count("== launch") == 1
    assert json.loads((run / "summary.json").read_text())["status"] == "stopped"
    log = (run / "train.log").read_text()
    assert log.count("received SIGINT") == 1 and "checkpoint" in log  # once: a second one stops without saving
    assert (run / "checkpoint.pt").exists()


class _Launch:
    """scripts/reproduce.py --launch in a process of its own, its output read line by line."""

    def __init__(self, *args):
        self.process = Forked("scripts/reproduce.py", *args, "--launch")
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, pattern: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not any(re.search(pattern, line) for line in list(self.lines)):
            assert self.process.poll() is None and time.monotonic() < deadline, "".join(self.lines)
            time.sleep(0.01)

    def end(self) -> tuple[int, str, str]:
        err = self.process.stderr.read()
        code = self.process.wait(timeout=240)
        self.reader.join(timeout=60)
        return code, "".join(self.lines), err


def _tiny_launch(root, *extra):
    return ["digits", "--root", str(root), "--seeds", "0", "--override", "model.width=4",
            "--override", "wandb.mode=disabled", "--override", "device=cpu", *extra]


@pytest.mark.slow
def test_a_signal_while_a_launch_starts_stops_it_and_launches_nothing_more(tmp_path):
    launch = _Launch(*_tiny_launch(tmp_path, "--limit-train", "64", "--epochs", "1"))
    launch.wait_for(r"^== launch 1/3")
    time.sleep(0.5)  # the child is importing torch and composing its config: no handler of its own yet
    launch.process.send_signal(signal.SIGTERM)
    code, out, err = launch.end()
    assert code == 143 and "Traceback" not in out + err, err
    assert err.strip().splitlines()[-1] == "launch 1/3 stopped by SIGTERM; the same command resumes it and launches " \
                                           "the rest"
    assert out.count("== launch") == 1
    smoke = tmp_path / "digits-smoke-n64-e1"
    assert not any((_dir(tmp_path, m, 0, smoke.name) / "summary.json").exists() for m in ("sam", "gnp"))


@pytest.mark.slow
def test_a_signal_in_a_runs_last_step_lets_it_finish_and_launches_nothing_more(tmp_path):
    # One step per epoch: once epoch 1 is logged, the signal lands in the last epoch's only step (or
    # its evaluation), where the run finishes by design; the next cell must not start.
    launch = _Launch(*_tiny_launch(tmp_path, "--limit-train", "64", "--epochs", "2"))
    launch.wait_for(r"^epoch +1/2 ")
    launch.process.send_signal(signal.SIGTERM)
    code, out, err = launch.end()
    assert code == 143 and "Traceback" not in out + err, err
    assert err.strip().splitlines()[-1] == "launch 1/3 stopped by SIGTERM; the same command resumes it and launches " \
                                           "the rest"
    assert out.count("== launch") == 1
    run = _dir(tmp_path, "plain", 0, "digits-smoke-n64-e2")
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    assert not _dir(tmp_path, "sam", 0, "digits-smoke-n64-e2").exists()


def test_a_second_signal_stops_the_launch_at_once(tmp_path, monkeypatch):
    """A launch that ignores the first signal (and Ctrl-C) is killed, with every process of its
    session, soon after the second; the first signal is what the script exits with."""
    ready, grandchild = tmp_path / "ready", tmp_path / "grandchild.pid"
    child = ("import signal, subprocess, sys, time\n"
             "for s in (signal.SIGTERM, signal.SIGINT): signal.signal(s, signal.SIG_IGN)\n"
             f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
             f"open({str(grandchild)!r}, 'w').write(str(p.pid))\n"
             f"open({str(ready)!r}, 'w').close()\n"
             "time.sleep(600)\n")

    def signal_twice():
        while not ready.exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(reproduce.Foreground, "STOP_AT_ONCE_S", 0.5)
    sender = threading.Thread(target=signal_twice, daemon=True)
    with reproduce.Foreground() as foreground:
        sender.start()
        code = foreground.run([sys.executable, "-c", child])
    sender.join(timeout=60)
    assert code == -signal.SIGKILL and foreground.signum == signal.SIGTERM and foreground.at_once
    pid = int(grandchild.read_text())
    for _ in range(500):  # the grandchild of the same session is killed too
        if not _alive(pid):
            break
        time.sleep(0.01)
    else:
        raise AssertionError(f"process {pid} of the launch's session is still alive")


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent's reaper."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _plan(*overrides):
    """A plan of the composed config (CIFAR-10) with these overrides."""
    config = tables.composed(("dataset=cifar10", *overrides))
    cell = tables.Cell("t", "cifar10", config["model.name"], "basic", config["method.name"], "basic", (), None)
    return tables.Plan(cell, (), Path("runs"), (0,), config, {})


def _benchmark_file(path, model, batch, ms_per_step, device="Card X"):
    """A results/benchmarks file as scripts/benchmark.py writes it, with the fields the estimates read."""
    variants = {m: {"images_per_second": batch * 1000 / ms, "ms_per_step": {"median": ms}, "role": "method",
                    "two_pass_fraction": float(m != "plain")} for m, ms in ms_per_step.items()}
    path.write_text(json.dumps({"format": "gnp-benchmark/2", "environment": {"device": "cuda", "device_name": device},
                                "models": [{"model": model, "options": {}, "batch_size": batch, "main_label": "bf16",
                                            "variants": variants}]}))


def test_time_estimates_follow_the_measured_throughput_and_the_passes_each_method_takes(tmp_path):
    _benchmark_file(tmp_path / "step_resnet18.json", "resnet18", 100, {"plain": 100.0, "gnp": 250.0})
    _benchmark_file(tmp_path / "step_wrn.json", "wrn28_10", 100, {"gnp": 500.0})
    measured = tables.read_throughput(tmp_path)
    images = 200 * (50_000 // 256 * 256)  # 200 epochs of 195 full batches of 256
    sgd = tables.estimate(_plan("method=plain"), measured, [])
    assert sgd.seconds == pytest.approx(images / 1000) and sgd.device == "Card X"  # 100 images per 100 ms
    sam = tables.estimate(_plan("method=sam"), measured, [])  # the same two passes as GNP: 400 images/s
    assert sam.seconds == pytest.approx(images / 400) and "extrapolated" in sam.how
    # A second pass costs 1.5 one-pass steps (250 / 100 ms); a zero-GR warmup of 40 of 200 epochs takes
    # 1 + 160 / 200 passes per step: 1 + 0.8 * 1.5 = 2.2 one-pass steps, not GNP's 2.5 (nor 2.5 * 2.5).
    warmup = tables.estimate(_plan("method=gnp_warmup", "method.warmup_epochs=40"), measured, [])
    assert warmup.seconds == pytest.approx(images * 2.2 / 1000) and "to 1.8 passes per step" in warmup.how
    hybrid = tables.estimate(_plan("method=asam", "method.two_pass_probability=0.5"), measured, [])
    assert hybrid.seconds == pytest.approx(images * 1.75 / 1000)
    # WRN measured with GNP only (200 images/s): SGD scaled by resnet18's measured GNP/SGD time, 2.5
    wrn_sgd = tables.estimate(_plan("method=plain", "model=wrn28_10"), measured, [])
    assert wrn_sgd.seconds == pytest.approx(images / 500) and "scaled from 2 to 1 passes per step" in wrn_sgd.how
    assert tables.estimate(_plan("method=plain", "model=resnet101"), measured, []).seconds is None
    narrow = tables.estimate(_plan("method=plain", "model.width=16"), measured, [])
    assert narrow.seconds is None and narrow.how.startswith("unknown")
    done = tables.Run("x", "finished", {}, {"wall_seconds": 40.0, "device": "cpu"})
    assert tables.estimate(_plan("method=plain", "model.width=16"), measured, [done]) == \
        tables.Estimate(40.0, "cpu", "measured: 1 finished seed(s) of this cell")


def test_the_measurements_in_results_benchmarks_are_read():
    """The H100 files of an earlier commit were rewritten in today's format, their numbers kept."""
    raw = json.loads((tables.BENCHMARK_DIR / "step_cuda.json").read_text())
    [model] = raw["models"]
    plain = next(t for t in tables.read_throughput() if (t.model, t.method, t.how.split(":")[0]) ==
                 ("resnet18", "plain", "step_cuda.json"))
    assert plain.images_per_second == pytest.approx(256 * 1000 / model["variants"]["plain"]["ms_per_step"]["median"])
    assert plain.device == raw["environment"]["device_name"] and raw["git_commit"] is None
    assert raw["measured_on"].startswith("an earlier commit")
    epochs = {t.model: t for t in tables.read_throughput() if t.how.startswith("cuda_check_cuda.json")}
    assert set(epochs) == {"pyramidnet272", "vit_s", "wrn28_10"} and all(t.upper_bound for t in epochs.values())


@pytest.mark.parametrize("content", ['{"device": "cuda", "main": {}}', '{"format": "gnp-benchmark/2"', "[]",
                                     '{"format": "gnp-benchmark/1", "models": []}'])
def test_a_benchmark_file_of_another_format_is_a_one_line_error(tmp_path, content):
    (tmp_path / "old.json").write_text(content)
    with pytest.raises(tables.TableError, match=r"old.json (is not a gnp-benchmark/2 file|\()"):
        tables.read_throughput(tmp_path)


@pytest.mark.parametrize("args,message", [
    (["cnnn"], "invalid choice: 'cnnn' (choose from 'cnn', 'digits', 'digits_alpha_r', 'digits_family', 'sam_family', 'vit', 'vit_gr_warmup')"),
    (["cnn", "--launcher", "mpi"], "invalid choice: 'mpi' (choose from 'basic', 'parallel', 'slurm')"),
    (["cnn", "--epochs", "0"], "argument --epochs: 0 is invalid: it must be an integer >= 1"),
    (["cnn", "--lanch"], "unrecognized arguments: --lanch; options: --docs, --epochs, --help, --launch, --launcher"),
    (["digits", "--override", "model.width"], "--override 'model.width': expected KEY=VALUE"),
    (["digits", "--override", "model.depth=3"], "does not compose: "),
    ([], "the following arguments are required: table (or --docs)"),
])
def test_bad_arguments_are_one_line_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        reproduce.main(args)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and message in err


def test_the_cost_table_of_the_docs_is_generated_from_the_estimates(tmp_path, capsys):
    page = reproduce.COST_PAGE.read_text()
    block = reproduce.cost_table()
    assert tables.marked(page, reproduce.COST_BEGIN, reproduce.COST_END) == block, \
        "docs/tables.md's cost table is stale: run python scripts/reproduce.py --docs"
    # the same numbers as the script prints for a table with no run done
    assert reproduce.main(["cnn", "--root", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    cnn = next(line for line in block.splitlines() if line.startswith("| `cnn` |"))
    runs, measured, bound, unknown = cnn.split(" | ")[1:5]
    assert f"of {runs} runs)" in printed
    assert f"Time for the runs left: {measured.split(' on ')[0]} on" in printed
    assert f"Time for the runs left: at most {bound.split(' on ')[0].replace(',', '')} on" in printed
    assert "no measurement of resnet101" in unknown and "no measurement of resnet101" in printed


def test_the_cost_table_is_replaced_between_its_markers():
    text = f"# x\nbefore\n{reproduce.COST_BEGIN}\nold\n{reproduce.COST_END}\nafter\n"
    updated = tables.replace_marked(text, reproduce.COST_BEGIN, reproduce.COST_END, "| new |")
    assert updated == f"# x\nbefore\n{reproduce.COST_BEGIN}\n| new |\n{reproduce.COST_END}\nafter\n"
    with pytest.raises(tables.TableError, match="docs/x.md has no '<!-- cost of the tables"):
        tables.replace_marked("# x\n", reproduce.COST_BEGIN, reproduce.COST_END, "| new |", "docs/x.md")
