"""A job's output root, read back from its files alone: what `dgbatch status` and `dgbatch report` see.

Nothing here needs the job's config, Ray or a model: the plan manifest, the data files and their
commit times, the commit markers, the failure records, the summary and `_progress.json` say it all.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from dgbatch.config import ConfigError, StorageSection
from dgbatch.io.commit import list_mtimes, read_json
from dgbatch.io.fs import filesystem
from dgbatch.io.layout import Layout
from dgbatch.progress_file import ProgressRecord


class NotAJobOutput(ConfigError):
    """The path holds no dgbatch job (no plan, no job file, no data)."""


def resolve(target: str) -> tuple[str, StorageSection | None]:
    """OUTPUT as given, or the output.path (and storage settings) of a job CONFIG file."""
    if target.endswith((".yaml", ".yml")) and Path(target).is_file():
        from dgbatch.config import load_config

        cfg = load_config(target)
        return cfg.output.path, cfg.storage
    return target, None


class JobFiles:
    def __init__(self, output: str, storage: StorageSection | None = None):
        try:
            self.fs, root = filesystem(output, storage)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.layout = Layout(root)
        self.url = self.layout.url(self.fs)

    def _json(self, path: str):
        return read_json(self.fs, path)

    @functools.cached_property
    def job(self) -> dict | None:
        return self._json(self.layout.job)

    @functools.cached_property
    def manifest(self) -> dict | None:
        return self._json(self.layout.plan_manifest)

    @functools.cached_property
    def summary(self) -> dict | None:
        return self._json(self.layout.summary)

    @functools.cached_property
    def success(self) -> dict | None:
        return self._json(self.layout.success)

    @functools.cached_property
    def metrics(self) -> dict | None:
        return self._json(self.layout.metrics)

    @functools.cached_property
    def progress(self) -> ProgressRecord | None:
        d = self._json(self.layout.progress)
        return ProgressRecord.from_dict(d) if isinstance(d, dict) else None

    @functools.cached_property
    def committed(self) -> dict[str, float]:
        """Committed shard id -> commit time (the data file's modification time), oldest first."""
        times = {n.removesuffix(".parquet"): t for n, t in list_mtimes(self.fs, self.layout.data(), ".parquet").items()}
        return dict(sorted(times.items(), key=lambda kv: kv[1]))

    @functools.cached_property
    def commit_stats(self) -> dict[str, dict]:
        """Shard id -> the stats in its commit marker (shards committed without one are absent). Read, not
        checked: `commits.verify` is what decides a resume; status only reports."""
        paths = [self.layout.commit(sid) for sid in self.committed]
        blobs = self.fs.cat(paths, on_error="omit") if paths else {}
        out = {}
        for p, b in blobs.items():
            sid = p.rstrip("/").rsplit("/", 1)[-1].removesuffix(".json")
            try:
                m = json.loads(b)
            except ValueError:
                continue
            if isinstance(m, dict) and isinstance(m.get("stats"), dict):  # io/markers.py
                out[sid] = m["stats"]
        return out

    @functools.cached_property
    def failed(self) -> list[dict]:
        """Failure records ({shard, reason}) of shards that ran out of attempts in the last run."""
        names = list_mtimes(self.fs, self.layout.failed(), ".json")
        paths = [self.layout.failed(n.removesuffix(".json")) for n in names]
        blobs = self.fs.cat(paths, on_error="omit") if paths else {}
        out = []
        for b in blobs.values():
            try:
                out.append(json.loads(b))
            except ValueError:
                continue
        return sorted(out, key=lambda r: str(r.get("shard")))

    @property
    def shards(self) -> list[dict]:
        return list((self.manifest or {}).get("shards", []))

    def check(self) -> None:
        if self.job is None and self.manifest is None and not self.committed:
            raise NotAJobOutput(f"{self.url} holds no dgbatch job (no _job.json, no plan, no data/*.parquet)")
