"""Config: YAML + dotted overrides, and every error names the key and what it expects."""

import re
from pathlib import Path

import pytest

from dgbatch.config import ConfigError, JobConfig, load_config
from tests.helpers import leaf_fields

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
        ("engine.batch_size=abc", "engine.batch_size: must be a positive integer or 'auto' (got 'abc')"),
        ("engine.batch_size=0", "engine.batch_size: must be a positive integer or 'auto' (got 0)"),
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
    assert a.fingerprint() == load_config(None, ["replicas.num_replicas=4", "engine.batch_size=8", "model.device=cpu",
                                                 "input.on_change=replan"], base=BASE).fingerprint()
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


def test_fingerprint_is_over_resolved_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "models")
    rel = load_config(None, [], base={**BASE, "model": {"path": "models/m"}})
    for path in (str(tmp_path / "models" / "m"), "./models/m/", "link/m", f"file://{tmp_path}/models/m"):
        assert load_config(None, [], base={**BASE, "model": {"path": path}}).fingerprint() == rel.fingerprint(), path


def test_a_sampling_value_equal_to_the_checkpoints_default_is_the_same_job(toy_model_dir):
    from dgbatch import checkpoint, driver

    def identity(*overrides):
        cfg = load_config(None, list(overrides), base={**BASE, "model": {"path": str(toy_model_dir)}})
        params = checkpoint.resolve_sampling(toy_model_dir, cfg.sampling)
        max_prompt = checkpoint.max_prompt_tokens(cfg, checkpoint.read_model_config(toy_model_dir), params)
        return driver.job_identity(cfg, toy_model_dir, params, max_prompt)

    # the toy checkpoint's generation_config.json: max_new_tokens 128, t_max 0.1
    assert identity() == identity("sampling.max_new_tokens=128", "sampling.t_max=0.1")
    changed = identity("sampling.max_new_tokens=64")
    assert changed != identity() and driver.identity_changes(identity(), changed)[0].startswith(
        "model.max_prompt_tokens 896 -> 960")  # the prompt limit follows the output length
    assert "sampling.max_new_tokens 128 -> 64" in driver.identity_changes(identity(), changed)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    assert load_config(path).model.path


@pytest.mark.parametrize(
    "override, expected",
    [
        ("sampling.t_min=.inf", "sampling.t_min: Input should be a finite number (got inf) [finite_number]"),
        ("sampling.entropy_bound=.nan", "sampling.entropy_bound: Input should be a finite number (got nan)"),
        ("replicas.num_cpus=-.inf", "replicas.num_cpus: Input should be a finite number"),
        ("parallel.timeout_s=.inf", "parallel.timeout_s: Input should be a finite number"),
        ("plan.shard_rows=true", "plan.shard_rows: Input should be a valid integer (got True) [int_type]"),
        ("replicas.num_replicas=false", "replicas.num_replicas: Input should be a valid integer (got False)"),
        ("sampling.max_new_tokens=2.5", "sampling.max_new_tokens: Input should be a valid integer (got 2.5)"),
        ("plan.shard_rows='64'", "plan.shard_rows: Input should be a valid integer (got '64') [int_type]"),
        ("replicas.num_gpus=true", "replicas.num_gpus: Input should be a valid number (got True) [float_type]"),
        ("output.force=yes-please", "output.force: Input should be a valid boolean (got 'yes-please') [bool_type]"),
        ("output.force=1", "output.force: Input should be a valid boolean (got 1) [bool_type]"),
        ("plan.fragment_rows=0", "plan.fragment_rows: Input should be greater than 0 (got 0) [greater_than]"),
        ("replicas.max_shard_attempts=-2", "replicas.max_shard_attempts: Input should be greater than 0 (got -2)"),
        ("sampling.stability_threshold=-1", "sampling.stability_threshold: Input should be greater than or equal to 0"),
        ("sampling.seed=-1", "sampling.seed: Input should be greater than or equal to 0 (got -1)"),
        ("sampling.seed=9223372036854775808", "sampling.seed: Input should be less than 9223372036854775808"),
        ("sampling.t_max=11", "sampling.t_max: Input should be less than or equal to 10"),
        ("sampling.t_min=-0.1", "sampling.t_min: Input should be greater than or equal to 0"),
        ("sampling.confidence_threshold=0", "sampling.confidence_threshold: Input should be greater than 0"),
        ("plan.num_buckets=65", "plan.num_buckets: Input should be less than or equal to 64"),
        ("plan.bucket_edges=[16,0]", "plan.bucket_edges: must be 'auto' or a list of positive integers"),
        ("plan.bucket_edges=[16,true]", "[bucket_edges]"),
        ("model.path=''", "model.path: String should have at least 1 character (got '') [string_too_short]"),
        ("output.path=' out'", "output.path: must not start or end with whitespace (got ' out') [no_surrounding_space]"),
        ('input.path="a\\nb"', "input.path: must not contain control characters"),
        ("input.prompt_column=''", "input.prompt_column: String should have at least 1 character"),
        ("input.id_column=7", ("input.id_column: Input should be a valid string (got 7); quote it to make it text: "
                               "id_column='7' [string_type]")),
        ("model.device=tpu", "model.device: must be 'auto', 'cpu', 'cuda' or 'cuda:N' (got 'tpu') [device]"),
        ("model.device=cuda:x", "[device]"),
        ("storage.endpoint_url=ftp://h", "storage.endpoint_url: must be an http:// or https:// URL"),
        ("storage.endpoint_url=http://u:p@h", "[endpoint_url]"),
        ("storage.key=AKIDONLY", ("storage.key and storage.secret must be set together, or both left to the AWS "
                                  "environment [key_with_secret]")),
        ("ray.num_cpus=0", "ray.num_cpus: Input should be greater than 0"),
        ("input.on_change=merge", "input.on_change: Input should be 'refuse' or 'replan'"),
    ],
)
def test_values_that_make_no_sense_are_refused_naming_key_value_and_rule(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override], base=BASE)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_exponent_numbers_are_numbers_and_quoted_ones_are_not():
    assert load_config(None, ["sampling.entropy_bound=1e-3"], base=BASE).sampling.entropy_bound == 0.001
    assert load_config(None, ["sampling.confidence_threshold=5E-3"], base=BASE).sampling.confidence_threshold == 0.005
    with pytest.raises(ConfigError, match="sampling.entropy_bound: Input should be a valid number"):
        load_config(None, ["sampling.entropy_bound='1e-3'"], base=BASE)


ALL_FIELDS = [key for key, _ in leaf_fields(JobConfig)]


@pytest.mark.parametrize("key", ALL_FIELDS)
def test_every_field_is_strict_about_type(key):
    """New fields must use config.py's strict types: a value of the wrong kind is refused, never coerced."""
    field = dict(leaf_fields(JobConfig))[key]
    wrong = ["maybe", 1, 0.5, ".nan"] if field.annotation is bool else [True, ".nan", "[true]", "{a: 1}"]
    for value in wrong:
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"{key}={value}"], base=BASE)
        assert key in str(e.value), (key, value, str(e.value))
