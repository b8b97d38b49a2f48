"""Write `read` prompts as input data: seeded number images (`dgbatch.toy.images`) with the word "read".

    python scripts/make_image_data.py data/demo_images.parquet --rows 32           # PNG bytes in an `image` column
    python scripts/make_image_data.py /tmp/imgs.parquet --rows 32 --folder /tmp/imgs  # PNG files; `image` holds paths
    python scripts/make_image_data.py /tmp/mixed.parquet --rows 32 --text-rows 32    # plus text-family rows (no image)

Columns: prompt ("read", or a text-family prompt), image (PNG bytes or a path; null for text rows), task, expected.
Then: dgbatch run configs/demo.yaml input.path=data/demo_images.parquet input.image_column=image input.prompt_column=prompt
"""

import argparse
from pathlib import Path

import pyarrow.parquet as pq

from dgbatch.toy.images import read_table

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("out")
ap.add_argument("--rows", type=int, default=32)
ap.add_argument("--seed", type=int, default=20261201)
ap.add_argument("--folder", type=Path, help="write PNG files here and put their paths in the image column")
ap.add_argument("--text-rows", type=int, default=0, help="add this many text-family rows (image null)")
args = ap.parse_args()
table = read_table(args.rows, args.seed, args.folder, args.text_rows)
pq.write_table(table, args.out)
print(f"wrote {table.num_rows} rows to {args.out}")
