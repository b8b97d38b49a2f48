"""`dgbatch run CONFIG [section.key=value ...]` and `dgbatch eval CONFIG | --rescore OUTPUT [...]`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from dgbatch import redact
from dgbatch.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dgbatch", description="Batch inference for DiffusionGemma on Ray.")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run or resume a job")
    run.add_argument("config", help="YAML job config (see configs/)")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. engine.batch_size=64")
    ev = sub.add_parser("eval", help="run or resume an eval: generate, score, write OUTPUT/_metrics.json")
    ev.add_argument("config", metavar="CONFIG|OUTPUT", help="YAML job config; with --rescore, a job's output root")
    ev.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.scorer=contains")
    ev.add_argument("--rescore", action="store_true",
                    help="score the committed outputs under OUTPUT again (no model, no generation)")
    args = ap.parse_args(argv)
    if args.command == "eval":
        return eval_job(args.config, args.overrides, args.rescore)
    return run_job(args.config, args.overrides)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _prepare() -> None:
    # Ctrl-C and SIGTERM (`ray job stop`, a scheduler) stop the driver cleanly: replicas are killed,
    # committed shards stay committed, a rerun resumes. Set explicitly: a parent may have ignored SIGINT.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_job(config: str, overrides: list[str]) -> int:
    _prepare()
    from dgbatch import driver

    try:
        cfg = load_config(config, overrides)
        redact.install(cfg)
        return driver.run(cfg)
    except ConfigError as e:
        print(f"dgbatch: error: {redact.scrub(str(e))}", file=sys.stderr)
        return driver.EXIT_BAD_INPUT


def eval_job(target: str, overrides: list[str], rescore: bool = False) -> int:
    _prepare()
    from dgbatch import driver
    from dgbatch.eval import job

    try:
        if rescore:
            return job.rescore(target, overrides)
        cfg = load_config(target, overrides)
        redact.install(cfg)
        return job.run(cfg)
    except ConfigError as e:
        print(f"dgbatch: error: {redact.scrub(str(e))}", file=sys.stderr)
        return driver.EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
