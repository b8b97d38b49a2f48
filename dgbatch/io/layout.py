"""Where everything lives under a job's output root. One place, so readers and writers agree.

    OUTPUT/data/<shard>.parquet        outputs; a file exists only once complete (its commit)
    OUTPUT/filtered/<shard>.parquet    with output.drop_filtered: the rows that failed output.filters
    OUTPUT/_commits/<shard>.json       per-shard stats, written after the data file
    OUTPUT/_failed/<shard>.json        shards that exhausted their attempts, with the reason
    OUTPUT/_plan/manifest.json         the plan: buckets and shard list
    OUTPUT/_plan/shards/<shard>.parquet  tokenized prompt shards
    OUTPUT/_job.json                   config fingerprint and public config of the job
    OUTPUT/_summary.json, OUTPUT/_SUCCESS
    OUTPUT/_metrics.json               an eval's metrics (jobs.eval)
"""

from __future__ import annotations

from dataclasses import dataclass

from dgbatch.io.fs import join


@dataclass(frozen=True)
class Layout:
    root: str  # fsspec path (no protocol) on the output filesystem

    def data(self, shard_id: str = "") -> str:
        return join(self.root, "data", f"{shard_id}.parquet") if shard_id else join(self.root, "data")

    def filtered(self, shard_id: str = "") -> str:
        return join(self.root, "filtered", f"{shard_id}.parquet") if shard_id else join(self.root, "filtered")

    def commit(self, shard_id: str = "") -> str:
        return join(self.root, "_commits", f"{shard_id}.json") if shard_id else join(self.root, "_commits")

    def failed(self, shard_id: str = "") -> str:
        return join(self.root, "_failed", f"{shard_id}.json") if shard_id else join(self.root, "_failed")

    def plan_shard(self, shard_id: str) -> str:
        return join(self.root, "_plan", "shards", f"{shard_id}.parquet")

    @property
    def plan_manifest(self) -> str:
        return join(self.root, "_plan", "manifest.json")

    @property
    def job(self) -> str:
        return join(self.root, "_job.json")

    @property
    def summary(self) -> str:
        return join(self.root, "_summary.json")

    @property
    def metrics(self) -> str:
        return join(self.root, "_metrics.json")

    @property
    def success(self) -> str:
        return join(self.root, "_SUCCESS")
