"""The eval job: generate with the ordinary driver, then score the committed outputs in place.

    python -m jobs.eval CONFIG [key=value ...]        generate (or resume), score, write _metrics.json
    python -m jobs.eval --rescore OUTPUT [key=value]  score the outputs again (e.g. eval.scorer=...), no model

Scoring reads each shard's output (data/ and, with output.drop_filtered, filtered/), adds `score` and
`extracted` to its rows, and replaces the file atomically (readers see the old file or the new one);
a rerun or a rescore replaces them again, so scores always match the latest scorer. The metrics are
aggregated shard by shard (a prompt's samples share a shard), never holding more than one shard.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time

import pyarrow as pa
import pyarrow.parquet as pq

from dgbatch import __version__, commits, driver, redact
from dgbatch.columns import SCORE_SCHEMA
from dgbatch.config import ConfigError, JobConfig, StorageSection, load_config, parse_overrides
from dgbatch.eval import scorers
from dgbatch.eval.metrics import Metrics, Sample
from dgbatch.io.commit import list_names, read_json, write_bytes, write_json
from dgbatch.io.fs import filesystem
from dgbatch.io.layout import Layout
from dgbatch.planning.planner import prompt_id
from dgbatch.planning.source import carried_name

log = logging.getLogger("dgbatch")

ERROR_EXAMPLES = 5  # scoring errors quoted in _metrics.json


def check(cfg: JobConfig) -> scorers.Scorer:
    """What an eval needs beyond a generate job, checked before anything heavy; returns the scorer."""
    if scorers.needs_reference(cfg.eval) and not cfg.input.reference_column:
        raise ConfigError(f"eval.scorer={cfg.eval.scorer} compares outputs with a reference: set "
                          "input.reference_column (the column holding each row's answer)")
    return scorers.build(cfg.eval)


def run(cfg: JobConfig) -> int:
    """Generate (or resume) the job, then score it. Returns the process exit code."""
    scorer = check(cfg)
    extra = {cfg.eval.group_column: "eval.group_column"} if cfg.eval.group_column else {}
    code = driver.run(cfg, extra)
    if code == driver.EXIT_BAD_INPUT:
        return code
    score_outputs(cfg, scorer)
    return code


def rescore(output: str, overrides: list[str]) -> int:
    """Score the outputs under `output` again with the job's config plus `overrides`; no generation."""
    pairs = parse_overrides(overrides)
    storage = StorageSection.model_validate({k.removeprefix("storage."): v for k, v in pairs
                                             if k.startswith("storage.")})
    fs, root = filesystem(output, storage)
    job = read_json(fs, Layout(root).job)
    if job is None:
        raise ConfigError(f"{output!r} holds no dgbatch job (no _job.json): nothing to rescore")
    tree = job["config"]
    tree["storage"] = {k: v for k, v in tree.get("storage", {}).items() if k not in ("key", "secret")}  # masked
    cfg = load_config(None, [*overrides, f"output.path={output}"], base=tree)
    redact.install(cfg)
    score_outputs(cfg, check(cfg))
    return driver.EXIT_OK


def _read(fs, path: str) -> pa.Table:
    with fs.open(path, "rb") as fh:
        return pq.read_table(fh)


