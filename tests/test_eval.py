"""The eval job end to end on local Ray and the toy checkpoint: scores, metrics, a user scorer, --rescore."""

import json
from pathlib import Path

import pytest

from dgbatch import checkpoint, cli, driver, pool
from dgbatch.config import load_config
from dgbatch.eval.metrics import pass_at_k
from dgbatch.toy.tasks import sample_examples
from tests.helpers import read_output, write_jsonl

REPO = Path(__file__).resolve().parent.parent


def eval_set(path: Path, n: int, seed: int, bad_line: bool = True) -> Path:
    lines = [{"qid": f"q{i}", "task": e.task, "question": e.prompt, "answer": e.answer}
             for i, e in enumerate(sample_examples(n, seed, tasks=("reverse", "repeat")))]
    if bad_line:
        lines.insert(3, '{"qid": "broken", "task": "reverse", "question": ')  # a truncated line
    return write_jsonl(path, lines)


def eval_config(tmp_path: Path, toy_model_dir: Path, data: Path, *overrides: str):
    base = {"model": {"path": str(toy_model_dir)}, "output": {"path": str(tmp_path / "out")},
            "input": {"path": str(data), "format": "jsonl", "prompt_column": "question",
                      "reference_column": "answer"},
            "eval": {"group_column": "task"}, "engine": {"batch_size": 16}, "plan": {"shard_rows": 8},
            "sampling": {"max_new_tokens": 32}}
    return load_config(None, list(overrides), base=base)


def metrics_of(out: Path) -> dict:
    m = json.loads((out / "_metrics.json").read_text())
    return {k: v for k, v in m.items() if k not in ("scored_at", "scoring_time_s")}


def no_generation(monkeypatch) -> None:
    """Spies (not mocks of behaviour): fail the test if Ray starts or the model loads from here on."""

    def boom(*a, **k):
        raise AssertionError("the job went past validation, or a rescore generated: Ray started or the model loaded")

    monkeypatch.setattr(pool, "init_ray", boom)
    monkeypatch.setattr(checkpoint, "load_model", boom)


def test_eval_scores_every_row_and_its_metrics_recompute_from_the_rows(ray_local, tmp_path, toy_model_dir,
                                                                       monkeypatch):
    from dgbatch.eval import job

    data = eval_set(tmp_path / "eval.jsonl", 14, seed=11)
    cfg = eval_config(tmp_path, toy_model_dir, data)
    assert job.run(cfg) == 0
    rows = read_output(tmp_path / "out").to_pylist()
    assert len(rows) == 15  # rows out = lines in
    [bad] = [r for r in rows if r["finish_reason"] == "error"]
    assert "input line 4: not valid JSON" in bad["error"] and bad["score"] is None and bad["extracted"] is None
    good = [r for r in rows if r["finish_reason"] != "error"]
    # an independent recomputation: exact match after collapsing whitespace and case
    norm = lambda s: " ".join(s.split()).casefold()
    for r in good:
        assert r["score"] == float(norm(r["output_text"]) == norm(r["answer"]))
        assert r["extracted"] == norm(r["output_text"])
    m = metrics_of(tmp_path / "out")
    assert m["accuracy"] == sum(r["score"] for r in good) / len(good)
    assert m["n"] == len(good) == 14 and m["error_rows"] == 1 and m["rows"] == 15 and m["scoring_errors"] == 0
    assert m["accuracy_all_rows"] == pytest.approx(sum(r["score"] for r in good) / 15)
    assert m["accuracy"] >= 0.7, m  # the toy is good at reverse and repeat
    for task in ("reverse", "repeat"):
        mine = [r["score"] for r in good if r["task"] == task]
        assert m["groups"][task]["accuracy"] == sum(mine) / len(mine) and m["groups"][task]["n"] == len(mine)
    assert set(m["groups"]) == {"reverse", "repeat"} and m["ungrouped_rows"] == 1  # the broken line has no task
    assert m["tokens_per_forward"]["mean"] == pytest.approx(sum(r["tokens_per_forward"] for r in good) / len(good))
    assert m["decoder_forwards"]["total"] == sum(r["num_decoder_forwards"] for r in good)
    assert m["model_path"] == str(toy_model_dir) and m["sampling"]["max_new_tokens"] == 32
    job = json.loads((Path(cfg.output.path) / "_job.json").read_text())
    assert m["config_fingerprint"] == job["fingerprint"] and m["dgbatch_version"] and m["complete"] is True
    assert m["higher_is_better"] == {"accuracy": True} and m["eval"]["scorer"] == "exact"

    # A user scorer, imported from the working directory, rescores without generating.
    work = tmp_path / "work"
    work.mkdir()
    (work / "toy_scorers_t1.py").write_text(
        "def starts_right(output, reference, row):\n"
        "    assert row['qid'].startswith('q')\n"
        "    return float(output[:1] == reference[:1]), output[:1]\n")
    monkeypatch.chdir(work)
    no_generation(monkeypatch)
    before = {r["id"]: r for r in rows}
    assert cli.main(["eval", "--rescore", str(tmp_path / "out"), "eval.scorer=toy_scorers_t1:starts_right"]) == 0
    user = metrics_of(tmp_path / "out")
    rescored = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert cli.main(["eval", "--rescore", str(tmp_path / "out")]) == 0  # back to the job's own scorer
    for i, r in rescored.items():
        if r["finish_reason"] != "error":
            assert r["score"] == float(r["output_text"][:1] == r["answer"][:1])
            assert r["extracted"] == r["output_text"][:1]
        assert {k: v for k, v in r.items() if k not in ("score", "extracted")} == \
               {k: v for k, v in before[i].items() if k not in ("score", "extracted")}  # generations untouched
    assert user["eval"]["scorer"] == "toy_scorers_t1:starts_right"
    assert user["accuracy"] == sum(r["score"] for r in rescored.values() if r["score"] is not None) / 14
    assert metrics_of(tmp_path / "out") == m  # --rescore gives the same metrics without generating
    assert {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()} == before


