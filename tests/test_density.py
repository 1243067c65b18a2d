"""The Hessian's spectral density by stochastic Lanczos quadrature and the Hessian of each block
(gnp.analysis.density, gnp.analysis.blocks), against independent oracles: matrices of a known
spectrum, the dense Hessian of a small float64 model and its diagonal blocks; and end to end on a
run trained through train.py, and in the analysis figures of scripts/make_tables.py."""
import json

import numpy as np
import pytest
import torch

from conftest import train_py
from gnp import figures, tables
from gnp.analysis.__main__ import main, parse_args
from gnp.analysis import blocks
from gnp.analysis.blocks import BlockLoss, per_block, top_level_blocks
from gnp.analysis.density import hessian_density, lanczos_quadrature
from gnp.analysis.run import DEFAULT_QUANTITIES, QUANTITIES
from gnp.models import build_model
from test_analysis import FAST, TRAIN, _one_pass_loss, _strict, _tiny_data, _tiny_loss, _tiny_model
from test_tables import DIGITS, DIGITS_METHODS, PNG_SIGNATURE, make_tables, write_analysis, write_run


class Matrix:
    """The linear operator of a symmetric matrix with the interface the Lanczos code uses (SubsetLoss's)."""

    def __init__(self, a):
        self.a = torch.as_tensor(a, dtype=torch.float64)
        self.params = [torch.zeros(len(self.a), dtype=torch.float64)]
        self.hvp_count = 0

    def hvps(self, vectors):
        self.hvp_count += len(vectors)
        return [[self.a @ vector[0]] for vector in vectors]


def _moments(result, powers=3):
    """Each probe's quadrature moments sum_j w_j theta_j^k, k = 0 .. powers - 1 (rows: probes)."""
    return np.array([[np.sum(np.array(w) * np.array(t) ** k) for k in range(powers)]
                     for t, w in zip(result["nodes"], result["weights"])])


def _integrals(result):
    """The broadened density's integral, mean and second moment, by the trapezoid rule on its grid."""
    grid, density = np.array(result["grid"]), np.array(result["density"])
    return [np.trapezoid(density * grid**k, grid) for k in range(3)]


# --- a known spectrum ----------------------------------------------------------------------------

# Four distinct eigenvalues with multiplicities 20, 150, 25 and 5 out of 200.
VALUES, COUNTS = np.array([-1.0, 0.5, 2.0, 5.0]), np.array([20, 150, 25, 5])


def test_a_spectrum_of_four_values_is_found_exactly_with_its_multiplicities():
    """On a diagonal matrix every Rademacher probe sees each eigenvalue with weight multiplicity / n
    (z_i^2 = 1), and the Krylov space closes after four steps: the quadrature is the spectrum."""
    spectrum = np.repeat(VALUES, COUNTS)
    operator = Matrix(np.diag(np.random.default_rng(0).permutation(spectrum)))
    result = hessian_density(operator, probes=3, steps=30, seed=0)
    assert result["hvp_count"] == operator.hvp_count == 3 * 4  # each probe stopped when its space closed
    for nodes, weights in zip(result["nodes"], result["weights"]):
        np.testing.assert_allclose(nodes, VALUES, atol=1e-12)
        np.testing.assert_allclose(weights, COUNTS / 200, atol=1e-12)
    # The broadened density: integral 1, mean tr(A) / n, second moment tr(A^2) / n + sigma^2 (the
    # Gaussians' own variance), to within the trapezoid rule's error on a grid of sigma / 4.5.
    sigma = result["sigma"]
    assert sigma == pytest.approx((5.0 + 1.0) / 400)
    expected = [1.0, spectrum.mean(), (spectrum**2).mean() + sigma**2]
    np.testing.assert_allclose(_integrals(result), expected, rtol=1e-9, atol=1e-12)
    # Its mass lies at the eigenvalues: within 5 sigma of each, its multiplicity / n.
    grid, density = np.array(result["grid"]), np.array(result["density"])
    for value, count in zip(VALUES, COUNTS):
        near = np.abs(grid - value) <= 5 * sigma
        assert np.trapezoid(density[near], grid[near]) == pytest.approx(count / 200, rel=1e-3)
    assert result["density"][0] < 1e-30 and result["density"][-1] < 1e-30  # the grid holds the tails


