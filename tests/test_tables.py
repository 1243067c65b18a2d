"""scripts/make_tables.py: exact statistics from runs written in the run-directory format, unfinished
and diverged runs left out and counted, missing cells as dashes with the commands that fill them,
the same numbers in Markdown, LaTeX and CSV, published values with our difference, W&B runs, and
valid figure files."""
import csv
import importlib.util
import json
import math
import sys
import types

import matplotlib.image
import pytest
from omegaconf import OmegaConf

from conftest import ROOT, compose_config
from gnp import tables

# The digits table's cells, written out by hand (conf/table/digits.yaml).
DIGITS = ("experiment=digits_demo", "dataset=digits", "model=resnet18", "aug=none")
DIGITS_METHODS = {"plain": ("method=plain",), "sam": ("method=sam", "method.r=0.05"),
                  "gnp": ("method=gnp", "method.r=0.1", "method.alpha=0.8")}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_tables = load_script("make_tables")
_configs: dict = {}


def write_run(directory, overrides, seed, test_error, status="finished", summary=True, epochs=2, device="cpu"):
    """A run directory as train.py leaves it: config.yaml, metrics.jsonl, checkpoint.pt, summary.json."""
    if overrides not in _configs:
        _configs[overrides] = OmegaConf.to_container(compose_config(*overrides), resolve=True)
    config = json.loads(json.dumps(_configs[overrides]))
    config["seed"] = seed
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    rows = [{"epoch": e, "first_pass_loss": 2.0 / e + seed, "first_pass_error": 50.0 / e, "perturbed_loss": 2.1 / e,
             "perturbed_error": 51.0 / e, "test_error": test_error + 10 / e, "test_loss": 1.0 / e, "g1_norm": 1.0 + e,
             "final_grad_norm": 9.0} for e in range(1, epochs + 1)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "checkpoint.pt").write_bytes(b"")
    if summary:  # the settings are config.yaml's; the summary's copies are not read
        finished = status == "finished"
        (directory / "summary.json").write_text(json.dumps({
            "status": status, "error": None, "test_error": test_error if finished else None, "test_top5_error": None,
            "first_pass_loss": rows[-1]["first_pass_loss"], "perturbed_loss": rows[-1]["perturbed_loss"],
            "device": device, "wall_seconds": 30.0}))


@pytest.fixture
def digits_runs(tmp_path):
    """Finished: SGD 2, 4, 6 (mean 4, sample std 2); SAM 1, 3 (mean 2, std sqrt 2); GNP 1.5 (n 1).
    Left out: 1 stopped, 1 failed, 1 without summary, 1 diverged, 1 duplicate, 1 with other settings."""
    runs = tmp_path / "runs"
    for seed, error in enumerate((2.0, 4.0)):
        write_run(runs / f"sgd{seed}", DIGITS + DIGITS_METHODS["plain"], seed, error)
    write_run(runs / "named_gnp_but_sgd", DIGITS + DIGITS_METHODS["plain"], 2, 6.0)  # folder names do not count
    write_run(runs / "copy_of_sgd0", DIGITS + DIGITS_METHODS["plain"], 0, 2.0)      # the same run twice
    for seed, error in enumerate((1.0, 3.0)):
        write_run(runs / f"sam{seed}", DIGITS + DIGITS_METHODS["sam"], seed, error)
    write_run(runs / "sam2", DIGITS + DIGITS_METHODS["sam"], 2, 0.5, status="stopped")
    write_run(runs / "gnp0", DIGITS + DIGITS_METHODS["gnp"], 0, 1.5)
    write_run(runs / "gnp1", DIGITS + DIGITS_METHODS["gnp"], 1, 0.5, status="failed")
    write_run(runs / "gnp2", DIGITS + DIGITS_METHODS["gnp"], 2, 0.5, summary=False)
    write_run(runs / "gnp3", DIGITS + DIGITS_METHODS["gnp"], 3, 0.5, status="diverged")
    write_run(runs / "gnp_other_r", DIGITS + ("method=gnp", "method.r=0.2", "method.alpha=0.8"), 4, 0.1)
    return runs


def _make(tmp_path, *args):
    code = make_tables.main([*map(str, args), "--out", str(tmp_path / "tables"), "--figures", str(tmp_path / "figures"),
                             "--root", str(tmp_path / "runs")])
    assert code == 0


