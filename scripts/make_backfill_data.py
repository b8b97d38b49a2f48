"""Write the dated toy input shipped for the backfill demo: one Hive-style directory per day.

    python scripts/make_backfill_data.py data/backfill --start 2026-11-28 --days 3 --rows 16
    -> data/backfill/date=2026-11-28/part-0.parquet, date=2026-11-29/..., date=2026-11-30/...

Each day holds seeded prompts of the toy task family (a different seed per day) with the expected answer.
"""

import argparse
from datetime import date, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dgbatch.toy.tasks import sample_examples

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--start", default="2026-11-28")
ap.add_argument("--days", type=int, default=3)
ap.add_argument("--rows", type=int, default=16)
args = ap.parse_args()
first = date.fromisoformat(args.start)
for i in range(args.days):
    day = first + timedelta(days=i)
    ex = sample_examples(args.rows, seed=int(day.strftime("%Y%m%d")))
    table = pa.table({"prompt": [e.prompt for e in ex], "task": [e.task for e in ex],
                      "expected": [e.answer for e in ex]})
    path = Path(args.out) / f"date={day.isoformat()}" / "part-0.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    print(f"wrote {table.num_rows} rows to {path}")
