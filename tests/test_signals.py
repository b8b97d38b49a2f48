"""A stop by signal is clean: Ctrl-C (SIGINT to the terminal's process group) and SIGTERM (what Kubernetes
and `ray job stop` send) stop the replicas, keep the committed shards, write a summary that says
`interrupted`, exit 130 / 143 with one line, leave no process behind, and a rerun resumes.

Real `dgbatch run` processes with their own local Ray (`ray job stop` on a real cluster is in
tests/test_job_submit.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from dgbatch.errors import EXIT_SIGINT, EXIT_SIGTERM
from tests.helpers import REPO, read_output, write_prompts


def _start(cmd: list[str]) -> subprocess.Popen:
    # Its own session, as a shell's foreground job: Ctrl-C reaches the whole group.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_commits(proc: subprocess.Popen, data: Path, n: int) -> list[psutil.Process]:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if data.exists() and len(list(data.glob("*.parquet"))) >= n:
            return psutil.Process(proc.pid).children(recursive=True)
        time.sleep(0.1)
    raise AssertionError(f"no {n} commits: {proc.communicate()}")


def _left_behind(procs: list[psutil.Process]) -> list[str]:
    deadline = time.time() + 15
    while True:
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.time() > deadline:
            return [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in alive]
        time.sleep(0.5)


def _stop_and_check(proc, data: Path, out: Path, sig: signal.Signals, code: int) -> tuple[int, str]:
    started = _wait_for_commits(proc, data, len(list(data.glob("*.parquet"))) + 2 if data.exists() else 2)
    assert any("raylet" in " ".join(p.cmdline()) for p in started), "the job should have started its own Ray"
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # Ctrl-C: the terminal signals the foreground process group
    else:
        proc.send_signal(sig)  # Kubernetes: the container's main process
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr and "SIGTERM received" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    committed = len(list(data.glob("*.parquet")))
    assert last == f"interrupted: {committed} of 12 shards committed; rerun the same command to resume", last
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["interrupted"] == sig.name and summary["shards_committed"] == committed
    assert summary["failed_shards"] == [] and not (out / "_SUCCESS").exists()
    assert _left_behind(started) == [], "processes the job started outlived it"
    return committed, stdout


def test_sigint_and_sigterm_stop_the_job_cleanly_and_each_rerun_resumes(tmp_path, toy_model_dir):
    prompts = [f"count: {'abcdefghi'[: 1 + i % 9]}" for i in range(24)]
    inp = write_prompts(tmp_path / "in.parquet", prompts)
    out, data = tmp_path / "out", tmp_path / "out" / "data"
    cmd = [sys.executable, "-m", "dgbatch.cli", "run", str(REPO / "configs" / "demo.yaml"),
           f"model.path={toy_model_dir}", f"input.path={inp}", f"output.path={out}", "plan.shard_rows=2",
           "plan.bucket_edges=[]", "engine.batch_size=2", "ray.num_cpus=2", "sampling.max_new_tokens=16"]

    first, _ = _stop_and_check(_start(cmd), data, out, signal.SIGINT, EXIT_SIGINT)
    second, stdout = _stop_and_check(_start(cmd), data, out, signal.SIGTERM, EXIT_SIGTERM)
    assert first < second < 12
    assert f"resuming: {first} of 12 shards already committed" in stdout

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resuming: {second} of 12 shards already committed" in rerun.stdout
    ids = read_output(out).column("id").to_pylist()
    assert sorted(ids) == sorted(f"in.parquet:{i}" for i in range(24))
    assert json.loads((out / "_summary.json").read_text())["interrupted"] is None


def test_a_stop_signal_while_a_job_writes_its_last_files_is_noted_not_raised_and_the_handlers_come_back():
    """The window after the last shard (replicas closed, summary written): a stop landing there must not
    leave a finished job without its summary; it is remembered and acted on once the files are written."""
    from dgbatch import errors
    from dgbatch.driver import StopSignalsNoted

    before = signal.getsignal(signal.SIGTERM)
    noted = list(errors._stop_signals)
    try:
        with StopSignalsNoted() as late:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler runs in the main thread between bytecodes
            assert late.received == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
        assert errors.stop_signal() == signal.SIGTERM
    finally:
        errors._stop_signals[:] = noted  # this process was not really stopped
    assert late.received == signal.SIGTERM, "the first stop signal decides"
    assert signal.getsignal(signal.SIGTERM) is before
