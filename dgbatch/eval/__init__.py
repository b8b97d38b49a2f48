"""Evals over a generate job: score each output against its reference, write lm-eval-style metrics.

`scorers` turns `eval.scorer` into a function of (output_text, reference, row); `metrics` aggregates
scores (accuracy with its standard error, pass@k, maj@k, per group); `job` runs the generate driver,
then scores the committed outputs in place, which is also all `--rescore` does.
"""
