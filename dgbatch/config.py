"""The job configuration: one typed tree, loaded from YAML, with dotted `key=value` overrides.

Precedence is command line > file > defaults. Everything is validated here, before any data or
model is touched, so a typo fails in milliseconds with the key and the expected type named.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says what and where."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    path: str = Field(description="Checkpoint directory or fsspec URL (safetensors weights).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights and compute dtype.")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu' or 'cuda[:N]'.")
    max_prompt_tokens: int | None = Field(
        None, gt=0, description="Longest prompt accepted; default: the model's positions minus max_new_tokens."
    )


class InputSection(Section):
    path: str = Field(
        description="Parquet or JSON Lines file, directory or glob (any fsspec URL), or a datasets path/name."
    )
    format: Literal["parquet", "jsonl", "datasets"] = Field(
        "parquet", description="How to read `path`: Parquet, JSON Lines (one object per line, plain or .gz), datasets."
    )
    split: str | None = Field(None, description="For `format: datasets` with a DatasetDict: the split to read.")
    prompt_column: str | None = Field(None, description="Column holding the user prompt text.")
    messages_column: str | None = Field(
        None, description="Column holding chat messages [{role, content}]; content a string or a list of text parts."
    )
    template: str | None = Field(
        None, description="Jinja2 template over the row's columns that renders the user prompt (sandboxed; a name "
        "that is not a column fails the job, a null value fails the row)."
    )
    system_prompt: str | None = Field(
        None, description="A system turn before the user turn (through the chat template)."
    )
    id_column: str | None = Field(None, description="Column with row ids; default: a stable id from file and row.")
    reference_column: str | None = Field(
        None, description="Column with each row's reference answer (what an eval's scorer compares against)."
    )
    max_new_tokens_column: str | None = Field(
        None, description="Integer column: a row's own output budget, capped at sampling.max_new_tokens (null: that)."
    )

    @model_validator(mode="after")
    def _one_prompt_source(self) -> InputSection:
        sources = [k for k in ("prompt_column", "messages_column", "template") if getattr(self, k)]
        if len(sources) > 1:
            raise ValueError(f"set only one of input.prompt_column, input.messages_column and input.template "
                             f"(got {', '.join('input.' + k for k in sources)}; an override of one replaces the others, "
                             f"or unset one with e.g. input.{sources[0]}=null)")
        if not sources:
            self.prompt_column = "prompt"
        return self

    @field_validator("template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is not None:
            from dgbatch import template

            template.check(v)
            if not v.strip():
                raise ValueError("is empty")
        return v

    @property
    def prompt_source(self) -> tuple[str, str]:
        """(config key, what it names) of the prompt: a column, or the template."""
        for key in ("prompt_column", "messages_column", "template"):
            if getattr(self, key):
                return f"input.{key}", getattr(self, key)
        raise AssertionError("validated: one prompt source is set")


class OutputFilters(Section):
    """Checks on each output. A row that fails one is kept, marked `filtered` with the `filter_reason`
    (the first failing check, in this order), never silently dropped."""

    min_tokens: int | None = Field(None, ge=0, description="Fewest output tokens (EOS not counted).")
    max_tokens: int | None = Field(None, gt=0, description="Most output tokens (EOS not counted).")
    regex: str | None = Field(None, description="A Python regular expression the output text must match (re.search).")
    json_: bool = Field(False, alias="json", description="The output text must parse as JSON.")

    @field_validator("regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            import re

            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from None
        return v

    @model_validator(mode="after")
    def _bounds(self) -> OutputFilters:
        if self.min_tokens is not None and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"output.filters.min_tokens ({self.min_tokens}) > max_tokens ({self.max_tokens})")
        return self

    @property
    def active(self) -> bool:
        return any(v not in (None, False) for v in (self.min_tokens, self.max_tokens, self.regex, self.json_))


class OutputSection(Section):
    path: str = Field(description="Output root (any fsspec URL); outputs go to PATH/data/.")
    force: bool = Field(False, description="Resume into an output whose job used a different config.")
    filters: OutputFilters = Field(OutputFilters(), description="Checks on each output (rows are marked, not dropped).")
    drop_filtered: bool = Field(
        False, description="Write rows that fail output.filters under PATH/filtered/ instead of PATH/data/."
    )
    progress_every_s: float = Field(
        5.0, gt=0, description="Seconds between progress lines (when stdout is not a terminal) and rewrites of "
        "PATH/_progress.json."
    )

    @model_validator(mode="after")
    def _drop_needs_filters(self) -> OutputSection:
        if self.drop_filtered and not self.filters.active:
            raise ValueError("output.drop_filtered=true needs output.filters (min_tokens, max_tokens, regex or json)")
        return self


class SamplingSection(Section):
    """Unset fields take the checkpoint's generation_config.json, then transformers' defaults."""

    max_new_tokens: int | None = Field(None, gt=0, description="Longest output, in tokens.")
    max_denoising_steps: int | None = Field(None, gt=0, description="Denoising steps per canvas, at most.")
    entropy_bound: float | None = Field(None, gt=0, description="Entropy-bound sampler: joint entropy accepted.")
    t_min: float | None = Field(None, ge=0, description="Temperature at the last denoising step.")
    t_max: float | None = Field(None, ge=0, description="Temperature at the first denoising step.")
    stability_threshold: int | None = Field(None, ge=0, description="Steps the argmax canvas must stay unchanged.")
    confidence_threshold: float | None = Field(None, gt=0, description="Mean token entropy below which to stop.")
    seed: int = Field(0, description="Job seed; each row's randomness derives from it and the row id.")
    num_samples: int = Field(
        1, gt=0, description="Output rows per input row (column sample_index, ids ROWID#k), each with its own draws."
    )

    @model_validator(mode="after")
    def _temperatures(self) -> SamplingSection:
        if self.t_min is not None and self.t_max is not None and self.t_max <= self.t_min:
            raise ValueError(f"sampling.t_max ({self.t_max}) must be greater than sampling.t_min ({self.t_min})")
        return self


class EngineSection(Section):
    backend: Literal["engine", "reference"] = Field(
        "engine", description="'engine': dgbatch's own loop (slots, slot KV cache); 'reference': transformers' generate."
    )
    batch_size: int | Literal["auto"] = Field(
        "auto",
        description="Rows per static batch (the engine's slots), or 'auto': the largest power of two up to 256 "
        "whose estimated peak memory (dgbatch.engine.memory) fits in 85% of the device's free memory.",
    )
    compile: bool = Field(False, description="Engine: torch.compile the denoising step (static shapes; for GPUs).")

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, v):
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return v
        raise ValueError("must be a positive integer or 'auto'")


class PlanSection(Section):
    shard_rows: int = Field(1024, gt=0, description="Rows per prompt shard (the unit of work and commit).")
    bucket_edges: list[int] | Literal["auto"] = Field(
        "auto", description="Prompt-length bucket upper edges (tokens), or 'auto' (quantiles of the input)."
    )
    num_buckets: int = Field(8, gt=0, description="Buckets to make when bucket_edges is 'auto'.")
    fragment_rows: int = Field(65536, gt=0, description="Input rows per planning task.")


class ReplicasSection(Section):
    num_replicas: int = Field(1, gt=0, description="Model replicas (each one actor, or one group of parallel ranks).")
    num_cpus: float = Field(1, ge=0, description="CPUs reserved per replica actor (per rank of a parallel replica).")
    num_gpus: float = Field(0, ge=0, description="GPUs reserved per replica actor (per rank of a parallel replica).")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. 'H100'.")
    max_shard_attempts: int = Field(3, gt=0, description="Tries per shard before it is recorded as failed.")


class ParallelSection(Section):
    """One replica over several devices: tp_size x ep_size ranks, one Ray actor each, gang-scheduled."""

    tp_size: int = Field(1, gt=0, description="Tensor-parallel ranks: attention heads and the dense MLP split over them.")
    ep_size: int = Field(1, gt=0, description="Expert-parallel groups (of tp_size ranks each): the experts split over them.")
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK", description="Ray placement group strategy for a replica's ranks (STRICT_PACK: one node)."
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend: 'auto' is nccl on CUDA, gloo on CPU."
    )
    timeout_s: float = Field(
        300, gt=0, description="Collective and rendezvous timeout: a rank that stops answering fails its replica."
    )
    startup_timeout_s: float = Field(
        1800, gt=0, description="A replica group not up this long after creation (placement, model load) is retried."
    )

    @property
    def world_size(self) -> int:
        return self.tp_size * self.ep_size


class StorageSection(Section):
    """Object-store settings; unset credentials come from the standard AWS environment and files."""

    key: SecretStr | None = Field(None, description="Access key id (prefer AWS_ACCESS_KEY_ID).")
    secret: SecretStr | None = Field(None, description="Secret access key (prefer AWS_SECRET_ACCESS_KEY).")
    endpoint_url: str | None = Field(None, description="S3 endpoint (prefer AWS_ENDPOINT_URL).")
    region: str | None = Field(None, description="S3 region.")


BUILTIN_SCORERS = ("exact", "contains", "regex", "numeric")


class EvalSection(Section):
    """How `jobs.eval` scores each output against input.reference_column (dgbatch/eval/)."""

    scorer: str = Field(
        "exact", description="exact | contains | regex | numeric, or 'module:function' imported from the job's "
        "working directory, called as function(output_text, reference, row) -> float (runs your code)."
    )
    regex: str | None = Field(
        None,
        description="regex: the answer is its first group (or the whole match); numeric: where to find the number.",
    )
    ignore_case: bool = Field(True, description="exact / contains / regex: compare case-insensitively.")
    normalize_whitespace: bool = Field(True, description="exact / contains / regex: strip and collapse whitespace.")
    tolerance: float = Field(1e-6, ge=0, description="numeric: the largest absolute difference that still scores 1.")
    group_column: str | None = Field(None, description="Column to report metrics per value of (e.g. task).")
    pass_k: list[int] | None = Field(
        None, description="With sampling.num_samples > 1: the k of pass@k (default: 1 and num_samples)."
    )

    @field_validator("scorer")
    @classmethod
    def _scorer(cls, v: str) -> str:
        import re

        if v not in BUILTIN_SCORERS and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v):
            raise ValueError(f"must be one of {', '.join(BUILTIN_SCORERS)} or 'module:function' (got {v!r})")
        return v

    @field_validator("regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        return OutputFilters._regex(v)

    @field_validator("pass_k")
    @classmethod
    def _pass_k(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(k < 1 for k in v)):
            raise ValueError("must be a non-empty list of positive integers")
        return v

    @model_validator(mode="after")
    def _regex_needed(self) -> EvalSection:
        if self.scorer == "regex" and not self.regex:
            raise ValueError("eval.scorer=regex needs eval.regex (a pattern whose first group is the answer)")
        return self


class RayCluster(Section):
    address: str | None = Field(None, description="Ray address; default: join a running cluster or start one.")
    num_cpus: int | None = Field(None, gt=0, description="CPUs for a locally started Ray.")


class JobConfig(Section):
    model: ModelSection
    input: InputSection
    output: OutputSection
    sampling: SamplingSection = SamplingSection()
    engine: EngineSection = EngineSection()
    plan: PlanSection = PlanSection()
    replicas: ReplicasSection = ReplicasSection()
    parallel: ParallelSection = ParallelSection()
    storage: StorageSection = StorageSection()
    ray: RayCluster = RayCluster()
    eval: EvalSection = EvalSection()

    @model_validator(mode="after")
    def _samples_fit(self) -> JobConfig:
        n = self.sampling.num_samples
        too_big = [k for k in self.eval.pass_k or () if k > n]
        if too_big:
            raise ValueError(f"eval.pass_k {too_big} exceed sampling.num_samples={n}: pass@k needs k <= samples")
        return self

    @model_validator(mode="after")
    def _parallel_fits(self) -> JobConfig:
        """What a parallel replica needs from the other sections (the model's shape is checked against
        its config.json by the driver, before any weights load)."""
        p, world = self.parallel, self.parallel.world_size
        if world == 1:
            return self
        ranks = f"parallel.tp_size={p.tp_size} x parallel.ep_size={p.ep_size} = {world} ranks"
        if self.engine.backend != "engine":
            raise ValueError(f"{ranks} need engine.backend=engine (the reference backend runs on one device)")
        if self.engine.compile:
            raise ValueError(f"{ranks}: engine.compile is not supported with more than one rank yet")
        if self.replicas.num_gpus not in (0, 1):
            raise ValueError(
                f"replicas.num_gpus={self.replicas.num_gpus:g} is per rank with {ranks}: each rank needs one whole "
                "GPU (replicas.num_gpus=1), or none (0) to run on CPUs"
            )
        if p.backend == "nccl" and (self.replicas.num_gpus == 0 or self.model.device == "cpu"):
            raise ValueError("parallel.backend=nccl needs GPUs (replicas.num_gpus=1 and model.device auto or cuda)")
        return self

    def fingerprint(self) -> str:
        """Hash of what decides the outputs; a resumed job must match it. Not `eval`: scores are
        recomputed from the outputs (`jobs.eval --rescore`), so a new scorer reuses the generations."""
        keep = {
            "model": self.model.model_dump(),
            "input": self.input.model_dump(),
            "sampling": self.sampling.model_dump(),
            "plan": self.plan.model_dump(),
            "output": self.output.model_dump(by_alias=True, include={"filters", "drop_filtered"}),
            "engine.backend": self.engine.backend,  # the two backends sample differently
        }
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def public_dict(self) -> dict[str, Any]:
        """The config as JSON, with secrets masked: safe for logs and manifests."""
        return json.loads(self.model_dump_json(by_alias=True))


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


# Keys of which a config holds at most one: setting one (to a value) drops the others, so the later
# setting wins: `input.messages_column=msgs` on a config file that sets `prompt_column` just works.
EXCLUSIVE = (("input.prompt_column", "input.messages_column", "input.template"),)


def _apply(tree: dict, pairs: list[tuple[str, Any]]) -> None:
    for key, value in pairs:
        _set_dotted(tree, key, value)
        for group in EXCLUSIVE:
            if key in group and value is not None:
                for other in group:
                    if other != key:
                        *sections, last = other.split(".")
                        node = tree
                        for part in sections:
                            node = node.get(part) if isinstance(node, dict) else None
                        if isinstance(node, dict):
                            node.pop(last, None)


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


def _section_fields(loc: tuple) -> list[str]:
    """The keys valid at `loc` (a path of section names into JobConfig); [] if it is not a section."""
    model: Any = JobConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = field.annotation
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _describe(err: dict) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "<root>"
    kind = err["type"]
    if kind == "extra_forbidden":
        *section, key = (str(p) for p in err["loc"])
        known = _section_fields(tuple(section))
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        if close:
            return f"{where}: unknown key; did you mean {'.'.join([*section, close[0]])!r}?"
        return f"{where}: unknown key; {'.'.join(section) or 'the config'} has {', '.join(known)}"
    if kind == "missing":
        return f"{where}: required, not set"
    got = err.get("input")
    got_s = f" (got {got!r})" if got is not None and not isinstance(got, dict) and "secret" not in where else ""
    return f"{where}: {err['msg']}{got_s}"


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None,
                values: Iterable[tuple[str, Any]] = ()) -> JobConfig:
    """Load YAML at `path` (or `base`), apply `overrides` ("section.key=value" strings, values parsed as
    YAML), then `values` ((dotted key, Python value) pairs, taken as they are), validate. Raises ConfigError."""
    tree: dict = copy.deepcopy(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
        tree = loaded
    _apply(tree, parse_overrides(list(overrides)) + list(values))
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as e:
        lines = "\n  ".join(_describe(err) for err in e.errors())
        raise ConfigError(f"invalid config:\n  {lines}") from None
