"""Entrypoint for `ray job submit ... -- python -m jobs.generate CONFIG [key=value ...]`.

Does exactly what `dgbatch run` does, with the same arguments (`--help`); joins the cluster it is
submitted to (RAY_ADDRESS), or starts a local Ray when run by hand.
"""

import sys

from dgbatch.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("run"))
