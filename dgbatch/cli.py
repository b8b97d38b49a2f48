"""`dgbatch run CONFIG [section.key=value ...]`, `dgbatch backfill CONFIG --start DATE --end DATE [...]`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from dgbatch import redact
from dgbatch.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["backfill"]:  # its own parser: options and key=value overrides may be interleaved
        return backfill_job(argv[1:])
    ap = argparse.ArgumentParser(prog="dgbatch", description="Batch inference for DiffusionGemma on Ray.")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run or resume a job")
    run.add_argument("config", help="YAML job config (see configs/)")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. engine.batch_size=64")
    sub.add_parser("backfill", help="run a job over date or hour partitions (dgbatch backfill -h)")
    args = ap.parse_args(argv)
    return run_job(args.config, args.overrides)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _prepare_process() -> None:
    # Ctrl-C and SIGTERM (`ray job stop`, a scheduler) stop the driver cleanly: replicas are killed,
    # committed shards stay committed, a rerun resumes. Set explicitly: a parent may have ignored SIGINT.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def backfill_job(argv: list[str]) -> int:
    from dgbatch import backfill

    ap = argparse.ArgumentParser(prog="dgbatch backfill", description=backfill.__doc__.split("\n")[0])
    backfill.add_arguments(ap)
    args = ap.parse_intermixed_args(backfill.join_date_options(argv))
    _prepare_process()
    return backfill.main(args)


def run_job(config: str, overrides: list[str]) -> int:
    _prepare_process()
    from dgbatch import driver

    try:
        cfg = load_config(config, overrides)
        redact.install(cfg)
        return driver.run(cfg)
    except ConfigError as e:
        print(f"dgbatch: error: {redact.scrub(str(e))}", file=sys.stderr)
        return driver.EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
