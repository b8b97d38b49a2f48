"""Whole-job problems fail before Ray starts or a model loads, with a message that says what to fix."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dgbatch import checkpoint, cli, driver, pool
from tests.helpers import write_jsonl, write_prompts


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


# ---- every job-level problem: exit 2, one line on stderr, no traceback, before Ray or the model ----


def one_line_error(code: int, err: str) -> str:
    assert code == driver.EXIT_BAD_INPUT, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("dgbatch: error: "), err
    assert "Traceback" not in err
    return lines[0]


def toy_copy(tmp_path, toy_model_dir, edit=None) -> Path:
    """A copy of the toy checkpoint (weights linked, not copied), changed by `edit(dir)`."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in toy_model_dir.iterdir():
        (ckpt / f.name).symlink_to(f) if f.suffix == ".safetensors" else (ckpt / f.name).write_bytes(f.read_bytes())
    if edit:
        edit(ckpt)
    return ckpt


def _config_json(ckpt: Path, **changes) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: (c / "config.json").write_text('{"model_type": "diffusion_gemma", '), "config.json is not valid JSON"),
        (lambda c: _config_json(c, auto_map={"AutoModel": "modeling_x.XModel"}),
         "config.json asks for custom code (auto_map: modeling_x.XModel); dgbatch never runs a checkpoint's own code"),
        (lambda c: _config_json(c, text_config={"auto_map": {"AutoConfig": "cfg.C"}}), "asks for custom code"),
        (lambda c: _config_json(c, model_type="llama"), "config.json has model_type 'llama'"),
        (lambda c: (c / "tokenizer.json").unlink(), "has no tokenizer (tokenizer.json or tokenizer.model)"),
        (lambda c: (c / "chat_template.jinja").unlink(), "the tokenizer has no chat template"),
        (lambda c: (c / "generation_config.json").write_text("{nope"), "generation_config.json is not valid JSON"),
        (lambda c: (c / "generation_config.json").write_text('{"t_min": 0.9, "t_max": 0.5}'),
         "sampling.t_max (0.5) must be greater than sampling.t_min (0.9)"),
        (lambda c: (c / "tokenizer.json").write_text("{}"), "its tokenizer cannot be loaded"),
    ],
)
def test_a_checkpoint_that_cannot_be_used_is_one_line(tmp_path, toy_model_dir, capsys, no_heavy_work, edit, message):
    ckpt = toy_copy(tmp_path, toy_model_dir, edit)
    code, err = run(capsys, *demo_args(tmp_path, ckpt, write_prompts(tmp_path / "i.parquet", ["x"])))
    assert message in one_line_error(code, err)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["input.path=gopher://host/in.parquet"], "unsupported storage URL scheme 'gopher://'"),
        (["output.path=ftp://host/out"], "unsupported storage URL scheme 'ftp://'"),
        (["model.path=hf://org/model"], "unsupported storage URL scheme 'hf://'"),
        (["output.path=s3://AKIDEXAMPLE:hunter2hunter2@bucket/out"], "s3:// URLs must not carry credentials"),
        (["storage.key=AKIDEXAMPLE"], "storage.key and storage.secret must be set together"),
        (["sampling.max_new_tokens=1024"], "leaves no room for a prompt in the model's 1024 positions"),
        (["model.max_prompt_tokens=1000"], "model.max_prompt_tokens=1000 plus sampling.max_new_tokens=128"),
    ],
)
def test_storage_and_size_problems_are_one_line(tmp_path, toy_model_dir, capsys, no_heavy_work, extra, message):
    code, err = run(capsys, *demo_args(tmp_path, toy_model_dir, write_prompts(tmp_path / "i.parquet", ["x"]), *extra))
    line = one_line_error(code, err)
    assert message in line and "hunter2" not in line


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_s3_endpoint_that_refuses_connections_is_one_line(tmp_path, toy_model_dir, capsys, no_heavy_work,
                                                             monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries only make this slower (about 12 s by default)
    endpoint = f"http://127.0.0.1:{_free_port()}"
    code, err = run(capsys, *demo_args(tmp_path, toy_model_dir, write_prompts(tmp_path / "i.parquet", ["x"]),
                                       "output.path=s3://bucket/out", f"storage.endpoint_url={endpoint}",
                                       "storage.key=AKIDEXAMPLE", "storage.secret=not-a-real-secret-123"))
    line = one_line_error(code, err)
    assert f"cannot access output.path s3://bucket/out at endpoint {endpoint}" in line
    assert "the endpoint does not answer" in line and "not-a-real-secret-123" not in line


def test_half_set_aws_credentials_in_the_environment_are_one_line(tmp_path, toy_model_dir, capsys, no_heavy_work,
                                                                  monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE123")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    code, err = run(capsys, *demo_args(tmp_path, toy_model_dir, write_prompts(tmp_path / "i.parquet", ["x"]),
                                       "output.path=s3://bucket/out"))
    line = one_line_error(code, err)
    assert "the AWS environment" in line and "Partial credentials found in env, missing: AWS_SECRET_ACCESS_KEY" in line


def test_a_wrong_s3_secret_is_one_line_without_the_secret(tmp_path, toy_model_dir, capsys, no_heavy_work, s3_server,
                                                         s3_bucket):
    wrong = "WRONG-secret-" + "7" * 20
    code, err = run(capsys, *demo_args(tmp_path, toy_model_dir, write_prompts(tmp_path / "i.parquet", ["x"]),
                                       f"output.path={s3_bucket}/out", f"storage.endpoint_url={s3_server.endpoint_url}",
                                       f"storage.key={s3_server.key}", f"storage.secret={wrong}"))
    line = one_line_error(code, err)
    assert "access denied" in line and "storage.key/storage.secret" in line and wrong not in line


