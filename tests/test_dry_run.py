"""`dgbatch plan CONFIG`: a dry run that plans as the planner does, estimates, and writes nothing."""

import json

import pytest

from dgbatch import cli
from tests.helpers import DEMO_CONFIG, MIXED_PROMPTS, copy_output


def tree(root) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def plan_json(capsys, *args) -> dict:
    assert cli.main(["plan", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_plan_writes_nothing_and_its_figures_match_the_real_plan(demo_output, tmp_path, capsys):
    fresh = tmp_path / "never-written"
    r = plan_json(capsys, DEMO_CONFIG, f"output.path={fresh}", "--calibrate-rows", "8")
    assert not fresh.exists()  # nothing at all under the output, data/ included
    real = json.loads((demo_output / "_plan" / "manifest.json").read_text())
    assert r["rows"] == real["num_rows"] == 96 and r["bucket_edges"] == real["edges"]
    assert r["shards"] == len(real["shards"]) and r["error_rows"] == 0
    # The padding figure is the planner's: prompt tokens over padded positions of the shards it wrote.
    tokens = sum(s["prompt_tokens"] for s in real["shards"])
    positions = sum(s["padded_positions"] for s in real["shards"])
    assert r["prompt_tokens"] == tokens and r["padded_positions"]["buckets"] == positions
    assert r["padding"]["buckets"] == round(1 - tokens / positions, 4)
    assert r["padding"]["buckets"] < r["padding"]["input_order"]
    assert sum(b["rows"] for b in r["buckets"]) == 96
    est = r["estimate"]
    assert est["calibration_rows"] == 8 and "calibration" in est["method"] and est["batch_size"] == 32
    assert est["output_tokens"] > 0 and est["generation_s"] > 0
    # From a sample of 8, the output-token estimate lands near the real total (2,650-ish on the toy).
    real_tokens = json.loads((demo_output / "_summary.json").read_text())["output_tokens"]
    assert 0.4 * real_tokens < est["output_tokens"] < 2.5 * real_tokens

    # On an existing output: read only, and it says what a run would do.
    out = copy_output(demo_output, tmp_path / "out")
    before = tree(out)
    r = plan_json(capsys, DEMO_CONFIG, f"output.path={out}", "--calibrate-rows", "0")
    assert tree(out) == before
    assert r["output_state"].startswith("holds this job, complete") and r["estimate"]["method"].startswith("none")


def test_plan_lists_row_errors_with_examples_without_loading_the_model(mixed_output, capsys, monkeypatch):
    from dgbatch import checkpoint

    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: pytest.fail("--calibrate-rows 0 loaded the model"))
    job = json.loads((mixed_output / "_job.json").read_text())["config"]
    args = [DEMO_CONFIG, f"model.path={job['model']['path']}", f"input.path={job['input']['path']}",
            "model.max_prompt_tokens=40", "plan.shard_rows=3", "sampling.max_new_tokens=32",
            f"output.path={mixed_output}", "--calibrate-rows", "0"]
    r = plan_json(capsys, *args)
    assert r["rows"] == len(MIXED_PROMPTS) and r["error_rows"] == 5
    errors = {e["reason"]: e for e in r["errors"]}
    assert errors["prompt is empty"]["rows"] == 2 and errors["prompt is null"]["rows"] == 1
    too_long = errors["prompt has N tokens; the model accepts at most N"]
    assert too_long["rows"] == 2 and {x["id"] for x in too_long["examples"]} == {"in.parquet:5", "in.parquet:8"}
    real = json.loads((mixed_output / "_plan" / "manifest.json").read_text())
    assert r["shards"] == len(real["shards"])

    assert cli.main(["plan", *map(str, args)]) == 0
    text = capsys.readouterr().out
    assert "5 rows will be error records" in text and "e.g. in.parquet:5" in text
    assert "padding" in text and "estimate none (--calibrate-rows 0)" in text


def test_a_bad_config_fails_plan_in_one_line(tmp_path, capsys):
    assert cli.main(["plan", str(DEMO_CONFIG), "plan.shard_row=4"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'plan.shard_rows'?" in err
