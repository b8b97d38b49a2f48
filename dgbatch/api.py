"""The Python API for notebooks and scripts: `dgbatch.run(config, **overrides)` returns the summary.

It runs the same driver as `dgbatch run`, in this process (a local Ray is started once and kept for
the next call), and leaves signals and logging to the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dgbatch.config import ConfigError, JobConfig, load_config


def _flatten(overrides: dict[str, Any]) -> list[tuple[str, Any]]:
    """`section={"key": v}` and `**{"section.key": v}` both become ("section.key", v)."""
    out = []
    for key, value in overrides.items():
        if "." not in key and isinstance(value, dict):
            out += [(f"{key}.{k}", v) for k, v in _flatten(value)] if value else [(key, value)]
        else:
            out.append((key, value))
    return out


def config_of(config: str | Path | dict | JobConfig, overrides: dict[str, Any]) -> JobConfig:
    values = _flatten(overrides)
    if isinstance(config, JobConfig):
        return config if not values else load_config(None, base=config.model_dump(), values=values)
    if isinstance(config, dict):
        return load_config(None, base=config, values=values)
    if isinstance(config, (str, Path)):
        return load_config(config, values=values)
    raise ConfigError(f"config must be a YAML path, a dict or a JobConfig, not {type(config).__name__}")


def run(config: str | Path | dict | JobConfig, /, **overrides: Any) -> dict:
    """Run (or resume) a job and return its summary (what `OUTPUT/_summary.json` holds).

    `config`: a YAML file, a config dict, or a JobConfig. `overrides`: a section as a dict
    (`sampling={"max_new_tokens": 64}`) or dotted keys (`**{"output.path": "/tmp/out"}`); values are
    taken as they are (no YAML parsing). A bad config raises ConfigError before anything heavy starts;
    shards that failed after their retries are listed in the summary's `failed_shards`.
    """
    from dgbatch import driver
    from dgbatch.io.commit import read_json
    from dgbatch.io.fs import filesystem
    from dgbatch.io.layout import Layout

    cfg = config_of(config, overrides)
    code = driver.run(cfg)
    fs, root = filesystem(cfg.output.path, cfg.storage)
    summary = read_json(fs, Layout(root).summary)
    if summary is None:  # cannot happen after driver.run returns; say so rather than return None
        raise RuntimeError(f"the job exited {code} without writing {Layout(root).summary}")
    return summary
