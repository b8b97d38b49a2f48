"""The driver's progress on its own (no Ray, no model): counting, speed and ETA, the two displays, and
the monitor that turns the scheduler's calls into `_progress.json`."""

import io
import json

from dgbatch.io.fs import filesystem
from dgbatch.io.layout import Layout
from dgbatch.monitor import JobMonitor
from dgbatch.progress import BarDisplay, JobProgress, LineDisplay, display, fmt_duration
from dgbatch.progress_file import ProgressRecord


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_rows_inside_shards_count_and_speed_leaves_the_start_up_out():
    p = JobProgress(rows_total=100, shards_total=4, rows_committed=25, shards_done=1)  # one shard from a past run
    for t in (0.0, 30.0, 60.0):  # replicas loading: nothing finishes
        p.sample(t)
    assert p.rates() == (None, None) and p.eta_s() is None and "ETA ?" in p.line()
    p.running("s1", 10, 300)  # rows finished inside a shard in flight, before its commit
    p.sample(61.0)
    p.running("s1", 20, 600)
    p.sample(62.0)
    assert p.rows_done == 45 and p.output_tokens == 600
    rows_per_s, tokens_per_s = p.rates()
    assert rows_per_s == 10.0 and tokens_per_s == 300.0  # from 60 s (the last reading with none done), not 0
    assert p.eta_s() == 5.5
    p.committed("s1", {"rows": 25, "output_tokens": 700})
    p.sample(63.0)
    assert (p.rows_done, p.shards_done, p.output_tokens, p.in_flight) == (50, 2, 700, {})
    p.running("s2", 0, 0)  # a lost shard's rows no longer count
    assert p.rows_done == 50


def test_speed_is_over_the_last_minute():
    p = JobProgress(rows_total=10_000, shards_total=1)
    p.sample(0.0)
    for t in range(1, 200):
        p.running("s", t * (10 if t < 100 else 1), 0)  # 10 rows/s for 100 s, then 1 row/s
        p.sample(float(t))
    assert abs(p.rates()[0] - 1.0) < 0.05


def test_the_plain_display_prints_one_line_every_few_seconds_and_no_control_characters():
    p = JobProgress(rows_total=1000, shards_total=10)
    out = io.StringIO()
    d = display(p, every_s=5.0, out=out)
    assert isinstance(d, LineDisplay)
    for t in range(21):
        p.running("s", 10 * t, 20 * t)
        p.sample(float(t))
        d.update(p, float(t))
    d.close(p)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 + 1  # t = 0, 5, 10, 15, 20, and the last one
    assert lines[2].startswith("rows 100/1,000 (10.0%) | shards 0/10 done, 0 in flight, 0 failed | 10.0 rows/s")
    assert "20 output tok/s | ETA 1m30s" in lines[2]
    assert all(ch.isprintable() for line in lines for ch in line)


def test_a_terminal_gets_a_live_bar():
    p = JobProgress(rows_total=1000, shards_total=10)
    out = Terminal()
    d = display(p, every_s=5.0, out=out)
    assert isinstance(d, BarDisplay)
    p.running("s", 420, 0)
    d.update(p, 1.0)
    d.close(p)
    text = out.getvalue()
    assert "\x1b[" in text and "420/1,000" in text and "shards 0/10 done" in text


def test_durations_read_as_people_write_them():
    assert [fmt_duration(s) for s in (None, 7.4, 65, 3600 * 2 + 7 * 60 + 5)] == ["?", "7s", "1m05s", "2h07m"]


def test_the_monitor_rewrites_progress_json_while_the_scheduler_reports_and_writes_its_last_state(tmp_path):
    fs, root = filesystem(str(tmp_path / "out"))
    fs.makedirs(root, exist_ok=True)
    layout = Layout(root)
    m = JobMonitor(JobProgress(rows_total=64, shards_total=2), fs, layout, "job-label", "run1", every_s=0.0,
                   out=io.StringIO())
    m.rows("a", 12, 340)
    m.round(None)
    m.writer.close(m.record("running"))  # wait for the writer thread: what a reader sees mid-run
    mid = json.loads((tmp_path / "out" / "_progress.json").read_text())
    assert mid["state"] == "running" and mid["rows"] == {"done": 12, "total": 64} and mid["output_tokens"] == 340
    assert mid["driver"]["run_id"] == "run1" and ProgressRecord.from_dict(mid).to_dict() == mid
    m.writer = type(m.writer)(fs, layout)
    m.done("a", {"rows": 32, "output_tokens": 900})
    m.failed("b", "failed 3 attempts")
    m.close("failed")
    last = json.loads((tmp_path / "out" / "_progress.json").read_text())
    assert last["state"] == "failed" and last["shards"] == {"done": 1, "in_flight": 0, "failed": 1, "total": 2}
    assert last["rows"]["done"] == 32 and last["output_tokens"] == 900
