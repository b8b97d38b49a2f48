"""dgbatch: distributed batch inference for DiffusionGemma on Ray.

The package mirrors the pipeline: `config` -> `planning` (read, tokenize, bucket, shard) ->
`driver` (queue, retries, progress, resume) -> `replica` (one model per Ray actor) -> `shard`
(generate one shard, commit it once) over a generation backend (`reference`, later `engine`),
with all IO in `io` (fsspec, commits, output layout).
"""

__version__ = "0.1.0"