def test_a_missing_bucket_is_one_line(tmp_path, toy_model_dir, capsys, no_heavy_work, s3_env):
    code, err = run(capsys, *demo_args(tmp_path, toy_model_dir, write_prompts(tmp_path / "i.parquet", ["x"]),
                                       "output.path=s3://no-such-bucket-dgbatch/out"))
    assert "bucket 'no-such-bucket-dgbatch' does not exist" in one_line_error(code, err)


def corrupt_pages(path: Path, groups: int = 1) -> Path:
    """A Parquet file whose footer is intact but whose last row group's first data page is garbage."""
    rows = 100 * groups
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"prompt": [f"reverse {'ab' * 20}{i}" for i in range(rows)]}), path, row_group_size=100)
    start = pq.ParquetFile(path).metadata.row_group(groups - 1).column(0).data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start : start + 40] = b"\xff" * 40  # the page header and the start of its data
    path.write_bytes(bytes(raw))
    return path


@pytest.fixture
def no_model(ray_local, monkeypatch):
    """For problems found while planning (Ray is up): fail the test if the model loaded."""

    def boom(*a, **k):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(checkpoint, "load_model", boom)


@pytest.mark.parametrize("groups", [1, 3], ids=["read by the driver", "read by a planning task"])
def test_a_parquet_file_with_corrupt_pages_is_one_line(tmp_path, toy_model_dir, capsys, no_model, groups):
    path = corrupt_pages(tmp_path / "in" / "bad.parquet", groups)
    code, err = run(capsys, *demo_args(tmp_path, toy_model_dir, path, "plan.fragment_rows=100"))
    first = (groups - 1) * 100
    assert f"input file 'bad.parquet': rows {first}-{first + 99} cannot be read" in one_line_error(code, err)


@pytest.mark.parametrize(
    "make_input, extra, message",
    [
        (lambda d: (pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), d / "e.parquet"),
                    d / "e.parquet")[1], [], "holds no rows (1 file(s), all empty)"),
        (lambda d: (d.joinpath("z.parquet").write_bytes(b""), d / "z.parquet")[1], [], "is not a readable Parquet"),
        (lambda d: write_prompts(d / "n.parquet", ["a", "b"], uid=["1", None]), ["input.id_column=uid"],
         "input file 'n.parquet' rows 0-1: input.id_column 'uid' has 1 null value(s); every row needs an id"),
        (lambda d: write_prompts(d / "f.parquet", ["a"], uid=[1.5]), ["input.id_column=uid"],
         "id column 'uid' has type double; ids must be strings or integers"),
    ],
)
def test_unreadable_or_unidentifiable_input_is_one_line(tmp_path, toy_model_dir, capsys, no_heavy_work,
                                                        make_input, extra, message):
    inp = tmp_path / "in"
    inp.mkdir()
    code, err = run(capsys, *demo_args(tmp_path, toy_model_dir, make_input(inp), *extra))
    assert message in one_line_error(code, err)


def test_schema_drift_across_files_names_the_columns(tmp_path, toy_model_dir, capsys, no_heavy_work):
    inp = tmp_path / "in"
    write_prompts(inp / "a.parquet", ["x"], n=[1])
    write_prompts(inp / "b.parquet", ["y"], n=["one"], extra=[2])
    code, err = run(capsys, *demo_args(tmp_path, toy_model_dir, inp))
    line = one_line_error(code, err)
    assert "input file 'b.parquet' has a different schema from 'a.parquet'" in line
    assert "has extra columns ['extra']" in line and "column 'n' is string, not int64" in line


@pytest.mark.parametrize(
    "uids, message",
    [
        ([7, 8, 7], "input.id_column 'uid' has duplicate values: '7' at 'd.parquet' rows 0 and 2; ids must be unique"),
        (["a", ""], "input file 'd.parquet' row 1: input.id_column 'uid' is an empty string"),
        (["x" * 5000, "y"], "input.id_column 'uid' is 5000 characters long"),
    ],
)
def test_bad_ids_found_while_planning_are_one_line(tmp_path, toy_model_dir, capsys, no_model, uids, message):
    path = write_prompts(tmp_path / "in" / "d.parquet", ["reverse a"] * len(uids), uid=uids)
    code, err = run(capsys, *demo_args(tmp_path, toy_model_dir, path, "input.id_column=uid"))
    assert message in one_line_error(code, err)
    assert not (tmp_path / "out" / "_plan" / "manifest.json").exists()


def test_an_input_file_rewritten_while_the_job_runs_is_a_job_level_error(tmp_path):
    from dgbatch.config import InputSection
    from dgbatch.planning.source import InputError, inspect_input, read_fragment

    path = write_prompts(tmp_path / "in" / "p.parquet", ["a", "b", "c", "d"])
    section = InputSection(path=str(path))
    [frag] = inspect_input(section, None, 1000).fragments
    write_prompts(path, ["a", "b"])  # rewritten between inspection and planning
    with pytest.raises(InputError, match=r"input file 'p.parquet' changed while the job ran: rows 0-3 now hold 2"):
        read_fragment(frag, section, None)
