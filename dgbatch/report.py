"""`dgbatch report OUTPUT [--out DIR]`: a self-contained HTML report of a job's output, with PNG figures.

Every number is computed here from the output's Parquet files (not copied from the summary), so the
report is also a check of the summary. The HTML loads nothing from anywhere: its figures are inlined
as data URIs and its style is inline (the same PNGs are written beside it for slides and docs).
Written to OUTPUT/_report/ by default: report.html, report.json (the numbers) and the figures.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dgbatch.config import StorageSection
from dgbatch.jobfiles import JobFiles, resolve
from dgbatch.planning.planner import ERROR_BUCKET
from dgbatch.status import reason_kind

COLUMNS = ["id", "num_prompt_tokens", "num_output_tokens", "tokens_per_forward", "num_decoder_forwards",
           "finish_reason", "error"]
MAX_FAILURE_ROWS = 50


def read_rows(files: JobFiles) -> pa.Table:
    """The stats columns of every committed data file, with each row's shard and bucket."""
    bucket_of = {s["shard_id"]: s["bucket"] for s in files.shards}
    tables = []
    for sid in sorted(files.committed):
        with files.fs.open(files.layout.data(sid), "rb") as fh:
            t = pq.read_table(fh, columns=COLUMNS)
        t = t.append_column("shard", pa.array([sid] * t.num_rows, pa.string()))
        tables.append(t.append_column("bucket", pa.array([bucket_of.get(sid, -2)] * t.num_rows, pa.int32())))
    if not tables:
        empty = {c: [] for c in (*COLUMNS, "shard", "bucket")}
        return pa.table(empty)
    return pa.concat_tables(tables)


def _num(a: np.ndarray, fn) -> float | None:
    return None if a.size == 0 else round(float(fn(a)), 4)


def _dist(a: np.ndarray) -> dict:
    return {"n": int(a.size), "mean": _num(a, np.mean), "p50": _num(a, lambda x: np.percentile(x, 50)),
            "p90": _num(a, lambda x: np.percentile(x, 90)), "min": _num(a, np.min), "max": _num(a, np.max)}


