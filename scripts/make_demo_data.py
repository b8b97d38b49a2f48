"""Write the demo input shipped in the repo: seeded prompts from the toy task family.

    python scripts/make_demo_data.py data/demo_prompts.parquet --rows 96
"""

import argparse

import pyarrow as pa
import pyarrow.parquet as pq

from dgbatch.toy.tasks import sample_examples

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--rows", type=int, default=96)
ap.add_argument("--seed", type=int, default=20261127)
args = ap.parse_args()
ex = sample_examples(args.rows, args.seed)
table = pa.table({
    "prompt": [e.prompt for e in ex],
    "task": [e.task for e in ex],
    "expected": [e.answer for e in ex],
})
pq.write_table(table, args.out)
print(f"wrote {table.num_rows} rows to {args.out}")
