"""A job's output is read as is by pandas, datasets, DuckDB, polars and Ray Data: exactly the rows in."""

import pyarrow.parquet as pq
import pytest

from dgbatch import report
from tests.helpers import REPO, copy_output


def readers(out, cache_dir) -> dict:
    """Row ids as each reader sees the output, through the form a user would type."""
    import datasets
    import duckdb
    import pandas as pd
    import polars as pl
    import ray

    datasets.disable_progress_bars()
    return {
        "pandas OUTPUT": pd.read_parquet(out)["id"].tolist(),
        "pandas OUTPUT/data": pd.read_parquet(out / "data")["id"].tolist(),
        "datasets.load_dataset(OUTPUT)": datasets.load_dataset(str(out), cache_dir=str(cache_dir))["train"]["id"],
        "datasets data_files": datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"),
                                                     split="train", cache_dir=str(cache_dir))["id"],
        "duckdb OUTPUT/**/*.parquet": [r[0] for r in duckdb.sql(f"select id from '{out}/**/*.parquet'").fetchall()],
        "duckdb OUTPUT/data/*.parquet": [r[0] for r in duckdb.sql(f"select id from '{out}/data/*.parquet'").fetchall()],
        "polars OUTPUT/**/*.parquet": pl.scan_parquet(f"{out}/**/*.parquet").select("id").collect()["id"].to_list(),
        "polars OUTPUT/data": pl.read_parquet(out / "data")["id"].to_list(),
        "ray.data OUTPUT": [r["id"] for r in ray.data.read_parquet(str(out)).select_columns(["id"]).take_all()],
    }


@pytest.mark.slow
def test_every_reader_gets_exactly_the_rows_in_also_after_a_report(demo_output, tmp_path, ray_local):
    out = copy_output(demo_output, tmp_path / "out")
    inp = pq.read_table(REPO / "data" / "demo_prompts.parquet")
    expected = sorted(f"demo_prompts.parquet:{i}" for i in range(inp.num_rows))  # the default ids: FILE:ROW
    for stage in ("fresh", "after dgbatch report"):
        got = readers(out, tmp_path / f"hf-{stage.replace(' ', '-')}")
        for name, ids in got.items():
            assert sorted(ids) == expected, f"{stage}: {name} read {len(ids)} rows, expected {len(expected)}"
        if stage == "fresh":
            report.write_report(str(out))
            assert (out / "_report" / "report.html").is_file()


def test_row_index_puts_rows_back_in_input_order(demo_output):
    import pandas as pd

    inp = pq.read_table(REPO / "data" / "demo_prompts.parquet").to_pandas()
    out = pd.read_parquet(demo_output / "data").sort_values("row_index", ignore_index=True)
    assert str(out["row_index"].dtype) == "int64"
    assert out["row_index"].tolist() == list(range(len(inp)))
    assert out["prompt"].tolist() == inp["prompt"].tolist()
    assert not any(p.suffix == ".parquet" for p in (demo_output / "_plan").rglob("*"))  # only data/ holds Parquet