def _unix(iso: str | None) -> float | None:
    import calendar

    try:
        return float(calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ"))) if iso else None
    except ValueError:
        return None


def compute(files: JobFiles, rows: pa.Table) -> dict:
    """The report's numbers (what report.json holds)."""
    col = lambda name: rows.column(name).to_numpy(zero_copy_only=False)
    ok = np.array([r != "error" for r in rows.column("finish_reason").to_pylist()], dtype=bool)
    tpf = np.array([v for v in rows.column("tokens_per_forward").to_pylist() if v is not None], dtype=float)
    out_len, prompt_len = col("num_output_tokens").astype(float), col("num_prompt_tokens").astype(float)
    buckets, bucket_col = [], col("bucket")
    edges = (files.manifest or {}).get("edges", [])
    for b in sorted(set(bucket_col.tolist())):
        sel = bucket_col == b
        b_tpf = np.array([v for v, s in zip(rows.column("tokens_per_forward").to_pylist(), sel) if s and v is not None])
        label = ("row errors" if b == ERROR_BUCKET else "?" if b < 0 else
                 f"<={edges[b]}" if b < len(edges) else f">{edges[-1]}" if edges else "all")
        buckets.append({"bucket": int(b), "tokens": label, "rows": int(sel.sum()),
                        "prompt_tokens_mean": _num(prompt_len[sel & ok], np.mean),
                        "output_tokens_mean": _num(out_len[sel & ok], np.mean),
                        "tokens_per_forward_mean": _num(b_tpf, np.mean)})
    errors = [(i, e) for i, e in zip(rows.column("id").to_pylist(), rows.column("error").to_pylist()) if e is not None]
    kinds = Counter(reason_kind(e) for _, e in errors)
    examples: dict[str, tuple[str, str]] = {}
    for rid, e in errors:
        examples.setdefault(reason_kind(e), (rid, e[:300]))
    summary = files.summary or {}
    return {
        "output": files.url,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "complete": files.success is not None,
        "rows": rows.num_rows,
        "rows_total": (files.manifest or {}).get("num_rows"),
        "shards_committed": len(files.committed),
        "shards_total": len(files.shards) if files.manifest else None,
        "error_rows": int((~ok).sum()),
        "output_tokens": int(out_len.sum()),
        "prompt_tokens": int(prompt_len.sum()),
        "tokens_per_forward": _dist(tpf),
        "output_length": _dist(out_len[ok]),
        "prompt_length": _dist(prompt_len[ok]),
        "finish_reasons": dict(sorted(Counter(rows.column("finish_reason").to_pylist()).items())),
        "buckets": buckets,
        "bucket_edges": edges,
        "throughput": _throughput(files, rows),
        "failed_shards": files.failed or list(summary.get("failed_shards", [])),
        "error_reasons": [{"reason": k, "rows": n, "example_id": examples[k][0], "example": examples[k][1]}
                          for k, n in kinds.most_common()],
        "metrics": files.metrics,
        "summary": summary or None,
        "config": (files.job or {}).get("config"),
        "job_meta": _job_meta(files),
    }


def _throughput(files: JobFiles, rows: pa.Table) -> dict:
    """Rows and output tokens committed over time, from the data files' commit times."""
    per_shard = {}
    shard_col, out_col = rows.column("shard").to_pylist(), rows.column("num_output_tokens").to_pylist()
    for sid, n in zip(shard_col, out_col):
        r, t = per_shard.get(sid, (0, 0))
        per_shard[sid] = (r + 1, t + n)
    commits = [(t, sid) for sid, t in files.committed.items()]
    if not commits:
        return {"points": [], "rows_per_s": None, "output_tokens_per_s": None}
    start = _unix((files.summary or {}).get("started_at"))
    t0 = min(start, commits[0][0]) if start is not None else commits[0][0]
    points, cum_rows, cum_tokens = [{"t_s": 0.0, "rows": 0, "output_tokens": 0}], 0, 0
    for t, sid in commits:
        r, n = per_shard.get(sid, (0, 0))
        cum_rows, cum_tokens = cum_rows + r, cum_tokens + n
        points.append({"t_s": round(t - t0, 3), "rows": cum_rows, "output_tokens": cum_tokens, "shard": sid})
    span = commits[-1][0] - commits[0][0]
    later_rows = cum_rows - per_shard.get(commits[0][1], (0, 0))[0]
    later_tokens = cum_tokens - per_shard.get(commits[0][1], (0, 0))[1]
    return {"points": points, "from": "the data files' commit times (first to last commit)",
            "rows_per_s": round(later_rows / span, 3) if span > 0 else None,
            "output_tokens_per_s": round(later_tokens / span, 3) if span > 0 else None}


def _job_meta(files: JobFiles) -> dict | None:
    """What every data file carries under the Parquet schema key `dgbatch` (model, sampling, version)."""
    for sid in files.committed:
        with files.fs.open(files.layout.data(sid), "rb") as fh:
            meta = pq.read_schema(fh).metadata or {}
        if b"dgbatch" in meta:
            return json.loads(meta[b"dgbatch"])
    return None


def metric_groups(metrics: dict | None) -> tuple[dict[str, float], dict[str, float]]:
    """(top-level numeric metrics, per-group values of the main metric) of an eval's `_metrics.json`.

    Tolerant of its exact shape: groups are the first mapping (under "groups", "per_group" or
    "by_group") of group -> number or group -> {accuracy | value | mean: number}."""
    if not isinstance(metrics, dict):
        return {}, {}
    top = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    groups: dict[str, float] = {}
    for key in ("groups", "per_group", "by_group"):
        g = metrics.get(key)
        if isinstance(g, dict):
            for name, v in g.items():
                if isinstance(v, dict):
                    v = next((v[k] for k in ("accuracy", "value", "mean", "score") if isinstance(v.get(k), (int, float))),
                             None)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    groups[str(name)] = float(v)
            break
    return top, groups


# --- figures ------------------------------------------------------------------------------------------


def _figures(numbers: dict, rows: pa.Table) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        return buf.getvalue()

    figs: dict[str, bytes] = {}
    ok = [r != "error" for r in rows.column("finish_reason").to_pylist()]
    tpf = [v for v in rows.column("tokens_per_forward").to_pylist() if v is not None]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    if tpf:
        ax.hist(tpf, bins=min(40, max(5, len(set(tpf)))), color="#3b6ea8", edgecolor="white")
        ax.axvline(float(np.mean(tpf)), color="#c0392b", linestyle="--", label=f"mean {np.mean(tpf):.2f}")
        ax.legend()
    ax.set(title="Tokens per decoder forward (per row)", xlabel="tokens_per_forward", ylabel="rows")
    figs["tokens_per_forward.png"] = png(fig)

    lengths = [n for n, k in zip(rows.column("num_output_tokens").to_pylist(), ok) if k]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    if lengths:
        ax.hist(lengths, bins=min(40, max(5, len(set(lengths)))), color="#2e8b57", edgecolor="white")
    ax.set(title="Output length (rows without error)", xlabel="num_output_tokens (EOS included)", ylabel="rows")
    figs["output_lengths.png"] = png(fig)

    reasons = numbers["finish_reasons"]
    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    colors = {"eos": "#2e8b57", "length": "#e67e22", "error": "#c0392b"}
    bars = ax.bar(list(reasons), list(reasons.values()), color=[colors.get(k, "#7f8c8d") for k in reasons])
    ax.bar_label(bars)
    ax.set(title="Finish reasons", ylabel="rows")
    figs["finish_reasons.png"] = png(fig)

    pts = numbers["throughput"]["points"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    if pts:
        ax.step([p["t_s"] for p in pts], [p["rows"] for p in pts], where="post", color="#3b6ea8", label="rows")
        ax2 = ax.twinx()
        ax2.step([p["t_s"] for p in pts], [p["output_tokens"] for p in pts], where="post", color="#e67e22",
                 label="output tokens")
        ax2.set_ylabel("output tokens committed")
        ax.legend(loc="upper left")
        ax2.legend(loc="lower right")
    ax.set(title="Committed over time (one step per shard commit)", xlabel="seconds since the job started",
           ylabel="rows committed")
    figs["throughput.png"] = png(fig)

    bk = [b for b in numbers["buckets"] if b["bucket"] != ERROR_BUCKET]
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.2))
    labels = [b["tokens"] for b in bk]
    for ax, key, title, color in zip(axes, ("prompt_tokens_mean", "output_tokens_mean", "tokens_per_forward_mean"),
                                     ("mean prompt length", "mean output length", "mean tokens/forward"),
                                     ("#8e44ad", "#2e8b57", "#3b6ea8")):
        ax.bar(labels, [b[key] or 0 for b in bk], color=color)
        ax.set(title=title, xlabel="prompt-length bucket (tokens)")
        ax.tick_params(axis="x", labelrotation=45)
    figs["buckets.png"] = png(fig)

    _, groups = metric_groups(numbers["metrics"])
    if groups:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        bars = ax.bar(list(groups), list(groups.values()), color="#16a085")
        ax.bar_label(bars, fmt="%.3f")
        ax.set(title="Eval metric per group", ylabel="value")
        ax.tick_params(axis="x", labelrotation=45)
        figs["metrics_by_group.png"] = png(fig)
    return figs


