"""Config: YAML + dotted overrides, and every error names the key and what it expects."""

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


def test_both_prompt_sources_refused():
    with pytest.raises(ConfigError, match="only one of input.prompt_column and input.messages_column"):
        load_config(None, ["input.prompt_column=p", "input.messages_column=m"], base=BASE)


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


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    assert load_config(path).model.path