def test_a_rotated_spectrum_has_its_extremes_and_its_moments_within_three_standard_errors():
    """A = Q diag(lambda) Q^T, a bulk and outliers: the Ritz values lie within the spectrum and
    reach its ends; each probe's moments are v^T A^k v, whose mean over probes estimates tr(A^k) / n."""
    rng = np.random.default_rng(1)
    spectrum = np.concatenate([rng.uniform(-0.5, 1.0, 296), [-3.0, 4.0, 7.0, 12.0]])
    q, _ = np.linalg.qr(rng.standard_normal((300, 300)))
    result = lanczos_quadrature(Matrix(q @ np.diag(spectrum) @ q.T), probes=20, steps=40, seed=3)
    nodes = np.concatenate(result["nodes"])
    assert result["hvp_count"] == 20 * 40 and all(len(n) == 40 for n in result["nodes"])
    assert nodes.min() >= -3.0 - 1e-9 and nodes.max() <= 12.0 + 1e-9  # Ritz values interlace the spectrum
    for t in result["nodes"]:
        np.testing.assert_allclose([t[0], t[-2], t[-1]], [-3.0, 7.0, 12.0], rtol=1e-9)
    moments = _moments(result)
    np.testing.assert_allclose(moments[:, 0], 1.0, rtol=1e-12)
    for k in (1, 2):
        exact = np.mean(spectrum**k)
        mean, stderr = moments[:, k].mean(), moments[:, k].std(ddof=1) / np.sqrt(len(moments))
        assert 0 < stderr and abs(mean - exact) < 3 * stderr, (k, mean, stderr, exact)


def test_too_few_probes_or_steps_are_refused():
    with pytest.raises(ValueError, match="0 probes of 5 Lanczos steps are too few"):
        lanczos_quadrature(Matrix(np.eye(3)), probes=0, steps=5, seed=0)


# --- the dense Hessian of a small network ---------------------------------------------------------

@pytest.fixture(scope="module")
def dense():
    model = _tiny_model()
    images, labels = _tiny_data()
    oracle, theta = _one_pass_loss(model, images, labels)
    return model, images, labels, torch.autograd.functional.hessian(oracle, theta).numpy()


def test_the_density_of_a_network_covers_its_extreme_eigenvalues_and_has_its_mean(dense):
    model, images, labels, hessian = dense
    eigenvalues = np.linalg.eigvalsh(hessian)
    result = hessian_density(_tiny_loss(model, images, labels), probes=10, steps=30, seed=0)
    assert result["probes"] == 10 and result["steps"] == 30 and result["hvp_count"] == 300
    assert result["parameters"] == len(hessian) == 84 + 6 + 196
    nodes = np.concatenate(result["nodes"])
    assert eigenvalues[0] - 1e-9 <= nodes.min() and nodes.max() <= eigenvalues[-1] + 1e-9
    for t in result["nodes"]:
        np.testing.assert_allclose([t[0], t[-1]], eigenvalues[[0, -1]], rtol=1e-8)
    # Each probe's first moment is Hutchinson's v^T H v / n: their mean, within 3 standard errors of tr(H) / n,
    # is the broadened density's mean (the Gaussians are symmetric).
    first = _moments(result)[:, 1]
    exact = np.trace(hessian) / len(hessian)
    assert abs(first.mean() - exact) < 3 * first.std(ddof=1) / np.sqrt(len(first))
    integral, mean, _ = _integrals(result)
    assert integral == pytest.approx(1.0, abs=1e-9) and mean == pytest.approx(first.mean(), rel=1e-9)


# --- the Hessian of each block --------------------------------------------------------------------

def test_the_blocks_are_the_named_children_with_containers_split():
    resnet = build_model("resnet18", 10, width=2)
    blocks = top_level_blocks(resnet, list(resnet.parameters()))
    assert list(blocks) == ["conv1", "bn1", *[f"layers.{i}" for i in range(8)], "fc"]
    vit = build_model("vit_ti", 10, depth=2)
    params = list(vit.parameters())
    blocks = top_level_blocks(vit, params)
    assert list(blocks) == ["(model)", "patch_embed", "blocks.0", "blocks.1", "norm", "head"]
    assert blocks["(model)"] == [vit.cls_token, vit.pos_embed]
    assert [id(p) for ps in blocks.values() for p in ps] == [id(p) for p in params]  # each parameter once, in order


def _block_indices(model):
    """The flat indices of each block's parameters in the dense Hessian."""
    index = np.cumsum([0] + [p.numel() for p in model.parameters()])
    slices = {id(p): np.arange(index[i], index[i + 1]) for i, p in enumerate(model.parameters())}
    return {name: np.concatenate([slices[id(p)] for p in ps])
            for name, ps in top_level_blocks(model, list(model.parameters())).items()}