def test_statistics_bold_and_left_out_runs(tmp_path, digits_runs, capsys):
    table = tables.load_table("digits")
    results = tables.collect(table, tables.make_plans(table, root=tmp_path / "runs"), tables.read_runs([digits_runs]))
    stats = {c.method: results.stat(c) for c in results.runs}
    assert stats["plain"].mean == pytest.approx(4.0) and stats["plain"].std == pytest.approx(2.0) and stats["plain"].n == 3
    assert stats["sam"].mean == pytest.approx(2.0) and stats["sam"].std == pytest.approx(math.sqrt(2))
    assert stats["gnp"] == tables.Stat(1.5, None, 1)
    assert tables.best_methods(results, "digits", "resnet18", "none") == {"gnp"}
    assert (results.ignored, results.duplicates, results.other) == \
        ({"stopped": 1, "failed": 1, "no summary": 1, "diverged": 1}, 1, 1)

    _make(tmp_path, digits_runs, "--table", "digits")
    assert "left out: 3 not finished (1 failed, 1 no summary, 1 stopped), 1 diverged" in capsys.readouterr().out
    md = (tmp_path / "tables" / "digits.md").read_text()
    # GNP's mean is the lowest, of one seed: no test says whether the others differ
    assert "| ResNet-18 (width 16) | ours | 4.00 ± 2.00 (3) n<2 / 2.00 ± 1.41 (2) n<2 / **1.50 (1)** |" in md
    assert "Hardware: cpu." in md and "Welch's t-test, unequal variances, two-sided p < 0.05" in md
    tex = (tmp_path / "tables" / "digits.tex").read_text()
    assert r"4.00 $\pm$ 2.00 (3) n$<$2 & 2.00 $\pm$ 1.41 (2) n$<$2 & \textbf{1.50 (1)} \\" in tex
    assert r"\toprule" in tex and r"\bottomrule" in tex
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "tables" / "digits.csv").open())}
    for method, (mean, std, n, best) in {"plain": (4.0, 2.0, 3, "False"), "sam": (2.0, math.sqrt(2), 2, "False"),
                                         "gnp": (1.5, None, 1, "True")}.items():
        row = rows[method]
        assert float(row["mean"]) == pytest.approx(mean) and int(row["n"]) == n and row["best"] == best
        assert (row["std"] == "") if std is None else float(row["std"]) == pytest.approx(std)
        shown = f"{mean:.2f}" + (rf" $\pm$ {std:.2f}" if std else "") + f" ({n})"
        assert shown in tex  # the LaTeX table carries the CSV's numbers
        assert row["p_vs_best"] == "" and row["differs_from_best"] == ("" if best == "True" else "n<2")
    # SGD's 95% interval: 4 ± t(0.975, 2) · 2/√3, with t(0.975, 2) = 0.95 / √(2 · 0.975 · 0.025) for 2 degrees
    half = 0.95 / math.sqrt(2 * 0.975 * 0.025) * 2 / math.sqrt(3)
    assert (float(rows["plain"]["ci95_low"]), float(rows["plain"]["ci95_high"])) == pytest.approx((4 - half, 4 + half))
    assert rows["gnp"]["ci95_low"] == ""  # one seed: no interval


def test_runs_of_different_layouts_are_never_pooled_in_a_cell(tmp_path, capsys):
    """A cell keeps the layout most of its runs have; the others are counted apart and named. A run from
    before train.shards took one shard per process (its summary's world_size); a table that fixes
    train.shards takes that layout only."""
    runs = tmp_path / "runs"
    plain = DIGITS + DIGITS_METHODS["plain"]
    for seed, error in enumerate((2.0, 4.0)):
        write_run(runs / f"one_shard{seed}", plain + ("train.shards=1",), seed, error)
    write_run(runs / "four_shards", plain + ("train.shards=4",), 2, 9.0)
    write_run(runs / "before_shards", plain, 3, 9.0)  # recorded no train.shards, and ran on 4 processes
    config = (runs / "before_shards" / "config.yaml")
    config.write_text(config.read_text().replace("  shards: auto\n", ""))
    summary = json.loads((runs / "before_shards" / "summary.json").read_text())
    (runs / "before_shards" / "summary.json").write_text(json.dumps({**summary, "world_size": 4}))
    table = tables.load_table("digits")
    found = tables.read_runs([runs])
    results = tables.collect(table, tables.make_plans(table, root=tmp_path / "runs", seeds=(0, 1, 2, 3)), found)
    (cell,) = [c for c in results.runs if c.method == "plain"]
    assert sorted(r.seed for r in results.runs[cell]) == [0, 1] and results.stat(cell).mean == pytest.approx(3.0)
    assert results.other_layouts == {4: 2}
    assert "2 finished runs of another layout than their cell's, counted apart (train.shards=4: 2)" in \
        tables.describe_counts(results)
    # Fixed at 4 shards: the two runs of 4 shards are the cell's, and the markdown says the layout.
    fixed = tables.collect(table, tables.make_plans(table, root=tmp_path / "runs", seeds=(0, 1, 2, 3),
                                                    extra=("train.shards=4",)), found)
    assert sorted(r.seed for r in fixed.runs[cell]) == [2, 3] and fixed.other_layouts == {1: 2}
    md = tables.render_markdown(fixed, tables.describe_counts(fixed), "")
    assert "Layout: 4 shards a step (train.shards; a cell's runs share one)." in md
    assert "Layout" not in tables.render_markdown(results, tables.describe_counts(results), "")


@pytest.mark.parametrize("a,b,p", [
    # n = 2 each with equal variances: Welch's df is 2, where the t distribution's tail is closed-form:
    # p = 1 - |t| / √(2 + t²); here t = -4 / √2
    ([1.0, 3.0], [5.0, 7.0], 1 - math.sqrt(8 / 10)),
    # b without spread: df = 1 (Cauchy), p = 1 - 2 arctan(|t|) / π; t = (2 - 5) / √(2 / 2) = -3
    ([1.0, 3.0], [5.0, 5.0, 5.0], 1 - 2 * math.atan(3) / math.pi),
    ([2.0, 2.0], [2.0, 2.0, 2.0], 1.0),   # no spread and the same mean: no difference
    ([1.0, 1.0], [2.0, 2.0], 0.0),        # no spread and another mean: certainly different
    ([1.0], [2.0, 3.0], None),            # one seed: no test
])
def test_welchs_test_against_closed_forms(a, b, p):
    assert tables.welch_p(a, b) == (None if p is None else pytest.approx(p, rel=1e-9, abs=1e-12))


