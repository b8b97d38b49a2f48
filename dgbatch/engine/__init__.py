"""The engine: dgbatch's own DiffusionGemma generation loop (slots, slot KV cache, per-row sampler).

Imports neither Ray nor fsspec; it runs on tensors alone.
"""

from dgbatch.engine.backend import EngineBackend
from dgbatch.engine.loop import Engine, EngineStats, Finished

__all__ = ["Engine", "EngineBackend", "EngineStats", "Finished"]
