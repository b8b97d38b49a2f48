"""The job configuration: one typed tree, loaded from YAML, with dotted `key=value` overrides.

Precedence is command line > file > defaults. Everything is validated here, before any data or
model is touched, so a typo fails in milliseconds with the key and the expected type named.
"""

from __future__ import annotations

import copy
import hashlib
import json
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
    path: str = Field(description="Parquet file, directory or glob (any fsspec URL), or a datasets path/name.")
    format: Literal["parquet", "datasets"] = Field("parquet", description="How to read `path`.")
    split: str | None = Field(None, description="For `format: datasets` with a DatasetDict: the split to read.")
    prompt_column: str | None = Field(None, description="Column holding the user prompt text.")
    messages_column: str | None = Field(None, description="Column holding chat messages [{role, content}].")
    id_column: str | None = Field(None, description="Column with row ids; default: a stable id from file and row.")

    @model_validator(mode="after")
    def _one_prompt_source(self) -> InputSection:
        if self.prompt_column and self.messages_column:
            raise ValueError("set only one of input.prompt_column and input.messages_column")
        if not self.prompt_column and not self.messages_column:
            self.prompt_column = "prompt"
        return self


class OutputSection(Section):
    path: str = Field(description="Output root (any fsspec URL); outputs go to PATH/data/.")
    force: bool = Field(False, description="Resume into an output whose job used a different config.")


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
        """Hash of what decides the outputs; a resumed job must match it."""
        keep = {
            "model": self.model.model_dump(),
            "input": self.input.model_dump(),
            "sampling": self.sampling.model_dump(),
            "plan": self.plan.model_dump(),
            "engine.backend": self.engine.backend,  # the two backends sample differently
        }
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def public_dict(self) -> dict[str, Any]:
        """The config as JSON, with secrets masked: safe for logs and manifests."""
        return json.loads(self.model_dump_json())


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


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


def _describe(err: dict) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "<root>"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{where}: unknown key"
    if kind == "missing":
        return f"{where}: required, not set"
    got = err.get("input")
    got_s = f" (got {got!r})" if got is not None and not isinstance(got, dict) and "secret" not in where else ""
    return f"{where}: {err['msg']}{got_s}"


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> JobConfig:
    """Load YAML at `path` (or `base`), apply `overrides`, validate. Raises ConfigError."""
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
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as e:
        lines = "\n  ".join(_describe(err) for err in e.errors())
        raise ConfigError(f"invalid config:\n  {lines}") from None
