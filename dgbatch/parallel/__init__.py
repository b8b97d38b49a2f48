"""Tensor and expert parallelism for DiffusionGemma: degrees, process groups, `parallelize`.

    dims = ParallelDims(tp=2, ep=1)
    dims.check_model(text_config)                     # before any weights load
    mesh = Mesh.init(dims, rank, store, "nccl", 300)  # or Mesh.local(dims, rank): no processes
    parallelize(model, mesh)                          # splits the loaded model in place, for this rank

The engine then runs the sharded model unchanged. Imports neither Ray nor fsspec.
"""

from dgbatch.parallel.dims import ParallelConfigError, ParallelDims
from dgbatch.parallel.mesh import Mesh
from dgbatch.parallel.parallelize import mesh_of, parallelize

__all__ = ["Mesh", "ParallelConfigError", "ParallelDims", "mesh_of", "parallelize"]
