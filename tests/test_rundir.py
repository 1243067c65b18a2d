"""The run directory's files read back as gnp writes them, and every kind of damage named with its file."""
import json

import pytest

from gnp import io
from gnp.rundir import ANALYSIS_FORMAT, Damaged, RunDir, Status, Summary, find_runs


def test_a_summary_reads_back_as_it_was_written_and_an_older_one_lacks_newer_fields(tmp_path):
    files = RunDir(tmp_path)
    summary = Summary(Status.FINISHED, dataset="digits", method_settings={"r": 0.1}, test_error=1.5, shards=4)
    files.write_summary(summary)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "finished"
    assert files.read_summary() == summary and files.read_summary().finished
    io.write_json(tmp_path / "summary.json", {"status": "stopped", "error": "stopped by SIGTERM", "unknown": 1})
    older = files.read_summary()
    assert (older.status, older.error, older.shards, older.method_settings) == (Status.STOPPED, "stopped by SIGTERM",
                                                                               None, {})


@pytest.mark.parametrize("content, what", [
    ("", "empty"), ("{\"status\": ", "not valid JSON, cut short?"), ("[1, 2]", "holds a list, not an object"),
    ("{\"test_error\": 1.0}", "has no status"), ("{\"status\": \"done\"}", "has no status"),
])
def test_a_damaged_summary_is_named_never_taken_as_finished(tmp_path, content, what):
    (tmp_path / "summary.json").write_text(content)
    with pytest.raises(Damaged, match=f"^{tmp_path / 'summary.json'}: {what}") as damaged:
        RunDir(tmp_path).read_summary()
    assert damaged.value.path == tmp_path / "summary.json"


def test_metrics_config_and_analysis_read_back_and_their_damage_is_named(tmp_path):
    files = RunDir(tmp_path)
    assert (files.read_summary(), files.read_config(), files.read_metrics(), files.read_analysis()) == \
        (None, None, [], None)
    assert not files.holds_run()
    files.write_config({"seed": 0, "train": {"shards": 2}})
    files.write_metrics([{"epoch": 1, "test_error": 50.0}, {"epoch": 2, "test_error": float("nan")}])
    files.write_analysis({"quantities": {"train_loss": 0.5}, "settings": {"subset": 10}})
    assert files.read_config() == {"seed": 0, "train": {"shards": 2}}
    assert files.read_metrics() == [{"epoch": 1, "test_error": 50.0}, {"epoch": 2, "test_error": None}]
    analysis = files.read_analysis()
    assert (analysis["format"], analysis["quantities"], analysis["settings"]) == \
        (ANALYSIS_FORMAT, {"train_loss": 0.5}, {"subset": 10})
    (tmp_path / "empty").mkdir()  # a folder without a run file is no run
    assert files.holds_run() and find_runs(tmp_path) == [tmp_path]
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2, "te')
    with pytest.raises(Damaged, match="metrics.jsonl: line 2 is cut short or not JSON"):
        files.read_metrics()
    (tmp_path / "config.yaml").write_text("- a list\n")
    with pytest.raises(Damaged, match="config.yaml: holds no mapping of settings"):
        files.read_config()
    (tmp_path / "analysis.json").write_text(json.dumps({"format": "other", "quantities": {}}))
    with pytest.raises(Damaged, match=f"analysis.json: not a {ANALYSIS_FORMAT} file"):
        files.read_analysis()
