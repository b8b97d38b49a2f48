"""dgbatch: distributed batch inference for DiffusionGemma on Ray.

The package mirrors the pipeline: `config` -> `planning` (read, tokenize, bucket, shard) ->
`driver` (queue, retries, progress, resume) -> `replica` (one model per Ray actor) -> `shard`
(generate one shard, commit it once) over a generation backend (`engine`, or `reference`: transformers'
generate), with all IO in `io` (fsspec, commits, output layout). `status`, `dry_run` and `report`
read or preview a job without running it.

`import dgbatch` stays light (no torch, no Ray): `run` imports the driver when called.
"""

from __future__ import annotations

__version__ = "0.1.0"


def run(config, /, **overrides) -> dict:
    """Run (or resume) a job from a notebook or script; returns its summary. See `dgbatch.api.run`."""
    from dgbatch.api import run as _run

    return _run(config, **overrides)