# --- HTML ---------------------------------------------------------------------------------------------

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dgbatch report: {{ n.output }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: .2em .7em; border-bottom: 1px solid #eee;
text-align: left; vertical-align: top; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; margin: .5em 0; } pre { background: #f6f6f6; padding: .8em; overflow-x: auto; }
.bad { color: #c0392b; } .muted { color: #777; }
</style></head><body>
<h1>dgbatch report</h1>
<p><code>{{ n.output }}</code> &middot; {{ "complete" if n.complete else "incomplete" }} &middot;
<span class="muted">generated {{ n.generated_at }}</span></p>
<h2>Summary</h2>
<table>
<tr><th>rows</th><td class="num" id="rows">{{ fmt_int(n.rows) }}</td>
<td class="muted">of {{ fmt_int(n.rows_total) }} in the plan</td></tr>
<tr><th>shards committed</th><td class="num" id="shards_committed">{{ fmt_int(n.shards_committed) }}</td>
<td class="muted">of {{ fmt_int(n.shards_total) }}</td></tr>
<tr><th>error rows</th><td class="num" id="error_rows">{{ fmt_int(n.error_rows) }}</td><td></td></tr>
<tr><th>output tokens</th><td class="num" id="output_tokens">{{ fmt_int(n.output_tokens) }}</td><td></td></tr>
<tr><th>prompt tokens</th><td class="num" id="prompt_tokens">{{ fmt_int(n.prompt_tokens) }}</td><td></td></tr>
<tr><th>tokens per forward</th><td class="num" id="tpf_mean">{{ fmt(n.tokens_per_forward.mean) }}</td>
<td class="muted">p50 {{ fmt(n.tokens_per_forward.p50) }}, p90 {{ fmt(n.tokens_per_forward.p90) }}</td></tr>
<tr><th>output length</th><td class="num" id="output_length_mean">{{ fmt(n.output_length.mean) }}</td>
<td class="muted">p50 {{ fmt(n.output_length.p50) }}, p90 {{ fmt(n.output_length.p90) }},
max {{ fmt(n.output_length.max) }}</td></tr>
<tr><th>throughput</th><td class="num" id="rows_per_s">{{ fmt(n.throughput.rows_per_s) }}</td>
<td class="muted">rows/s, {{ fmt(n.throughput.output_tokens_per_s) }} output tok/s, from
{{ n.throughput.get("from", "-") }}</td></tr>
{% if n.summary %}<tr><th>last run</th><td class="num">{{ fmt(n.summary.get("wall_time_s")) }} s</td>
<td class="muted">{{ n.summary.get("started_at", "") }} .. {{ n.summary.get("ended_at", "") }}</td></tr>{% endif %}
</table>
{% if metrics_top or groups %}
<h2>Eval metrics</h2>
<table>{% for k, v in metrics_top.items() %}<tr><th>{{ k }}</th><td class="num" id="metric_{{ k }}">{{ fmt(v) }}</td>
</tr>{% endfor %}</table>
{% if groups %}<table><tr><th>group</th><th>value</th></tr>{% for g, v in groups.items() %}
<tr><td>{{ g }}</td><td class="num">{{ fmt(v) }}</td></tr>{% endfor %}</table>
<img alt="eval metric per group" src="{{ img['metrics_by_group.png'] }}">{% endif %}
{% endif %}
<h2>Tokens per forward</h2>
<img alt="tokens per forward histogram" src="{{ img['tokens_per_forward.png'] }}">
<h2>Output lengths and finish reasons</h2>
<img alt="output length histogram" src="{{ img['output_lengths.png'] }}">
<table><tr><th>finish reason</th><th>rows</th></tr>{% for k, v in n.finish_reasons.items() %}
<tr><td>{{ k }}</td><td class="num" id="finish_{{ k }}">{{ fmt_int(v) }}</td></tr>{% endfor %}</table>
<img alt="finish reasons" src="{{ img['finish_reasons.png'] }}">
<h2>Throughput over time</h2>
<img alt="rows and tokens committed over time" src="{{ img['throughput.png'] }}">
<h2>Prompt-length buckets</h2>
<p class="muted">bucket edges {{ n.bucket_edges }}</p>
<table><tr><th>bucket</th><th>prompt tokens</th><th>rows</th><th>mean prompt length</th><th>mean output length</th>
<th>mean tokens/forward</th></tr>{% for b in n.buckets %}
<tr><td>{{ b.bucket }}</td><td>{{ b.tokens }}</td><td class="num">{{ fmt_int(b.rows) }}</td>
<td class="num">{{ fmt(b.prompt_tokens_mean) }}</td><td class="num">{{ fmt(b.output_tokens_mean) }}</td>
<td class="num">{{ fmt(b.tokens_per_forward_mean) }}</td></tr>{% endfor %}</table>
<img alt="per-bucket prompt length, output length and tokens per forward" src="{{ img['buckets.png'] }}">
<h2>Failures</h2>
{% if not n.failed_shards and not n.error_reasons %}<p>None: no failed shard, no error row.</p>{% endif %}
{% if n.failed_shards %}<table><tr><th>failed shard</th><th>reason</th></tr>{% for f in n.failed_shards %}
<tr><td>{{ f.shard }}</td><td class="bad">{{ f.reason }}</td></tr>{% endfor %}</table>{% endif %}
{% if n.error_reasons %}<table><tr><th>error rows</th><th>reason</th><th>example row</th><th>example message</th></tr>
{% for r in n.error_reasons[:max_failures] %}<tr><td class="num">{{ fmt_int(r.rows) }}</td><td>{{ r.reason }}</td>
<td>{{ r.example_id }}</td><td class="bad">{{ r.example }}</td></tr>{% endfor %}</table>{% endif %}
<h2>Model and job</h2>
<pre>{{ meta_text }}</pre>
<h2>Config</h2>
<pre>{{ config_text }}</pre>
</body></html>
"""


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not v.is_integer():
        return f"{v:,.4f}".rstrip("0").rstrip(".") if abs(v) < 10 else f"{v:,.2f}"
    return f"{int(v):,}"


def render_html(numbers: dict, figures: dict[str, bytes]) -> str:
    import jinja2
    import yaml

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    img = {name: "data:image/png;base64," + base64.b64encode(data).decode() for name, data in figures.items()}
    top, groups = metric_groups(numbers["metrics"])
    return env.from_string(TEMPLATE).render(
        n=numbers, img=img, fmt=_fmt, fmt_int=lambda v: "-" if v is None else f"{int(v):,}",
        metrics_top=top, groups=groups, max_failures=MAX_FAILURE_ROWS,
        meta_text=yaml.safe_dump(numbers["job_meta"] or {}, sort_keys=False, allow_unicode=True),
        config_text=yaml.safe_dump(numbers["config"] or {}, sort_keys=False, allow_unicode=True),
    )


def write_report(output: str, out: str | None = None, storage: StorageSection | None = None) -> str:
    """Write report.html, report.json and the PNGs to `out` (default OUTPUT/_report); returns the HTML's URL."""
    from fsspec.implementations.local import LocalFileSystem

    from dgbatch.io.commit import write_bytes
    from dgbatch.io.fs import filesystem, join

    files = JobFiles(output, storage)
    files.check()
    rows = read_rows(files)
    numbers = compute(files, rows)
    figures = _figures(numbers, rows)
    html = render_html(numbers, figures)
    if out is None:
        fs, where = files.fs, files.layout.report()
    else:
        fs, where = filesystem(out, storage)
    fs.makedirs(where, exist_ok=True)
    for name, data in figures.items():
        write_bytes(fs, join(where, name), data)
    write_bytes(fs, join(where, "report.json"), (json.dumps(numbers, indent=2, default=str) + "\n").encode())
    write_bytes(fs, join(where, "report.html"), html.encode())
    path = join(where, "report.html")
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def main(target: str, out: str | None = None) -> int:
    output, storage = resolve(target)
    path = write_report(output, out, storage)
    print(f"report: {path}")
    return 0
