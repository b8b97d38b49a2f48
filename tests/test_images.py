"""Image prompts end to end: local files, Parquet bytes and s3://, on a real local Ray and the shipped toy;
bad images fail only their own rows.

Every image row is generated with its image (its soft tokens counted in its prompt), gives exactly what the
engine gives for the same processed request outside the pipeline, and, the shipped toy having learnt `read`
(BENCHMARKS.md, "Stage 3"), mostly the number its image shows."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dgbatch import driver
from dgbatch.io.fs import filesystem
from dgbatch.planning.planner import read_shard
from dgbatch.toy.images import draw_number, png_bytes, read_table
from tests.helpers import DEMO_CONFIG, engine_reproduction, read_output

IMAGES = ["input.image_column=image", "input.prompt_column=prompt", "sampling.max_new_tokens=32"]


def _rows(out: pa.Table) -> dict[str, dict]:
    return {r["id"]: r for r in out.to_pylist()}


def _assert_reads(out: pa.Table, n: int) -> None:
    rows = [r for r in out.to_pylist() if r["task"] == "read"]
    assert len(rows) == n and all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]]
    assert all(r["finish_reason"] in ("eos", "length") for r in rows)
    # "read" with one 64x32 image: 20 text tokens of the chat turn + boi + 55 soft tokens + eoi
    assert {r["num_prompt_tokens"] for r in rows} == {77}
    right = sum(r["output_text"] == r["expected"] for r in rows)
    assert right >= 0.75 * n, [(r["expected"], r["output_text"]) for r in rows]  # the toy reads ~98%


@pytest.mark.slow
def test_image_bytes_in_parquet_end_to_end(ray_local, job_config, tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(read_table(24, seed=11), path)
    cfg = job_config(path, *IMAGES)
    assert driver.run(cfg) == 0
    out = read_output(tmp_path / "out")
    _assert_reads(out, 24)
    assert {k: r["output_text"] for k, r in _rows(out).items()} == engine_reproduction(cfg, tmp_path / "out")
    # the plan keeps the encoded bytes as the input had them, never decoded pixels
    shard_file = next((tmp_path / "out" / "_plan" / "shards").iterdir())
    shard = read_shard(filesystem(str(shard_file))[0], str(shard_file))
    assert shard.schema.field("image").type == pa.binary()
    assert not [c for c in shard.column_names if "pixel" in c]


@pytest.mark.slow
def test_the_demo_config_runs_the_demo_images(ray_local, tmp_path):
    """configs/demo.yaml with input.image_column + input.prompt_column over data/demo_images.parquet (32 rows)."""
    from dgbatch.config import load_config

    cfg = load_config(DEMO_CONFIG, ["input.path=data/demo_images.parquet", "input.image_column=image",
                                    "input.prompt_column=prompt", f"output.path={tmp_path / 'out'}"])
    assert driver.run(cfg) == 0
    out = read_output(tmp_path / "out")
    _assert_reads(out, 32)
    assert {k: r["output_text"] for k, r in _rows(out).items()} == engine_reproduction(cfg, tmp_path / "out")


@pytest.mark.slow
def test_image_paths_from_a_local_folder_end_to_end(ray_local, job_config, tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(read_table(16, seed=12, folder=tmp_path / "pngs"), path)
    cfg = job_config(path, *IMAGES)
    assert driver.run(cfg) == 0
    out = read_output(tmp_path / "out")
    _assert_reads(out, 16)
    assert {k: r["output_text"] for k, r in _rows(out).items()} == engine_reproduction(cfg, tmp_path / "out")


@pytest.mark.slow
def test_image_urls_on_s3_end_to_end(ray_local, job_config, tmp_path, s3_server, s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem(key=s3_server.key, secret=s3_server.secret,
                           client_kwargs={"endpoint_url": s3_server.endpoint_url}, skip_instance_cache=True)
    local = read_table(12, seed=13, folder=tmp_path / "pngs")
    urls = []
    for p in local.column("image").to_pylist():
        key = f"{s3_bucket.removeprefix('s3://')}/images/{p.rsplit('/', 1)[1]}"
        fs.put(p, key)
        urls.append(f"s3://{key}")
    urls[-1] = f"{s3_bucket}/images/missing.png"
    table = local.set_column(local.schema.get_field_index("image"), "image", pa.array(urls, pa.string()))
    path = tmp_path / "in.parquet"
    pq.write_table(table, path)
    storage = [f"storage.key={s3_server.key}", f"storage.secret={s3_server.secret}",
               f"storage.endpoint_url={s3_server.endpoint_url}"]
    cfg = job_config(path, *IMAGES, *storage)
    assert driver.run(cfg) == 0
    out = read_output(tmp_path / "out")
    missing = [r for r in out.to_pylist() if r["image"] == urls[-1]]
    assert len(missing) == 1 and "not found" in missing[0]["error"]
    _assert_reads(out.filter(pa.compute.is_null(out.column("error"))), 11)
    assert {k: r["output_text"] for k, r in _rows(out).items() if r["error"] is None} == \
        engine_reproduction(cfg, tmp_path / "out")


@pytest.mark.slow
def test_chat_messages_with_image_parts(ray_local, job_config, tmp_path):
    t = read_table(8, seed=14)
    messages = [[{"role": "user", "content": [{"type": "image", "image": img, "text": None},
                                              {"type": "text", "image": None, "text": "read"}]}]
                for img in t.column("image").to_pylist()]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"messages": messages, "task": t.column("task"), "expected": t.column("expected")}), path)
    cfg = job_config(path, "input.messages_column=messages", "sampling.max_new_tokens=32")
    assert driver.run(cfg) == 0
    out = read_output(tmp_path / "out")
    _assert_reads(out, 8)
    assert {k: r["output_text"] for k, r in _rows(out).items()} == engine_reproduction(cfg, tmp_path / "out")


@pytest.mark.slow
def test_text_rows_in_a_shard_with_image_rows_match_a_text_only_run(ray_local, job_config, tmp_path):
    mixed = read_table(10, seed=15, text_rows=10)
    mixed = mixed.append_column("row", pa.array([f"r{i}" for i in range(mixed.num_rows)]))
    text = mixed.filter(pa.compute.is_null(mixed.column("image")))
    pq.write_table(mixed, tmp_path / "mixed.parquet")
    pq.write_table(text, tmp_path / "text.parquet")
    one_shard = ["input.id_column=row", "plan.bucket_edges=[]", "plan.shard_rows=64"]
    assert driver.run(job_config(tmp_path / "mixed.parquet", *IMAGES, *one_shard,
                                 f"output.path={tmp_path / 'm'}")) == 0
    assert driver.run(job_config(tmp_path / "text.parquet", *IMAGES, *one_shard, f"output.path={tmp_path / 't'}")) == 0
    assert len(list((tmp_path / "m" / "data").iterdir())) == 1  # one shard held both kinds of rows
    m, t = _rows(read_output(tmp_path / "m")), _rows(read_output(tmp_path / "t"))
    assert set(t) < set(m) and len(t) == 10
    assert {k: r["output_text"] for k, r in t.items()} == {k: m[k]["output_text"] for k in t}
    _assert_reads(read_output(tmp_path / "m"), 10)


@pytest.mark.slow
def test_each_bad_image_fails_only_its_own_row(ray_local, job_config, tmp_path):
    import random

    good = png_bytes(draw_number(42, random.Random(0)))
    big = png_bytes(draw_number(7, random.Random(0), size=(400, 300)))
    (tmp_path / "notes.txt").write_text("not an image")
    buf = io.BytesIO()
    draw_number(5, random.Random(0)).save(buf, format="JPEG")
    cases = {
        "good": good,
        "corrupt": good[: len(good) // 2],  # a truncated PNG
        "not_an_image": b"plain bytes, no image format",
        "empty": b"",
        "missing_file": str(tmp_path / "nowhere.png"),
        "text_file": str(tmp_path / "notes.txt"),
        "too_large": big,  # 120,000 pixels > input.max_image_pixels below
        "http_off": "http://127.0.0.1:9/never-fetched.png",
        "jpeg": buf.getvalue(),
    }
    # one run over the bytes cases, one over the reference cases (an image column has one type)
    byte_rows = [k for k, v in cases.items() if isinstance(v, bytes)]
    ref_rows = [k for k, v in cases.items() if isinstance(v, str)]
    pq.write_table(pa.table({"row": byte_rows, "prompt": ["read"] * len(byte_rows),
                             "image": pa.array([cases[k] for k in byte_rows], pa.binary())}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"row": ref_rows, "prompt": ["read"] * len(ref_rows),
                             "image": pa.array([cases[k] for k in ref_rows], pa.string())}), tmp_path / "r.parquet")
    limits = ["input.id_column=row", "input.max_image_pixels=100000"]
    assert driver.run(job_config(tmp_path / "b.parquet", *IMAGES, *limits, f"output.path={tmp_path / 'ob'}")) == 0
    assert driver.run(job_config(tmp_path / "r.parquet", *IMAGES, *limits, f"output.path={tmp_path / 'or'}")) == 0
    rows = {**_rows(read_output(tmp_path / "ob")), **_rows(read_output(tmp_path / "or"))}
    assert set(rows) == set(cases)
    for k in ("good", "jpeg"):
        assert rows[k]["error"] is None and rows[k]["finish_reason"] in ("eos", "length"), rows[k]
    expected = {
        "corrupt": "corrupt",
        "not_an_image": "not an image",
        "empty": "empty",
        "missing_file": "not found",
        "text_file": "not an image",
        "too_large": "input.max_image_pixels",
        "http_off": "input.allow_http_images",
    }
    for k, reason in expected.items():
        r = rows[k]
        assert r["finish_reason"] == "error" and r["output_text"] is None, (k, r)
        assert reason in r["error"], (k, r["error"])


@pytest.mark.slow
def test_too_many_images_in_a_row_is_that_rows_error(ray_local, job_config, tmp_path):
    t = read_table(3, seed=16)
    part = [{"type": "image", "image": img, "text": None} for img in t.column("image").to_pylist()]
    text = {"type": "text", "image": None, "text": "read"}
    messages = [[{"role": "user", "content": [part[0], text]}],
                [{"role": "user", "content": [part[0], part[1], part[2], text]}]]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"messages": messages, "row": ["one", "three"]}), path)
    cfg = job_config(path, "input.messages_column=messages", "input.id_column=row", "input.max_images_per_row=2",
                     "sampling.max_new_tokens=32")
    assert driver.run(cfg) == 0
    rows = _rows(read_output(tmp_path / "out"))
    assert rows["one"]["error"] is None
    assert "input.max_images_per_row is 2" in rows["three"]["error"]
