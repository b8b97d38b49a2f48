"""`dgbatch report OUTPUT`: numbers equal a recomputation from the Parquet, real figures, no external resource."""

import base64
import io
import json
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from dgbatch import cli
from tests.helpers import copy_output

FIGURES = ("tokens_per_forward.png", "output_lengths.png", "finish_reasons.png", "throughput.png", "buckets.png")


class Resources(HTMLParser):
    """Every attribute through which a page can load something, and what it points at."""

    def __init__(self):
        super().__init__()
        self.refs, self.tags = [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.refs += [(tag, k, v or "") for k, v in attrs if k in ("src", "href", "srcset", "data", "poster",
                                                                     "background", "action", "formaction")]


@pytest.fixture(scope="module")
def reported(mixed_output, tmp_path_factory):
    out = copy_output(mixed_output, tmp_path_factory.mktemp("report") / "out")
    assert cli.main(["report", str(out)]) == 0
    return out


def test_report_numbers_equal_a_recomputation_from_the_parquet(reported):
    n = json.loads((reported / "_report" / "report.json").read_text())
    df = pd.read_parquet(reported / "data")
    ok = df[df.finish_reason != "error"]
    tpf = df.tokens_per_forward.dropna().to_numpy()
    assert n["rows"] == len(df) == 12 and n["error_rows"] == int((df.finish_reason == "error").sum()) == 5
    assert n["output_tokens"] == int(df.num_output_tokens.sum()) and n["prompt_tokens"] == int(df.num_prompt_tokens.sum())
    assert n["tokens_per_forward"]["mean"] == pytest.approx(tpf.mean(), abs=1e-4)
    assert n["tokens_per_forward"]["p90"] == pytest.approx(np.percentile(tpf, 90), abs=1e-4)
    assert n["output_length"]["mean"] == pytest.approx(ok.num_output_tokens.mean(), abs=1e-4)
    assert n["finish_reasons"] == df.finish_reason.value_counts().to_dict()
    # Per bucket, through the plan manifest's shard -> bucket map and each data file's name.
    bucket_of = {s["shard_id"]: s["bucket"] for s in json.loads((reported / "_plan" / "manifest.json").read_text())
                 ["shards"]}
    parts = [pd.read_parquet(p).assign(bucket=bucket_of[p.stem]) for p in sorted((reported / "data").iterdir())]
    by_bucket = pd.concat(parts)
    for b in n["buckets"]:
        rows = by_bucket[by_bucket.bucket == b["bucket"]]
        assert b["rows"] == len(rows)
        good = rows[rows.finish_reason != "error"]
        if len(good):
            assert b["output_tokens_mean"] == pytest.approx(good.num_output_tokens.mean(), abs=1e-4)
            assert b["tokens_per_forward_mean"] == pytest.approx(good.tokens_per_forward.mean(), abs=1e-4)
    assert sum(r["rows"] for r in n["error_reasons"]) == 5
    assert n["throughput"]["points"][-1]["rows"] == 12
    # The page shows the same numbers.
    html = (reported / "_report" / "report.html").read_text()
    assert f'id="rows">{len(df)}<' in html and 'id="error_rows">5<' in html
    assert f'id="output_tokens">{int(df.num_output_tokens.sum()):,}<' in html
    assert "prompt has N tokens; the model accepts at most N" in html


def test_figures_are_real_images_and_the_page_inlines_them(reported):
    from PIL import Image

    html = (reported / "_report" / "report.html").read_text()
    for name in FIGURES:
        data = (reported / "_report" / name).read_bytes()
        img = Image.open(io.BytesIO(data))
        assert img.format == "PNG" and img.width >= 400 and img.height >= 250, name
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
        colours = len(np.unique(pixels, axis=0))
        not_white = (pixels.min(axis=1) < 200).mean()
        assert colours > 20 and 0.01 < not_white < 0.9, f"{name}: {colours} colours, {not_white:.3f} drawn"
        assert "data:image/png;base64," + base64.b64encode(data).decode() in html, f"{name} is not inlined"


def test_the_page_loads_no_external_resource(reported):
    html = (reported / "_report" / "report.html").read_text()
    page = Resources()
    page.feed(html)
    assert page.refs and all(v.startswith("data:") for _, _, v in page.refs), page.refs
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}
    assert "@import" not in html and "url(" not in html.replace("data:", "")


def test_eval_metrics_per_group_when_the_job_wrote_them(mixed_output, tmp_path):
    out = copy_output(mixed_output, tmp_path / "out")
    (out / "_metrics.json").write_text(json.dumps(
        {"accuracy": 0.625, "accuracy_stderr": 0.1, "n": 8, "groups": {"reverse": {"accuracy": 0.75, "n": 4},
                                                                       "repeat": {"accuracy": 0.5, "n": 4}}}))
    assert cli.main(["report", str(out), "--out", str(tmp_path / "elsewhere")]) == 0
    assert not (out / "_report").exists()
    html = (tmp_path / "elsewhere" / "report.html").read_text()
    assert 'id="metric_accuracy">0.625<' in html and "reverse" in html
    assert (tmp_path / "elsewhere" / "metrics_by_group.png").stat().st_size > 1000


def test_a_job_without_metrics_has_no_eval_section(reported):
    assert not (reported / "_report" / "metrics_by_group.png").exists()
    assert "Eval metrics" not in (reported / "_report" / "report.html").read_text()
