"""Whole-job problems fail before Ray starts or a model loads, with a message that says what to fix."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dgbatch import checkpoint, cli, driver, pool
from tests.conftest import write_jsonl, write_prompts


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Spies (not mocks of behaviour): fail the test if the job got as far as Ray or the model."""

    def boom(*a, **k):
        raise AssertionError("the job went past validation: Ray started or the model loaded")

    monkeypatch.setattr(pool, "init_ray", boom)
    monkeypatch.setattr(checkpoint, "load_model", boom)


def run(capsys, *args) -> tuple[int, str]:
    code = cli.main(["run", *map(str, args)])
    return code, capsys.readouterr().err


def demo_args(tmp_path, toy_model_dir, input_path, *extra):
    cfg = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    return [cfg, f"model.path={toy_model_dir}", f"input.path={input_path}", f"output.path={tmp_path / 'out'}", *extra]


@pytest.mark.parametrize(
    "make_input, extra, message",
    [
        (lambda d: d / "missing.parquet", [], "does not exist"),
        (lambda d: d / "nothing-*.parquet", [], "matched no files"),
        (lambda d: write_prompts(d / "a.parquet", ["x"]), ["input.prompt_column=text"],
         "column 'text' (input.prompt_column) not found; columns are ['prompt']"),
        (lambda d: (pq.write_table(pa.table({"prompt": [1, 2]}), d / "i.parquet"), d / "i.parquet")[1], [],
         "column 'prompt' has type int64, expected string"),
        (lambda d: (pq.write_table(pa.table({"prompt": [[{"role": "user", "content": "hi"}]]}), d / "m.parquet"),
                    d / "m.parquet")[1], [], "for chat messages set input.messages_column"),
        (lambda d: write_prompts(d / "s.parquet", ["x"]), ["input.messages_column=prompt", "input.prompt_column=null"],
         "expected list<struct<role: string, content: string>>"),
        (lambda d: (d.joinpath("t.parquet").write_text("id,prompt\n1,hi\n"), d / "t.parquet")[1], [],
         "is not a readable Parquet file"),
        (lambda d: write_prompts(d / "c.parquet", ["x"], topic=["y"]),
         ["input.prompt_column=null", "input.template=Write about {{ topic }} in {{ style }}"],
         "input.template uses 'style', not a column of the input; columns are ['prompt', 'topic']"),
        (lambda d: write_prompts(d / "r.parquet", ["x"]), ["input.reference_column=answer"],
         "column 'answer' (input.reference_column) not found"),
        (lambda d: write_prompts(d / "b.parquet", ["x"], budget=["many"]), ["input.max_new_tokens_column=budget"],
         "column 'budget' (input.max_new_tokens_column) has type string, expected integers"),
        (lambda d: write_jsonl(d / "j.jsonl", [{"text": "x"}, "not json"]), ["input.format=jsonl"],
         "column 'prompt' (input.prompt_column) not found; columns are ['text']"),
        (lambda d: (d.joinpath("g.jsonl.gz").write_bytes(b"not gzip at all"), d / "g.jsonl.gz")[1],
         ["input.format=jsonl"], "'g.jsonl.gz' cannot be read as JSON Lines"),
        (lambda d: write_jsonl(d / "p.jsonl", [{"prompt": "x"}]), [], "for JSON Lines set input.format=jsonl"),
        (lambda d: write_jsonl(d / "a.json", ['[{"prompt": "x"}, {"prompt": "y"}]']), ["input.format=jsonl"],
         "input file 'a.json' has no line holding a JSON object"),
        (lambda d: write_prompts(d / "u.parquet", ["x"]), ["input.id_column=uid"],
         "column 'uid' (input.id_column) not found"),
        (lambda d: write_prompts(d / "v.parquet", ["x"]), ["engine.batch_sise=3"], "engine.batch_sise: unknown key"),
        (lambda d: write_prompts(d / "w.parquet", ["x"]), ["sampling.max_new_tokens=lots"],
         "sampling.max_new_tokens: Input should be a valid integer"),
    ],
)
def test_job_level_errors_fail_before_heavy_work(tmp_path, toy_model_dir, capsys, no_heavy_work,
                                                 make_input, extra, message):
    inp = tmp_path / "in"
    inp.mkdir()
    code, err = run(capsys, *demo_args(tmp_path, toy_model_dir, make_input(inp), *extra))
    assert code == driver.EXIT_BAD_INPUT
    assert message in err
    assert not (tmp_path / "out" / "data").exists()


def test_non_parquet_file_in_input_directory(tmp_path, toy_model_dir, capsys, no_heavy_work):
    inp = tmp_path / "in"
    write_prompts(inp / "part-0.parquet", ["count 1-3"])
    (inp / "notes.txt").write_text("not parquet")
    code, err = run(capsys, *demo_args(tmp_path, toy_model_dir, inp))
    assert code == driver.EXIT_BAD_INPUT and "'notes.txt' is not a readable Parquet file" in err


def test_checkpoint_without_safetensors_is_refused(tmp_path, toy_model_dir, capsys, no_heavy_work):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((toy_model_dir / "config.json").read_text())
    (ckpt / "pytorch_model.bin").write_bytes(b"pickle")
    code, err = run(capsys, *demo_args(tmp_path, ckpt, write_prompts(tmp_path / "i.parquet", ["x"])))
    assert code == driver.EXIT_BAD_INPUT
    assert "no .safetensors weights" in err and "pytorch_model.bin" in err


def test_missing_model_path(tmp_path, capsys, no_heavy_work):
    code, err = run(capsys, *demo_args(tmp_path, tmp_path / "nope", write_prompts(tmp_path / "i.parquet", ["x"])))
    assert code == driver.EXIT_BAD_INPUT and "is not a directory holding a checkpoint" in err
