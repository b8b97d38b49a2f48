"""The README's ways of reading a job's output run as written: pandas, datasets, DuckDB, polars."""

import re
from pathlib import Path

import pytest

from dgbatch.toy.tasks import sample_examples
from tests.helpers import write_jsonl

REPO = Path(__file__).resolve().parent.parent


def reading_snippets() -> list[str]:
    """The jobs' reading recipes: runnable blocks (they import what they use) that read OUTPUT/."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)
    return [b for b in blocks if "OUTPUT/" in b and b.startswith("import ")]


def test_the_readme_shows_every_reader_for_every_job():
    snippets = reading_snippets()
    assert len(snippets) == 3  # generate, synthetic data, evals
    for code in snippets:
        for reader in ("pd.read_parquet", "datasets.load_dataset", "duckdb.sql", "pl.read_parquet"):
            assert reader in code, (reader, code)


def test_the_readmes_reading_snippets_run_on_a_real_output(ray_local, tmp_path, toy_model_dir, monkeypatch):
    import datasets

    from dgbatch.config import load_config
    from dgbatch.eval import job

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    lines = [{"task": e.task, "prompt": e.prompt, "answer": e.answer} for e in sample_examples(4, 3)]
    base = {"model": {"path": str(toy_model_dir)}, "output": {"path": str(tmp_path / "out")},
            "input": {"path": str(write_jsonl(tmp_path / "set.jsonl", lines)), "format": "jsonl",
                      "reference_column": "answer"},
            "sampling": {"max_new_tokens": 32, "num_samples": 2}, "eval": {"group_column": "task"}}
    cfg = load_config(None, ["output.filters.regex=^[a-z ]+$"], base=base)  # every column the snippets read
    assert job.run(cfg) == 0
    for code in reading_snippets():
        scope: dict = {}
        exec(compile(code.replace("OUTPUT/", f"{tmp_path / 'out'}/"), "README.md", "exec"), scope)  # noqa: S102
        frames = [v for k, v in scope.items() if not k.startswith("__") and hasattr(v, "__len__")
                  and (hasattr(v, "shape") or hasattr(v, "num_rows"))]
        assert any(len(f) > 0 for f in frames), code
    assert pytest.approx(scope["metrics"]["accuracy"]) == scope["df"]["score"].mean()
