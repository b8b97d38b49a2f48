"""Where everything lives under a job's output root. One place, so readers and writers agree.

    OUTPUT/data/<shard>.parquet        outputs; a file exists only once complete (its commit)
    OUTPUT/filtered/<shard>.parquet    with output.drop_filtered: the rows that failed output.filters
    OUTPUT/_commits/<shard>.json       the data file's size, rows and sha256, and per-shard stats (io/markers.py)
    OUTPUT/_failed/<shard>.json        shards that exhausted their attempts, with the reason
    OUTPUT/_rejected/<name>.<time>.rejected[.json]  data files that failed their check, and why (commits.py)
    OUTPUT/_plan/manifest.json         the plan: buckets and shard list
    OUTPUT/_plan/shards/<shard>.arrow  tokenized prompt shards (Arrow IPC)
    OUTPUT/_job.json                   the job that owns this root: identity, fingerprint, public config
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

A root is either absent, empty, or a dgbatch job's (it has `_job.json`): `unowned_entries` says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dgbatch.io.fs import join

_OUR_TEMP = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")  # io.commit's in-flight temp files


@dataclass(frozen=True)
class Layout:
    root: str  # fsspec path (no protocol) on the output filesystem

    def data(self, shard_id: str = "") -> str:
        """data/<shard>.parquet (a name ending in .parquet is taken as is), or the directory."""
        if not shard_id:
            return join(self.root, "data")
        return join(self.root, "data", shard_id if shard_id.endswith(".parquet") else f"{shard_id}.parquet")

    def filtered(self, shard_id: str = "") -> str:
        return join(self.root, "filtered", f"{shard_id}.parquet") if shard_id else join(self.root, "filtered")

    def commit(self, shard_id: str = "") -> str:
        return join(self.root, "_commits", f"{shard_id}.json") if shard_id else join(self.root, "_commits")

    def failed(self, shard_id: str = "") -> str:
        return join(self.root, "_failed", f"{shard_id}.json") if shard_id else join(self.root, "_failed")

    def rejected(self, name: str = "") -> str:
        return join(self.root, "_rejected", name) if name else join(self.root, "_rejected")

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
def unowned_entries(fs, root: str) -> list[str] | None:
    """None if `root` may be used by a new job (absent, empty, or holding `_job.json`); else the names it holds.

    Raises NotADirectoryError if `root` is a file.
    """
    fs.invalidate_cache(root)
    try:
        if fs.isfile(root):
            raise NotADirectoryError(root)
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return None
    names = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
    names = [n for n in names if n and not _OUR_TEMP.match(n) and join(root, n) != root.rstrip("/")]
    if not names or "_job.json" in names:
        return None
    return names
