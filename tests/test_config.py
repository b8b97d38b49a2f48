"""Config: YAML + dotted overrides, and every error names the key and what it expects."""

import re
from pathlib import Path

import pytest

from dgbatch.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
BASE = {"model": {"path": "m"}, "input": {"path": "in.parquet"}, "output": {"path": "out"}}


def test_demo_config_loads_with_documented_defaults():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.model.path == "models/toy-diffusiongemma"
    assert cfg.input.prompt_column == "prompt"
    assert cfg.engine.batch_size == 32
    assert cfg.sampling.max_new_tokens is None  # left to the checkpoint's generation_config.json


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["engine.batch_size=64", "sampling.t_min=0.1", "sampling.t_max=0.5",
                             "sampling.seed=7", "replicas.num_replicas=2", "plan.bucket_edges=[16,32]",
                             "output.path=s3://bucket/x", "input.id_column=uid"], base=BASE)
    assert cfg.engine.batch_size == 64 and cfg.sampling.seed == 7 and cfg.replicas.num_replicas == 2
    assert cfg.sampling.t_min == 0.1 and cfg.plan.bucket_edges == [16, 32]
    assert cfg.output.path == "s3://bucket/x" and cfg.input.id_column == "uid"


def test_file_then_overrides_precedence(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("model: {path: a}\ninput: {path: b}\noutput: {path: c}\nengine: {batch_size: 8}\n")
    assert load_config(p).engine.batch_size == 8
    assert load_config(p, ["engine.batch_size=12"]).engine.batch_size == 12


@pytest.mark.parametrize(
    "override, expected",
    [
        ("engine.batch_sise=4", "engine.batch_sise: unknown key"),
        ("engine.batch_size=abc", "engine.batch_size: Value error, must be a positive integer or 'auto'"),
        ("engine.batch_size=0", "engine.batch_size: Value error, must be a positive integer or 'auto'"),
        ("sampling.entropy_bound=-1", "sampling.entropy_bound: Input should be greater than 0"),
        ("modle.path=x", "modle: unknown key"),
        ("engine.backend=vllm", "engine.backend: Input should be 'engine' or 'reference'"),
        ("sampling.t_max=0.1", "sampling.t_max (0.1) must be greater than sampling.t_min (0.2)"),
    ],
)
def test_bad_values_name_the_key_and_type(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["sampling.t_min=0.2", override] if "t_max" in override else [override], base=BASE)
    assert expected in str(e.value)


def test_missing_required_section():
    with pytest.raises(ConfigError, match="output: required, not set"):
        load_config(None, [], base={"model": {"path": "m"}, "input": {"path": "x"}})


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        load_config(None, ["engine.batch_size"], base=BASE)
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["model.path.x=1"], base=BASE)


def test_both_prompt_sources_refused_in_one_file_and_the_later_override_wins():
    both = {**BASE, "input": {**BASE["input"], "prompt_column": "p", "messages_column": "m"}}
    with pytest.raises(ConfigError, match="only one of input.prompt_column, input.messages_column and input.template"):
        load_config(None, base=both)
    cfg = load_config(None, ["input.prompt_column=p", "input.messages_column=m"], base=BASE)
    assert (cfg.input.prompt_column, cfg.input.messages_column) == (None, "m")


def test_a_template_override_replaces_a_prompt_column_set_in_the_file():
    both = {**BASE, "input": {**BASE["input"], "prompt_column": "p", "template": "{{ text }}"}}
    with pytest.raises(ConfigError, match="only one of input.prompt_column, input.messages_column and input.template"):
        load_config(None, base=both)
    cfg = load_config(None, ["input.prompt_column=p", "input.template={{ text }}"], base=BASE)
    assert (cfg.input.prompt_column, cfg.input.template) == (None, "{{ text }}")


@pytest.mark.parametrize("override, message", [
    ("input.template=Say {{ text", "input.template: Value error, not a valid Jinja2 template"),
    ("output.filters.regex=(", "output.filters.regex: Value error, not a valid regular expression"),
    ("output.drop_filtered=true", "output.drop_filtered=true needs output.filters"),
    ("eval.scorer=fuzzy", "must be one of exact, contains, regex, numeric or 'module:function'"),
    ("eval.scorer=regex", "eval.scorer=regex needs eval.regex"),
    ("eval.pass_k=[1,4]", "eval.pass_k [4] exceed sampling.num_samples=1"),
    ("sampling.num_samples=0", "sampling.num_samples: Input should be greater than 0"),
])
def test_eval_and_synthetic_settings_are_checked_up_front(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override], base=BASE)


def test_a_template_replaces_the_default_prompt_column():
    cfg = load_config(None, ["input.template=Translate: {{ text }}"], base=BASE)
    assert cfg.input.prompt_column is None and cfg.input.prompt_source == ("input.template", "Translate: {{ text }}")


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_secrets_are_masked_in_public_dict_and_errors():
    cfg = load_config(None, ["storage.key=AKIDSECRETKEY", "storage.secret=supersecretvalue"], base=BASE)
    assert "supersecretvalue" not in str(cfg.public_dict()) and "AKIDSECRETKEY" not in repr(cfg)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["storage.secret=supersecretvalue", "storage.bogus=1"], base=BASE)
    assert "supersecretvalue" not in str(e.value)


def test_fingerprint_tracks_outputs_not_scheduling():
    a = load_config(None, [], base=BASE)
    assert a.fingerprint() == load_config(None, ["replicas.num_replicas=4", "engine.batch_size=8"], base=BASE).fingerprint()
    assert a.fingerprint() != load_config(None, ["sampling.seed=1"], base=BASE).fingerprint()
    # the two backends sample differently: a job must not resume into a mix of both
    assert a.fingerprint() != load_config(None, ["engine.backend=reference"], base=BASE).fingerprint()
    # samples and output filters decide the outputs; the scorer does not (a rescore reuses the generations)
    assert a.fingerprint() != load_config(None, ["sampling.num_samples=2"], base=BASE).fingerprint()
    assert a.fingerprint() != load_config(None, ["output.filters.json=true"], base=BASE).fingerprint()
    assert a.fingerprint() == load_config(None, ["eval.scorer=contains"], base=BASE).fingerprint()


def test_public_dict_loads_back_as_the_same_config():
    cfg = load_config(None, ["output.filters.json=true", "eval.scorer=numeric"], base=BASE)
    assert load_config(None, [], base=cfg.public_dict()) == cfg


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    assert load_config(path).model.path
