"""Entrypoint for `ray job submit ... -- python -m jobs.eval CONFIG [key=value ...]`.

Does exactly what `dgbatch eval` does: generates (or resumes) like jobs.generate, then scores every
output against input.reference_column and writes OUTPUT/_metrics.json. `python -m jobs.eval --rescore
OUTPUT [eval.scorer=...]` scores an existing output again without generating.
"""

import sys

from dgbatch.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("eval"))
