"""Find, check and load a DiffusionGemma checkpoint: safetensors only, never remote code."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dgbatch.config import ConfigError, JobConfig, ModelSection, SamplingSection, StorageSection
from dgbatch.generation import SamplingParams

CACHE_DIR = Path(os.environ.get("DGBATCH_CACHE", Path.home() / ".cache" / "dgbatch"))


def local_checkpoint(model: ModelSection, storage: StorageSection | None = None) -> Path:
    """The checkpoint as a local directory, downloading a remote one (fsspec URL) once into the cache."""
    if "://" not in model.path or model.path.startswith("file://"):
        path = Path(model.path.removeprefix("file://")).expanduser().resolve()
        _check_dir(path, model.path)
        return path
    from dgbatch.io.fs import filesystem

    fs, remote = filesystem(model.path, storage)
    dest = CACHE_DIR / "models" / hashlib.sha256(model.path.encode()).hexdigest()[:16]
    if not (dest / ".complete").exists():
        if not fs.exists(remote):
            raise ConfigError(f"model.path {model.path!r} does not exist")
        dest.mkdir(parents=True, exist_ok=True)
        fs.get(remote.rstrip("/") + "/", str(dest), recursive=True)
        (dest / ".complete").touch()
    _check_dir(dest, model.path)
    return dest


def _check_dir(path: Path, shown: str) -> None:
    if not path.is_dir():
        raise ConfigError(f"model.path {shown!r} is not a directory holding a checkpoint")
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path {shown!r} has no config.json; point it at a saved checkpoint")
    names = {p.name for p in path.iterdir()}
    if not any(n.endswith(".safetensors") for n in names):
        pickled = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
        hint = f" (found {', '.join(pickled)}: pickled weights are not loaded, convert to safetensors)" if pickled else ""
        raise ConfigError(f"model.path {shown!r} has no .safetensors weights{hint}")


def read_model_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def resolve_sampling(path: Path, sampling: SamplingSection) -> SamplingParams:
    """Config fields win, then the checkpoint's generation_config.json, then transformers' defaults
    (imported only when a field is still unset: they pull in torch)."""
    names = [f for f in SamplingParams.__dataclass_fields__ if f != "seed"]
    merged: dict = dict.fromkeys(names)
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        ckpt = json.loads(gen_file.read_text())
        for k in names:
            if ckpt.get(k) is not None:
                merged[k] = ckpt[k]
        if isinstance(ckpt.get("sampler_config"), dict) and "entropy_bound" in ckpt["sampler_config"]:
            merged["entropy_bound"] = ckpt["sampler_config"]["entropy_bound"]
    for k, v in sampling.model_dump().items():
        if v is not None and k in merged:
            merged[k] = v
    if any(v is None for v in merged.values()):
        from transformers import DiffusionGemmaGenerationConfig

        defaults = DiffusionGemmaGenerationConfig._get_default_generation_params()
        defaults["entropy_bound"] = defaults.pop("sampler_config").entropy_bound
        merged = {k: defaults[k] if v is None else v for k, v in merged.items()}
    params = SamplingParams(seed=sampling.seed, **merged)
    if params.t_max <= params.t_min:
        raise ConfigError(f"sampling.t_max ({params.t_max}) must be greater than sampling.t_min ({params.t_min})")
    return params


def max_prompt_tokens(cfg: JobConfig, model_config: dict, params: SamplingParams) -> int:
    if cfg.model.max_prompt_tokens is not None:
        return cfg.model.max_prompt_tokens
    text = model_config.get("text_config", model_config)
    canvas = model_config.get("canvas_length", 256)
    max_new = -(-params.max_new_tokens // canvas) * canvas
    return int(text.get("max_position_embeddings", 131072)) - max_new


def check_parallel(cfg: JobConfig, path: Path) -> None:
    """Fail before any weights load if parallel.tp_size / ep_size cannot shard this checkpoint."""
    if cfg.parallel.world_size == 1:
        return
    from transformers import AutoConfig

    from dgbatch.parallel.dims import ParallelConfigError, ParallelDims

    text = AutoConfig.from_pretrained(str(path), trust_remote_code=False).get_text_config()
    try:
        ParallelDims(cfg.parallel.tp_size, cfg.parallel.ep_size).check_model(text)
    except ParallelConfigError as e:
        raise ConfigError(f"model.path {cfg.model.path!r}: {e}") from None


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def load_model(path: Path, model: ModelSection):
    """Load weights (safetensors only) onto the configured device, in eval mode."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    device = model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    m = DiffusionGemmaForBlockDiffusion.from_pretrained(
        str(path), dtype=getattr(torch, model.dtype), use_safetensors=True, trust_remote_code=False
    )
    return m.to(device).eval()


def special_ids(path: Path, tokenizer) -> tuple[int, list[int]]:
    """(pad id, EOS ids): the checkpoint's generation config first (it may list several EOS ids)."""
    gen_file = path / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    eos = gen.get("eos_token_id")
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = gen.get("pad_token_id")
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return int(pad), [int(e) for e in (eos if isinstance(eos, list) else [eos])]
