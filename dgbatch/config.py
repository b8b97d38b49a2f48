"""The job configuration: one typed tree, loaded from YAML, with dotted `key=value` overrides.

Precedence is command line > file > defaults. Everything is validated here, before any data or
model is touched, so a typo fails in milliseconds with the key, the value and the rule named
(`sampling.t_max: Input should be a finite number (got inf) [finite_number]`), on one line.

Strict fields, one pattern for every section (use it for new fields too):
- Give a field one of the annotated types below instead of a bare `int` / `float` / `str`:
  `PositiveInt`, `NonNegativeInt` (counts: a bool, 2.0 or "2" is refused, not coerced),
  `PositiveFloat`, `NonNegativeFloat` (finite: inf and nan are refused; an int is a float),
  `Seconds` (a positive, finite duration), `Temperature` (0 <= t <= MAX_TEMPERATURE),
  `Seed` (0 <= seed < 2**63), `Name` (a column or split name), `PathStr` (a path or URL),
  `Flag` (true/false only), `Text` (free text such as a template or a regex: non-empty, any
  characters). Each carries its rule; pydantic names the rule in the error type.
- A rule between fields goes in a `model_validator` that raises `rule_error(rule, message)`, so the
  error still says which rule refused the value.
- Values only the checkpoint or the input can refute (max_new_tokens against the model's positions,
  a column's type) are checked by the driver before Ray starts, and raise `ConfigError` too.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    Strict,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from dgbatch.errors import JobError


class ConfigError(JobError, ValueError):
    """A configuration problem the user must fix; the message says what and where."""


def rule_error(rule: str, message: str) -> PydanticCustomError:
    """A validation error that names its rule (shown as `[rule]` after the message)."""
    return PydanticCustomError(rule, message)


def _plain_text(value: str) -> str:
    if value != value.strip():
        raise rule_error("no_surrounding_space", "must not start or end with whitespace")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise rule_error("no_control_characters", "must not contain control characters (newlines, NUL, ...)")
    return value


MAX_TEMPERATURE = 10.0  # far above any useful sampling temperature; beyond it outputs are noise

PositiveInt = Annotated[int, Strict(), Gt(0)]
NonNegativeInt = Annotated[int, Strict(), Ge(0)]
PositiveFloat = Annotated[float, Strict(), Gt(0), Field(allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Strict(), Ge(0), Field(allow_inf_nan=False)]
Seconds = PositiveFloat
Temperature = Annotated[float, Strict(), Ge(0), Le(MAX_TEMPERATURE), Field(allow_inf_nan=False)]
Seed = Annotated[int, Strict(), Ge(0), Lt(2**63)]
Name = Annotated[str, Strict(), Field(min_length=1, max_length=1024), AfterValidator(_plain_text)]
PathStr = Annotated[str, Strict(), Field(min_length=1, max_length=4096), AfterValidator(_plain_text)]
Flag = StrictBool
Text = Annotated[str, Strict(), Field(min_length=1, max_length=1_000_000)]


def _device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise rule_error("device", "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return value


def _endpoint(value: str) -> str:
    if not re.fullmatch(r"https?://[^\s/@]+(/\S*)?", value):
        raise rule_error("endpoint_url", "must be an http:// or https:// URL without credentials")
    return value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    path: PathStr = Field(description="Checkpoint directory or fsspec URL (safetensors weights).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights and compute dtype.")
    device: Annotated[Name, AfterValidator(_device)] = Field(
        "auto", description="'auto' (cuda if available, else cpu), 'cpu' or 'cuda[:N]'."
    )
    max_prompt_tokens: PositiveInt | None = Field(
        None, description="Longest prompt accepted; default: the model's positions minus max_new_tokens."
    )


class InputSection(Section):
    path: PathStr = Field(
        description="Parquet or JSON Lines file, directory or glob (any fsspec URL), or a datasets path/name."
    )
    format: Literal["parquet", "jsonl", "datasets"] = Field(
        "parquet", description="How to read `path`: Parquet, JSON Lines (one object per line, plain or .gz), datasets."
    )
    split: Name | None = Field(None, description="For `format: datasets` with a DatasetDict: the split to read.")
    prompt_column: Name | None = Field(None, description="Column holding the user prompt text.")
    messages_column: Name | None = Field(
        None, description="Column holding chat messages [{role, content}]; content a string or a list of text parts."
    )
    template: Text | None = Field(
        None, description="Jinja2 template over the row's columns that renders the user prompt (sandboxed; a name "
        "that is not a column fails the job, a null value fails the row)."
    )
    system_prompt: Text | None = Field(
        None, description="A system turn before the user turn (through the chat template)."
    )
    id_column: Name | None = Field(
        None, description="Column with row ids (strings or integers; unique, no nulls); default: FILE:ROW."
    )
    reference_column: Name | None = Field(
        None, description="Column with each row's reference answer (what an eval's scorer compares against)."
    )
    max_new_tokens_column: Name | None = Field(
        None, description="Integer column: a row's own output budget, capped at sampling.max_new_tokens (null: that)."
    )
    partition: Name | None = Field(
        None,
        description="The partition this job covers (set per date/hour by `jobs.backfill`): it prefixes the default "
        "row ids (so per-row seeds differ between partitions) and is written to the output's `partition` column.",
    )
    allow_special_tokens: Flag = Field(
        False, description="Tokenize special-token text in prompts ('<eos>', turn markers) as the special tokens "
        "themselves. Off: user text is always plain text and cannot open or close a turn."
    )
    image_column: Name | None = Field(
        None, description="Column with one image per row (PNG/JPEG bytes, or a path / URL string; null: a text-only "
        "row), shown before input.prompt_column's text in the user message."
    )
    max_images_per_row: PositiveInt = Field(8, description="A row with more images is that row's error.")
    max_image_pixels: PositiveInt = Field(
        25_000_000, description="An image larger than this (width x height, read from its header) is its row's error."
    )
    allow_http_images: Flag = Field(
        False, description="Fetch http(s):// image URLs (on the replica that runs the row; never in the driver)."
    )
    on_change: Literal["refuse", "replan"] = Field(
        "refuse", description="When the input's files changed since the job was planned: 'refuse' (exit 2, naming "
        "the files) or 'replan' (discard the old plan and its outputs, plan and run again)."
    )

    @model_validator(mode="after")
    def _one_prompt_source(self) -> InputSection:
        sources = [k for k in ("prompt_column", "messages_column", "template") if getattr(self, k)]
        if len(sources) > 1:
            raise rule_error("one_prompt_source", f"set only one of input.prompt_column, input.messages_column and "
                             f"input.template (got {', '.join('input.' + k for k in sources)}; an override of one "
                             f"replaces the others, or unset one with e.g. input.{sources[0]}=null)")
        if not sources:
            self.prompt_column = "prompt"
        if self.image_column and self.messages_column:
            raise rule_error("image_column_with_text", "input.image_column goes with input.prompt_column or "
                             "input.template; with input.messages_column put images in the messages as "
                             "{type: image, image: ...} parts")
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

    min_tokens: NonNegativeInt | None = Field(None, description="Fewest output tokens (EOS not counted).")
    max_tokens: PositiveInt | None = Field(None, description="Most output tokens (EOS not counted).")
    regex: Text | None = Field(None, description="A Python regular expression the output text must match (re.search).")
    json_: Flag = Field(False, alias="json", description="The output text must parse as JSON.")

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
            raise rule_error("min_tokens_le_max_tokens",
                             f"output.filters.min_tokens ({self.min_tokens}) > max_tokens ({self.max_tokens})")
        return self

    @property
    def active(self) -> bool:
        return any(v not in (None, False) for v in (self.min_tokens, self.max_tokens, self.regex, self.json_))


class OutputSection(Section):
    path: PathStr = Field(description="Output root (any fsspec URL); outputs go to PATH/data/.")
    force: Flag = Field(False, description="Resume into an output whose job used a different config.")
    filters: OutputFilters = Field(OutputFilters(), description="Checks on each output (rows are marked, not dropped).")
    drop_filtered: Flag = Field(
        False, description="Write rows that fail output.filters under PATH/filtered/ instead of PATH/data/."
    )
    shared_filesystem: Flag = Field(
        False, description="A local output.path is on storage every node of a multi-node cluster mounts (NFS, "
        "Lustre, ...). Off, a local output on a multi-node cluster is refused: each node would write its own disk."
    )
    progress_every_s: Seconds = Field(
        5.0, description="Seconds between progress lines (when stdout is not a terminal) and rewrites of "
        "PATH/_progress.json."
    )

    @model_validator(mode="after")
    def _drop_needs_filters(self) -> OutputSection:
        if self.drop_filtered and not self.filters.active:
            raise rule_error("drop_needs_filters",
                             "output.drop_filtered=true needs output.filters (min_tokens, max_tokens, regex or json)")
        return self


class SamplingSection(Section):
    """Unset fields take the checkpoint's generation_config.json, then transformers' defaults."""

    max_new_tokens: PositiveInt | None = Field(None, description="Longest output, in tokens.")
    max_denoising_steps: PositiveInt | None = Field(None, description="Denoising steps per canvas, at most.")
    entropy_bound: PositiveFloat | None = Field(None, description="Entropy-bound sampler: joint entropy accepted.")
    t_min: Temperature | None = Field(None, description="Temperature at the last denoising step.")
    t_max: Temperature | None = Field(None, description="Temperature at the first denoising step.")
    stability_threshold: NonNegativeInt | None = Field(
        None, description="Steps the argmax canvas must stay unchanged."
    )
    confidence_threshold: PositiveFloat | None = Field(None, description="Mean token entropy below which to stop.")
    seed: Seed = Field(0, description="Job seed; each row's randomness derives from it and the row id.")
    num_samples: PositiveInt = Field(
        1, description="Output rows per input row (column sample_index, ids ROWID#k), each with its own draws."
    )

    @model_validator(mode="after")
    def _temperatures(self) -> SamplingSection:
        if self.t_min is not None and self.t_max is not None and self.t_max <= self.t_min:
            raise rule_error(
                "t_max_above_t_min",
                f"sampling.t_max ({self.t_max}) must be greater than sampling.t_min ({self.t_min})",
            )
        return self


class EngineSection(Section):
    backend: Literal["engine", "reference"] = Field(
        "engine", description="'engine': dgbatch's own loop (slots, slot KV cache); 'reference': transformers' generate."
    )
    batch_size: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="Rows per static batch (the engine's slots), or 'auto': the largest power of two up to 256 "
        "whose estimated peak memory (dgbatch.engine.memory) fits in 85% of the device's free memory.",
    )
    compile: Flag = Field(False, description="Engine: torch.compile the denoising step (static shapes; for GPUs).")
    share_prefixes: Flag = Field(
        True,
        description="Engine: rows that share a prompt (sampling.num_samples) or a long common prefix (few-shot "
        "examples, a system prompt) encode it once per replica and start from a copy of its K/V; outputs are the same "
        "(the encoder is causal). Rows with images never share.",
    )

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, v):
        if v == "auto" or (type(v) is int and v > 0):
            return v
        raise rule_error("positive_int_or_auto", "must be a positive integer or 'auto'")


MAX_BUCKETS = 64  # the bucket search is cubic in this; more buckets than this save no padding


class PlanSection(Section):
    shard_rows: PositiveInt = Field(1024, description="Rows per prompt shard (the unit of work and commit).")
    bucket_edges: list[PositiveInt] | Literal["auto"] = Field(
        "auto", description="Prompt-length bucket upper edges (tokens), or 'auto' (quantiles of the input)."
    )
    num_buckets: Annotated[PositiveInt, Le(MAX_BUCKETS)] = Field(
        8, description=f"Buckets to make when bucket_edges is 'auto' (at most {MAX_BUCKETS})."
    )
    fragment_rows: PositiveInt = Field(65536, description="Input rows per planning task.")

    @field_validator("bucket_edges", mode="before")
    @classmethod
    def _bucket_edges(cls, v):
        if v == "auto" or (isinstance(v, list) and all(type(x) is int and x > 0 for x in v)):
            return v
        raise rule_error("bucket_edges", "must be 'auto' or a list of positive integers (prompt tokens)")


class ReplicasSection(Section):
    num_replicas: PositiveInt = Field(1, description="Model replicas (each one actor, or one group of parallel ranks).")
    num_cpus: NonNegativeFloat = Field(1, description="CPUs reserved per replica actor (per rank of a parallel replica).")
    num_gpus: NonNegativeFloat = Field(0, description="GPUs reserved per replica actor (per rank of a parallel replica).")
    accelerator_type: Name | None = Field(None, description="Ray accelerator type, e.g. 'H100'.")
    max_shard_attempts: PositiveInt = Field(3, description="Tries per shard before it is recorded as failed.")
    max_identical_failures: NonNegativeInt = Field(
        10, description="Different shards failing their first attempt in a row with the same error, none committed "
        "in between, that stop the job (exit 2, that error): a fault of the job (storage the replicas cannot "
        "reach), not of its shards. 0: never stop for this."
    )
    max_start_failures: PositiveInt = Field(
        3, description="Failed starts in a row (its __init__ raised: a bad model.device, unreadable weights) before "
        "a replica is dropped; with none left up, the job stops with the replica's error (exit 2)."
    )
    placement_timeout_s: Seconds = Field(
        600.0, description="How long a replica waits for its resources (CPUs, GPUs, accelerator) on a cluster that "
        "could hold it but is busy, or may add nodes; with none up after this, the job stops (exit 2) naming what is "
        "missing. One that no node could ever hold fails at once."
    )


class ParallelSection(Section):
    """One replica over several devices: tp_size x ep_size ranks, one Ray actor each, gang-scheduled."""

    tp_size: PositiveInt = Field(1, description="Tensor-parallel ranks: attention heads and the dense MLP split over them.")
    ep_size: PositiveInt = Field(1, description="Expert-parallel groups (of tp_size ranks each): the experts split over them.")
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK", description="Ray placement group strategy for a replica's ranks (STRICT_PACK: one node)."
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend: 'auto' is nccl on CUDA, gloo on CPU."
    )
    timeout_s: Seconds = Field(
        300, description="Collective and rendezvous timeout: a rank that stops answering fails its replica."
    )
    startup_timeout_s: Seconds = Field(
        1800, description="A replica group not up this long after creation (placement, model load) is retried."
    )

    @property
    def world_size(self) -> int:
        return self.tp_size * self.ep_size


class StorageSection(Section):
    """Object-store settings; unset credentials come from the standard AWS environment and files."""

    key: SecretStr | None = Field(None, description="Access key id (prefer AWS_ACCESS_KEY_ID).")
    secret: SecretStr | None = Field(None, description="Secret access key (prefer AWS_SECRET_ACCESS_KEY).")
    endpoint_url: Annotated[PathStr, AfterValidator(_endpoint)] | None = Field(
        None, description="S3 endpoint (prefer AWS_ENDPOINT_URL)."
    )
    region: Name | None = Field(None, description="S3 region.")
    retries: NonNegativeInt = Field(
        6, description="Tries again, per storage call, after a timeout, throttling (SlowDown, 503), another 5xx or "
        "a connection reset: exponential backoff with full jitter (0.25 s doubling, at most 15 s a wait). 0: none."
    )
    retry_max_s: Seconds = Field(
        60.0, description="A storage call stops retrying this long after its first failure; then the job stops "
        "early (exit 2, one line), keeps what it committed, and a rerun resumes."
    )

    @field_validator("key", "secret", mode="before")
    @classmethod
    def _secret_text(cls, v):
        if v is None or isinstance(v, SecretStr):
            return v
        if not isinstance(v, str) or not v or v != v.strip():
            raise rule_error("secret_text", "must be a non-empty string without surrounding whitespace")
        return v

    @model_validator(mode="after")
    def _key_with_secret(self) -> StorageSection:
        if (self.key is None) != (self.secret is None):
            raise rule_error(
                "key_with_secret",
                "storage.key and storage.secret must be set together, or both left to the AWS environment",
            )
        return self


BUILTIN_SCORERS = ("exact", "contains", "regex", "numeric")


class EvalSection(Section):
    """How `jobs.eval` scores each output against input.reference_column (dgbatch/eval/)."""

    scorer: Name = Field(
        "exact", description="exact | contains | regex | numeric, or 'module:function' imported from the job's "
        "working directory, called as function(output_text, reference, row) -> float (runs your code)."
    )
    regex: Text | None = Field(
        None,
        description="regex: the answer is its first group (or the whole match); numeric: where to find the number.",
    )
    ignore_case: Flag = Field(True, description="exact / contains / regex: compare case-insensitively.")
    normalize_whitespace: Flag = Field(True, description="exact / contains / regex: strip and collapse whitespace.")
    tolerance: NonNegativeFloat = Field(1e-6, description="numeric: the largest absolute difference that still scores 1.")
    group_column: Name | None = Field(None, description="Column to report metrics per value of (e.g. task).")
    pass_k: list[PositiveInt] | None = Field(
        None, description="With sampling.num_samples > 1: the k of pass@k (default: 1 and num_samples)."
    )

    @field_validator("scorer")
    @classmethod
    def _scorer(cls, v: str) -> str:
        import re

        if v not in BUILTIN_SCORERS and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v):
            raise rule_error("scorer", f"must be one of {', '.join(BUILTIN_SCORERS)} or 'module:function'")
        return v

    @field_validator("regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        return OutputFilters._regex(v)

    @field_validator("pass_k")
    @classmethod
    def _pass_k(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(k < 1 for k in v)):
            raise rule_error("pass_k", "must be a non-empty list of positive integers")
        return v

    @model_validator(mode="after")
    def _regex_needed(self) -> EvalSection:
        if self.scorer == "regex" and not self.regex:
            raise rule_error("regex_scorer_needs_regex",
                             "eval.scorer=regex needs eval.regex (a pattern whose first group is the answer)")
        return self


class RayCluster(Section):
    address: PathStr | None = Field(None, description="Ray address; default: join a running cluster or start one.")
    connect_timeout_s: Seconds = Field(
        10.0, description="How long to wait for ray.address to answer before the job stops (exit 2, one line)."
    )
    num_cpus: PositiveInt | None = Field(None, description="CPUs for a locally started Ray.")


# What decides a job's outputs. Left out, on purpose: where and how fast it runs (model.device,
# engine.batch_size, engine.compile, replicas, parallel, ray, storage), how a resume reacts
# (output.path, output.force, input.on_change) and how outputs are scored (eval: `jobs.eval --rescore`
# recomputes scores from the outputs, so a new scorer reuses the generations). The engine's outputs do
# not depend on its batch size (tests/engine). output.filters decide which rows go where.
IDENTITY_SECTIONS = ("model", "input", "sampling", "plan", "engine")
NOT_IDENTITY = ("model.device", "input.on_change", "input.reference_column", "engine.batch_size", "engine.compile")


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
            raise rule_error("pass_k_le_num_samples",
                             f"eval.pass_k {too_big} exceed sampling.num_samples={n}: pass@k needs k <= samples")
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
            raise rule_error("parallel_backend", f"{ranks} need engine.backend=engine (the reference backend runs "
                             "on one device)")
        if self.engine.compile:
            raise rule_error("parallel_compile", f"{ranks}: engine.compile is not supported with more than one "
                             "rank yet")
        if self.replicas.num_gpus not in (0, 1):
            raise rule_error(
                "parallel_gpus",
                f"replicas.num_gpus={self.replicas.num_gpus:g} is per rank with {ranks}: each rank needs one whole "
                "GPU (replicas.num_gpus=1), or none (0) to run on CPUs",
            )
        if p.backend == "nccl" and (self.replicas.num_gpus == 0 or self.model.device == "cpu"):
            raise rule_error("nccl_needs_gpus", "parallel.backend=nccl needs GPUs (replicas.num_gpus=1 and "
                             "model.device auto or cuda)")
        return self

    def identity(self, resolved: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What decides the outputs, as {dotted key: value}, taken over resolved values.

        Local paths are made absolute (and symlinks followed), so `models/x` and `/abs/models/x` are one
        job. `resolved` carries what only the driver knows, and wins over the config: the checkpoint's
        sampling defaults for unset `sampling.*` (a value equal to the default is not a different job),
        `model.max_prompt_tokens` as the limit in force, and `model.checkpoint` (a digest of its files).
        """
        flat: dict[str, Any] = {}
        for name in IDENTITY_SECTIONS:
            for key, value in getattr(self, name).model_dump(mode="json").items():
                flat[f"{name}.{key}"] = value
        for key, value in self.output.model_dump(mode="json", by_alias=True,
                                                 include={"filters", "drop_filtered"}).items():
            flat[f"output.{key}"] = value
        for key in NOT_IDENTITY:
            flat.pop(key, None)
        flat["model.path"] = resolve_location(self.model.path)
        if self.input.format == "parquet" or Path(self.input.path).expanduser().exists():
            flat["input.path"] = resolve_location(self.input.path)
        flat.update(resolved or {})
        return flat

    def fingerprint(self, resolved: Mapping[str, Any] | None = None) -> str:
        """Hash of `identity(resolved)`; a resumed job must match it."""
        return fingerprint_of(self.identity(resolved))

    def public_dict(self) -> dict[str, Any]:
        """The config as JSON, with secrets masked: safe for logs and manifests."""
        return json.loads(self.model_dump_json(by_alias=True))


