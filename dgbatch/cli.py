"""The command line: `dgbatch run | eval | backfill | plan | status | report`, and the parser every job
entrypoint shares.

A job command takes `CONFIG [section.key=value ...]` and runs a job: `dgbatch run` here, and the same
command as `python -m jobs.generate` under `ray job submit`. Each is one entry in `JOB_COMMANDS`; a new
job (an eval) is one entry there plus a `jobs/NAME.py` that calls `job_main("NAME")`, so
`dgbatch NAME --help` and `python -m jobs.NAME --help` say the same thing and parse the same way.
`backfill` takes dated options interleaved with overrides, so it parses its own (`backfill_job`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

from dgbatch import __version__, redact
from dgbatch.config import load_config
from dgbatch.errors import EXIT_SIGINT, EXIT_SIGTERM, JobError, root_cause


@dataclass(frozen=True)
class JobCommand:
    """A command that runs a job. `target` is "module:function", imported only when the command runs
    (so `--help` stays fast); it is called as `function(cfg, **extra)` and returns the exit code, where
    `extra` holds whatever `arguments` added to the parser beyond CONFIG and the overrides."""

    help: str
    target: str
    entrypoint: str  # the `python -m` module that runs the same command under `ray job submit`
    arguments: Callable[[argparse.ArgumentParser], None] | None = None


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rescore", action="store_true",
                        help="CONFIG is a job's output root: score its committed outputs again with the job's "
                             "config plus the overrides (no model, no generation)")


JOB_COMMANDS: dict[str, JobCommand] = {
    "run": JobCommand("run or resume a job", "dgbatch.driver:run", "jobs.generate"),
    "eval": JobCommand("run or resume an eval: generate, score every row, write OUTPUT/_metrics.json",
                       "dgbatch.eval.job:run", "jobs.eval", _eval_arguments),
}


def add_job_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """CONFIG and its dotted overrides: what every command that takes a job config parses."""
    parser.add_argument("config", metavar="CONFIG", help="YAML job config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override a config field; values parse as YAML, e.g. engine.batch_size=64 "
                             "plan.bucket_edges=[64,128]")
    return parser


def job_parser(name: str, parser: argparse.ArgumentParser | None = None,
               prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of job command `name`: fills `parser` (a `dgbatch` subcommand) or builds a standalone
    one for its `python -m` entrypoint, named `prog`."""
    cmd = JOB_COMMANDS[name]
    if parser is None:
        parser = argparse.ArgumentParser(prog=prog or f"python -m {cmd.entrypoint}", description=f"{cmd.help}.",
                                         epilog=f"The same as `dgbatch {name}`; under `ray job submit` it joins "
                                                "the cluster it was submitted to.")
        parser.add_argument("--version", action="version", version=f"dgbatch {__version__}")
    add_job_arguments(parser)
    if cmd.arguments is not None:
        cmd.arguments(parser)
    return parser


