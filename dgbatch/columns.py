"""The columns dgbatch writes into a job's output: the one list that the planner, the shard writer, the
eval scorer and the carried-name rule (`planning.source.carried_name`) read.

Every output row starts with `id` and `row_index`, then `sample_index` (with sampling.num_samples > 1),
the input columns carried through, OUTPUT_SCHEMA, FILTER_SCHEMA (with output.filters) and, in an eval,
SCORE_SCHEMA.
"""

from __future__ import annotations

import pyarrow as pa

ROW_KEY = ("id", "row_index")
SAMPLE_INDEX = "sample_index"
OUTPUT_SCHEMA = [
    ("output_text", pa.string()),
    ("num_prompt_tokens", pa.int32()),
    ("num_output_tokens", pa.int32()),
    ("tokens_per_forward", pa.float64()),
    ("num_decoder_forwards", pa.int32()),
    ("finish_reason", pa.string()),
    ("error", pa.string()),
]
FILTER_SCHEMA = [("filtered", pa.bool_()), ("filter_reason", pa.string())]  # with output.filters
SCORE_SCHEMA = [("score", pa.float64()), ("extracted", pa.string())]  # evals

OUTPUT_COLUMNS = (*ROW_KEY, SAMPLE_INDEX, *(name for name, _ in OUTPUT_SCHEMA + FILTER_SCHEMA + SCORE_SCHEMA))
