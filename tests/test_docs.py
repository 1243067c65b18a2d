"""README.md and docs/: the parts generated from conf/ are current and cover every key the composed config
has, every relative link reaches a file and a heading that exist, and the hand-written maps (the config
groups' choices, README's layout) name what conf/ and gnp/ hold. The Python blocks run in test_family.py."""
from __future__ import annotations

import re
from collections import Counter

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import CONF, ROOT, compose_config
from gnp import config_docs
from gnp.config import method_class
from gnp.config_docs import _cell, _flat, _value, file_comments

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "results" / "README.md"]


@pytest.mark.parametrize("block", config_docs.BLOCKS, ids=lambda b: b.what)
def test_the_generated_parts_of_the_docs_are_current(block):
    assert block.current() == block.render(), \
        f"{block.page.relative_to(ROOT)} is stale: run python scripts/docs.py"


def test_the_config_keys_table_has_every_key_of_the_composed_config_with_its_default():
    table = config_docs.BLOCKS[0].current()
    cfg = compose_config()
    expected = {"seed": "`0`", "train.epochs": "`200`", "train.shards": "`auto`", "wandb.tags": "`[]`",
                "dataset.root": "`${oc.env:GNP_DATA_ROOT,data}`", "optimizer.weight_decay": "`0.001`"}
    rows = {line.split(" | ")[0][3:-1]: line.split(" | ")[1] for line in table.splitlines() if line.startswith("| `")}
    for key, value in expected.items():
        assert rows[key] == value
    for section in ("train", "wandb", "dataset", "optimizer", "aug"):
        for key in cfg[section]:
            assert f"{section}.{key}" in rows, f"{section}.{key} is not in docs/configuration.md"
    assert "| `optimizer.betas` | – | `[0.9, 0.999]` |" in table  # adamw's own key, absent from sgd


def test_the_method_settings_name_every_method_file_and_its_settings():
    text = config_docs.BLOCKS[1].current()
    for path in (CONF / "method").glob("*.yaml"):
        method = compose_config(f"method={path.stem}").method
        assert f"**`method={path.stem}`**: `{method._target_}`." in text
    gnp_warmup = text.split("**`method=gnp_warmup`**")[1].split("**`method=")[0]
    # inherited from GNP's settings file with its meaning, overridden by gnp_warmup.yaml
    assert ("| `method.normalize_first_grad` | `true` | true (the authors' code): the (1 - alpha) term uses g1 / "
            "\\|\\|g1\\|\\|; false gives the paper's (1 - alpha) \\* g1 |") in gnp_warmup
    assert "| `method.warmup` | `zero` |" in gnp_warmup and "| `method.alpha` | `1.0` |" in gnp_warmup
    # every setting of a class is in its settings file: none needs a +, and LookSAM has sync_perturbation
    looksam = text.split("**`method=looksam`**")[1].split("**`method=")[0]
    assert "| `method.sync_perturbation` | `false` |" in looksam and "`+method." not in text


def test_each_method_setting_means_what_its_class_says():
    """The meaning column is the class's setting_meanings, read back whole from the generated settings files'
    comments (a long one wraps there), the WSAM's own max_grad_norm text included."""
    text = config_docs.BLOCKS[1].current()
    for path in (CONF / "method").glob("*.yaml"):
        meanings = method_class(compose_config(f"method={path.stem}").method).setting_meanings()
        section = text.split(f"**`method={path.stem}`**")[1].split("**`method=")[0]
        rows = [line[2:-2].split(" | ") for line in section.splitlines() if line.startswith("| `")]
        assert rows
        for key, _, meaning in rows:
            name = key.strip("`").removeprefix("method.")
            assert meaning == _cell(meanings[{"warmup_epochs": "warmup_steps"}.get(name, name)]), (path.stem, name)


@pytest.mark.parametrize("launcher", ["parallel", "slurm"])
def test_the_launcher_tables_have_each_key_their_file_sets_with_the_value_hydra_composes(launcher):
    if launcher == "slurm":
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason='needs pip install -e ".[slurm]"')
    block = next(b for b in config_docs.BLOCKS if b.what == f"{launcher} launcher keys")
    rows = {line.split(" | ")[0][3:-1]: yaml.safe_load(line.split(" | ")[1].strip("`"))
            for line in block.current().splitlines() if line.startswith("| `")}
    composed = compose_config(f"hydra/launcher={launcher}", with_hydra=True).hydra.launcher
    own = OmegaConf.load(CONF / "hydra" / "launcher" / f"{launcher}.yaml").keys() - {"defaults"}
    # as composed (the plugin's schema makes stop_timeout_s 300.0), unresolved (tasks_per_node is ${.gpus_per_node})
    expected = {f"hydra.launcher.{key}": value for key, value in _flat(composed).items() if key.split(".")[0] in own}
    assert rows == expected and len(rows) >= 3


