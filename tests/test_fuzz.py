"""Fuzz: hostile inputs and configs end in exit 2 with one line before the model loads, or in per-row
error records with rows out = rows in; never a traceback, a hang, or exit 0 with degenerate output.

Three tiers, so CI stays within a few minutes on 2 cores (hypothesis, derandomized: the same examples
every run; `DGBATCH_FUZZ=long` draws fresh random examples, 10x as many):
- configs: `load_config` over every field with out-of-range and wrong-typed values (FUZZ_CONFIGS);
- inputs: generated Parquet inputs (column types, nulls, empty strings, huge prompts, invalid UTF-8,
  control-token text, duplicate and hostile ids, messages with bad roles, zero-row, empty, corrupt and
  truncated files, schema drift across files) with config overrides, through `check_job` and planning,
  in process (no Ray, no model), against an oracle of which inputs are job-level errors (FUZZ_INPUTS);
- jobs: a few such inputs as whole jobs on the toy checkpoint, short generations (FUZZ_JOBS).

    pytest tests/test_fuzz.py                       # CI: 1,000 configs + 1,000 inputs + 6 jobs
    DGBATCH_FUZZ=long pytest tests/test_fuzz.py     # soak: 10,000 + 10,000 + 60, random seeds
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dgbatch import driver
from dgbatch.config import ConfigError, JobConfig, Text, load_config
from dgbatch.errors import JobError
from dgbatch.planning.planner import ID, PLAN_ERROR, PROMPT_IDS, read_shard
from dgbatch.pool import ReplicaPool
from dgbatch.toy.tasks import answer_for
from tests.helpers import leaf_fields

LONG = os.environ.get("DGBATCH_FUZZ") == "long"
SCALE = 10 if LONG else 1
FUZZ_CONFIGS, FUZZ_INPUTS, FUZZ_JOBS = 1000 * SCALE, 1000 * SCALE, 6 * SCALE


def fuzz_settings(n: int):
    return settings(max_examples=n, derandomize=not LONG, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])


# ---- configs ----------------------------------------------------------------------------------------

KEYS = [k for k, _ in leaf_fields(JobConfig)]
BASE = {"model": {"path": "m"}, "input": {"path": "in.parquet"}, "output": {"path": "out"}}
RAW = st.one_of(
    st.sampled_from(["", " ", "0", "-1", "1", "2", "64", "1e-3", "-1e9", ".inf", "-.inf", ".nan", "true", "false",
                     "null", "~", "auto", "[]", "[1, 2]", "[0]", "[true]", "{a: 1}", "'7'", "s3://b/x", "file:///t",
                     "cuda:0", "cpu", "tpu", "engine", "reference", "STRICT_PACK", "refuse", "replan", "float32",
                     "9223372036854775808", "0.5", "11", "x\ty", "'a\nb'", '"\\x00"', "http://h:1", "[1, [2]]"]),
    st.text(max_size=12),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)


@fuzz_settings(FUZZ_CONFIGS)
@given(st.lists(st.tuples(st.sampled_from(KEYS), RAW), min_size=1, max_size=4))
def test_configs_are_valid_or_refused_in_one_line_naming_the_key(pairs):
    overrides = [f"{k}={v}" for k, v in pairs]
    try:
        cfg = load_config(None, overrides, base=BASE)
    except ConfigError as e:
        line = e.line()
        assert line and "\n" not in line
        assert "Traceback" not in line
        assert any(k.split(".")[0] in line for k, _ in pairs) or "override" in line, line
        return
    for key, info in leaf_fields(JobConfig):  # what was accepted makes sense
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if isinstance(value, float):
            assert math.isfinite(value), key
        if info.annotation is int:
            assert type(value) is int, key
        if isinstance(value, str):
            assert value, key
            if not _free_text(info.annotation):  # a template or regex may hold any characters
                assert value == value.strip(), key


def _free_text(annotation) -> bool:
    return annotation is Text or Text in typing.get_args(annotation)


# ---- inputs -----------------------------------------------------------------------------------------

SPECIAL = ["<eos>", "<bos>", "<pad>", "<start_of_turn>", "<end_of_turn>\n<start_of_turn>model\n"]
TEXT = st.one_of(
    st.sampled_from(["reverse abc", "repeat 2 xy", "count 1-5", "", "   ", "\n\t", "x" * 3000, *SPECIAL,
                     "reverse " + "".join(SPECIAL), "\u2603 \U0001f600", "\x00\x01", "{{ not jinja }}"]),
    st.text(max_size=40),
)
ROLES = st.sampled_from(["user", "user", "system", "assistant", "model", "", "root", "user\n<start_of_turn>model"])
IDS = st.sampled_from(["a", "b", "c", "d", "../../etc/passwd", "x\ny", "", "\u2603", "id with spaces", "a" * 5000])


@dataclass
class Spec:
    """An input as generated, and what the job must make of it."""

    files: dict[str, bytes | pa.Table] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    job_error: bool = False  # the oracle: must the job be refused as a whole?
    rows: int = 0  # rows of the readable files
    ids: list[str] = field(default_factory=list)
    carried: str | None = None  # a column every row carries into the output


@st.composite
def inputs(draw, allow_bad: bool = True) -> Spec:
    spec = Spec()
    messages = draw(st.booleans())
    ptype = "messages" if messages else draw(st.sampled_from(["string"] * 8 + ["large_string", "binary"] +
                                                            (["int64"] if allow_bad else [])))
    idtype = draw(st.sampled_from([None] * 4 + ["string"] * 3 + ["int64"] * 2 + (["double"] if allow_bad else [])))
    # "output_text": this input is an earlier job's output; its column is carried as prev_output_text
    carried = spec.carried = draw(st.sampled_from([None] * 5 + ["note"] * 3 + ["output_text"]))
    kinds = ["ok"] * 24 + (["empty", "garbage", "truncated", "zero_rows", "drift", "corrupt_pages"] if allow_bad else [])
    n_files = draw(st.integers(1 if not allow_bad else 0, 3))
    pool = iter(range(10**6))
    if ptype == "int64" or idtype == "double" or n_files == 0:
        spec.job_error = True
    seen_ids: set[str] = set()
    schemas: set[bool] = set()  # drifted or not, over the Parquet files
    for f in range(n_files):
        kind = draw(st.sampled_from(kinds))
        n = 0 if kind == "zero_rows" else draw(st.integers(1, 10))
        cols: dict[str, pa.Array] = {}
        if messages:
            chats = [None if draw(st.integers(0, 9)) == 0 else
                     [{"role": draw(ROLES), "content": draw(st.one_of(TEXT, st.none()))}
                      for _ in range(draw(st.integers(0, 3)))] for _ in range(n)]
            cols["prompt"] = pa.array(chats, pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))
        elif ptype == "binary":
            values = [draw(st.one_of(st.binary(max_size=20), TEXT.map(str.encode), st.none())) for _ in range(n)]
            cols["prompt"] = pa.array(values, pa.binary())
        elif ptype == "int64":
            cols["prompt"] = pa.array([draw(st.integers(0, 9)) for _ in range(n)], pa.int64())
        else:
            cols["prompt"] = pa.array([draw(st.one_of(TEXT, st.none())) for _ in range(n)],
                                      pa.large_string() if ptype == "large_string" else pa.string())
        if idtype is not None:
            hostile = draw(st.integers(0, 3)) == 0  # a quarter of id columns get nulls, repeats, empty and huge ids
            if idtype == "string":
                values = [draw(st.one_of(IDS, st.none())) if hostile and draw(st.booleans()) else
                          f"u{next(pool)}{draw(st.sampled_from(['', '/x', ' y', chr(10), chr(0x2603)]))}"
                          for _ in range(n)]
            elif idtype == "int64":
                values = [draw(st.one_of(st.integers(0, 5), st.none())) if hostile and draw(st.booleans()) else
                          10 + next(pool) for _ in range(n)]
            else:
                values = [draw(st.floats(0, 5)) for _ in range(n)]
            cols["uid"] = pa.array(values, {"string": pa.string(), "int64": pa.int64(), "double": pa.float64()}[idtype])
            if kind in ("ok", "drift") and idtype != "double":
                for v in values:
                    s = None if v is None else str(v)
                    if s is None or not s or len(s) > 4096 or s in seen_ids:
                        spec.job_error = True
                    seen_ids.add(s)
        if carried:
            cols[carried] = pa.array([f"c{i}" for i in range(n)], pa.string())
        table = pa.table(cols)
        if kind == "drift":
            table = table.append_column("drifted", pa.array([1] * n))
        name = f"part-{f}.parquet"
        if kind in ("ok", "zero_rows", "drift", "corrupt_pages"):
            spec.files[name] = table
            if kind in ("ok", "drift"):
                spec.rows += n
                spec.ids += [str(v) for v in cols["uid"].to_pylist()] if idtype else [f"{name}:{i}" for i in range(n)]
        else:
            spec.files[name] = {"empty": b"", "garbage": draw(st.binary(min_size=1, max_size=200)),
                                "truncated": b"trunc"}[kind]
        if kind in ("empty", "garbage", "truncated", "corrupt_pages"):
            spec.job_error = True
        if kind == "corrupt_pages":
            spec.files[name] = ("corrupt", table)
        if kind in ("ok", "zero_rows", "drift", "corrupt_pages"):
            schemas.add(kind == "drift")
    if spec.rows == 0 or len(schemas) > 1:  # no rows at all, or files whose columns differ
        spec.job_error = True
    if messages:
        spec.overrides += ["input.messages_column=prompt", "input.prompt_column=null"]
    if idtype:
        spec.overrides.append("input.id_column=uid")
    spec.overrides += draw(st.lists(st.sampled_from(
        ["plan.shard_rows=1", "plan.shard_rows=3", "plan.fragment_rows=1", "plan.fragment_rows=4",
         "plan.bucket_edges=[]", "plan.bucket_edges=[16,64]", "plan.num_buckets=2", "model.max_prompt_tokens=40",
         "input.allow_special_tokens=true", "sampling.max_new_tokens=16"]), max_size=3))
    return spec


def write_input(spec: Spec, d: Path) -> Path:
    d.mkdir(parents=True)
    for name, content in spec.files.items():
        path = d / name
        if isinstance(content, pa.Table):
            pq.write_table(content, path, row_group_size=3)
        elif isinstance(content, tuple):  # intact footer, garbage first page
            pq.write_table(content[1], path, row_group_size=3)
            start = pq.ParquetFile(path).metadata.row_group(0).column(0).data_page_offset
            raw = bytearray(path.read_bytes())
            raw[start : start + 24] = b"\xff" * 24
            path.write_bytes(bytes(raw))
        else:
            path.write_bytes(content)
    return d


def plan_in_process(cfg) -> tuple[driver.Plan, driver.CheckedJob]:
    """What `driver.run` does before it starts Ray and replicas, in this process."""
    job = driver.check_job(cfg)
    return driver.make_plan(None, cfg, job.fs, job.layout, job.model_dir, job.max_prompt, job.inp, job.identity,
                            job.tokenizer), job


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.timeout(1200)
@fuzz_settings(FUZZ_INPUTS)
@given(inputs())
def test_inputs_are_refused_in_one_line_or_planned_row_for_row(scratch, toy_model_dir, spec):
    d = Path(tempfile.mkdtemp(dir=scratch))
    try:
        inp = write_input(spec, d / "in")
        try:
            cfg = load_config(None, [f"model.path={toy_model_dir}", f"input.path={inp}", f"output.path={d / 'out'}",
                                     *spec.overrides], base={})
            plan, job = plan_in_process(cfg)
        except JobError as e:
            assert "\n" not in e.line() and e.line()
            assert spec.job_error, f"refused an input the oracle accepts: {e.line()}"
            event(f"refused: {type(e).__name__}")
            return
        assert not spec.job_error, "accepted an input the oracle refuses"
        assert plan.num_rows == spec.rows == sum(s.rows for s in plan.shards)
        got_ids, errors = [], 0
        for s in plan.shards:
            t = read_shard(job.fs, job.layout.plan_shard(s.shard_id))
            for rid, prompt, err in zip(*(t.column(c).to_pylist() for c in (ID, PROMPT_IDS, PLAN_ERROR))):
                got_ids.append(rid)
                if err is None:
                    assert prompt and len(prompt) <= job.max_prompt
                else:
                    assert prompt is None and err.strip()
                    errors += 1
        assert sorted(got_ids) == sorted(spec.ids) and len(set(got_ids)) == len(got_ids)
        assert errors == sum(s.error_rows for s in plan.shards)
        event("planned, with error rows" if errors else "planned")
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- whole jobs -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1800)
@fuzz_settings(FUZZ_JOBS)
@given(inputs(allow_bad=False))
def test_whole_jobs_write_rows_out_equal_rows_in(ray_local, scratch, toy_model_dir, monkeypatch, spec):
    started = []  # shards handed to replicas (they start, and load the model, while the driver plans)
    real_run = ReplicaPool.run
    monkeypatch.setattr(ReplicaPool, "run", lambda *a, **k: started.append(1) or real_run(*a, **k))
    d = Path(tempfile.mkdtemp(dir=scratch))
    try:
        inp = write_input(spec, d / "in")
        cfg = load_config(None, [f"model.path={toy_model_dir}", f"input.path={inp}", f"output.path={d / 'out'}",
                                 "sampling.max_new_tokens=16", "engine.batch_size=8", *spec.overrides], base={})
        try:
            code = driver.run(cfg)
        except JobError as e:
            assert not started, "a job-level error after the shards were handed to replicas"
            assert spec.job_error and "\n" not in e.line()
            event(f"whole job refused: {type(e).__name__}")
            return
        assert not spec.job_error and code == driver.EXIT_OK
        import pyarrow.dataset as ds

        out = ds.dataset(d / "out" / "data", format="parquet").to_table()
        assert out.num_rows == spec.rows and sorted(out.column("id").to_pylist()) == sorted(spec.ids)
        if spec.carried:
            name = "prev_output_text" if spec.carried == "output_text" else spec.carried
            assert all(str(v).startswith("c") for v in out.column(name).to_pylist())
        answers = 0
        for r in out.to_pylist():
            if r["finish_reason"] == "error":
                assert r["error"] and r["output_text"] is None
                continue
            assert r["error"] is None and r["finish_reason"] in ("eos", "length") and r["num_decoder_forwards"] > 0
            prompt = r["prompt"].decode() if isinstance(r["prompt"], bytes) else r["prompt"]
            if prompt in ("reverse abc", "repeat 2 xy"):  # not degenerate: what the model answers when all is well
                assert r["output_text"] == answer_for(prompt), r
                answers += 1
        event(f"whole job: {out.num_rows} rows" + (", answers checked" if answers else ""))
    finally:
        shutil.rmtree(d, ignore_errors=True)
