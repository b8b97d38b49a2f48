"""`dgbatch run CONFIG [section.key=value ...]`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from dgbatch import redact
from dgbatch.config import load_config
from dgbatch.errors import JobError, root_cause


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dgbatch", description="Batch inference for DiffusionGemma on Ray.")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run or resume a job")
    run.add_argument("config", help="YAML job config (see configs/)")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. engine.batch_size=64")
    args = ap.parse_args(argv)
    return run_job(args.config, args.overrides)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_job(config: str, overrides: list[str]) -> int:
    # Ctrl-C and SIGTERM (`ray job stop`, a scheduler) stop the driver cleanly: replicas are killed,
    # committed shards stay committed, a rerun resumes. Set explicitly: a parent may have ignored SIGINT.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("aiobotocore", "botocore", "s3fs"):  # "Found credentials in ..." on every S3 job
        logging.getLogger(chatty).setLevel(logging.WARNING)
    from dgbatch import driver

    try:
        cfg = load_config(config, overrides)
        redact.install(cfg)
        return driver.run(cfg)
    except Exception as e:  # one error path: any JobError, wherever raised (a Ray task's too), is one line
        cause = root_cause(e)
        if not isinstance(cause, JobError):
            raise
        print(f"dgbatch: error: {redact.scrub(cause.line())}", file=sys.stderr)
        return cause.exit_code


if __name__ == "__main__":
    sys.exit(main())
