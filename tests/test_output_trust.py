"""The output root is trusted only as far as it checks out: it is empty or a dgbatch job's, its data
files match their commit markers and the plan, it never overlaps the input, and one job owns it."""

import json
import shutil
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dgbatch import checkpoint, cli, driver, pool
from dgbatch.config import ConfigError, load_config
from dgbatch.io.fs import filesystem, overlap
from dgbatch.io.layout import Layout
from tests.helpers import read_output, write_prompts

REPO = Path(__file__).resolve().parent.parent
FAST = ["sampling.max_new_tokens=32"]
PROMPTS = ["reverse abc", "repeat 2 xy", "reverse hello", "repeat 3 q", "reverse ab", "repeat 2 z"]


@pytest.fixture
def no_heavy_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the job went past validation: Ray started or the model loaded")

    monkeypatch.setattr(pool, "init_ray", boom)
    monkeypatch.setattr(checkpoint, "load_model", boom)


def cli_run(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["run", str(REPO / "configs" / "demo.yaml"), *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def job_args(toy_model_dir, inp, out, *extra):
    return [f"model.path={toy_model_dir}", f"input.path={inp}", f"output.path={out}", "plan.shard_rows=2", *FAST,
            *extra]


def the_error_line(code: int, err: str) -> str:
    assert code == driver.EXIT_BAD_INPUT, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- what the output root may be --------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, found",
    [
        (lambda o: write_prompts(o / "data" / "f000000-b00-0000.parquet", ["foreign"]), "found data"),
        (lambda o: (o.mkdir(), (o / "notes.txt").write_text("mine"))[0], "found notes.txt"),
        (lambda o: [(o / f"part-{i}.csv").parent.mkdir(exist_ok=True) or (o / f"part-{i}.csv").write_text("x")
                    for i in range(7)], "found part-0.csv, part-1.csv, part-2.csv, part-3.csv, part-4.csv and 2 more"),
    ],
)
def test_a_directory_that_is_not_a_dgbatch_output_is_refused(tmp_path, toy_model_dir, capsys, no_heavy_work,
                                                              make, found):
    out = tmp_path / "existing"
    make(out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, _, err = cli_run(capsys, *job_args(toy_model_dir, write_prompts(tmp_path / "i.parquet", ["x"]), out))
    line = the_error_line(code, err)
    assert "is not empty and holds no dgbatch job (_job.json)" in line and found in line
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written there


def test_an_output_path_that_is_a_file_or_a_foreign_job_file_is_refused(tmp_path, toy_model_dir, capsys,
                                                                         no_heavy_work):
    inp = write_prompts(tmp_path / "i.parquet", ["x"])
    (tmp_path / "afile").write_text("x")
    code, _, err = cli_run(capsys, *job_args(toy_model_dir, inp, tmp_path / "afile"))
    assert "is a file; it must be a directory" in the_error_line(code, err)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "_job.json").write_text("[1, 2]")
    code, _, err = cli_run(capsys, *job_args(toy_model_dir, inp, tmp_path / "other"))
    assert "its _job.json is not a dgbatch job file" in the_error_line(code, err)


def test_an_empty_directory_is_a_fine_output(tmp_path, job_config, no_heavy_work):
    (tmp_path / "out").mkdir()
    cfg = job_config(write_prompts(tmp_path / "i.parquet", ["x"]))
    job = driver.check_job(cfg)
    assert json.loads((tmp_path / "out" / "_job.json").read_text())["job_id"] == job.record["job_id"]


def test_an_s3_prefix_holding_other_objects_is_refused(tmp_path, toy_model_dir, capsys, no_heavy_work, s3_env,
                                                       s3_bucket):
    fs, root = filesystem(f"{s3_bucket}/reports")
    fs.pipe_file(f"{root}/q3.csv", b"a,b\n")
    code, _, err = cli_run(capsys, *job_args(toy_model_dir, write_prompts(tmp_path / "i.parquet", ["x"]),
                                             f"{s3_bucket}/reports"))
    assert "is not empty and holds no dgbatch job" in the_error_line(code, err)
    assert fs.ls(root) == [f"{root}/q3.csv"]


def test_the_output_may_not_overlap_the_input(tmp_path, toy_model_dir, capsys, no_heavy_work):
    inp = tmp_path / "in"
    write_prompts(inp / "part-0.parquet", ["x"])
    cases = [
        (inp, inp / "out", "lies inside input.path"),
        (f"{inp}/*.parquet", inp / "results", "lies inside input.path"),
        (inp / "part-0.parquet", inp / "part-0.parquet", "lies inside input.path"),
        (inp, tmp_path, "input.path"),  # the input inside the output
    ]
    for i, (source, out, message) in enumerate(cases):
        code, _, err = cli_run(capsys, *job_args(toy_model_dir, source, out))
        assert message in the_error_line(code, err), (i, err)
    (tmp_path / "link").symlink_to(inp)  # a symlinked path to the same place is the same place
    code, _, err = cli_run(capsys, *job_args(toy_model_dir, tmp_path / "link", inp / "o"))
    assert "lies inside input.path" in the_error_line(code, err)
    assert not (inp / "out").exists() and not (inp / "results").exists()


def test_overlap_compares_object_store_prefixes():
    assert overlap("s3://b/in/out", "s3://b/in") == "a_in_b"
    assert overlap("s3://b/in", "s3://b/in/") == "same"
    assert overlap("s3://b/input", "s3://b/in") is None  # a prefix of the name is not a parent
    assert overlap("s3://b/in", "/local/in") is None and overlap("s3://a/x", "s3://b/x") is None


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_drivers_with_different_configs_on_one_output_exactly_one_wins(tmp_path, toy_model_dir, request, where):
    out = str(tmp_path / "out") if where == "local" else (request.getfixturevalue("s3_env") and
                                                          request.getfixturevalue("s3_bucket") + "/out")
    base = {"model": {"path": str(toy_model_dir)}, "input": {"path": "in.parquet"}, "output": {"path": out}}
    n = 6
    barrier, results = threading.Barrier(n), {}

    def driver_start(seed: int) -> None:
        cfg = load_config(None, [f"sampling.seed={seed}"], base=base)
        fs, root = filesystem(out)
        barrier.wait()
        try:
            results[seed] = driver.check_fingerprint(fs, Layout(root), cfg)["fingerprint"]
        except ConfigError as e:
            results[seed] = e

    threads = [threading.Thread(target=driver_start, args=(s,)) for s in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    winners = [s for s, r in results.items() if isinstance(r, str)]
    assert len(results) == n and len(winners) == 1, results
    for seed, r in results.items():
        if seed != winners[0]:
            assert f"sampling.seed {winners[0]} -> {seed}" in str(r)
    fs, root = filesystem(out)
    assert json.loads(fs.cat_file(f"{root}/_job.json"))["fingerprint"] == results[winners[0]]


# ---- committed data files are checked, not trusted ----------------------------------------------------


@pytest.fixture(scope="module")
def finished(ray_local, tmp_path_factory, toy_model_dir) -> dict:
    """One finished job (3 shards of 2 rows); tests copy its output and break the copy."""
    d = tmp_path_factory.mktemp("finished")
    inp = write_prompts(d / "in.parquet", PROMPTS)
    cfg = load_config(REPO / "configs" / "demo.yaml", job_args(toy_model_dir, inp, d / "out"))
    assert driver.run(cfg) == 0
    return {"dir": d, "input": inp, "out": d / "out"}


def copy_of(finished, tmp_path) -> tuple[Path, object]:
    out = tmp_path / "out"
    shutil.copytree(finished["out"], out)
    cfg = load_config(REPO / "configs" / "demo.yaml", job_args(Path(checkpoint.__file__).parent.parent / "models" /
                                                               "toy-diffusiongemma", finished["input"], out))
    return out, cfg


def shards(out: Path) -> list[str]:
    return sorted(p.stem for p in (out / "data").glob("*.parquet"))


def assert_every_row_once(out: Path) -> None:
    ids = read_output(out).column("id").to_pylist()
    assert sorted(ids) == sorted(f"in.parquet:{i}" for i in range(len(PROMPTS)))


@pytest.mark.parametrize("damage", ["truncated", "replaced by a foreign file", "foreign, marker gone", "missing"])
def test_a_damaged_data_file_is_run_again_never_trusted(finished, tmp_path, capsys, damage):
    out, cfg = copy_of(finished, tmp_path)
    victim = shards(out)[1]
    data, marker = out / "data" / f"{victim}.parquet", out / "_commits" / f"{victim}.json"
    original = data.read_bytes()
    if damage == "truncated":
        data.write_bytes(original[: len(original) // 2])
    elif damage.startswith("replaced"):
        pq.write_table(pa.table({"id": ["intruder"], "prompt": ["x"]}), data)
    elif damage.startswith("foreign"):
        pq.write_table(pa.table({"id": ["intruder"], "prompt": ["x"]}), data)
        marker.unlink()
    else:
        data.unlink()
    capsys.readouterr()
    assert driver.run(cfg) == 0
    printed = capsys.readouterr().out
    assert "no longer check out (1 shard(s) missing or damaged)" in printed
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["shards_run_now"] == 1 and summary["rows"] == len(PROMPTS)
    assert_every_row_once(out)
    assert json.loads(marker.read_text())["file"]["size"] == data.stat().st_size
    rejected = list((out / "_rejected").glob(f"{victim}.parquet.*.rejected")) if damage != "missing" else []
    assert len(rejected) == (damage != "missing")  # moved aside, not deleted
    assert [r["file"] for r in summary["rejected_files"]] == [f"data/{victim}.parquet"] * (damage != "missing")
    assert (out / "_SUCCESS").exists()


def test_a_foreign_file_in_data_is_moved_aside_and_rows_out_equal_rows_in(finished, tmp_path):
    out, cfg = copy_of(finished, tmp_path)
    pq.write_table(pa.table({"id": ["intruder"], "prompt": ["x"]}), out / "data" / "zz-extra.parquet")
    (out / "_SUCCESS").unlink()  # an interrupted job: it resumes, and its summary is rewritten
    assert driver.run(cfg) == 0
    assert_every_row_once(out)
    assert sorted(p.name.split(".")[0] for p in (out / "_rejected").iterdir()) == ["zz-extra", "zz-extra"]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["shards_run_now"] == 0
    [why] = summary["rejected_files"]
    assert why["file"] == "data/zz-extra.parquet" and why["reason"] == "it is not a shard of this job's plan"


def test_a_data_file_whose_marker_was_never_written_is_recognised_by_its_footer(finished, tmp_path):
    out, cfg = copy_of(finished, tmp_path)
    victim = shards(out)[0]
    marker = out / "_commits" / f"{victim}.json"
    kept = json.loads(marker.read_text())
    marker.unlink()  # a crash between the data file's commit and its marker
    (out / "_SUCCESS").unlink()
    assert driver.run(cfg) == 0
    assert json.loads((out / "_summary.json").read_text())["shards_run_now"] == 0
    assert json.loads(marker.read_text()) == kept


def test_success_is_written_only_when_every_data_file_checks_out(finished, tmp_path, capsys):
    out, _ = copy_of(finished, tmp_path)
    (out / "_SUCCESS").unlink()
    victim = shards(out)[2]
    (out / "data" / f"{victim}.parquet").write_bytes(b"PAR1 torn")
    plan = driver.Plan.from_dict(json.loads((out / "_plan" / "manifest.json").read_text()))
    fs, root = filesystem(str(out))
    code = driver.summarize(fs, Layout(root), plan, {}, 0.0, 0)
    assert code == driver.EXIT_FAILED_SHARDS and not (out / "_SUCCESS").exists()
    summary = json.loads((out / "_summary.json").read_text())
    assert [f["shard"] for f in summary["failed_shards"]] == [victim]
    assert "not committed: it has 9 bytes, its commit marker says" in summary["failed_shards"][0]["reason"]
    assert summary["rows"] == len(PROMPTS) - 2


# ---- the input is part of what a job is ---------------------------------------------------------------


def test_a_changed_input_is_refused_naming_the_files_or_replanned(ray_local, tmp_path, toy_model_dir, capsys):
    inp = tmp_path / "in"
    write_prompts(inp / "a.parquet", PROMPTS[:4])
    write_prompts(inp / "b.parquet", PROMPTS[4:])
    out = tmp_path / "out"
    assert cli_run(capsys, *job_args(toy_model_dir, inp, out))[0] == 0

    write_prompts(inp / "a.parquet", ["reverse xyz", *PROMPTS[1:4]])  # rewritten in place, same row count
    write_prompts(inp / "c.parquet", ["reverse new"])  # and a file added: the partition grew
    code, stdout, err = cli_run(capsys, *job_args(toy_model_dir, inp, out))
    line = the_error_line(code, err)
    assert "the input changed since this job was planned: a.parquet (" in line and "c.parquet (new)" in line
    assert "b.parquet" not in line and "input.on_change=replan" in line
    assert "nothing to do" not in stdout

    code, stdout, _ = cli_run(capsys, *job_args(toy_model_dir, inp, out, "input.on_change=replan"))
    assert code == 0 and "replanning: the input changed" in stdout
    rows = {r["prompt"]: r for r in read_output(out).to_pylist()}
    assert sorted(rows) == sorted(["reverse xyz", *PROMPTS[1:], "reverse new"])
    assert rows["reverse xyz"]["output_text"] == "zyx"
    assert json.loads((out / "_SUCCESS").read_text())["rows"] == 7
    assert cli_run(capsys, *job_args(toy_model_dir, inp, out))[1].startswith("nothing to do")
