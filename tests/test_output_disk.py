"""An output disk that is read-only, or fills up mid-run: one line and a summary, never a traceback.

Real filesystems, not mocks: each case runs the CLI inside a private mount namespace (`unshare -m`) with
the output on a small tmpfs, remounted read-only or filled with `dd`. Skipped where mounting is not
permitted (not root, or no CAP_SYS_ADMIN).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import write_prompts

REPO = Path(__file__).resolve().parent.parent

SCRIPT = r"""
set -u
mount -t tmpfs -o size=4m tmpfs "$MNT"
if [ "$MODE" = readonly ]; then mount -o remount,ro "$MNT"; fi
"$PY" -m dgbatch.cli run "$REPO/configs/demo.yaml" "model.path=$MODEL" "input.path=$INPUT" "output.path=$MNT/job" \
    plan.shard_rows=1 engine.batch_size=1 ray.num_cpus=2 sampling.max_new_tokens=32 replicas.max_shard_attempts=2 \
    >"$LOGS/out" 2>"$LOGS/err" &
pid=$!
if [ "$MODE" = full ]; then
  while kill -0 $pid 2>/dev/null && ! ls "$MNT/job/data/"*.parquet >/dev/null 2>&1; do sleep 0.05; done
  dd if=/dev/zero of="$MNT/fill" bs=4k >/dev/null 2>&1
  ls "$MNT/job/data" > "$LOGS/committed_at_fill"
fi
wait $pid
echo $? > "$LOGS/rc"
ls -R "$MNT" > "$LOGS/listing" 2>&1
cat "$MNT/job/_summary.json" > "$LOGS/summary" 2>/dev/null
exit 0
"""


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, check=False)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _can_mount(), reason="needs `unshare -m` and mount permission (root)")


def run_on_small_disk(tmp_path: Path, toy_model_dir: Path, mode: str) -> dict:
    inp = write_prompts(tmp_path / "in.parquet", [f"count 1-{n}" for n in (9, 8, 7, 9, 8, 7)])
    logs, mnt = tmp_path / "logs", tmp_path / "mnt"
    logs.mkdir()
    mnt.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="rd", dir="/tmp")
    env = {**os.environ, "MNT": str(mnt), "MODE": mode, "PY": sys.executable, "REPO": str(REPO),
           "MODEL": str(toy_model_dir), "INPUT": str(inp), "LOGS": str(logs), "RAY_TMPDIR": ray_tmp,
           "PYTHONPATH": str(REPO)}
    try:
        subprocess.run(["unshare", "-m", "sh", "-c", SCRIPT], env=env, cwd=REPO, timeout=600, check=True)
    finally:
        subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    read = lambda name: (logs / name).read_text() if (logs / name).exists() else ""
    return {"rc": int(read("rc")), "out": read("out"), "err": read("err"), "listing": read("listing"),
            "summary": read("summary"), "committed_at_fill": read("committed_at_fill")}


def test_a_read_only_output_is_refused_in_one_line(tmp_path, toy_model_dir):
    r = run_on_small_disk(tmp_path, toy_model_dir, "readonly")
    assert r["rc"] == 2, r
    lines = [ln for ln in r["err"].splitlines() if ln.strip()]
    assert lines == [f"dgbatch: error: output.path '{tmp_path}/mnt/job' is not writable: Read-only file system"], r
    assert "summary:" not in r["out"]


def test_a_disk_that_fills_mid_run_ends_with_a_summary_and_no_traceback(tmp_path, toy_model_dir):
    r = run_on_small_disk(tmp_path, toy_model_dir, "full")
    assert r["committed_at_fill"].strip(), "the disk filled before any shard was committed"
    assert r["rc"] == 1, r
    assert "Traceback" not in r["err"] + r["out"], r["err"][-3000:]
    assert "summary:" in r["out"] and "job incomplete:" in r["err"]
    assert "could not write" in r["err"] and "No space left on device" in r["err"]
    assert "_SUCCESS" not in r["listing"]
    if r["summary"]:  # written before the disk filled up, or not at all: never half-written
        json.loads(r["summary"])