def test_each_blocks_hessian_is_the_diagonal_block_of_the_dense_hessian(dense):
    model, images, labels, hessian = dense
    loss = _tiny_loss(model, images, labels)
    indices = _block_indices(model)
    assert {name: len(i) for name, i in indices.items()} == {"0": 84, "1": 6, "4": 196}  # conv, BatchNorm, linear
    generator = torch.Generator().manual_seed(0)
    for name, index in indices.items():
        block = BlockLoss(loss, top_level_blocks(model, loss.params)[name])
        v = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in block.params]
        product = torch.cat([x.reshape(-1) for x in block.hvp(v)]).numpy()
        np.testing.assert_allclose(product, hessian[np.ix_(index, index)] @ torch.cat([x.reshape(-1) for x in v]).numpy(),
                                   rtol=1e-9, atol=1e-12)

    result = per_block(loss, model, trace_method="hutchinson", trace_samples=30, lanczos_seed=0, trace_seed=1)
    rows = {row["name"]: row for row in result["blocks"]}
    assert list(rows) == ["0", "1", "4"] and result["hvp_count"] == sum(r["hvp_count"] for r in rows.values())
    for name, index in indices.items():
        sub = hessian[np.ix_(index, index)]
        row = rows[name]
        assert row["parameters"] == len(index)
        assert row["top_eigenvalue"] == pytest.approx(np.linalg.eigvalsh(sub)[-1], rel=1e-8)
        if row["exact"]:  # the BatchNorm block of 6: its exact Hessian, one product a column
            assert row["trace"] == pytest.approx(np.trace(sub), rel=1e-10) and row["hvp_count"] == 6
        else:
            assert 0 < row["trace_stderr"] and abs(row["trace"] - np.trace(sub)) < 3 * row["trace_stderr"]
    assert not rows["0"]["exact"] and rows["1"]["exact"] and not rows["4"]["exact"]
    # The blocks' Hessians are not the whole: the largest eigenvalue of H exceeds each block's.
    assert np.linalg.eigvalsh(hessian)[-1] > max(r["top_eigenvalue"] for r in rows.values())


# --- end to end ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run trained through train.py (in this process), once for the module."""
    target = tmp_path_factory.mktemp("runs") / "plain"
    done = train_py(*TRAIN, "method=plain", f"hydra.run.dir={target}")
    assert done.returncode == 0, done.stderr[-2000:]
    return target


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a hang guard: about 25 products for each of the 11 blocks, minutes on a busy CPU
def test_the_density_and_the_blocks_go_into_analysis_json_with_their_figures(run):
    # 8 images: the 11 blocks' Lanczos and the density take about 250 products, at half the cost of FAST's 32
    assert main([str(run), *FAST, "--subset", "8", "--batch-size", "8", "--only", "train_loss", "--density",
                 "--density-probes", "2", "--density-steps", "12", "--per-block"]) == 0
    record = _strict((run / "analysis.json").read_text())
    assert record["quantities"].keys() == {"train_loss", "train_cross_entropy", "train_l2"}  # neither adds a scalar
    settings = record["settings"]
    assert settings["quantities"] == ["train_loss", "hessian_density"] and settings["per_block"] is True
    assert settings["density"] == {"probes": 2, "steps": 12, "grid_points": 2000, "sigma_of_span": 1 / 400}
    d = record["details"]
    assert d.keys() == {"hessian_density", "hessian_blocks"}
    density = d["hessian_density"]
    assert (density["probes"], density["steps"], density["hvp_count"]) == (2, 12, 24)
    assert [len(n) for n in density["nodes"]] == [len(w) for w in density["weights"]] == [12, 12]
    assert len(density["grid"]) == len(density["density"]) == 2000 and density["sigma"] > 0
    assert _integrals(density)[0] == pytest.approx(1.0, abs=1e-6)
    blocks = d["hessian_blocks"]
    net = build_model("resnet18", 10, width=2)
    assert [b["name"] for b in blocks["blocks"]] == ["conv1", "bn1", *[f"layers.{i}" for i in range(8)], "fc"]
    assert sum(b["parameters"] for b in blocks["blocks"]) == sum(p.numel() for p in net.parameters())
    assert blocks["blocks"][1]["exact"] and blocks["blocks"][1]["parameters"] == 4  # bn1 of width 2
    assert all(b["top_eigenvalue"] is not None and b["hvp_count"] > 0 for b in blocks["blocks"])
    for name in ("analysis_density", "analysis_blocks"):
        for suffix in (".png", ".pdf"):
            assert (run / (name + suffix)).stat().st_size > 1000
    assert density["figures"] == ["analysis_density.png", "analysis_density.pdf"]
    assert blocks["figures"] == ["analysis_blocks.png", "analysis_blocks.pdf"]

    # Without them the settings hold neither, as before they existed: older analyses stay up to date.
    assert main([str(run), *FAST, "--only", "train_loss"]) == 0
    assert not {"density", "per_block"} & _strict((run / "analysis.json").read_text())["settings"].keys()