def test_a_scorer_that_cannot_be_imported_fails_before_the_model_loads(tmp_path, toy_model_dir, capsys, monkeypatch):
    no_generation(monkeypatch)
    data = eval_set(tmp_path / "eval.jsonl", 3, seed=1, bad_line=False)
    cfg = REPO / "configs" / "eval-toy.yaml"
    code = cli.main(["eval", str(cfg), f"input.path={data}", "input.id_column=qid", "input.prompt_column=question",
                     f"output.path={tmp_path / 'out'}", "eval.scorer=missing_module_t2:f"])
    assert code == driver.EXIT_BAD_INPUT and "cannot import 'missing_module_t2'" in capsys.readouterr().err
    code = cli.main(["eval", str(cfg), f"output.path={tmp_path / 'out'}", "input.reference_column=null"])
    assert code == driver.EXIT_BAD_INPUT and "set input.reference_column" in capsys.readouterr().err
    code = cli.main(["eval", str(cfg), f"output.path={tmp_path / 'out'}", "eval.group_column=topic"])
    assert code == driver.EXIT_BAD_INPUT and "column 'topic' (eval.group_column) not found" in capsys.readouterr().err
    assert not (tmp_path / "out" / "data").exists()


def test_samples_give_pass_at_k_and_maj_at_k_that_recompute_from_the_rows(ray_local, tmp_path, toy_model_dir):
    from dgbatch.eval import job

    data = eval_set(tmp_path / "eval.jsonl", 6, seed=5, bad_line=False)
    cfg = eval_config(tmp_path, toy_model_dir, data, "sampling.num_samples=3", "sampling.t_min=0.6",
                      "sampling.t_max=1.2", "eval.pass_k=[1,2,3]")
    assert job.run(cfg) == 0
    rows = read_output(tmp_path / "out").to_pylist()
    assert len(rows) == 18
    prompts: dict[str, list] = {}
    for r in sorted(rows, key=lambda r: r["sample_index"]):
        prompts.setdefault(r["id"].rsplit("#", 1)[0], []).append(r)
    m = metrics_of(tmp_path / "out")
    for k in (1, 2, 3):
        want = [pass_at_k(3, sum(s["score"] >= 0.5 for s in p), k) for p in prompts.values()]
        assert m[f"pass@{k}"] == pytest.approx(sum(want) / len(want))
    votes = []
    for p in prompts.values():
        answers = [s["extracted"] for s in p]
        top = max(answers, key=lambda a: (answers.count(a), -answers.index(a)))
        votes.append(p[answers.index(top)]["score"])
    assert m["maj@3"] == pytest.approx(sum(votes) / len(votes))
    assert m["pass@1"] == pytest.approx(m["accuracy"]) and m["n_prompts"] == 6 and m["num_samples"] == 3
