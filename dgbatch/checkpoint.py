"""Find, check and load a DiffusionGemma checkpoint: safetensors only, never remote code."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import NamedTuple

from pydantic import ValidationError

from dgbatch.config import ConfigError, JobConfig, ModelSection, SamplingSection, StorageSection, describe_errors
from dgbatch.generation import SamplingParams

log = logging.getLogger(__name__)

CACHE_DIR = Path(os.environ.get("DGBATCH_CACHE", Path.home() / ".cache" / "dgbatch"))
COMPLETE = ".complete"  # inside a cached checkpoint: it was downloaded whole


class Resolved(NamedTuple):
    """A job's checkpoint as the job uses it."""

    path: Path  # the checkpoint as a local directory (downloaded once per node when remote), checked
    params: SamplingParams  # sampling: the config over the checkpoint's generation_config.json over transformers'
    max_prompt: int  # the longest prompt the job accepts, in tokens


def resolve(cfg: JobConfig) -> Resolved:
    """The one way a job's checkpoint is resolved (the driver's checks and fingerprint, `dgbatch plan`, a
    backfill, the benchmarks): found or downloaded, checked, its sampling and prompt limit worked out.
    ConfigError if any of it refuses the job."""
    path = local_checkpoint(cfg.model, cfg.storage)
    params = resolve_sampling(path, cfg.sampling)
    return Resolved(path, params, max_prompt_tokens(cfg, read_model_config(path), params))


def local_checkpoint(model: ModelSection, storage: StorageSection | None = None) -> Path:
    """The checkpoint as a local directory, downloading a remote one (fsspec URL) once per node into the cache."""
    if "://" not in model.path or model.path.startswith("file://"):
        path = Path(model.path.removeprefix("file://")).expanduser().resolve()
        _check_dir(path, model.path)
        return path
    dest = CACHE_DIR / "models" / hashlib.sha256(model.path.encode()).hexdigest()[:16]
    if not (dest / COMPLETE).is_file():
        _download(model, storage, dest)
    _check_dir(dest, model.path)
    return dest


def _download(model: ModelSection, storage: StorageSection | None, dest: Path) -> None:
    """Fetch `model.path` into `dest`, once, whoever else on this node asks at the same time.

    Every process (the replicas and ranks of a node, the driver) takes the same lock file next to `dest`;
    the first one downloads into a hidden sibling directory and renames it into place whole, with its
    COMPLETE marker already inside, so `dest` is either absent or complete and no reader ever sees a
    half-written checkpoint. The others wait on the lock, then find it there. The lock (flock) dies with
    its holder, so a crashed download is redone by the next process; its partial directory is removed."""
    from filelock import FileLock, Timeout

    from dgbatch.io.fs import filesystem

    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(dest) + ".lock")
    try:
        lock.acquire(timeout=5)
    except Timeout:
        log.info("waiting for another process on this node to download %s into %s", model.path, dest)
        lock.acquire()
    try:
        if (dest / COMPLETE).is_file():
            return
        fs, remote = filesystem(model.path, storage)
        if not fs.exists(remote):
            raise ConfigError(f"model.path {model.path!r} does not exist")
        for stale in [dest, *dest.parent.glob(f".{dest.name}.*.partial")]:  # a crashed or pre-lock download
            shutil.rmtree(stale, ignore_errors=True)
        t0 = time.time()
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.partial")
        tmp.mkdir()
        try:
            fs.get(remote.rstrip("/") + "/", str(tmp), recursive=True)
            size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
            (tmp / COMPLETE).write_text(json.dumps({"source": model.path, "bytes": size}) + "\n")
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("downloaded %s to %s (%.1f MB in %.1f s)", model.path, dest, size / 1e6, time.time() - t0)
    finally:
        lock.release()
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # what AutoTokenizer builds a tokenizer from
IDENTITY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
                  "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")


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
    config = _json_file(path / "config.json", shown)
    _refuse_custom_code(config, "config.json", shown)
    if config.get("model_type") != "diffusion_gemma":
        raise ConfigError(f"model.path {shown!r}: config.json has model_type {config.get('model_type')!r}; dgbatch "
                          f"runs DiffusionGemma checkpoints (model_type 'diffusion_gemma')")
    if not any(n in names for n in TOKENIZER_FILES):
        raise ConfigError(f"model.path {shown!r} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); save the "
                          f"tokenizer with the checkpoint (tokenizer.save_pretrained)")
    if "tokenizer_config.json" in names:
        _refuse_custom_code(_json_file(path / "tokenizer_config.json", shown), "tokenizer_config.json", shown)


def _json_file(file: Path, shown: str) -> dict:
    try:
        value = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"model.path {shown!r}: {file.name} is not valid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"model.path {shown!r}: {file.name} must hold a JSON object")
    return value


def _refuse_custom_code(config: dict, file: str, shown: str) -> None:
    """A checkpoint that asks for its own code (`auto_map`) is refused: it would run without it, or run it."""
    found = [config["auto_map"]] if config.get("auto_map") else []
    found += [v["auto_map"] for v in config.values() if isinstance(v, dict) and v.get("auto_map")]
    if found:
        classes = sorted({str(c) for m in found for c in (m.values() if isinstance(m, dict) else [m])})
        raise ConfigError(
            f"model.path {shown!r}: {file} asks for custom code (auto_map: {', '.join(classes)[:200]}); dgbatch never "
            f"runs a checkpoint's own code. Use a checkpoint of transformers' DiffusionGemma classes (no auto_map)"
        )


def read_model_config(path: Path) -> dict:
    return _json_file(path / "config.json", str(path))