def fingerprint_of(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_location(path: str) -> str:
    """A local path made absolute with symlinks resolved (file:// dropped); a URL with its trailing '/' dropped."""
    if "://" in path and not path.startswith("file://"):
        scheme, rest = path.split("://", 1)
        return f"{scheme.lower()}://{rest.rstrip('/')}"
    local = path.removeprefix("file://")
    return os.path.realpath(os.path.expanduser(local))


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


class _Loader(yaml.SafeLoader):
    """YAML as users expect it: `1e-3` is a number (PyYAML, following YAML 1.1, reads it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            value = _yaml(raw) if raw != "" else ""
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
    """One validation error as `key: what is wrong (got value) [rule]`."""
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
    got_s = ""
    if got is not None and not isinstance(got, dict) and "secret" not in where and "key" != where.rsplit(".", 1)[-1]:
        shown = repr(got)
        got_s = f" (got {shown if len(shown) <= 80 else shown[:77] + '...'})"
    hint = ""
    if kind == "string_type" and isinstance(got, (int, float)) and not isinstance(got, bool):
        hint = f"; quote it to make it text: {where.rsplit('.', 1)[-1]}='{got}'"
    return f"{where}: {err['msg']}{got_s}{hint} [{kind}]"


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None,
                values: Iterable[tuple[str, Any]] = ()) -> JobConfig:
    """Load YAML at `path` (or `base`), apply `overrides` ("section.key=value" strings, values parsed as
    YAML), then `values` ((dotted key, Python value) pairs, taken as they are), validate. Raises ConfigError
    (one line)."""
    tree: dict = copy.deepcopy(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = _yaml(p.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
        tree = loaded
    _apply(tree, parse_overrides(list(overrides)) + list(values))
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(f"invalid config: {describe_errors(e)}") from None


def describe_errors(e: ValidationError) -> str:
    return "; ".join(_describe(err) for err in e.errors())
