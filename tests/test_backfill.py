"""Cron backfills: partitions from dates, skip what is complete, report what is missing or failed, and two
overlapping runs of one partition that neither duplicate nor lose a row."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dgbatch import backfill
from dgbatch.backfill import BackfillError, Partition, partitions, resolve_date
from dgbatch.generation import row_seed
from tests.conftest import read_output, write_prompts

REPO = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 12, 1, 14, 37)
PROMPTS = ["reverse abc", "repeat 2 xy", "reverse hello", "repeat 3 q", "reverse zyx", "repeat 2 k"]


def _args(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    backfill.add_arguments(ap)
    return ap.parse_intermixed_args(backfill.join_date_options(list(argv)))


def _config(tmp_path: Path, toy_model_dir: Path, **over) -> Path:
    tree = {
        "model": {"path": str(toy_model_dir)},
        "input": {"path": str(tmp_path / "in" / "date={date}")},
        "output": {"path": str(tmp_path / "out" / "date={date}")},
        "sampling": {"max_new_tokens": 32},
        "engine": {"batch_size": 8},
        "plan": {"shard_rows": 4},
    }
    for key, value in over.items():
        section, field = key.split("__")
        tree[section][field] = value
    path = tmp_path / "backfill.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _write_days(tmp_path: Path, *days: str, prompts: list[str] = PROMPTS) -> None:
    for day in days:
        write_prompts(tmp_path / "in" / f"date={day}" / "part-0.parquet", prompts, expected=prompts)


def _run(*argv: str, now: datetime = NOW) -> tuple[int, dict | None]:
    args = _args(*argv)
    bf = backfill.prepare(args, now=now)
    code = bf.run()
    report = json.loads(Path(args.report).read_text()) if args.report else None
    return code, report


def test_dates_resolve_to_partitions():
    day = lambda s, **k: resolve_date(s, "day", NOW, **k)
    hour = lambda s, **k: resolve_date(s, "hour", NOW, **k)
    assert day("today") == day("+0d") == day("now") == datetime(2026, 12, 1)
    assert day("yesterday") == day("-1d") == day("-15h") == datetime(2026, 11, 30)
    assert day("-14h") == datetime(2026, 12, 1)
    assert day("2026-11-28") == day("2026-11-28T03") == datetime(2026, 11, 28)
    assert hour("now") == hour("+0h") == datetime(2026, 12, 1, 14)
    assert hour("-3h") == datetime(2026, 12, 1, 11)
    assert hour("-1d") == datetime(2026, 11, 30, 14)
    assert hour("2026-11-28") == datetime(2026, 11, 28, 0)
    assert hour("2026-11-28", end=True) == datetime(2026, 11, 28, 23)  # a bare date ends with its last hour
    assert hour("yesterday", end=True) == datetime(2026, 11, 30, 23)
    assert hour("2026-11-28t05") == hour("2026-11-28 05:40") == datetime(2026, 11, 28, 5)
    for bad in ("tomorrowish", "2026-13-01", "-1w", "28/11/2026"):
        with pytest.raises(BackfillError, match="cannot read"):
            day(bad)

    days = partitions(day("2026-11-28"), day("2026-12-01"), "day")
    assert [p.value for p in days] == ["2026-11-28", "2026-11-29", "2026-11-30", "2026-12-01"]  # across a month
    hours = partitions(hour("2026-11-30"), hour("2026-11-30", end=True), "hour")
    assert len(hours) == 24 and hours[3].value == "2026-11-30T03"
    assert hours[3].fill("s3://b/{date}/h={hour}/") == "s3://b/2026-11-30/h=03/"
    assert Partition(datetime(2026, 11, 28), "day").fill("in/date={date}") == "in/date=2026-11-28"
    with pytest.raises(BackfillError, match="is after --end"):
        partitions(day("today"), day("yesterday"), "day")
    with pytest.raises(BackfillError, match="more than 20,000"):
        partitions(day("1900-01-01"), day("2026-01-01"), "day")


@pytest.mark.parametrize(
    "over, every, message",
    [
        ({"output__path": "OUT"}, "day", r"output.path 'OUT' has no \{date\}: every day partition writes over one"),
        ({"input__path": "IN"}, "day", r"input.path 'IN' has no \{date\}: every day partition reads the same input"),
        ({"output__path": "o/{date}"}, "hour", r"has no \{hour\}"),
        ({"output__path": "o/{date}/{hour}"}, "day", r"uses \{hour\}: run with --every hour"),
        ({"input__path": "i/{day}"}, "day", r"unknown placeholder\(s\) \['day'\]"),
    ],
)
def test_a_bad_template_fails_before_anything_runs(tmp_path, toy_model_dir, capsys, over, every, message):
    from dgbatch.cli import main

    cfg = _config(tmp_path, toy_model_dir, **over)
    assert main(["backfill", str(cfg), "--start", "-2d", "--end", "today", "--every", every]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dgbatch backfill: error:")
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_a_bad_range_or_config_exits_2(tmp_path, toy_model_dir, capsys):
    from dgbatch.cli import main

    cfg = _config(tmp_path, toy_model_dir)
    assert main(["backfill", str(cfg), "--start", "today", "--end", "-3d"]) == 2
    assert "is after --end" in capsys.readouterr().err
    assert main(["backfill", str(cfg), "--start", "today", "--end", "today", "engine.batch_size=zero"]) == 2
    assert "engine.batch_size" in capsys.readouterr().err
    assert main(["backfill", str(cfg), "--start", "today", "--end", "today", f"model.path={tmp_path}/none"]) == 2
    assert "model.path" in capsys.readouterr().err
    assert main(["backfill", str(cfg), "--start", "today", "--end", "today", "--timezone", "Mars/Base"]) == 2
    assert "not a known timezone" in capsys.readouterr().err


def test_missing_inputs_are_reported_and_fatal_only_when_required(tmp_path, toy_model_dir, capsys):
    """No Ray needed: a missing input and a bad one are found before a partition would start it."""
    cfg = _config(tmp_path, toy_model_dir)
    bad = tmp_path / "in" / "date=2026-11-28" / "part-0.parquet"
    bad.parent.mkdir(parents=True)
    pq.write_table(pa.table({"text": ["reverse abc"]}), bad)  # no `prompt` column
    report = tmp_path / "report.json"
    code, rep = _run(str(cfg), "--start", "2026-11-27", "--end", "2026-11-28", "--report", str(report))
    assert code == 1  # the bad partition failed
    missing, failed = rep["partitions"]
    assert (missing["partition"], missing["status"]) == ("2026-11-27", "missing")
    assert "does not exist" in missing["reason"]
    assert (failed["status"], failed["partition"]) == ("failed", "2026-11-28")
    assert "'prompt'" in failed["reason"] and "not found" in failed["reason"]
    assert rep["counts"] == {"done": 0, "skipped": 0, "missing": 1, "failed": 1} and rep["exit_code"] == 1
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("partition ")]
    assert [ln.split(":")[0] for ln in lines] == ["partition 2026-11-27", "partition 2026-11-28"]
    assert "missing" in lines[0] and "failed" in lines[1]

    assert _run(str(cfg), "--start", "2026-11-27", "--end", "2026-11-27")[0] == 0  # missing alone: not an error
    code, rep = _run(str(cfg), "--start", "2026-11-27", "--end", "2026-11-27", "--require-input", "--report",
                     str(report))
    assert code == 1 and rep["partitions"][0]["status"] == "missing" and rep["require_input"] is True
    assert not (tmp_path / "out" / "date=2026-11-27").exists()  # nothing written for a missing partition


@pytest.mark.slow
def test_backfill_runs_only_incomplete_partitions_and_a_rerun_runs_none(ray_local, tmp_path, toy_model_dir):
    cfg = _config(tmp_path, toy_model_dir)
    days = ["2026-11-28", "2026-11-29", "2026-11-30"]
    _write_days(tmp_path, *days)  # the same prompts every day
    report = tmp_path / "report.json"

    code, rep = _run(str(cfg), "--start", days[1], "--end", days[1])  # one day already complete
    assert code == 0
    code, rep = _run(str(cfg), "--start", days[0], "--end", "-1d", "--report", str(report))  # -1d: 2026-11-30
    assert code == 0, rep
    assert [(p["partition"], p["status"]) for p in rep["partitions"]] == [
        (days[0], "done"), (days[1], "skipped"), (days[2], "done")]
    assert rep["counts"] == {"done": 2, "skipped": 1, "missing": 0, "failed": 0}
    assert all(p["rows"] == len(PROMPTS) for p in rep["partitions"])

    ids_by_day = {}
    for day in days:
        out = tmp_path / "out" / f"date={day}"
        rows = read_output(out).to_pylist()
        assert len(rows) == len(PROMPTS) and len({r["id"] for r in rows}) == len(PROMPTS)
        assert {r["partition"] for r in rows} == {day}
        assert all(r["id"].startswith(f"{day}/part-0.parquet:") for r in rows)
        assert json.loads((out / "_SUCCESS").read_text())["rows"] == len(PROMPTS)
        ids_by_day[day] = sorted(r["id"] for r in rows)
    # The same file name and rows on two days: different ids, so different per-row seeds.
    a, b = ids_by_day[days[0]], ids_by_day[days[2]]
    assert not set(a) & set(b)
    assert all(row_seed(0, x) != row_seed(0, y) for x, y in zip(a, b))

    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()}
    code, rep = _run(str(cfg), "--start", days[0], "--end", days[2], "--report", str(report))
    assert code == 0 and [p["status"] for p in rep["partitions"]] == ["skipped"] * 3
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_backfill_loads_the_model_once_for_the_whole_range(ray_local, tmp_path, toy_model_dir, monkeypatch):
    """Three partitions, one replica pool: the replica actors are created once, and the same replica
    process (started and loaded once) runs every partition's shards."""
    from dgbatch import driver, placement

    cfg = _config(tmp_path, toy_model_dir)
    days = ["2026-11-28", "2026-11-29", "2026-11-30"]
    _write_days(tmp_path, *days)
    created, runs = [], []
    real_make = placement.make_replicas
    monkeypatch.setattr(placement, "make_replicas", lambda *a, **k: created.append(real_make(*a, **k)) or created[-1])
    real_run = driver.run

    def spy_run(pcfg, *args, pool=None, **kwargs):
        code = real_run(pcfg, *args, pool=pool, **kwargs)
        runs.append((pool, [(s.get("process_start"), s.get("ready_at"), s.get("shards")) for s in pool.stats()]))
        return code

    monkeypatch.setattr(driver, "run", spy_run)
    code, rep = _run(str(cfg), "--start", days[0], "--end", days[2], "--report", str(tmp_path / "report.json"))
    assert code == 0 and [p["status"] for p in rep["partitions"]] == ["done"] * 3, rep
    assert len(created) == 1 and len(created[0]) == 1, "replicas created once for the range, not per partition"
    assert len(runs) == 3 and all(pool is runs[0][0] for pool, _ in runs), "one pool for every partition"
    loads = {(start, ready) for _, stats in runs for start, ready, _ in stats}
    assert len(loads) == 1 and None not in next(iter(loads)), loads  # one process, its model loaded once
    shards = [stats[0][2] for _, stats in runs]
    assert shards[0] < shards[1] < shards[2], shards  # the same replica ran every partition's shards
    assert runs[0][0].closed  # closed when the backfill ended
    for day in days:
        assert len(read_output(tmp_path / "out" / f"date={day}")) == len(PROMPTS)


