"""Rows to prompts, without Ray or a model: templates, chat content parts, system prompts, JSON Lines."""

import pyarrow as pa
import pytest

from dgbatch.config import load_config
from dgbatch.planning.chats import row_chats
from dgbatch.planning.jsonl import READ_ERROR
from dgbatch.planning.prompts import PromptEncoder
from dgbatch.planning.source import carried_name, inspect_input, read_fragment
from tests.helpers import write_jsonl

BASE = {"model": {"path": "m"}, "input": {"path": "in.parquet"}, "output": {"path": "out"}}


def section(*overrides):
    return load_config(None, list(overrides), base=BASE).input


def test_a_template_renders_each_rows_columns_and_a_bad_row_fails_alone():
    inp = section("input.template=Translate to {{ lang }}: {{ text | trim }}"
                  "{% if note is defined %} ({{ note }}){% endif %}")
    table = pa.table({"text": [" hello ", "bye", None, "x"], "lang": ["French", "German", "Dutch", None],
                      "note": [None, "formal", None, None], "unused": [1, 2, 3, 4]})
    chats = row_chats(table, inp)
    assert chats[0] == ([{"role": "user", "content": "Translate to French: hello"}], None)
    assert chats[1] == ([{"role": "user", "content": "Translate to German: bye (formal)"}], None)
    for chat, err in chats[2:]:  # a null value is undefined: that row's error, never the text "None"
        assert chat is None and "is undefined" in err and "null value" in err
    assert row_chats(pa.table({"t": [""]}), section("input.template={{ t }}")) == [(None, "prompt is empty")]


def test_a_template_cannot_reach_python_internals():
    inp = section("input.template={{ text.__class__.__mro__ }}")
    [(chat, err)] = row_chats(pa.table({"text": ["hi"]}), inp)
    assert chat is None and "SecurityError" in err


def test_text_parts_are_joined_image_parts_kept_and_other_parts_are_a_row_error():
    msgs = [  # Hugging Face's content-parts chat format, as a Parquet column holds it (one struct type)
        [{"role": "user", "content": [{"type": "text", "text": "reverse "}, {"type": "text", "text": "abc"}]}],
        [{"role": "user", "content": [{"type": "image", "url": "cat.png"}, {"type": "text", "text": "what?"}]}],
        [{"role": "user", "content": [{"text": "no type"}]}],
        [{"role": "user", "content": []}],
        [{"role": "user", "content": [{"type": "audio", "url": "a.wav"}, {"type": "text", "text": "what?"}]}],
    ]
    chats = row_chats(pa.table({"m": msgs}), section("input.prompt_column=null", "input.messages_column=m"))
    assert chats[0] == ([{"role": "user", "content": "reverse abc"}], None)
    assert chats[1] == ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}], None)
    assert chats[2][0] is None and "needs a string 'type'" in chats[2][1]
    assert chats[3] == (None, "messages have no content")
    assert chats[4][0] is None and chats[4][1].startswith("unsupported content part 'audio'")


def test_a_system_prompt_comes_first_and_the_spliced_render_matches_the_chat_template(toy_model_dir):
    from dgbatch.checkpoint import load_tokenizer

    tok = load_tokenizer(toy_model_dir)
    inp = section("input.system_prompt=Answer tersely.")
    chats = row_chats(pa.table({"prompt": ["reverse abc", "count 1-3"]}), inp)
    assert chats[0][0] == [{"role": "system", "content": "Answer tersely."}, {"role": "user", "content": "reverse abc"}]
    enc = PromptEncoder(tok, 1000, system_prompt="Answer tersely.")
    assert enc._splice is not None  # the fast path survives a system turn
    ids, errors = enc.encode_column(pa.table({"prompt": ["reverse abc", "count 1-3"]}), inp)
    assert errors == [None, None]
    for (chat, _), got in zip(chats, ids):
        assert got == tok.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    # a conversation that brings its own system turn keeps it
    own = [[{"role": "system", "content": "Mine."}, {"role": "user", "content": "hi"}]]
    [(chat, _)] = row_chats(pa.table({"m": own}), section("input.prompt_column=null", "input.messages_column=m",
                                                          "input.system_prompt=Other."))
    assert chat == own[0]


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_every_jsonl_line_is_a_row_and_a_bad_line_is_an_error_row(tmp_path, gz):
    lines = [{"prompt": "reverse abc", "n": 1}, "{not json", "", {"prompt": "count 1-3", "n": 2.5, "extra": [1]},
             "[1, 2]", {"prompt": 7}, "   ", {"prompt": "repeat 2 x"}, b"\xff".decode("latin-1")]
    name = "in.jsonl.gz" if gz else "in.jsonl"
    path = write_jsonl(tmp_path / "d" / name, lines, gz=gz)
    inp = section(f"input.path={tmp_path / 'd'}", "input.format=jsonl")
    plan = inspect_input(inp, None, fragment_rows=2)  # several fragments per file: seeks (plain) / skips (gzip)
    assert plan.num_rows == 7 and len(plan.fragments) == 4  # blank lines are not rows
    assert plan.schema.field("n").type == pa.float64() and plan.schema.field("prompt").type == pa.string()
    table = pa.concat_tables([read_fragment(f, inp, None) for f in plan.fragments])
    errors = table.column(READ_ERROR).to_pylist()
    assert table.column("prompt").to_pylist() == ["reverse abc", None, "count 1-3", None, None, "repeat 2 x", None]
    assert errors[0] is None and errors[2] is None and errors[5] is None
    assert errors[1].startswith("input line 2: not valid JSON")
    assert errors[3].startswith("input line 5: not a JSON object")
    assert errors[4].startswith("input line 6: a value does not fit its column's type")  # 7 in a string column
    assert errors[6].startswith("input line 9: not valid JSON")
    assert table.column("extra").to_pylist()[2] == [1]
    assert [f.label for f in plan.fragments] == [name] * 4 and path.exists()


def test_a_chained_jobs_columns_move_under_prev():
    assert carried_name("output_text", None) == "prev_output_text"
    assert carried_name("prev_output_text", None) == "prev_prev_output_text"
    assert carried_name("id", None) == "prev_id" and carried_name("id", "id") == "id"
    assert carried_name("sample_index", None) == "prev_sample_index"
    assert carried_name("prompt", None) == "prompt" and carried_name("prev_note", None) == "prev_note"
