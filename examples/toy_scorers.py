"""An example user scorer for `eval.scorer: examples.toy_scorers:word_overlap` (runs as your own code).

A scorer is any function (output_text, reference, row) -> float, or -> (float, extracted); `row` is
the whole output row (the input's columns included). It is imported from the job's working
directory, which `ray job submit --working-dir .` ships to the cluster.
"""


def word_overlap(output_text: str, reference: str, row: dict) -> tuple[float, str]:
    """Partial credit: the share of the reference's words that the output has, in place."""
    got, want = output_text.split(), str(reference).split()
    same = [w for w, r in zip(got, want) if w == r]
    return len(same) / max(len(want), 1), " ".join(same)
