"""`dgbatch status OUTPUT`: where a job stands, from its files alone."""

import json
import os
import subprocess
import sys
import time

import pytest

from dgbatch import cli
from dgbatch.io.fs import filesystem
from dgbatch.io.layout import Layout
from dgbatch.progress_file import STALE_AFTER_S, ProgressRecord
from dgbatch.status import read_status
from tests.helpers import copy_output


def manifest(out) -> dict:
    return json.loads((out / "_plan" / "manifest.json").read_text())


def test_a_finished_job_is_complete_with_every_shard_and_row(demo_output, capsys):
    st = read_status(str(demo_output))
    shards = manifest(demo_output)["shards"]
    summary = json.loads((demo_output / "_summary.json").read_text())
    assert st.state == "complete" and st.shards_done == st.shards_total == len(shards) == 6
    assert st.rows_done == st.rows_total == 96 and st.row_errors == 0 and not st.failed_shards
    assert st.output_tokens == summary["output_tokens"]
    assert st.rows_per_s == summary["throughput"]["rows_per_s"] > 0
    assert cli.main(["status", str(demo_output)]) == 0
    text = capsys.readouterr().out
    assert "state    complete" in text and "6/6 committed" in text and "96/96 (100.0%)" in text


def test_an_interrupted_job_shows_what_is_left_its_failures_and_its_error_rows(mixed_output, tmp_path, capsys):
    out = copy_output(mixed_output, tmp_path / "out")
    shards = sorted(p.stem for p in (out / "data").iterdir())
    lost = next(s for s in shards if "-err-" not in s)  # the error rows stay committed
    lost_rows = next(s["rows"] for s in manifest(out)["shards"] if s["shard_id"] == lost)
    (out / "data" / f"{lost}.parquet").unlink()
    (out / "_SUCCESS").unlink()
    (out / "_failed").mkdir()
    (out / "_failed" / f"{lost}.json").write_text(json.dumps({"shard": lost, "reason": "failed 3 attempts; last: "
                                                                                         "OSError: disk full"}))
    st = read_status(str(out))
    assert st.state == "incomplete" and st.shards_done == len(shards) - 1 and st.rows_done == 12 - lost_rows
    assert st.failed_shards == [{"shard": lost, "reason": "failed 3 attempts; last: OSError: disk full"}]
    # Row errors grouped by kind, numbers taken out, each with an example row.
    reasons = {r["reason"]: r for r in st.error_reasons}
    assert reasons["prompt is empty"]["rows"] == 2 and reasons["prompt is null"]["rows"] == 1
    too_long = reasons["prompt has N tokens; the model accepts at most N"]
    assert too_long["rows"] == 2 and "at most 40" in too_long["example"]
    assert st.row_errors == sum(r["rows"] for r in st.error_reasons) == 5
    assert cli.main(["status", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["failed_shards"][0]["reason"].endswith("disk full")


def test_a_fresh_progress_file_means_a_driver_is_writing_and_gives_the_eta(demo_output, tmp_path):
    out = copy_output(demo_output, tmp_path / "out")
    (out / "_SUCCESS").unlink()
    fs, root = filesystem(str(out))
    rec = ProgressRecord(rows_done=90, rows_total=96, shards_done=5, shards_total=6, shards_in_flight=1,
                         output_tokens=2000, rows_per_s=3.0, output_tokens_per_s=80.0, eta_s=2.0, run_id="abc")
    rec.write(fs, Layout(root))
    st = read_status(str(out))
    assert st.state == "running" and f"pid {os.getpid()}" in st.note
    assert st.shards_in_flight == 1 and st.eta_s == 2.0 and st.rows_per_s == 3.0 and st.rate_from == "_progress.json"

    # Old: nobody is writing any more (a killed driver leaves its last snapshot behind).
    ProgressRecord(rows_done=90, rows_total=96, shards_done=5, shards_total=6,
                   updated_at=time.time() - 10 * STALE_AFTER_S).write(fs, Layout(root))
    st = read_status(str(out))
    assert st.state == "stopped" and "no update from the driver" in st.note

    # Fresh, but its driver process is gone on this host.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    ProgressRecord(rows_done=90, rows_total=96, shards_done=5, shards_total=6,
                   pid=int(gone.stdout)).write(fs, Layout(root))
    st = read_status(str(out))
    assert st.state == "stopped" and "no such process" in st.note


def test_the_progress_file_schema_round_trips_and_tolerates_missing_fields():
    rec = ProgressRecord(rows_done=5, rows_total=10, shards_done=1, shards_total=2, eta_s=None)
    d = rec.to_dict()
    assert d["schema"] == 1 and d["rows"] == {"done": 5, "total": 10} and d["driver"]["pid"] == os.getpid()
    again = ProgressRecord.from_dict(json.loads(json.dumps(d)))
    assert (again.rows_done, again.shards_total, again.host) == (5, 2, rec.host)
    assert ProgressRecord.from_dict({"rows": {"done": 3}}).rows_done == 3


def test_status_of_a_path_without_a_job_fails_in_one_line(tmp_path, capsys):
    assert cli.main(["status", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no dgbatch job" in err


@pytest.mark.parametrize("via", ["OUTPUT", "CONFIG"])
def test_status_takes_the_output_or_the_job_config(demo_output, tmp_path, capsys, via):
    config = tmp_path / "job.yaml"
    config.write_text(f"model: {{path: x}}\ninput: {{path: x}}\noutput: {{path: {demo_output}}}\n")
    assert cli.main(["status", str(demo_output if via == "OUTPUT" else config)]) == 0
    assert f"job      {demo_output}" in capsys.readouterr().out


def test_without_progress_or_summary_speed_and_eta_come_from_commit_times(demo_output, tmp_path):
    out = copy_output(demo_output, tmp_path / "out")  # as a driver that writes no _progress.json, mid-run
    for name in ("_SUCCESS", "_summary.json", "_progress.json"):
        (out / name).unlink()
    shards = sorted((out / "data").iterdir(), key=lambda p: p.stat().st_mtime)
    shards[-1].unlink()
    st = read_status(str(out))
    assert st.state == "unknown" and "no _progress.json" in st.note
    assert st.rows_per_s > 0 and st.rate_from == f"commit times of {len(shards) - 1} shards"
    assert st.eta_s == pytest.approx((96 - st.rows_done) / st.rows_per_s, abs=0.2)