def test_file_comments_reads_the_header_the_comments_above_a_key_and_on_its_line(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(
        "# What the file is,\n"
        "# in two lines.\n"
        "defaults:\n"
        "  - other          # a list item has no key\n"
        "\n"
        "a: 1               # on the line\n"
        "                   # and aligned under it\n"
        "# above b, at the key's indent\n"
        "b: 2\n"
        "c:\n"
        "  d: x | y         # nested: c.d, a pipe\n"
        "  # above e\n"
        "  e: 0.1\n"
        "    # not aligned under anything: dropped at the blank line\n"
        "\n"
        "f: null\n")
    comments = file_comments(path)
    assert comments.header == "What the file is, in two lines."
    assert comments.keys == {"a": "on the line and aligned under it", "b": "above b, at the key's indent",
                             "c.d": "nested: c.d, a pipe", "c.e": "above e"}


def test_values_and_comments_in_a_markdown_cell():
    assert [_value(v) for v in (None, True, False, 0.05, 1e-08, "auto", [0.9, 0.999], [], "a|b")] == [
        "`null`", "`true`", "`false`", "`0.05`", "`1e-08`", "`auto`", "`[0.9, 0.999]`", "`[]`", "`a\\|b`"]
    assert _cell("0.5*wd*||theta||^2, `a*b`") == "0.5\\*wd\\*\\|\\|theta\\|\\|^2, `a*b`"


def _outside_fences(text: str) -> list[str]:
    lines, fence = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence:
            lines.append(line)
    return lines


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation but hyphens dropped, spaces as
    hyphens, a repeated one numbered."""
    seen: Counter = Counter()
    result = set()
    for line in _outside_fences(text):
        heading = re.match(r"#{1,6} (.*)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading[1].strip().lower()).replace(" ", "-")
            result.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return result


def test_anchors_follow_githubs_rule():
    text = "# Config groups (`conf/`)\n```\n# not a heading\n```\n## Weights & Biases\n## A\n## A\n"
    assert anchors(text) == {"config-groups-conf", "weights--biases", "a", "a-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file_and_a_heading(page):
    links = [link for line in _outside_fences(page.read_text())
             for link in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line))
             if not re.match(r"[a-z]+:", link)]
    for link in links:
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.relative_to(ROOT)}: {link}: no such file"
        if anchor:
            assert anchor in anchors(path.read_text()), f"{page.relative_to(ROOT)}: {link}: no such heading"


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f"](docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"


def test_the_config_groups_table_lists_every_choice_in_conf():
    text = (ROOT / "docs" / "configuration.md").read_text()
    for group in ("dataset", "model", "method", "optimizer", "aug", "experiment"):
        row = next(line for line in text.splitlines() if line.startswith(f"| `{group}` |"))
        listed = set(re.findall(r"`(\w+)`", row.split(" | ")[1]))
        assert listed == {p.stem for p in (CONF / group).glob("*.yaml")}, f"the {group} row of the config groups"


def test_readmes_layout_names_every_module_of_gnp():
    layout = (ROOT / "README.md").read_text().split("## Layout\n")[1].split("\n## ")[0]
    entries = {entry.split()[0]: entry for entry in re.split(r"\n    (?=\S)", "\n" + layout) if entry.strip()}
    gnp = ROOT / "gnp"
    for folder in [gnp, *sorted(p for p in gnp.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
        name = f"{folder.relative_to(ROOT)}/"
        if name not in entries:  # a folder without an entry of its own is named in its parent's
            assert re.search(rf"(?<![\w/]){folder.name}/", entries[f"{folder.parent.relative_to(ROOT)}/"]), \
                f"README.md's Layout does not name {name}"
            continue
        for module in folder.glob("*.py"):
            assert module.name == "__init__.py" or re.search(rf"(?<![\w/]){re.escape(module.name)}", entries[name]), \
                f"README.md's Layout: {name} does not name {module.name}"
