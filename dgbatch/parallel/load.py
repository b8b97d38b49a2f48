"""Per-rank loading: each rank of a parallel replica reads only the weights and slices it keeps.

    model = load_parallelized(checkpoint_dir, torch.bfloat16, "cuda", mesh)

Loading the whole checkpoint and then `parallelize`-ing it costs every rank the full model in host
memory (and, on a GPU, in device memory until the slices are cut). Here:

    1. build the model on the meta device (no storage), as transformers' `from_pretrained` does;
    2. `parallelize` it there: the same `parallelize`, on shapes only, returns which slice of which weight
       each of the rank's parameters is (`Cuts`);
    3. read each parameter from the safetensors files (`safe_open(...).get_slice`): a replicated
       weight whole, a sharded one only its slice, straight to the rank's device, one at a time;
    4. buffers: those in the checkpoint are read, the rest (rotary frequencies, scales) initialised by
       the model's own `_init_weights`, as `from_pretrained` initialises whatever the checkpoint lacks.

The result equals `parallelize(from_pretrained(...), mesh)` exactly (tests/parallel/test_rank_loading.py).
Imports neither Ray nor fsspec: the checkpoint is a local directory (the node's cache for a remote one).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from dgbatch.parallel.mesh import Mesh
from dgbatch.parallel.parallelize import Cut, parallelize

INDEX = "model.safetensors.index.json"


def tensor_files(path: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it (one file, or an index of several)."""
    from safetensors import safe_open

    index = path / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: path / f for k, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            out.update(dict.fromkeys(fh.keys(), f))
    return out


def read_cut(sl, ndim: int, cut: Cut) -> torch.Tensor:
    """The slice `cut` of a safetensors slice handle, reading only its bytes; ranges on the same dim are
    concatenated in order (what `parallelize`'s slicer does with `narrow` + `cat`)."""
    ranges: dict[int, list[tuple[int, int]]] = {}
    for dim, start, length in cut:
        ranges.setdefault(dim, []).append((start, length))
    return _read_ranges(sl, list(ranges.items()), [slice(None)] * ndim)


def _read_ranges(sl, ranges: list[tuple[int, list[tuple[int, int]]]], index: list) -> torch.Tensor:
    # A plain recursive function, not a closure: a self-referencing closure would keep `sl` (and with it
    # the file's mapping) alive until the garbage collector breaks the cycle.
    if not ranges:
        return sl[tuple(index)]
    (dim, spans), rest = ranges[0], ranges[1:]
    parts = []
    for start, length in spans:
        index = list(index)
        index[dim] = slice(start, start + length)
        parts.append(_read_ranges(sl, rest, index))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def meta_model(path: Path, dtype: torch.dtype):
    """The checkpoint's model with no storage: parameters and buffers on the meta device, ties made."""
    from transformers import AutoConfig, DiffusionGemmaForBlockDiffusion

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    config.name_or_path = str(path)
    with torch.device("meta"):
        return DiffusionGemmaForBlockDiffusion._from_config(config, dtype=dtype)


def _holders(model: nn.Module, kind: str) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """(qualified name, owning module, attribute, tensor) for every parameter or buffer slot, ties included."""
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, t in getattr(module, kind).items():
            if t is not None:
                yield (f"{prefix}.{attr}" if prefix else attr), module, attr, t


def load_parallelized(path: Path, dtype: torch.dtype, device: str | torch.device, mesh: Mesh):
    """`parallelize(from_pretrained(path), mesh)`, reading only this rank's slices. Eval mode."""
    model = meta_model(path, dtype)
    names: dict[int, list[str]] = {}
    for name, _, _, p in _holders(model, "_parameters"):
        names.setdefault(id(p), []).append(name)
    cuts = parallelize(model, mesh)
    where = tensor_files(path)

    todo: dict[int, tuple[str, str, Cut | None, torch.Tensor]] = {}  # id(meta parameter) -> (name, key, cut, it)
    for name, _, _, p in _holders(model, "_parameters"):
        if id(p) not in todo:
            source, cut = cuts.get(id(p), (id(p), None))
            key = next((n for n in names[source] if n in where), None)
            if key is None:
                raise ValueError(f"checkpoint {path} has no tensor for {name} (looked for {names[source]})")
            todo[id(p)] = (name, key, cut, p)
    # One open per tensor: the file's mapping lives only while this tensor is read, so the pages it touches
    # (a sliced tensor's neighbouring bytes belong to other ranks) leave with it.
    loaded = {pid: _read_parameter(where[key], name, key, cut, p, device, mesh.rank)
              for pid, (name, key, cut, p) in todo.items()}  # tied slots share one
    for _, module, attr, p in list(_holders(model, "_parameters")):
        module._parameters[attr] = loaded[id(p)]

    to_init: dict[int, nn.Module] = {}
    for name, module, attr, b in list(_holders(model, "_buffers")):
        if name in where:
            with _open(where[name]) as fh:
                value = fh.get_tensor(name).to(device=device, dtype=b.dtype, copy=True)
            value._is_hf_initialized = True
        else:
            value = torch.empty_like(b, device=device)
            to_init[id(module)] = module
        module._buffers[attr] = value
    for module, owner in _init_owners(model):  # only the uninitialised buffers: loaded tensors carry the flag
        if id(module) in to_init:
            owner._init_weights(module)
    _load_generation_config(model, path)
    return model.eval()


def _open(f: Path):
    from safetensors import safe_open

    return safe_open(str(f), framework="pt", device="cpu")


def _read_parameter(f: Path, name: str, key: str, cut: Cut | None, p: torch.Tensor, device, rank: int) -> nn.Parameter:
    with _open(f) as fh:
        sl = fh.get_slice(key)
        t = sl[:] if cut is None else read_cut(sl, len(sl.get_shape()), cut)
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{key} has shape {tuple(sl.get_shape())} in the checkpoint, which does not give "
                             f"{name}'s {tuple(p.shape)} on rank {rank}")
        # safetensors hands out views of its file mapping: copy them (a cut concatenated from several
        # ranges already is one), so the rank holds only its own bytes and the mapping can go.
        concatenated = cut is not None and len({d for d, _, _ in cut}) < len(cut)
        t = t.to(device=device, dtype=p.dtype, copy=not concatenated)
    param = nn.Parameter(t, requires_grad=p.requires_grad)
    param._is_hf_initialized = True
    return param


def _init_owners(model) -> Iterator[tuple[nn.Module, nn.Module]]:
    """(module, the closest PreTrainedModel at or above it): whose `_init_weights` transformers applies to it
    (its `initialize_weights` dispatches to sub-models, e.g. the vision tower, that way)."""
    from transformers import PreTrainedModel

    def walk(module: nn.Module, owner: nn.Module):
        for child in module.children():
            yield from walk(child, child if isinstance(child, PreTrainedModel) else owner)
        yield module, owner

    yield from walk(model, model)


def _load_generation_config(model, path: Path) -> None:
    """What `from_pretrained` does for a model that generates: the checkpoint's generation_config.json."""
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path))
