"""Synthetic data end to end on local Ray and the toy checkpoint: samples per prompt, output filters."""

import json
import re
from pathlib import Path

import pyarrow.parquet as pq

from dgbatch import driver
from dgbatch.config import load_config
from dgbatch.generation import row_seed
from dgbatch.toy.tasks import sample_examples
from tests.helpers import engine_reproduction, read_output, write_prompts

REPO = Path(__file__).resolve().parent.parent


def rows_by_id(out) -> dict[str, dict]:
    return {r["id"]: r for r in read_output(out).to_pylist()}


def test_num_samples_gives_each_prompt_n_rows_with_their_own_reproducible_draws(ray_local, tmp_path, job_config):
    prompts = [e.prompt for e in sample_examples(8, 7)]
    path = write_prompts(tmp_path / "in.parquet", prompts)
    # hotter than the checkpoint's own 0.05-0.1, where the toy's samples would all take one path
    settings = ["sampling.max_new_tokens=48", "sampling.num_samples=3", "plan.shard_rows=6", "sampling.t_min=0.6",
                "sampling.t_max=1.2"]
    cfg = job_config(path, *settings)
    assert driver.run(cfg) == 0
    rows = rows_by_id(tmp_path / "out")
    assert len(rows) == 3 * len(prompts)
    for i, prompt in enumerate(prompts):
        samples = [rows[f"in.parquet:{i}#{k}"] for k in range(3)]
        assert [s["sample_index"] for s in samples] == [0, 1, 2] and {s["prompt"] for s in samples} == {prompt}
    # every sample has its own seed, from (job seed, row id, sample index) through its id ...
    assert len({row_seed(cfg.sampling.seed, i) for i in rows}) == len(rows)
    # ... so samples of one prompt take different paths (the toy mostly agrees on the answer itself)
    paths = {i: {(rows[f"in.parquet:{i}#{k}"]["num_decoder_forwards"], rows[f"in.parquet:{i}#{k}"]["output_text"])
                 for k in range(3)} for i in range(len(prompts))}
    assert any(len(p) > 1 for p in paths.values()), paths
    assert {i: r["output_text"] for i, r in rows.items()} == engine_reproduction(cfg, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["rows"] == summary["rows_total"] == 24
    texts = {i: {rows[f"in.parquet:{i}#{k}"]["output_text"] for k in range(3)} for i in range(len(prompts))}
    assert summary["duplicate_outputs"] == sum(3 - len(t) for t in texts.values())

    # identical on a rerun, and with another batch size (3 slots: samples of a prompt split over batches)
    for extra, name in (([], "again"), (["engine.batch_size=3", "plan.shard_rows=3"], "batch3")):
        again = load_config(None, [f"output.path={tmp_path / name}", *extra], base=cfg.public_dict())
        assert driver.run(again) == 0
        other = rows_by_id(tmp_path / name)
        assert other == rows, name


def _expected_reason(row: dict) -> str | None:
    body = row["num_output_tokens"] - (row["finish_reason"] == "eos")
    if body > 24:
        return "max_tokens"
    if not re.search(r"^[a-z]+( [a-z]+)*$", row["output_text"]):
        return "regex"
    return None


def test_synth_toy_marks_filtered_rows_and_drop_filtered_writes_them_apart(ray_local, tmp_path):
    """configs/synth-toy.yaml as shipped: a template over row fields, 4 samples per row, two filters."""
    cfg = load_config(REPO / "configs" / "synth-toy.yaml", [f"output.path={tmp_path / 'kept'}", "ray.num_cpus=2"])
    assert driver.run(cfg) == 0
    from dgbatch.checkpoint import load_tokenizer
    from dgbatch.toy.tasks import answer_for

    tok = load_tokenizer(REPO / "models" / "toy-diffusiongemma")
    fields = pq.read_table(REPO / "data" / "synth_fields.parquet").to_pylist()
    rows = rows_by_id(tmp_path / "kept")
    assert len(rows) == 4 * len(fields)
    right = 0
    for i, f in enumerate(fields):
        r = rows[f"synth_fields.parquet:{i}#0"]
        assert (r["task"], r["word"], r["n"], r["lo"], r["hi"]) == (f["task"], f["word"], f["n"], f["lo"], f["hi"])
        prompt = {"count": f"count {f['lo']}-{f['hi']}", "repeat": f"repeat {f['n']} {f['word']}",
                  "reverse": f"reverse {f['word']}"}[f["task"]]  # what the template must have rendered
        chat = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        assert r["error"] is None and r["num_prompt_tokens"] == len(chat["input_ids"]), r
        right += r["output_text"] == answer_for(prompt)
    assert right >= 0.8 * len(fields)
    reasons = {i: r["filter_reason"] for i, r in rows.items()}
    assert all(r["filtered"] == (r["filter_reason"] is not None) for r in rows.values())
    assert reasons == {i: _expected_reason(r) for i, r in rows.items()}
    assert {"regex", "max_tokens", None} <= set(reasons.values())  # the shipped filters do something
    summary = json.loads((tmp_path / "kept" / "_summary.json").read_text())
    counted = {k: sum(v == k for v in reasons.values()) for k in ("regex", "max_tokens")}
    assert summary["filtered_rows"] == counted and summary["kept_rows"] == sum(v is None for v in reasons.values())

    # drop_filtered: the same rows, the filtered ones under filtered/ and out of data/
    drop = load_config(None, [f"output.path={tmp_path / 'drop'}", "output.drop_filtered=true"],
                       base=cfg.public_dict())
    assert driver.run(drop) == 0
    data = rows_by_id(tmp_path / "drop")
    apart = {r["id"]: r for r in pq.read_table(tmp_path / "drop" / "filtered").to_pylist()}
    assert {i for i, r in rows.items() if not r["filtered"]} == set(data) and not any(r["filtered"] for r in
                                                                                     data.values())
    assert {i for i, r in rows.items() if r["filtered"]} == set(apart)
    assert {**data, **apart} == rows
    assert json.loads((tmp_path / "drop" / "_summary.json").read_text())["filtered_rows"] == counted
