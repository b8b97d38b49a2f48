"""Where everything lives under a job's output root. One place, so readers and writers agree.

    OUTPUT/data/<shard>.parquet        outputs; a file exists only once complete (its commit)
    OUTPUT/filtered/<shard>.parquet    with output.drop_filtered: the rows that failed output.filters
    OUTPUT/_commits/<shard>.json       per-shard stats, written after the data file
    OUTPUT/_failed/<shard>.json        shards that exhausted their attempts, with the reason
    OUTPUT/_plan/manifest.json         the plan: buckets and shard list
    OUTPUT/_plan/shards/<shard>.arrow  tokenized prompt shards (Arrow IPC)
    OUTPUT/_job.json                   config fingerprint and public config of the job
    OUTPUT/_progress.json              a running driver's progress, rewritten every few seconds
    OUTPUT/_summary.json, OUTPUT/_SUCCESS
    OUTPUT/_metrics.json               an eval's metrics (jobs.eval)
    OUTPUT/_report/                    `dgbatch report`: report.html, its PNG figures, report.json
    OUTPUT/.huggingface.yaml           tells `datasets.load_dataset(OUTPUT)` that the data is data/*.parquet

The only Parquet files under OUTPUT are the outputs in data/ (and, with output.drop_filtered, the
filtered rows in filtered/, which carry `filtered=true`), so any reader's `OUTPUT/**/*.parquet` glob
counts each output row once. Everything else is `_`-prefixed (pyarrow, pandas and Ray Data skip it) or
hidden; `datasets`, which would otherwise pick the most common extension (.json), reads the
`.huggingface.yaml` config (the Hub's own standalone dataset-card YAML).
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

    def plan_shard(self, shard_id: str = "") -> str:
        shards = join(self.root, "_plan", "shards")
        return join(shards, f"{shard_id}.arrow") if shard_id else shards

    @property
    def plan_manifest(self) -> str:
        return join(self.root, "_plan", "manifest.json")

    @property
    def job(self) -> str:
        return join(self.root, "_job.json")

    @property
    def progress(self) -> str:
        return join(self.root, "_progress.json")

    @property
    def metrics(self) -> str:
        """An eval job's metrics (written by the eval job; read by `dgbatch report`)."""
        return join(self.root, "_metrics.json")

    @property
    def reader_config(self) -> str:
        return join(self.root, ".huggingface.yaml")

    def url(self, fs) -> str:
        """The root as a URL a user can paste: an absolute local path, or scheme://bucket/prefix."""
        from fsspec.implementations.local import LocalFileSystem

        return self.root if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(self.root)

    def report(self, name: str = "") -> str:
        return join(self.root, "_report", name) if name else join(self.root, "_report")

    @property
    def summary(self) -> str:
        return join(self.root, "_summary.json")

    @property
    def metrics(self) -> str:
        return join(self.root, "_metrics.json")

    @property
    def success(self) -> str:
        return join(self.root, "_SUCCESS")


# The content of OUTPUT/.huggingface.yaml: `datasets.load_dataset(OUTPUT)` (and the Hub, if the output
# is uploaded as a dataset repo) reads data/*.parquet as the train split and nothing else.
READER_CONFIG = """\
# Written by dgbatch: `datasets.load_dataset(OUTPUT)` reads the outputs in data/ and nothing else.
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*.parquet
"""
