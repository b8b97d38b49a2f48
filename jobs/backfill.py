"""Entrypoint for `ray job submit ... -- python -m jobs.backfill CONFIG --start DATE --end DATE [...]`.

Does exactly what `dgbatch backfill` does (see dgbatch/backfill.py); joins the cluster it is submitted to
(RAY_ADDRESS), or starts a local Ray when run by hand.
"""

import sys

from dgbatch.cli import backfill_job

if __name__ == "__main__":
    sys.exit(backfill_job(sys.argv[1:]))
