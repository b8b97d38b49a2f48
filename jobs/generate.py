"""Entrypoint for `ray job submit ... -- python -m jobs.generate CONFIG [key=value ...]`.

Does exactly what `dgbatch run` does; joins the cluster it is submitted to (RAY_ADDRESS), or
starts a local Ray when run by hand.
"""

import sys

from dgbatch.cli import run_job

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m jobs.generate CONFIG [section.key=value ...]")
    sys.exit(run_job(sys.argv[1], sys.argv[2:]))
