"""s3:// in and out against a real SeaweedFS server; credentials never leak into what the job writes."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from dgbatch import driver
from dgbatch.config import load_config
from dgbatch.toy.tasks import answer_for
from tests.helpers import FAST, assert_exactly_once, read_output, short_prompts

REPO = Path(__file__).resolve().parent.parent


def s3(server) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(key=server.key, secret=server.secret, endpoint_url=server.endpoint_url,
                             skip_instance_cache=True)


def upload_input(server, bucket: str, prompts: list[str]) -> str:
    fs = s3(server)
    with fs.open(f"{bucket.removeprefix('s3://')}/in/part-0.parquet", "wb") as fh:
        pq.write_table(pa.table({"prompt": prompts, "k": list(range(len(prompts)))}), fh)
    return f"{bucket}/in/"


def test_s3_model_input_and_output(ray_local, s3_server, s3_bucket, toy_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DGBATCH_CACHE", str(tmp_path / "cache"))
    fs = s3(s3_server)
    fs.put(str(toy_model_dir) + "/", s3_bucket.removeprefix("s3://") + "/model/", recursive=True)
    prompts = short_prompts(10, seed=5)
    base = {"model": {"path": f"{s3_bucket}/model"}, "input": {"path": upload_input(s3_server, s3_bucket, prompts)},
            "output": {"path": f"{s3_bucket}/out"}, "plan": {"shard_rows": 4}, "engine": {"batch_size": 8},
            "storage": {"key": s3_server.key, "secret": s3_server.secret, "endpoint_url": s3_server.endpoint_url}}
    cfg = load_config(None, FAST, base=base)
    import dgbatch.checkpoint as ck

    monkeypatch.setattr(ck, "CACHE_DIR", tmp_path / "cache")
    assert driver.run(cfg) == 0
    out = read_output(f"{s3_bucket}/out", key=s3_server.key, secret=s3_server.secret,
                      endpoint_url=s3_server.endpoint_url)
    assert_exactly_once(out, [f"part-0.parquet:{i}" for i in range(len(prompts))])
    rows = out.to_pylist()
    assert sum(r["output_text"] == answer_for(r["prompt"]) for r in rows) >= 8
    root = s3_bucket.removeprefix("s3://") + "/out"
    assert fs.exists(f"{root}/_SUCCESS") and json.loads(fs.cat(f"{root}/_summary.json"))["rows"] == 10
    assert not [p for p in fs.find(root) if "/." in p and not p.endswith("/.huggingface.yaml")], \
        "temporary files left behind"
    # Status and report read an S3 output as they do a local one (commit times from LastModified).
    from dgbatch.report import write_report
    from dgbatch.status import read_status

    st = read_status(f"{s3_bucket}/out", cfg.storage)
    assert st.state == "complete" and st.rows_done == 10 and 0 <= st.last_commit_age_s < 600
    assert write_report(f"{s3_bucket}/out", storage=cfg.storage) == f"{s3_bucket}/out/_report/report.html"
    assert fs.exists(f"{root}/_report/throughput.png")
    assert json.loads(fs.cat(f"{root}/_report/report.json"))["rows"] == 10


def _scan_for(secret: str, server, bucket: str, *local_dirs: Path, texts: tuple[str, ...] = ()) -> list[str]:
    """Every place the secret shows up: objects the job wrote, local files (logs), captured output."""
    hits = [f"output[{i}]" for i, t in enumerate(texts) if secret in t]
    fs = s3(server)
    for path in fs.find(bucket.removeprefix("s3://")):
        if secret.encode() in fs.cat(path):
            hits.append(f"s3://{path}")
    for d in local_dirs:
        for p in d.rglob("*"):
            if p.is_file() and not p.is_symlink() and secret.encode() in p.read_bytes():
                hits.append(str(p))
    return hits


@pytest.mark.parametrize("via", ["environment", "config"])
def test_secrets_never_reach_logs_or_outputs(s3_server, s3_bucket, toy_model_dir, tmp_path, via):
    prompts = short_prompts(4, seed=6)
    inp = upload_input(s3_server, s3_bucket, prompts)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(RAY_TMPDIR=str(ray_tmp), DGBATCH_CACHE=str(tmp_path / "cache"))
    args = [f"model.path={toy_model_dir}", f"input.path={inp}", f"output.path={s3_bucket}/out", "ray.num_cpus=2",
            "plan.shard_rows=2", *FAST]
    if via == "environment":
        env.update(AWS_ACCESS_KEY_ID=s3_server.key, AWS_SECRET_ACCESS_KEY=s3_server.secret,
                   AWS_ENDPOINT_URL=s3_server.endpoint_url, AWS_REGION="us-east-1")
        config = REPO / "configs" / "demo.yaml"
    else:
        config = tmp_path / "job.yaml"
        text = (REPO / "configs" / "demo.yaml").read_text()
        config.write_text(text + f"storage:\n  key: {s3_server.key}\n  secret: {s3_server.secret}\n"
                                 f"  endpoint_url: {s3_server.endpoint_url}\n")
    proc = subprocess.run([sys.executable, "-m", "jobs.generate", str(config), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "summary:" in proc.stdout
        hits = _scan_for(s3_server.secret, s3_server, s3_bucket, ray_tmp, tmp_path / "cache",
                         texts=(proc.stdout, proc.stderr))
        assert hits == [], f"secret leaked into {hits}"
        job = json.loads(s3(s3_server).cat(f"{s3_bucket.removeprefix('s3://')}/out/_job.json"))
        if via == "config":
            assert job["config"]["storage"]["secret"] == "**********"
    finally:
        subprocess.run(["pkill", "-9", "-f", str(ray_tmp)], check=False)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_jsonl_input_on_s3_is_inspected_and_read_in_fragments(s3_server, s3_bucket, gz):
    import gzip

    from dgbatch.planning.jsonl import READ_ERROR
    from dgbatch.planning.source import inspect_input, read_fragment

    lines = [json.dumps({"prompt": f"reverse w{i}", "answer": f"{i}w"}) for i in range(7)]
    lines[4] = "{broken"
    body = ("\n".join(lines) + "\n").encode()
    name = "set.jsonl.gz" if gz else "set.jsonl"
    s3(s3_server).pipe(f"{s3_bucket.removeprefix('s3://')}/evals/{name}", gzip.compress(body) if gz else body)
    cfg = load_config(None, [], base={
        "model": {"path": "m"}, "output": {"path": "o"},
        "input": {"path": f"{s3_bucket}/evals/", "format": "jsonl", "reference_column": "answer"},
        "storage": {"key": s3_server.key, "secret": s3_server.secret, "endpoint_url": s3_server.endpoint_url}})
    plan = inspect_input(cfg.input, cfg.storage, fragment_rows=3)
    assert plan.num_rows == 7 and [f.num_rows for f in plan.fragments] == [3, 3, 1]
    table = pa.concat_tables([read_fragment(f, cfg.input, cfg.storage) for f in plan.fragments])
    assert table.column("prompt").to_pylist() == [f"reverse w{i}" if i != 4 else None for i in range(7)]
    errors = table.column(READ_ERROR).to_pylist()
    assert errors[4].startswith("input line 5: not valid JSON") and errors.count(None) == 6
