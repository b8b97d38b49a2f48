"""The remote-checkpoint cache: one download per node, and nobody reads a half-written copy."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import s3fs

REPO = Path(__file__).resolve().parent.parent

# A process that waits for the `go` file, fetches the checkpoint through the cache, and reports the
# sha256 of every file it was handed (read at once, while the other process may still be at work).
# Each file's download is slowed down and counted, so the two fetches overlap and we see who downloaded.
FETCH = """
import asyncio, hashlib, json, sys, time
from pathlib import Path
import s3fs
_get_file = s3fs.S3FileSystem._get_file
async def slow_get_file(self, *args, **kwargs):
    print("GET", args[0], file=sys.stderr, flush=True)
    await asyncio.sleep(0.2)
    return await _get_file(self, *args, **kwargs)
s3fs.S3FileSystem._get_file = slow_get_file
from dgbatch.checkpoint import local_checkpoint
from dgbatch.config import ModelSection
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
path = local_checkpoint(ModelSection(path=sys.argv[1]))
hashes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.name != ".complete"}
print(json.dumps({"path": str(path), "hashes": hashes}))
"""


def _hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_two_processes_fetching_one_checkpoint_download_it_once(s3_env, s3_bucket, toy_model_dir, tmp_path):
    fs = s3fs.S3FileSystem(key=s3_env.key, secret=s3_env.secret, endpoint_url=s3_env.endpoint_url,
                           skip_instance_cache=True)
    fs.put(str(toy_model_dir) + "/", s3_bucket.removeprefix("s3://") + "/ckpt/", recursive=True)
    cache, go = tmp_path / "cache", tmp_path / "go"
    env = {**os.environ, "DGBATCH_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", FETCH, f"{s3_bucket}/ckpt", str(go)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(3)  # both imported and polling for `go`
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    source = _hashes(toy_model_dir)
    for r in reports:  # each read a complete, byte-identical copy, right when it was handed the path
        assert r["hashes"] == source
    assert reports[0]["path"] == reports[1]["path"]
    gets = [err.count("GET ") for _, err in results]
    assert min(gets) == 0 and max(gets) >= len(source), gets  # one process downloaded; the other waited
    models = cache / "models"
    entries = sorted(p.name for p in models.iterdir())
    name = Path(reports[0]["path"]).name
    assert entries == [name, f"{name}.lock"], entries  # one copy, no partial directory left
    assert json.loads((models / name / ".complete").read_text())["source"] == f"{s3_bucket}/ckpt"


def test_a_partial_download_is_never_used(s3_env, s3_bucket, toy_model_dir, tmp_path, monkeypatch):
    """A copy without its marker (a download that crashed, or one made before the lock) is fetched again."""
    import dgbatch.checkpoint as ck
    from dgbatch.config import ModelSection

    fs = s3fs.S3FileSystem(key=s3_env.key, secret=s3_env.secret, endpoint_url=s3_env.endpoint_url,
                           skip_instance_cache=True)
    fs.put(str(toy_model_dir) + "/", s3_bucket.removeprefix("s3://") + "/ckpt/", recursive=True)
    monkeypatch.setattr(ck, "CACHE_DIR", tmp_path / "cache")
    url = f"{s3_bucket}/ckpt"
    dest = tmp_path / "cache" / "models" / hashlib.sha256(url.encode()).hexdigest()[:16]
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{}")
    (dest / "model.safetensors").write_bytes(b"half")
    (dest.parent / f".{dest.name}.dead.partial").mkdir()
    assert ck.local_checkpoint(ModelSection(path=url)) == dest
    assert {k: v for k, v in _hashes(dest).items() if k != ".complete"} == _hashes(toy_model_dir)
    assert not list(dest.parent.glob("*.partial"))