def _write(fs, layout: Layout, sid: str, path: str, table: pa.Table) -> None:
    """Replace a shard's file with its scored table (atomically), then its commit marker."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(fs, path, buf.getvalue())
    commits.record_rewrite(fs, layout, sid, path, buf.getvalue(), table.num_rows)


def score_table(table: pa.Table, scorer: scorers.Scorer, reference: str | None) -> tuple[pa.Table, list[str | None]]:
    """`table` with `score` and `extracted` set on every row (None where not scored), and each row's
    scoring error (None if scored, or if the generation itself failed)."""
    rows = table.to_pylist()
    scores, answers, errors = [], [], []
    for row in rows:
        score = answer = err = None
        if row["finish_reason"] != "error":
            try:
                score, answer = scorer(row["output_text"] or "", row.get(reference) if reference else None, row)
            except scorers.ScoreError as e:
                err = str(e)
        scores.append(score)
        answers.append(answer)
        errors.append(err)
    meta = table.schema.metadata
    for (name, typ), values in zip(SCORE_SCHEMA, (scores, answers)):
        col = pa.array(values, typ)
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, col) if i >= 0 else table.append_column(name, col)
    return table.replace_schema_metadata(meta), errors


def score_outputs(cfg: JobConfig, scorer: scorers.Scorer) -> dict:
    """Score every committed shard in place and write OUTPUT/_metrics.json; returns the metrics."""
    fs, root = filesystem(cfg.output.path, cfg.storage)
    layout = Layout(root)
    t0 = time.time()
    id_col = cfg.input.id_column
    reference = carried_name(cfg.input.reference_column, id_col) if cfg.input.reference_column else None
    group_col = carried_name(cfg.eval.group_column, id_col) if cfg.eval.group_column else None
    n, pass_k = cfg.sampling.num_samples, sorted(set(cfg.eval.pass_k or [1, cfg.sampling.num_samples]))
    overall, groups, ungrouped = Metrics(n, pass_k), {}, 0
    examples: list[dict] = []
    meta: dict = {}
    shards = sorted({s.removesuffix(".parquet") for d in (layout.data(), layout.filtered())
                     for s in list_names(fs, d, ".parquet")})
    for sid in shards:
        parts = [p for p in (layout.data(sid), layout.filtered(sid)) if fs.exists(p)]
        prompts: dict[tuple, list[Sample]] = {}
        for path in parts:
            table = _read(fs, path)
            meta = meta or json.loads((table.schema.metadata or {}).get(b"dgbatch", b"{}"))
            if group_col and group_col not in table.column_names:
                raise ConfigError(f"eval.group_column {cfg.eval.group_column!r} is not a column of the outputs")
            table, errors = score_table(table, scorer, reference)
            _write(fs, layout, sid, path, table)
            sampled = "sample_index" in table.column_names
            cols = {c: table.column(c).to_pylist() for c in ("id", "finish_reason", "output_text", "score",
                                                               "extracted", "tokens_per_forward",
                                                               "num_decoder_forwards")}
            group_values = table.column(group_col).to_pylist() if group_col else [None] * table.num_rows
            for i in range(table.num_rows):
                err = cols["finish_reason"][i] == "error"
                answer = cols["extracted"][i] if cols["extracted"][i] is not None else cols["output_text"][i]
                sample = Sample(cols["score"][i], answer, err, cols["tokens_per_forward"][i],
                                cols["num_decoder_forwards"][i] or 0)
                key = (None if group_values[i] is None else str(group_values[i]), prompt_id(cols["id"][i], sampled))
                prompts.setdefault(key, []).append(sample)
                if errors[i] and len(examples) < ERROR_EXAMPLES:
                    examples.append({"id": cols["id"][i], "error": errors[i]})
        for (group, _), samples in prompts.items():
            overall.add_prompt(samples)
            if group is not None:
                groups.setdefault(group, Metrics(n, pass_k)).add_prompt(samples)
            elif group_col:
                ungrouped += len(samples)  # a null group value (e.g. a line that could not be read)
    metrics = {
        **overall.to_dict(),
        "groups": {g: m.to_dict() for g, m in sorted(groups.items())},
        "group_column": cfg.eval.group_column,
        "ungrouped_rows": ungrouped,
        "higher_is_better": dict.fromkeys(overall.metric_names(), True),
        "eval": {**cfg.eval.model_dump(), "pass_k": pass_k if n > 1 else None},
        "num_samples": n,
        "scoring_error_examples": examples,
        "complete": fs.exists(layout.success),
        "model_path": meta.get("model_path", cfg.model.path),
        "sampling": meta.get("sampling"),
        "seed": meta.get("seed", cfg.sampling.seed),
        "backend": meta.get("backend"),
        "config_fingerprint": meta.get("config_fingerprint") or driver.resolved_fingerprint(cfg),
        "dgbatch_version": __version__,
        "scored_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "scoring_time_s": round(time.time() - t0, 3),
    }
    write_json(fs, layout.metrics, _finite(metrics))
    print("metrics: " + redact.scrub(_fmt(metrics)), flush=True)
    if examples:
        log.warning("%d row(s) could not be scored, e.g. %s: %s", metrics["scoring_errors"], examples[0]["id"],
                    examples[0]["error"])
    if not metrics["complete"]:
        print("note: the job is incomplete; these metrics cover its committed shards only", flush=True)
    return metrics


def _finite(obj):
    """NaN / inf have no JSON spelling: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _fmt(m: dict) -> str:
    f = lambda v: "n/a" if v is None else f"{v:.4f}"
    line = f"accuracy {f(m['accuracy'])} ± {f(m['accuracy_stderr'])} (n={m['n']}, {m['error_rows']} error rows"
    line += f", {m['scoring_errors']} not scorable)" if m["scoring_errors"] else ")"
    extra = [f"{k} {f(m[k])}" for k in m if k.startswith(("pass@", "maj@")) and not k.endswith("_stderr")]
    groups = [f"{g} {f(v['accuracy'])}" for g, v in m["groups"].items()]
    return "; ".join([line, *extra, *(["per group: " + ", ".join(groups)] if groups else [])])
