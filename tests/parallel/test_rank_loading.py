"""Per-rank loading: a rank that reads only its slices of the checkpoint holds exactly the model that
loading everything and then sharding it gives: every parameter and buffer, bit for bit, with the same
dtypes and the same ties (encoder/decoder, lm_head/embedding)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion

from dgbatch.parallel import Mesh, ParallelDims, parallelize
from dgbatch.parallel.load import INDEX, load_parallelized
from tests.engine.helpers import CHECKPOINT

REPO = Path(__file__).resolve().parents[2]
DIMS = [ParallelDims(2, 1), ParallelDims(1, 2), ParallelDims(2, 2), ParallelDims(4, 1)]


def assert_same_model(got, want) -> None:
    g, w = dict(got.named_parameters(remove_duplicate=False)), dict(want.named_parameters(remove_duplicate=False))
    assert g.keys() == w.keys()
    for name, t in w.items():
        assert g[name].dtype == t.dtype and torch.equal(g[name], t), name
    gb, wb = dict(got.named_buffers(remove_duplicate=False)), dict(want.named_buffers(remove_duplicate=False))
    assert gb.keys() == wb.keys()
    for name, t in wb.items():
        assert gb[name].dtype == t.dtype and torch.equal(gb[name], t), name
    ties = lambda params: {n: min(m for m in params if params[m] is params[n]) for n in params}
    assert ties(g) == ties(w)  # the same slots share one tensor
    assert {type(m).__name__ for m in got.modules()} == {type(m).__name__ for m in want.modules()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dims", DIMS, ids=str)
def test_each_rank_reads_exactly_what_load_then_shard_keeps(dims, dtype):
    whole = DiffusionGemmaForBlockDiffusion.from_pretrained(str(CHECKPOINT), dtype=dtype).eval()
    for rank in range(dims.world):
        want = copy.deepcopy(whole)
        parallelize(want, Mesh.local(dims, rank))
        got = load_parallelized(CHECKPOINT, dtype, "cpu", Mesh.local(dims, rank))
        assert_same_model(got, want)
        assert not got.training


def test_a_checkpoint_in_several_files_of_the_real_structure(tmp_path):
    """The 26B-A4B's structure at a tiny size (16 q heads, 8 / 2 KV heads, 16 experts), saved as several
    safetensors files behind an index, as the real checkpoint is; 8 ranks of tp 4 x ep 2."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import shapes

    torch.manual_seed(0)
    model = shapes.random_model(shapes.config(layers=6, tiny=True), "cpu", torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / INDEX).is_file() and len(list(tmp_path.glob("*.safetensors"))) > 3
    whole = DiffusionGemmaForBlockDiffusion.from_pretrained(str(tmp_path)).eval()
    dims = ParallelDims(4, 2)
    for rank in range(dims.world):
        want = copy.deepcopy(whole)
        parallelize(want, Mesh.local(dims, rank))
        assert_same_model(load_parallelized(tmp_path, torch.float32, "cpu", Mesh.local(dims, rank)), want)


def test_a_checkpoint_without_a_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    for f in CHECKPOINT.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(CHECKPOINT / "model.safetensors")
    del tensors["model.decoder.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"has no tensor for .*layers\.1\.self_attn\.q_proj\.weight"):
        load_parallelized(tmp_path, torch.float32, "cpu", Mesh.local(ParallelDims(2, 1), 0))