@pytest.mark.slow
def test_two_overlapping_runs_of_one_partition_leave_each_row_once(tmp_path, toy_model_dir):
    """Two cron ticks that overlap (KubeRay's RayCronJob has no overlap policy): two processes, each with
    its own Ray, run the same partition at once into the same output."""
    prompts = PROMPTS * 3  # 18 rows, 5 shards of 4: both runs plan, run and commit shards at the same time
    _write_days(tmp_path, "2026-11-29", prompts=prompts)
    cfg = _config(tmp_path, toy_model_dir)
    procs, tmpdirs = [], []
    for i in range(2):
        ray_tmp = tempfile.mkdtemp(prefix="bf", dir="/tmp")
        tmpdirs.append(ray_tmp)
        env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO)}
        env.pop("RAY_ADDRESS", None)
        cmd = [sys.executable, "-m", "jobs.backfill", str(cfg), "--start", "2026-11-29", "--end", "2026-11-29",
               "--report", str(tmp_path / f"report{i}.json"), "ray.num_cpus=1"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for d in tmpdirs:
            subprocess.run(["pkill", "-9", "-f", d], check=False)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    reports = [json.loads((tmp_path / f"report{i}.json").read_text()) for i in range(2)]
    statuses = sorted(r["partitions"][0]["status"] for r in reports)
    assert statuses in (["done", "done"], ["done", "skipped"]), statuses
    out = tmp_path / "out" / "date=2026-11-29"
    ids = read_output(out).column("id").to_pylist()
    assert sorted(ids) == sorted(f"2026-11-29/part-0.parquet:{i}" for i in range(len(prompts)))  # each once
    data = sorted((out / "data").glob("*.parquet"))
    plan = json.loads((out / "_plan" / "manifest.json").read_text())
    assert [p.stem for p in data] == sorted(s["shard_id"] for s in plan["shards"])
    assert sum(pq.read_metadata(p).num_rows for p in data) == len(prompts)
    assert json.loads((out / "_SUCCESS").read_text())["rows"] == len(prompts)
    assert json.loads((out / "_summary.json").read_text())["rows"] == len(prompts)
    assert not [p for p in out.rglob(".*.tmp")]  # no temp file left behind
