"""input.id_column: a null, empty or repeated id is a job-level error, found without gathering ids anywhere."""

from pathlib import Path

import pytest

from dgbatch import checkpoint, cli
from dgbatch.planning import ids
from dgbatch.planning.source import InputError
from tests.helpers import write_prompts

REPO = Path(__file__).resolve().parent.parent


def test_duplicates_are_found_across_fragments_and_partitions():
    parts = 4
    a = ids.digest_parts([f"id-{i}" for i in range(1000)], fragment=0, parts=parts)
    b = ids.digest_parts([f"id-{i}" for i in range(1000, 2000)] + ["id-17"], fragment=1, parts=parts)
    assert sum(len(p) for p in a) == 1000 and all(len(p) for p in a)  # spread over every partition
    found = [d for p in range(parts) for d in ids.duplicates(a[p], b[p])]
    assert found == [((0, 17), (1, 1000))]
    assert [d for p in range(parts) for d in ids.duplicates(a[p])] == []
    assert ids.num_parts(10) == 1 and ids.num_parts(ids.ROWS_PER_PART * 3 + 1) == 4


def test_a_fragment_checks_its_own_ids():
    assert ids.checked_ids([1, 2, 3], "a.parquet", 100, "uid") == ["1", "2", "3"]
    with pytest.raises(InputError, match=r"'5' at 'a.parquet' rows 101 and 103"):
        ids.checked_ids([4, 5, 6, 5], "a.parquet", 100, "uid")
    with pytest.raises(InputError, match=r"input file 'a.parquet' row 12: input.id_column 'uid' is null"):
        ids.checked_ids(["x", None], "a.parquet", 11, "uid")


@pytest.mark.parametrize("same_file", [False, True], ids=["two files", "two row groups of one file"])
def test_a_duplicate_id_across_fragments_fails_the_job_before_the_model_loads(ray_local, tmp_path, toy_model_dir,
                                                                             capsys, monkeypatch, same_file):
    def boom(*a, **k):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(checkpoint, "load_model", boom)
    inp = tmp_path / "in"
    if same_file:
        import pyarrow as pa
        import pyarrow.parquet as pq

        inp.mkdir()
        uids = [f"u{i}" for i in range(40)] + ["u3"] + [f"v{i}" for i in range(39)]
        pq.write_table(pa.table({"prompt": ["reverse ab"] * 80, "uid": uids}), inp / "one.parquet", row_group_size=40)
        where = "'u3' at 'one.parquet' row 3 and 'one.parquet' row 40"
    else:
        write_prompts(inp / "a.parquet", ["reverse ab"] * 3, uid=["x1", "x2", "x3"])
        write_prompts(inp / "b.parquet", ["reverse cd"] * 3, uid=["y1", "x2", "y3"])
        where = "'x2' at 'a.parquet' row 1 and 'b.parquet' row 1"
    code = cli.main(["run", str(REPO / "configs" / "demo.yaml"), f"model.path={toy_model_dir}", f"input.path={inp}",
                     f"output.path={tmp_path / 'out'}", "input.id_column=uid", "plan.fragment_rows=40"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"input.id_column 'uid' has duplicate values: {where}; ids must be unique" in err
    assert not (tmp_path / "out" / "_plan" / "manifest.json").exists()