def test_the_t_interval_against_closed_forms():
    # df = 1: t(0.975) = tan(0.475 π); df = 2: t(0.975) = 0.95 / √(2 · 0.975 · 0.025)
    low, high = tables.t_interval([1.0, 3.0])
    assert (low, high) == pytest.approx((2 - math.tan(0.475 * math.pi), 2 + math.tan(0.475 * math.pi)))
    half = 0.95 / math.sqrt(2 * 0.975 * 0.025) / math.sqrt(3)
    assert tables.t_interval([1.0, 2.0, 3.0]) == pytest.approx((2 - half, 2 + half))
    assert tables.t_interval([4.0, 4.0]) == (4.0, 4.0) and tables.t_interval([4.0]) is None


def test_each_method_is_marked_against_the_best_of_its_cell(tmp_path):
    runs = tmp_path / "runs"
    for seed, error in enumerate((2.0, 4.0, 6.0)):
        write_run(runs / f"sgd{seed}", DIGITS + DIGITS_METHODS["plain"], seed, error)
    for seed, error in enumerate((1.0, 1.2)):
        write_run(runs / f"sam{seed}", DIGITS + DIGITS_METHODS["sam"], seed, error)
    for seed, error in enumerate((10.0, 10.1, 10.2)):  # far above SAM's, with little spread
        write_run(runs / f"gnp{seed}", DIGITS + DIGITS_METHODS["gnp"], seed, error)
    _make(tmp_path, runs, "--table", "digits")
    # Welch by hand against SAM (variance of the mean 0.02 / 2): t = Δmean / √(s²/n + 0.01) and
    # df = (s²/n + 0.01)² / ((s²/n)² / (n - 1) + 0.01² / 1); the p-value from the t distribution's tail
    # (scipy only for that function). SGD: s²/n = 4/3; GNP: s²/n = 0.01/3.
    from scipy.stats import t as t_distribution

    def welch(difference, variance_of_mean, n):
        se2 = variance_of_mean + 0.01
        return 2 * t_distribution.sf(difference / math.sqrt(se2), se2 ** 2 / (variance_of_mean ** 2 / (n - 1) + 1e-4))

    p_sgd, p_gnp = welch(4 - 1.1, 4 / 3, 3), welch(10.1 - 1.1, 0.01 / 3, 3)
    assert p_sgd > 0.05 and p_gnp < 0.05
    md = (tmp_path / "tables" / "digits.md").read_text()
    assert "| ours | 4.00 ± 2.00 (3) / **1.10 ± 0.14 (2)** / 10.10 ± 0.10 (3) † |" in md
    tex = (tmp_path / "tables" / "digits.tex").read_text()
    assert r"& \textbf{1.10 $\pm$ 0.14 (2)} & 10.10 $\pm$ 0.10 (3) $^\dagger$ \\" in tex
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "tables" / "digits.csv").open())}
    assert float(rows["plain"]["p_vs_best"]) == pytest.approx(p_sgd) and rows["plain"]["differs_from_best"] == "False"
    assert float(rows["gnp"]["p_vs_best"]) == pytest.approx(p_gnp) and rows["gnp"]["differs_from_best"] == "True"
    assert rows["sam"]["p_vs_best"] == rows["sam"]["differs_from_best"] == ""


def _damage(run, file, how):
    path = run / file
    if how == "delete":
        path.unlink()
    elif how == "cut":  # a copy that stopped mid-line
        path.write_bytes(path.read_bytes()[:-7])
    elif how == "no status":
        summary = json.loads(path.read_text())
        del summary["status"]
        path.write_text(json.dumps(summary))
    else:
        path.write_text(how)


DAMAGE = [  # (file, damage, what the warning says)
    ("summary.json", "", "summary.json: empty"),
    ("summary.json", "cut", "summary.json: not valid JSON, cut short?"),
    ("summary.json", "[1, 2]", "summary.json: holds a list, not an object"),
    ("summary.json", "no status", "summary.json: has no status"),
    ("config.yaml", "model: {name: [resnet18", "config.yaml: does not parse"),
    ("config.yaml", "- a list", "config.yaml: holds no mapping of settings"),
    ("config.yaml", "delete", "config.yaml: missing, so the run's settings are unknown"),
    ("metrics.jsonl", "cut", "metrics.jsonl: line 2 is cut short or not JSON"),
    ("metrics.jsonl", '{"epoch": 1}\n[]\n', "metrics.jsonl: line 2 is not an object"),
]


@pytest.mark.parametrize("file,how,message", DAMAGE, ids=[f"{f} {h or 'empty'}" for f, h, _ in DAMAGE])
def test_a_run_with_a_damaged_file_is_left_out_counted_and_named(tmp_path, capsys, file, how, message):
    runs = tmp_path / "runs"
    write_run(runs / "good", DIGITS + DIGITS_METHODS["plain"], 0, 2.0)
    write_run(runs / "damaged", DIGITS + DIGITS_METHODS["plain"], 1, 3.0)
    _damage(runs / "damaged", file, how)
    _make(tmp_path, runs, "--table", "digits")
    out, err = capsys.readouterr()
    [warning] = err.splitlines()  # one line, naming the file
    assert warning.startswith(f"warning: {runs}/damaged/{message}") and warning.endswith("; the run is left out")
    assert "1 finished runs used; left out: 1 unreadable (" in out and "Traceback" not in out + err
    md = (tmp_path / "tables" / "digits.md").read_text()
    assert "| ours | 2.00 (1) / – / – |" in md and f"1 unreadable ({runs}/damaged/{message}" in md


