"""The command line and the Python API: the small things a new user meets first."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import dgbatch
from dgbatch import cli
from dgbatch.config import ConfigError, load_config
from dgbatch.toy.tasks import sample_examples
from tests.helpers import DEMO_CONFIG, REPO, write_prompts


def sh(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False, **kw)


def test_version_and_help_of_every_entrypoint():
    version = sh("-m", "dgbatch.cli", "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"dgbatch {dgbatch.__version__}"
    for args in (["-m", "jobs.generate", "--help"], ["-m", "dgbatch.cli", "run", "--help"]):
        helped = sh(*args)
        assert helped.returncode == 0, helped.stderr
        assert "CONFIG" in helped.stdout and "section.key=value" in helped.stdout and "does not exist" not in helped.stdout
    assert "usage: python -m jobs.generate" in sh("-m", "jobs.generate", "--help").stdout
    for command in ("plan", "status", "report"):
        assert sh("-m", "dgbatch.cli", command, "--help").returncode == 0
    missing = sh("-m", "jobs.generate")
    assert missing.returncode == 2 and "CONFIG" in missing.stderr  # argparse's usage error, not a traceback


def test_a_new_job_command_is_one_entry_and_shares_the_parser(monkeypatch, tmp_path, toy_model_dir):
    seen = {}
    monkeypatch.setitem(cli.JOB_COMMANDS, "echo", cli.JobCommand(
        "echo a config", "tests.test_cli:_echo_job", "jobs.echo",
        arguments=lambda p: p.add_argument("--loud", action="store_true")))
    monkeypatch.setattr(sys.modules[__name__], "_SEEN", seen, raising=False)
    args = [str(DEMO_CONFIG), "engine.batch_size=8", "--loud"]
    assert cli.main(["echo", *args]) == 7 and seen == {"batch": 8, "loud": True}
    seen.clear()
    assert cli.job_main("echo", args) == 7 and seen == {"batch": 8, "loud": True}
    assert cli.job_parser("echo").prog == "python -m jobs.echo"


def _echo_job(cfg, loud: bool) -> int:
    _SEEN.update(batch=cfg.engine.batch_size, loud=loud)  # noqa: F821 - set by the test above
    return 7


def test_import_dgbatch_loads_neither_torch_nor_ray():
    probe = sh("-c", "import sys, dgbatch; print(sorted(m for m in ('torch', 'ray', 'transformers', 'matplotlib') "
                     "if m in sys.modules)); print(callable(dgbatch.run))")
    assert probe.returncode == 0 and probe.stdout.split() == ["[]", "True"], probe.stdout + probe.stderr


def test_an_unknown_key_says_what_was_meant():
    with pytest.raises(ConfigError, match=r"sampling.max_new_token: unknown key; did you mean 'sampling.max_new_tokens'"):
        load_config(DEMO_CONFIG, ["sampling.max_new_token=4"])
    with pytest.raises(ConfigError, match=r"sampler: unknown key; did you mean 'sampling'"):
        load_config(DEMO_CONFIG, ["sampler.seed=4"])
    with pytest.raises(ConfigError, match=r"engine.zzz: unknown key; engine has backend, batch_size, compile"):
        load_config(DEMO_CONFIG, ["engine.zzz=4"])


def test_messages_column_on_the_command_line_replaces_the_files_prompt_column():
    cfg = load_config(DEMO_CONFIG, ["input.messages_column=messages"])  # demo.yaml sets prompt_column
    assert cfg.input.messages_column == "messages" and cfg.input.prompt_column is None
    back = load_config(DEMO_CONFIG, ["input.messages_column=messages", "input.prompt_column=prompt"])
    assert back.input.prompt_column == "prompt" and back.input.messages_column is None  # the later one wins
    with pytest.raises(ConfigError, match="set only one of input.prompt_column, input.messages_column and input.template"):
        load_config(None, base={"model": {"path": "m"}, "input": {"path": "i", "prompt_column": "p",
                                                                    "messages_column": "m"}, "output": {"path": "o"}})


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_no_ray_auth_warning(tmp_path, toy_model_dir):
    prompts = [e.prompt for e in sample_examples(120, 5, tasks=("count",))]  # long answers, many small shards
    path = write_prompts(tmp_path / "in.parquet", prompts)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # as a user's shell has it
    proc = subprocess.Popen(
        [sys.executable, "-m", "dgbatch.cli", "run", str(DEMO_CONFIG), f"model.path={toy_model_dir}",
         f"input.path={path}", f"output.path={out}", "plan.shard_rows=2", "engine.batch_size=2", "ray.num_cpus=2"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "data").exists() and any((out / "data").iterdir())):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    total = len(json.loads((out / "_plan" / "manifest.json").read_text())["shards"])
    done = len(list((out / "data").glob("*.parquet")))
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert f"interrupted: {done} of {total} shards committed; rerun the same command to resume" in stderr
    assert "Traceback" not in stdout + stderr and "KeyboardInterrupt" not in stdout + stderr
    assert "Token authentication is enabled" not in stdout + stderr


def test_the_python_api_runs_a_job_and_returns_its_summary(ray_local, tmp_path, toy_model_dir, capsys):
    path = write_prompts(tmp_path / "in.parquet", ["reverse abc", "repeat 2 xy", "reverse hello"])
    out = tmp_path / "out"
    summary = dgbatch.run(str(DEMO_CONFIG), model={"path": str(toy_model_dir)}, input={"path": str(path)},
                          sampling={"max_new_tokens": 16, "num_samples": 2}, **{"output.path": str(out)})
    assert summary == json.loads((out / "_summary.json").read_text())
    enc = summary["prompt_encoding"]  # each prompt's two samples: encoded once
    assert enc["prompt_tokens"] == summary["prompt_tokens"] and 2 * enc["encoded_prompt_tokens"] <= enc["prompt_tokens"]
    assert summary["rows"] == 6 and summary["output"] == str(out) and summary["dgbatch_version"] == dgbatch.__version__
    assert summary["model"]["path"] == str(toy_model_dir) and summary["started_at"] <= summary["ended_at"]
    assert summary["throughput"]["rows_per_s"] > 0 and summary["throughput"]["output_tokens_per_s"] > 0
    assert f"output in {out}/data/" in capsys.readouterr().out  # the summary line says where the output went
    with pytest.raises(ConfigError, match="did you mean 'sampling.max_new_tokens'"):
        dgbatch.run(str(DEMO_CONFIG), sampling={"max_new_token": 4})