def checkpoint_digest(path: Path) -> str:
    """What identifies a checkpoint's outputs cheaply: its config, generation and tokenizer files, and the
    names and sizes of its weights (weights are not hashed: tens of GB)."""
    h = hashlib.sha256()
    for name in IDENTITY_FILES:
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}\0{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def resolve_sampling(path: Path, sampling: SamplingSection) -> SamplingParams:
    """Config fields win, then the checkpoint's generation_config.json, then transformers' defaults
    (imported only when a field is still unset: they pull in torch)."""
    names = [f for f in SamplingParams.__dataclass_fields__ if f != "seed"]
    merged: dict = dict.fromkeys(names)
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        ckpt = _json_file(gen_file, str(path))
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
    try:  # the checkpoint's defaults obey the config's rules too (its t_min may exceed our t_max)
        SamplingSection.model_validate({**merged, "seed": sampling.seed})
    except ValidationError as e:
        raise ConfigError(f"sampling settings (config over {path.name}/generation_config.json over transformers' "
                          f"defaults) are invalid: {describe_errors(e)}") from None
    return SamplingParams(seed=sampling.seed, **merged)


def max_prompt_tokens(cfg: JobConfig, model_config: dict, params: SamplingParams) -> int:
    """The longest prompt the job accepts: model.max_prompt_tokens, or the model's positions left after the
    longest output (max_new_tokens rounded up to whole canvases). Refuses settings that leave no room."""
    text = model_config.get("text_config", model_config)
    canvas = int(model_config.get("canvas_length", 256))
    positions = int(text.get("max_position_embeddings", 131072))
    max_new = -(-params.max_new_tokens // canvas) * canvas
    room = positions - max_new
    if room <= 0:
        raise ConfigError(f"sampling.max_new_tokens={params.max_new_tokens} (rounded up to {max_new}, whole canvases of "
                          f"{canvas}) leaves no room for a prompt in the model's {positions} positions")
    if cfg.model.max_prompt_tokens is not None:
        if cfg.model.max_prompt_tokens > room:
            raise ConfigError(f"model.max_prompt_tokens={cfg.model.max_prompt_tokens} plus sampling.max_new_tokens="
                              f"{params.max_new_tokens} (rounded up to {max_new}) exceeds the model's {positions} "
                              f"positions; at most {room}")
        return cfg.model.max_prompt_tokens
    return room


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


# What AutoTokenizer builds for a DiffusionGemma checkpoint whose tokenizer_config.json names one of these
# classes (and no auto_map): that class; TokenizersBackend for the generic names (tests/test_toy_checkpoint.py
# checks both against AutoTokenizer).
_PLAIN_TOKENIZERS = {"TokenizersBackend": "TokenizersBackend", "PreTrainedTokenizerFast": "TokenizersBackend",
                     "GemmaTokenizer": "GemmaTokenizer", "GemmaTokenizerFast": "GemmaTokenizer"}


def plain_tokenizer_class(path: Path | str) -> str | None:
    """The transformers class AutoTokenizer would load for this checkpoint, where that is plain from its files
    alone; None where only AutoTokenizer can tell (other model types, custom code, no tokenizer_class)."""
    path = Path(path)
    try:
        named = json.loads((path / "tokenizer_config.json").read_text())
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None
    if model_type != "diffusion_gemma" or "auto_map" in named:
        return None
    return _PLAIN_TOKENIZERS.get(named.get("tokenizer_class"))


def load_tokenizer(path: Path | str):
    """The checkpoint's tokenizer, as AutoTokenizer builds it. Where its class is plain from the files, loaded
    through that class: AutoTokenizer reads the model config first, and that imports torch (~4 s of a job's
    start-up on 2 cores, in a driver that never runs the model)."""
    import transformers

    if name := plain_tokenizer_class(path):
        return getattr(transformers, name).from_pretrained(str(path), trust_remote_code=False)
    return transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def check_tokenizer(path: Path, shown: str):
    """The checkpoint's tokenizer, loaded and shown to render a chat; ConfigError if it cannot (before Ray starts)."""
    try:
        tokenizer = load_tokenizer(path)
    except Exception as e:  # noqa: BLE001 - any failure here means the checkpoint cannot be used
        raise ConfigError(f"model.path {shown!r}: its tokenizer cannot be loaded ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:300]})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"model.path {shown!r}: the tokenizer has no chat template (chat_template.jinja or "
                          f"tokenizer_config.json's chat_template); prompts are rendered with it")
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "probe"}], add_generation_prompt=True,
                                      tokenize=False)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"model.path {shown!r}: its chat template fails on a one-turn chat ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:300]})") from None
    return tokenizer


def load_model(path: Path, model: ModelSection, mesh=None):
    """Load weights (safetensors only) onto the configured device, in eval mode. With a `mesh` (one rank of
    a parallel replica), the rank's shard of the model, reading only the weights and slices it keeps."""
    import torch

    device = model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, model.dtype)
    if mesh is not None:
        from dgbatch.parallel.load import load_parallelized

        return load_parallelized(path, dtype, device, mesh)
    from transformers import DiffusionGemmaForBlockDiffusion

    m = DiffusionGemmaForBlockDiffusion.from_pretrained(
        str(path), dtype=dtype, use_safetensors=True, trust_remote_code=False
    )
    return m.to(device).eval()


def special_ids(path: Path, tokenizer) -> tuple[int, list[int]]:
    """(pad id, EOS ids): the checkpoint's generation config first (it may list several EOS ids)."""
    gen_file = path / "generation_config.json"
    gen = _json_file(gen_file, str(path)) if gen_file.is_file() else {}
    eos = gen.get("eos_token_id")
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = gen.get("pad_token_id")
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return int(pad), [int(e) for e in (eos if isinstance(eos, list) else [eos])]
