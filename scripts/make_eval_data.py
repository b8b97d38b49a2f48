"""Write the eval and synthetic-data inputs shipped in the repo, seeded, from the toy task family.

    python scripts/make_eval_data.py data/eval_toy.jsonl data/synth_fields.parquet

data/eval_toy.jsonl: one JSON object per line, {"id", "task", "prompt", "answer"}, an equal number of
each task (what configs/eval-toy.yaml scores). data/synth_fields.parquet: the row fields a template
turns into prompts (task, word, n, lo, hi; null where a task has no such field), for configs/synth-toy.yaml.
"""

import argparse
import json
import random
import string

import pyarrow as pa
import pyarrow.parquet as pq

from dgbatch.toy.tasks import sample_examples

ap = argparse.ArgumentParser()
ap.add_argument("eval_out")
ap.add_argument("synth_out")
ap.add_argument("--eval-rows", type=int, default=300)
ap.add_argument("--synth-rows", type=int, default=24)
ap.add_argument("--seed", type=int, default=20261210)
args = ap.parse_args()

with open(args.eval_out, "w") as f:
    f.writelines(json.dumps({"id": f"toy-{i:04d}", "task": e.task, "prompt": e.prompt, "answer": e.answer}) + "\n"
                 for i, e in enumerate(sample_examples(args.eval_rows, args.seed)))
print(f"wrote {args.eval_rows} lines to {args.eval_out}")

rng = random.Random(args.seed + 1)
rows = []
for i in range(args.synth_rows):
    task = ("reverse", "repeat", "count")[i % 3]
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
    lo = rng.randint(0, 60)
    rows.append({"task": task, "word": word if task != "count" else None, "n": rng.randint(2, 4) if task == "repeat"
                 else None, "lo": lo if task == "count" else None, "hi": lo + rng.randint(3, 9) if task == "count"
                 else None})
table = pa.Table.from_pylist(rows, schema=pa.schema([("task", pa.string()), ("word", pa.string()), ("n", pa.int32()),
                                                      ("lo", pa.int32()), ("hi", pa.int32())]))
pq.write_table(table, args.synth_out)
print(f"wrote {table.num_rows} rows to {args.synth_out}")
