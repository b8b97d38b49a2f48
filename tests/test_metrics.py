"""Every metric the code defines is in the README's table and the Grafana dashboard, and they name no other."""

import json
import re
from pathlib import Path

from dgbatch.metrics import _DRIVER, SPECS

REPO = Path(__file__).resolve().parent.parent
HISTOGRAM_SERIES = re.compile(r"_(bucket|count|sum)$")


def exported() -> set[str]:
    return {s.exported for s in SPECS}


def test_the_readme_documents_every_metric_with_its_type_and_labels():
    rows = re.findall(r"^\| `(ray_dgbatch_\w+)` \| (\w+) \| ([\w, ]+) \| (\w+) \|", (REPO / "README.md").read_text(),
                      flags=re.MULTILINE)
    assert {name for name, *_ in rows} == exported() and len(rows) == len(SPECS)
    by_name = {s.exported: s for s in SPECS}
    for name, kind, labels, source in rows:
        assert kind == by_name[name].kind and tuple(labels.split(", ")) == by_name[name].labels, name
        assert source == ("driver" if by_name[name].name in _DRIVER else "replica"), name


def test_the_grafana_dashboard_queries_exactly_the_metrics_the_code_defines():
    dash = json.loads((REPO / "infra" / "grafana" / "dgbatch.json").read_text())
    assert dash["title"] == "dgbatch" and dash["panels"]
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    assert all(p["type"] in ("stat", "timeseries") and p["targets"] and "gridPos" in p for p in dash["panels"])
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    used = {HISTOGRAM_SERIES.sub("", n) if HISTOGRAM_SERIES.search(n) and HISTOGRAM_SERIES.sub("", n) in exported()
            else n for e in exprs for n in re.findall(r"ray_dgbatch_\w+", e)}
    assert used == exported()


def test_metric_names_are_prefixed_and_labelled_by_job():
    assert len({s.name for s in SPECS}) == len(SPECS)
    for s in SPECS:
        assert re.fullmatch(r"dgbatch_[a-z_]+", s.name) and s.labels[0] == "job", s
        assert (s.kind == "histogram") == bool(s.boundaries), s