def job_main(name: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """`python -m jobs.NAME ...`: parse with `job_parser(name)` and run the job."""
    return _run_parsed(name, job_parser(name, prog=prog).parse_args(argv))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dgbatch", description="Batch inference for DiffusionGemma on Ray.")
    ap.add_argument("--version", action="version", version=f"dgbatch {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in JOB_COMMANDS.items():
        job_parser(name, sub.add_parser(name, help=cmd.help, description=f"{cmd.help}."))

    plan = add_job_arguments(sub.add_parser(
        "plan", help="dry run: plan a job and estimate it, without generating",
        description="Plan a job without generating: rows, shards, bucket edges, prompt tokens and padding, row "
                    "errors, and an estimate of output tokens and generation time from a short calibration run. "
                    "Writes nothing (the output root is not touched)."))
    plan.add_argument("--calibrate-rows", type=int, default=None, metavar="N",
                      help="rows to generate for the estimate (default: one batch, at most 64; 0: no calibration, "
                           "no model load)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")

    status = sub.add_parser("status", help="where a running or finished job stands, from its files",
                            description="Shards done / total, rows, failures with their reasons, throughput, ETA "
                                        "and whether a driver is still writing, read from the job's output files.")
    status.add_argument("output", metavar="OUTPUT", help="the job's output root (a path or URL), or its CONFIG")
    status.add_argument("--json", action="store_true", help="print the status as JSON")

    report = sub.add_parser("report", help="an HTML report with figures of a job's output",
                            description="Write a self-contained HTML report (report.html, its PNG figures and "
                                        "report.json) about a job's output.")
    report.add_argument("output", metavar="OUTPUT", help="the job's output root (a path or URL), or its CONFIG")
    report.add_argument("--out", metavar="DIR", default=None, help="where to write it [OUTPUT/_report]")
    sub.add_parser("backfill", help="run a job over date or hour partitions (dgbatch backfill -h)", add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["backfill"]:  # its own parser: options and key=value overrides may be interleaved
        return backfill_job(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command in JOB_COMMANDS:
        return _run_parsed(args.command, args)
    try:
        if args.command == "plan":
            from dgbatch import dry_run

            cfg = load_config(args.config, args.overrides)
            redact.install(cfg)
            return dry_run.main(cfg, args.calibrate_rows, args.json)
        if args.command == "status":
            from dgbatch import status

            return status.main(args.output, args.json)
        if args.command == "report":
            from dgbatch import report

            return report.main(args.output, args.out)
    except Exception as e:  # noqa: BLE001 - job_error re-raises what is not a JobError
        return job_error(e)
    raise AssertionError(args.command)


def _run_parsed(name: str, args: argparse.Namespace) -> int:
    extra = {k: v for k, v in vars(args).items() if k not in ("command", "config", "overrides")}
    if extra.pop("rescore", False):  # `eval --rescore OUTPUT`: an output root, not a config
        return run_job(args.config, args.overrides, "dgbatch.eval.job:rescore", load=False)
    return run_job(args.config, args.overrides, JOB_COMMANDS[name].target, **extra)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


def _prepare_process() -> None:
    # Ctrl-C and SIGTERM (`ray job stop`, a scheduler) stop the driver cleanly: replicas are killed,
    # committed shards stay committed, a rerun resumes. Set explicitly: a parent may have ignored SIGINT.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("aiobotocore", "botocore", "s3fs"):  # "Found credentials in ..." on every S3 job
        logging.getLogger(chatty).setLevel(logging.WARNING)


def _interrupted(e: KeyboardInterrupt, line: str) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not turn this into a traceback
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(redact.scrub(line), file=sys.stderr, flush=True)
    return EXIT_SIGTERM if e.args == (signal.SIGTERM,) else EXIT_SIGINT


def backfill_job(argv: list[str]) -> int:
    """`dgbatch backfill` / `python -m jobs.backfill`: CONFIG --start DATE --end DATE [...] [key=value ...]."""
    from dgbatch import backfill

    ap = argparse.ArgumentParser(prog="dgbatch backfill", description=backfill.__doc__.split("\n")[0])
    backfill.add_arguments(ap)
    args = ap.parse_intermixed_args(backfill.join_date_options(argv))
    _prepare_process()
    try:
        return backfill.main(args)
    except KeyboardInterrupt as e:
        return _interrupted(e, "backfill interrupted: committed shards and finished partitions are kept; rerun the "
                               "same command to resume")
    except Exception as e:  # noqa: BLE001 - job_error re-raises what is not a JobError
        return job_error(e)


def run_job(config: str, overrides: list[str], target: str = "dgbatch.driver:run", load: bool = True, **extra) -> int:
    """Load and check the config, then run `target` (see JobCommand) on it; the process's exit code.
    `load=False`: `target` takes (config, overrides) as given (`eval --rescore`: an output root)."""
    _prepare_process()
    cfg = None
    module, function = target.split(":")
    try:
        if not load:
            return getattr(importlib.import_module(module), function)(config, overrides, **extra)
        cfg = load_config(config, overrides)
        redact.install(cfg)
        return getattr(importlib.import_module(module), function)(cfg, **extra)
    except KeyboardInterrupt as e:
        return _interrupted(e, interrupted_line(cfg))
    except Exception as e:  # noqa: BLE001 - one error path: any JobError, wherever raised (a Ray task's too), is one line
        return job_error(e)


def job_error(e: BaseException) -> int:
    """A JobError (or a Ray error caused by one) as one scrubbed line and its exit code; anything else is a
    bug and raises on."""
    cause = root_cause(e)
    if not isinstance(cause, JobError):
        raise e
    print(f"dgbatch: error: {redact.scrub(cause.line())}", file=sys.stderr)
    return cause.exit_code


def interrupted_line(cfg) -> str:
    """One line on what an interrupted job left behind, read from its files."""
    resume = "rerun the same command to resume"
    if cfg is None:
        return "interrupted before the job started"
    try:
        from dgbatch.status import read_status

        st = read_status(cfg.output.path, cfg.storage)
    except Exception:  # noqa: BLE001 - the storage may be what was slow; the line must still come out
        return f"interrupted; {resume}"
    if st.shards_total is None:
        return f"interrupted before the plan was made; {resume}"
    return f"interrupted: {st.shards_done} of {st.shards_total} shards committed; {resume}"


if __name__ == "__main__":
    sys.exit(main())