def test_the_blocks_figure_names_the_trace_estimator_it_shows(monkeypatch):
    drawn = []
    monkeypatch.setattr(blocks, "save_figure", lambda fig, stem: drawn.append(fig) or [])
    rows = [{"name": name, "parameters": 4, "top_eigenvalue": 1.0, "trace": 2.0, "trace_stderr": 0.1} for name in "ab"]
    for method in ("hutch++", "hutchinson"):
        blocks.plot_blocks("unused", "a run", {"trace_method": method, "trace_samples": 33, "blocks": rows})
        assert drawn[-1].texts[0].get_text().endswith(f"trace: {method}, 33 products, bars ± one standard error")


def test_the_density_is_opt_in():
    assert "hessian_density" in QUANTITIES and "hessian_density" not in DEFAULT_QUANTITIES
    assert parse_args(["run"]).quantities == DEFAULT_QUANTITIES
    assert parse_args(["run", "--density"]).quantities == QUANTITIES
    assert parse_args(["run", "--only", "hessian_trace", "--density"]).quantities == ("hessian_trace", "hessian_density")
    assert parse_args(["run", "--only", "hessian_density"]).quantities == ("hessian_density",)


@pytest.mark.parametrize("option", ["--density-probes", "--density-steps"])
def test_a_bad_density_option_is_one_line(option, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["run", option, "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: argument {option}: 0 is invalid: it must be an integer >= 1 " \
                                      f"(python -m gnp.analysis --help)\n"


# --- the tables' figure ---------------------------------------------------------------------------

def _with_density(run, grid, density):
    analysis = json.loads((run / "analysis.json").read_text())
    analysis["details"] = {"hessian_density": {"grid": grid, "density": density}}
    (run / "analysis.json").write_text(json.dumps(analysis))


def test_the_analysis_figures_overlay_each_cells_densities_by_method(tmp_path):
    runs = tmp_path / "runs"
    grid = list(np.linspace(-1, 3, 50))
    for method, seeds in (("plain", 2), ("gnp", 1)):
        for seed in range(seeds):
            write_run(runs / f"{method}{seed}", DIGITS + DIGITS_METHODS[method], seed, 2.0 + seed)
            write_analysis(runs / f"{method}{seed}", hessian_trace=1.0 + seed)
            _with_density(runs / f"{method}{seed}", grid, list(np.exp(-np.square(grid)) + seed))
    write_run(runs / "gnp1", DIGITS + DIGITS_METHODS["gnp"], 1, 1.0)
    write_analysis(runs / "gnp1", hessian_trace=2.0)
    _with_density(runs / "gnp1", grid, ["x"] * len(grid))  # damaged details: that run's density is left out
    assert make_tables.main([str(runs), "--table", "digits", "--analysis", "--out", str(tmp_path / "tables"),
                             "--figures", str(tmp_path / "figures"), "--root", str(runs)]) == 0
    png = tmp_path / "figures" / "digits_digits_resnet18_none_density.png"
    assert png.read_bytes().startswith(PNG_SIGNATURE) and png.with_suffix(".pdf").stat().st_size > 1000

    table = tables.load_table("digits")
    results = tables.collect(table, tables.make_plans(table), tables.read_runs([runs]))
    series = {table.methods[c.method].label: [d for r in results.runs[c] if (d := tables.hessian_density(r))]
              for c in results.runs}
    assert {label: len(curves) for label, curves in series.items()} == {"SGD": 2, "SAM": 0, "GNP": 1}
    fig = figures.densities_figure("t", {label: curves for label, curves in series.items() if curves})
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and len(ax.get_lines()) == 3  # one line per run, on one axis
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["SGD (2 runs)", "GNP (1 run)"]
    np.testing.assert_allclose(ax.get_lines()[1].get_ydata(), np.exp(-np.square(grid)) + 1)