def test_missing_cells_show_dashes_and_the_commands_reproduce_prints(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_run(runs / "a", DIGITS + DIGITS_METHODS["plain"], 0, 2.0)
    _make(tmp_path, runs, "--table", "digits")
    md = (tmp_path / "tables" / "digits.md").read_text()
    assert "| ours | 2.00 (1) / – / – |" in md and "## Missing runs (8)" in md
    run_dir = f"{runs}/digits/digits/resnet18/none"
    assert ("python train.py experiment=digits_demo dataset=digits model=resnet18 aug=none method=sam method.r=0.05 "
            f"seed=0 hydra.run.dir={run_dir}/sam/seed0") in md
    assert f"seed=0 hydra.run.dir={run_dir}/plain/seed0" not in md  # that one is finished (in another folder)
    capsys.readouterr()
    load_script("reproduce").main(["digits", "--root", str(runs)])
    printed = [line.split("] ", 1)[1].split("   #")[0] for line in capsys.readouterr().out.splitlines()
               if line.startswith("  [")]
    missing_in_md = [line for line in md.splitlines() if line.startswith("python train.py")]
    assert len(printed) == 9 and len(missing_in_md) == 8 and set(missing_in_md) <= set(printed)


def test_published_values_and_differences(tmp_path):
    runs = tmp_path / "runs"
    vit = ("dataset=cifar10", "model=vit_s", "aug=basic", "method=plain")
    for seed, error in enumerate((12.0, 13.0)):
        write_run(runs / f"vit{seed}", vit, seed, error)
    tiny = ("dataset=cifar10", "model=vit_ti", "aug=basic", "method=plain")
    for seed, error in enumerate((10.0, 10.1, 10.2)):
        write_run(runs / f"vit_ti{seed}", tiny, seed, error)
    _make(tmp_path, runs, "--table", "vit")
    md = (tmp_path / "tables" / "vit.md").read_text()
    assert "| ViT-S/4 | ours | 12.50 ± 0.71 (2) / – / – | – / – / – |" in md  # one method: nothing bold
    # 12.50 - 12.07, inside 12.5 ± tan(0.475 π) · 0.71 / √2; the follow-up paper has no SAM/GNP column
    # and no CIFAR-100 value
    assert "|  | Zhao et al. 2024 | 12.07 (+0.43) ∈ / · / · | n/a / · / · |" in md
    assert "|  | Zhao et al. 2022 (GNP) | n/a / n/a / n/a | n/a / n/a / n/a |" in md
    # ViT-Ti: 14.82 is outside 10.1 ± 4.30 · 0.1 / √3
    assert "|  | Zhao et al. 2024 | 14.82 (-4.72) ∉ / · / · | n/a / · / · |" in md
    assert "∈ / ∉ when it lies inside / outside our 95% t interval of the mean" in md
    assert r"12.07 (+0.43) $\in$" in (tmp_path / "tables" / "vit.tex").read_text()
    rows = {r["model"]: r for r in csv.DictReader((tmp_path / "tables" / "vit.csv").open())
            if (r["dataset"], r["method"]) == ("cifar10", "plain")}
    first = rows["vit_s"]
    assert (first["gr_warmup_zhao2024"], first["gnp_zhao2022"], first["gr_warmup_zhao2024_in_ci95"]) == \
        ("12.07", "n/a", "True")
    assert float(first["gr_warmup_zhao2024_diff"]) == pytest.approx(0.43)
    assert rows["vit_ti"]["gr_warmup_zhao2024_in_ci95"] == "False" and rows["vit_ti"]["gnp_zhao2022_in_ci95"] == ""


def _cell(table, dataset, row, column, method):
    return next(c for c in tables.cells(tables.load_table(table))
                if (c.dataset, c.row, c.column, c.method) == (dataset, row, column, method))


def test_published_cells_point_at_the_papers_values():
    sam_paper, pyramid = tables.load_table("cnn").published[1:]
    assert tables.published_value(sam_paper, _cell("cnn", "cifar100", "wrn28_10", "cutout", "sam")) == 14.9
    assert tables.published_value(sam_paper, _cell("cnn", "cifar10", "wrn28_10", "basic", "plain")) == 3.5
    assert tables.published_value(sam_paper, _cell("cnn", "cifar10", "wrn28_10", "basic", "gnp")) is tables.NOT_COVERED
    assert tables.published_value(sam_paper, _cell("cnn", "cifar10", "resnet18", "basic", "plain")) is tables.NOT_COVERED
    assert tables.published_value(pyramid, _cell("cnn", "cifar100", "pyramidnet272", "autoaugment", "plain")) == 10.6
    gr = tables.load_table("vit_gr_warmup").published[0]
    zero_warmup = _cell("vit_gr_warmup", "cifar10", "vit_b", "basic", "adam_gr_zero_warmup")
    assert tables.published_value(gr, zero_warmup) == 9.42


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_the_gnp_paper_file_has_an_empty_place_for_every_cell(name):
    """Unknown values are null (n/a), never invented, and every cell has a place to enter one."""
    source = tables.load_table(name).published[0]
    data = tables.published._published_file(source.file)
    for cell in tables.cells(tables.load_table(name)):
        node = data
        for part in source.path.format(model=cell.row, dataset=cell.dataset, column=cell.column).split("."):
            node = node[part]
        assert node[source.methods[cell.method]] is None


class _FakeApiRun:
    def __init__(self, run_id, overrides, seed, error, state="finished"):
        config = OmegaConf.to_container(compose_config(*overrides, f"seed={seed}"), resolve=True)
        self.id, self.state, self.config = run_id, state, config
        self.summary = {"dataset": "digits", "model": "resnet18", "method": config["method"]["name"], "aug": "none",
                        "seed": seed,
                        "test_error": error, "device": "NVIDIA H100 80GB HBM3", "results": {"_type": "table-file"}}
        if state != "finished":
            del self.summary["test_error"]

    def scan_history(self):
        return [{"epoch": 1, "first_pass_loss": 1.0, "test_error": 5.0, "g1_norm": 2.0}, {"_step": 3, "results": 1}]


def _fake_wandb(runs=None, error=None):
    logged = {}

    class Api:
        def __init__(self, timeout=None):
            if error:
                raise error

        def runs(self, path):
            assert path == "me/gnp"
            return runs

    class Table:
        def __init__(self, columns, data, allow_mixed_types=False):
            self.columns, self.data = columns, data

    class Run:
        def log(self, values):
            logged.update(values)

        def finish(self):
            logged["finished"] = True

    def init(**kwargs):
        logged["init"] = kwargs
        return Run()
    return types.SimpleNamespace(Api=Api, Table=Table, init=init), logged


def test_runs_from_wandb_and_logging_the_table(tmp_path, monkeypatch):
    sgd, gnp = DIGITS + DIGITS_METHODS["plain"], DIGITS + DIGITS_METHODS["gnp"]
    api_runs = [_FakeApiRun("a", sgd, 0, 3.0), _FakeApiRun("b", sgd, 1, 5.0), _FakeApiRun("c", gnp, 0, 1.0, "crashed")]
    fake, logged = _fake_wandb(api_runs)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_API_KEY", "x")
    _make(tmp_path, "--wandb", "me/gnp", "--table", "digits", "--wandb-log", "me/tables")
    md = (tmp_path / "tables" / "digits.md").read_text()
    assert "| ours | 4.00 ± 1.41 (2) / – / – |" in md and "1 not finished (1 failed)" in md
    table = logged["tables/digits"]
    sgd = dict(zip(table.columns, table.data[0]))
    assert (sgd["method"], sgd["mean"], sgd["n"]) == ("plain", 4.0, 2)
    assert logged["init"]["project"] == "tables" and logged["init"]["entity"] == "me" and logged["finished"]
    png = tmp_path / "figures" / "digits_digits_resnet18_none_curves.png"
    assert png.read_bytes().startswith(PNG_SIGNATURE)


def test_no_network_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    fake, _ = _fake_wandb(error=ConnectionError("Max retries exceeded with url: /graphql\nmore detail"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with pytest.raises(SystemExit) as exit:
        make_tables.main(["--wandb", "me/gnp", "--table", "digits"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1
    assert "cannot read the W&B runs of 'me/gnp' (Max retries exceeded with url: /graphql)" in err


@pytest.mark.parametrize("args,message", [
    (["runs", "--table", "cnnn"], "invalid choice: 'cnnn' (choose from 'cnn', 'digits'"),
    (["runs", "--tabel", "cnn"], "unrecognized arguments: --tabel cnn; options: --analysis, --epochs, --figures"),
    ([], "no runs to read: name a folder (e.g. runs) or --wandb ENTITY/PROJECT"),
    (["/nonexistent/runs"], "/nonexistent/runs: no such folder"),
])
def test_bad_arguments_are_one_line_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        make_tables.main(args)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and message in err


def test_a_smoke_tests_tables_say_so_and_leave_the_real_ones(tmp_path, digits_runs):
    _make(tmp_path, digits_runs, "--table", "digits")
    real = (tmp_path / "tables" / "digits.md").read_text()
    _make(tmp_path, digits_runs, "--table", "digits", "--epochs", "1", "--force")  # no run of its cells
    assert (tmp_path / "tables" / "digits.md").read_text() == real
    smoke = (tmp_path / "tables" / "digits-smoke-e1.md").read_text()
    assert smoke.splitlines()[0].endswith("[smoke test e1]")
    _make(tmp_path, digits_runs, "--table", "digits", "--epochs", "1", "--override", "model.width=4", "--force")
    title = (tmp_path / "tables" / "digits-smoke-e1.md").read_text().splitlines()[0]
    assert title.endswith("[smoke test e1; model.width=4]")  # the row label still says the table's width


def test_figures_are_valid_images(tmp_path, digits_runs, capsys):
    # The grid's seeds are 0 and 1: its seed-2 run is left out, and counted as such.
    for alpha, r, seed, error in ((0.5, 0.02, 0, 4.0), (0.5, 0.02, 1, 6.0), (0.5, 0.02, 2, 90.0), (1.0, 0.1, 0, 2.0)):
        overrides = DIGITS + ("method=gnp", f"method.alpha={alpha}", f"method.r={r}")
        write_run(digits_runs / f"grid_{alpha}_{r}_{seed}", overrides, seed, error)
    _make(tmp_path, digits_runs, "--table", "digits", "--table", "digits_alpha_r")
    assert "; 1 finished runs of seeds this table does not list (--seeds adds them)" in capsys.readouterr().out
    figures = tmp_path / "figures"
    for stem in ("digits_digits_resnet18_none_curves", "digits_alpha_r_digits_resnet18_none_heatmap",
                 "digits_alpha_r_digits_resnet18_none_curves", "digits_alpha_r_digits_resnet18_none_g1_norm"):
        png = (figures / f"{stem}.png").read_bytes()
        assert png.startswith(PNG_SIGNATURE) and len(png) > 5_000
        height, width, channels = matplotlib.image.imread(figures / f"{stem}.png").shape
        assert height > 200 and width > 200 and channels in (3, 4)
        assert (figures / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
    md = (tmp_path / "tables" / "digits_alpha_r.md").read_text()
    # alpha rows x r columns; GNP's digits run (alpha 0.8, r 0.1) is a point of this grid too
    assert "| 0.5 | 5.00 ± 1.41 (2) | – | – |" in md and "| 0.8 | – | – | 1.50 (1) |" in md
    assert "| 1 | – | – | 2.00 (1) |" in md


def test_a_table_is_never_replaced_by_one_with_fewer_finished_cells_or_runs(tmp_path, digits_runs, capsys):
    _make(tmp_path, digits_runs, "--table", "digits")
    written = {p.name: p.read_bytes() for p in (tmp_path / "tables").iterdir()}
    figures = {p.name: p.read_bytes() for p in (tmp_path / "figures").iterdir()}
    capsys.readouterr()
    fewer = tmp_path / "fewer"  # the same cells, fewer seeds: results would be lost
    write_run(fewer / "a", DIGITS + DIGITS_METHODS["plain"], 0, 2.0)
    write_run(fewer / "b", DIGITS + DIGITS_METHODS["sam"], 0, 1.0)
    write_run(fewer / "c", DIGITS + DIGITS_METHODS["gnp"], 0, 1.5)
    assert make_tables.main([str(fewer), "--table", "digits", "--out", str(tmp_path / "tables"),
                             "--figures", str(tmp_path / "figures")]) == 1
    err = capsys.readouterr().err
    assert err == (f"warning: digits: not written: {tmp_path}/tables/digits.csv holds 3 finished cells (6 runs), these "
                   f"runs give 3 (3 runs); --force replaces it\n")
    assert {p.name: p.read_bytes() for p in (tmp_path / "tables").iterdir()} == written
    assert {p.name: p.read_bytes() for p in (tmp_path / "figures").iterdir()} == figures
    _make(tmp_path, fewer, "--table", "digits", "--force")
    assert "| ours | 2.00 (1) n<2 / **1.00 (1)** / 1.50 (1) n<2 |" in (tmp_path / "tables" / "digits.md").read_text()
    _make(tmp_path, digits_runs, "--table", "digits")  # more runs replace fewer
    assert (tmp_path / "tables" / "digits.md").read_bytes() == written["digits.md"]


def test_an_empty_match_writes_nothing_and_names_the_options_that_would_match(tmp_path, capsys):
    table = tables.load_table("digits")
    smoke = tables.make_plans(table, seeds=(0,), shrink=tables.Shrink(64, 1), extra=("model.width=4",))
    runs = tmp_path / "runs"
    for plan in smoke:  # what `reproduce.py digits --launch --seeds 0 --limit-train 64 --epochs 1 ...` leaves
        write_run(runs / plan.cell.method, plan.overrides, 0, 50.0, epochs=1)
    out_dir = tmp_path / "results"
    assert make_tables.main([str(runs), "--table", "digits", "--table", "vit", "--out", str(out_dir)]) == 1
    out, err = capsys.readouterr()
    digits, vit = err.splitlines()
    assert digits == ("warning: digits: no finished run counts for this table, nothing written (0 finished runs used; "
                      "3 finished runs belong to no cell of this table); 3 of the finished runs found would count "
                      "with: --limit-train 64 --epochs 1 --override model.width=4")
    assert vit.startswith("warning: vit: no finished run counts for this table, nothing written (0 finished runs")
    assert "would count" not in vit and not out_dir.exists() and out == ""

    assert make_tables.main([str(runs), "--table", "digits", "--out", str(out_dir), "--figures", str(tmp_path / "f"),
                             "--limit-train", "64", "--epochs", "1", "--override", "model.width=4"]) == 0
    md = (out_dir / "digits-smoke-n64-e1.md").read_text()
    assert "| ours | **50.00 (1)** / **50.00 (1)** n<2 / **50.00 (1)** n<2 |" in md
    capsys.readouterr()
    # Full-size runs read with a smoke test's options: the hint says to drop them (and which seeds)
    write_run(tmp_path / "full" / "sgd", DIGITS + DIGITS_METHODS["plain"], 7, 2.0)
    assert make_tables.main([str(tmp_path / "full"), "--table", "digits", "--out", str(out_dir),
                             "--epochs", "1"]) == 1
    assert capsys.readouterr().err.endswith("1 of the finished runs found would count with: --seeds 0,1,2,7 "
                                            "(without --epochs)\n")


def test_a_folder_without_runs_says_so_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    assert make_tables.main([str(tmp_path / "runs"), "--out", str(tmp_path / "tables")]) == 1
    out, err = capsys.readouterr()
    assert err == (f"warning: found no runs in {tmp_path}/runs (a run is a folder with summary.json, checkpoint.pt or "
                   f"metrics.jsonl); nothing written\n") and out == ""
    assert not (tmp_path / "tables").exists()


def _rows(epochs, **per_key):
    """metrics.jsonl rows: each key's value at epoch e is f(e)."""
    return [{"epoch": e, **{k: f(e) for k, f in per_key.items()}} for e in range(1, epochs + 1)]


def test_the_curves_show_the_ending_and_each_method_apart():
    from gnp import figures

    flat = lambda e: 80.0 / e  # noqa: E731  (both methods end within a percent of each other)
    series = {"SGD": [_rows(8, test_error=lambda e: flat(e) + 1.0, g1_norm=float)],
              "GNP": [_rows(8, test_error=flat, g1_norm=float), _rows(8, test_error=lambda e: flat(e) + 0.5,
                                                                        g1_norm=float)]}
    fig = figures.curves_figure("t", series)
    error_panel = fig.axes[1]
    [inset] = error_panel.child_axes
    sgd, gnp = inset.get_lines()
    assert list(sgd.get_xdata()) == [7, 8] and list(gnp.get_ydata()) == pytest.approx([flat(7) + 0.25, flat(8) + 0.25])
    low, high = inset.get_ylim()
    assert high - low < 5  # the last epochs' ~1% differences fill the inset (the panel spans ~80%)
    looks = {(line.get_marker(), line.get_linestyle()) for line in error_panel.get_lines()}
    assert len(looks) == 2 and all(line.get_markerfacecolor() == "none" for line in error_panel.get_lines())
    assert [ax.get_xlabel() for ax in fig.axes[:3]] == ["epoch"] * 3
    assert not figures.curves_figure("t", {"SGD": [_rows(2, test_error=flat)]}).axes[1].child_axes  # too few epochs


def test_the_gradient_norm_figure_has_one_line_per_alpha_and_a_panel_per_r():
    from gnp import figures

    series = {0.1: {0.5: [_rows(3, g1_norm=lambda e: e), _rows(3, g1_norm=lambda e: 3.0 * e)],
                    1.0: [_rows(3, g1_norm=lambda e: 10.0)]},
              0.02: {0.8: [_rows(3, g1_norm=lambda e: 5.0)]}}
    fig = figures.gradient_norms_figure("t", "method.alpha", "method.r", series)
    small_r, large_r = fig.axes
    assert (small_r.get_title(), large_r.get_title()) == ("method.r 0.02", "method.r 0.1")
    half, one = large_r.get_lines()
    assert list(half.get_ydata()) == [2.0, 4.0, 6.0] and list(one.get_ydata()) == [10.0] * 3  # means over seeds
    assert [text.get_text() for text in large_r.get_legend().get_texts()] == ["method.alpha 0.5 (n=2)",
                                                                              "method.alpha 1 (n=1)"]
    assert small_r.get_ylabel() == "‖∇L(θ)‖, mean over the epoch" and large_r.get_xlabel() == "epoch"
    assert half.get_marker() != one.get_marker() != small_r.get_lines()[0].get_marker()


# the settings python -m gnp.analysis records (those that change a value, and two that do not)
ANALYSED_WITH = {"subset": 500, "rho": 0.05, "top_k": 3, "trace_samples": 20, "ascent_steps": 5, "ascent_tol": 0.01,
                 "sharpness_starts": 3, "m_sharpness": None, "seed": 0, "dtype": "float32", "device": "cpu",
                 "batch_size": 500}


def write_analysis(run, settings=ANALYSED_WITH, **quantities):
    """analysis.json as python -m gnp.analysis writes it (settings=None: without its settings)."""
    analysis = {"format": "gnp-analysis/1", "quantities": quantities, **({"settings": settings} if settings else {})}
    (run / "analysis.json").write_text(json.dumps(analysis))


def test_the_analysis_table_and_its_scatter_figure(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed, (error, trace, sharpness, loss) in enumerate(((2.0, 10.0, 0.1, 0.782), (4.0, 20.0, 0.3, 0.783),
                                                              (6.0, 30.0, 0.2, 0.784))):
        write_run(runs / f"sgd{seed}", DIGITS + DIGITS_METHODS["plain"], seed, error)
        write_analysis(runs / f"sgd{seed}", hessian_trace=trace, sam_sharpness=sharpness, hessian_top_eigenvalue=None,
                       train_loss=loss)
    for seed, (error, trace, loss) in enumerate(((1.0, 1.0, 0.79), (1.2, 1.2, 0.792))):
        write_run(runs / f"gnp{seed}", DIGITS + DIGITS_METHODS["gnp"], seed, error)
        write_analysis(runs / f"gnp{seed}", hessian_trace=trace, train_loss=loss)
    write_run(runs / "gnp2", DIGITS + DIGITS_METHODS["gnp"], 2, 1.4)  # no analysis.json: missing for each quantity
    write_run(runs / "sam0", DIGITS + DIGITS_METHODS["sam"], 0, 3.0)
    (runs / "sam0" / "analysis.json").write_text('{"format": "gnp-analysis/1", "quanti')  # damaged
    _make(tmp_path, runs, "--table", "digits", "--analysis")
    out, err = capsys.readouterr()
    [warning] = err.splitlines()
    assert warning.startswith(f"warning: {runs}/sam0/analysis.json: not valid JSON, cut short? (Unterminated string")
    assert warning.endswith("; the run's analysis quantities are left out")
    assert "digits-analysis: train_loss, hessian_trace, sam_sharpness\n" in out
    md = (tmp_path / "tables" / "digits-analysis.md").read_text()
    # mean ± sample std over seeds, every number of a cell with the decimals that show its smallest std to 2
    # significant digits; GNP's two traces against SGD's three: Welch p < 0.05
    assert "## Hessian trace (with the in-loss L2 term's wd · P) (`hessian_trace`)" in md
    assert "## SAM sharpness (`sam_sharpness`)" in md
    assert "| ours | 20.00 ± 10.00 (3) n<2 / – / **1.10 ± 0.14 (2)** |" not in md
    assert "| ours | 20.00 ± 10.00 (3) / – / **1.10 ± 0.14 (2)** |" in md
    assert "| ours | 0.20 ± 0.10 (3) / – / – |" in md  # one method has it: nothing to compare
    assert "## loss on the analysis subset (cross-entropy + in-loss L2) (`train_loss`)" in md
    assert "| ours | **0.7830 ± 0.0010 (3)** / – / 0.7910 ± 0.0014 (2) † |" in md
    assert "largest Hessian eigenvalue" not in md  # null in every file: not a quantity of these runs
    assert f"python -m gnp.analysis {runs}/sam0 {runs}/gnp2" in md
    rows = list(csv.DictReader((tmp_path / "tables" / "digits-analysis.csv").open()))
    trace = {r["method"]: r for r in rows if r["quantity"] == "hessian_trace"}
    assert (float(trace["plain"]["mean"]), int(trace["plain"]["n"]), int(trace["gnp"]["n"])) == (20.0, 3, 2)
    assert float(trace["plain"]["p_vs_best"]) == pytest.approx(tables.welch_p([1.0, 1.2], [10.0, 20.0, 30.0]))
    assert {r["quantity"] for r in rows} == {"train_loss", "hessian_trace", "sam_sharpness"}
    tex = (tmp_path / "tables" / "digits-analysis.tex").read_text()
    assert tex.count(r"\begin{table}") == 3 and "Hessian trace" in tex
    png = tmp_path / "figures" / "digits_digits_resnet18_none_flatness.png"
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    assert "test error (%)" in (tmp_path / "tables" / "digits.md").read_text()  # the main table as before

    from gnp import figures

    table = tables.load_table("digits")
    results = tables.collect(table, tables.make_plans(table), tables.read_runs([runs]))
    sgd = next(c for c in results.runs if c.method == "plain")
    points = [(results.of(tables.ANALYSIS_QUANTITIES["hessian_trace"]).quantity.value(r), r.summary["test_error"])
              for r in results.runs[sgd]]
    assert sorted(points) == [(10.0, 2.0), (20.0, 4.0), (30.0, 6.0)]
    fig = figures.scatter_figure("t", [("Hessian trace", {"SGD": points})])
    assert sorted(zip(*fig.axes[0].get_lines()[0].get_data())) == sorted(points)
    assert fig.axes[0].get_ylabel() == "test error (%)" and fig.axes[0].get_xlabel() == "Hessian trace"
    four = figures.scatter_figure("t", [(f"q{i}", {"SGD": points}) for i in range(4)])  # 3 to a row: 2 rows
    assert [ax.get_xlabel() for ax in four.axes] == ["q0", "q1", "q2", "q3"]
    assert [ax.get_ylabel() for ax in four.axes] == ["test error (%)", "", "", "test error (%)"]


def test_the_analysis_table_says_its_options_and_when_they_differ_between_runs(tmp_path, capsys):
    settings = {**ANALYSED_WITH, "dtype": "float64"}
    runs = tmp_path / "runs"
    for seed in range(2):
        for method in ("plain", "gnp"):
            write_run(runs / f"{method}{seed}", DIGITS + DIGITS_METHODS[method], seed, 1.0 + seed)
            write_analysis(runs / f"{method}{seed}", {**settings, "batch_size": 100 * (seed + 1)}, sam_sharpness=0.1)
    _make(tmp_path, runs, "--table", "digits", "--analysis")
    md = (tmp_path / "tables" / "digits-analysis.md").read_text()
    # the batch size changes no value: the analyses compare
    assert ("Analysed with `python -m gnp.analysis --subset 500 --rho 0.05 --top-k 3 --trace-samples 20 "
            "--ascent-steps 5 --ascent-tol 0.01 --sharpness-starts 3 --seed 0 --float64`.\n") in md  # no --m-sharpness
    assert "Not comparable" not in md
    assert capsys.readouterr().err == ""

    write_analysis(runs / "gnp0", {**settings, "rho": 0.1, "dtype": "float32"}, sam_sharpness=0.3)
    write_analysis(runs / "gnp1", None, sam_sharpness=0.3)  # an analysis.json without settings
    _make(tmp_path, runs, "--table", "digits", "--analysis", "--force")
    problem = ("the analyses were made with other options: --rho 0.05 (2 runs), 0.1 (1 run); --float64 yes (2 runs), "
               "no (1 run); 1 run recorded no settings in analysis.json; analyse every run with the same ones")
    assert problem in capsys.readouterr().err
    md = (tmp_path / "tables" / "digits-analysis.md").read_text()
    assert ("Analysed with `python -m gnp.analysis --subset 500 --top-k 3 --trace-samples 20 --ascent-steps 5 "
            f"--ascent-tol 0.01 --sharpness-starts 3 --seed 0`. **Not comparable**: {problem}") in md


def test_chosen_analysis_quantities_and_runs_without_any(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_run(runs / "sgd0", DIGITS + DIGITS_METHODS["plain"], 0, 2.0)
    write_analysis(runs / "sgd0", hessian_trace=5.0, train_loss=0.25, sam_sharpness=0.5)
    _make(tmp_path, runs, "--table", "digits", "--quantity", "train_loss,hessian_trace", "--quantity", "train_loss")
    md = (tmp_path / "tables" / "digits-analysis.md").read_text()
    assert md.index("(`train_loss`)") < md.index("(`hessian_trace`)") and "sam_sharpness" not in md
    capsys.readouterr()
    other = tmp_path / "other"
    write_run(other / "sgd0", DIGITS + DIGITS_METHODS["plain"], 0, 2.0)
    assert make_tables.main([str(other), "--table", "digits", "--analysis", "--out", str(tmp_path / "t2"),
                             "--figures", str(tmp_path / "f2")]) == 0
    assert capsys.readouterr().err == ("warning: digits: none of its 1 finished runs has an analysis.json; no analysis "
                                       "table written (python -m gnp.analysis RUN_DIR ... computes them)\n")
    assert not (tmp_path / "t2" / "digits-analysis.md").exists()
    with pytest.raises(SystemExit) as exit:
        make_tables.main([str(runs), "--quantity", "hessian_traec"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1
    assert "unknown quantity hessian_traec; choose from train_loss, train_cross_entropy, train_error, train_grad_norm" in err
