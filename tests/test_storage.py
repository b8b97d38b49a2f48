"""dgbatch.io against a local directory and a real S3 server (SeaweedFS): no mocks of storage."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from pydantic import SecretStr

from dgbatch.config import StorageSection
from dgbatch.io import commit
from dgbatch.io.commit import list_names, put_exclusive, read_json, write_json
from dgbatch.io.fs import check_access, filesystem, join, storage_options


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    """An empty root URL on each backend; S3 reaches the server through the AWS environment."""
    if request.param == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("s3_env")
    return request.getfixturevalue("s3_bucket") + "/out"


def test_join() -> None:
    assert join("s3://b", "x", "y.json") == "s3://b/x/y.json"
    assert join("s3://b/", "/x/", "", "y") == "s3://b/x/y"
    assert join("s3://", "b", "k") == "s3://b/k"
    assert join("/tmp/a/", "b") == "/tmp/a/b"
    assert join("/", "b") == "/b"
    assert join("file:///tmp", "b") == "file:///tmp/b"
    assert join("rel", "a/b", "c") == "rel/a/b/c"


def test_local_paths_become_absolute(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _, path = filesystem("sub/x.json")
    assert path == f"{tmp_path}/sub/x.json"
    assert filesystem(f"file://{tmp_path}/y")[1] == f"{tmp_path}/y"
    assert storage_options("sub/x", StorageSection(key=SecretStr("k"), secret=SecretStr("s"))) == {}


def test_unsupported_scheme_names_it() -> None:
    with pytest.raises(ValueError, match=r"'gopher://'"):
        filesystem("gopher://host/x")
    with pytest.raises(ValueError, match="must not carry credentials") as e:
        filesystem("s3://AKID:hunter2@bucket/x")
    assert "hunter2" not in str(e.value)
    with pytest.raises(ValueError, match="set together"):
        filesystem("s3://b/x", StorageSection(key=SecretStr("k")))


def test_put_exclusive_first_wins(root: str) -> None:
    fs, path = filesystem(join(root, "a", "done.json"))
    assert put_exclusive(fs, path, b"first") is True
    assert put_exclusive(fs, path, b"second") is False
    assert fs.cat_file(path) == b"first"
    assert put_exclusive(fs, path + ".empty", b"") is True  # empty bodies are conditional too
    assert put_exclusive(fs, path + ".empty", b"x") is False
    assert fs.cat_file(path + ".empty") == b""


def test_put_exclusive_threads(root: str) -> None:
    fs, path = filesystem(join(root, "race.bin"))
    n = 8
    barrier = threading.Barrier(n)

    def attempt(i: int) -> bool:
        barrier.wait()
        return put_exclusive(fs, path, f"writer {i} ".encode() * 1000)

    with ThreadPoolExecutor(n) as pool:
        won = list(pool.map(attempt, range(n)))
    assert sum(won) == 1
    assert fs.cat_file(path) == f"writer {won.index(True)} ".encode() * 1000
    assert list_names(fs, path.rsplit("/", 1)[0], "") == ["race.bin"]  # no temp files left behind


def _race_in_process(url: str, i: int, barrier, results) -> None:
    fs, path = filesystem(url)
    barrier.wait()
    results.put((i, put_exclusive(fs, path, f"process {i}".encode())))


def test_put_exclusive_processes(root: str) -> None:
    url, n = join(root, "proc-race.txt"), 3
    ctx = mp.get_context("spawn")  # a fresh interpreter per writer, as Ray workers would be
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_race_in_process, args=(url, i, barrier, results)) for i in range(n)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    winners = [i for i, won in got.items() if won]
    assert len(winners) == 1
    fs, path = filesystem(url)
    assert fs.cat_file(path) == f"process {winners[0]}".encode()


def test_put_exclusive_local_without_link(tmp_path, monkeypatch) -> None:
    """Filesystems without hard links (some FUSE mounts) fall back to an atomic no-replace rename."""

    def no_link(src, dst):
        raise OSError(errno.EPERM, "link not supported")

    monkeypatch.setattr(commit.os, "link", no_link)
    path = str(tmp_path / "d" / "x")
    fs, _ = filesystem(path)
    assert put_exclusive(fs, path, b"1") is True
    assert put_exclusive(fs, path, b"2") is False
    assert (tmp_path / "d" / "x").read_bytes() == b"1"
    assert os.listdir(tmp_path / "d") == ["x"]


def test_json_and_listing(root: str) -> None:
    fs, d = filesystem(join(root, "shards"))
    assert read_json(fs, join(d, "missing.json")) is None
    assert list_names(fs, d, ".json") == []
    write_json(fs, join(d, "b.json"), {"rows": 1})
    write_json(fs, join(d, "b.json"), {"rows": 2, "ids": ["x"]})  # overwrite
    assert read_json(fs, join(d, "b.json")) == {"rows": 2, "ids": ["x"]}
    put_exclusive(fs, join(d, "a.json"), b"{}")
    put_exclusive(fs, join(d, "c.parquet"), b"PAR1")
    put_exclusive(fs, join(d, "nested", "z.json"), b"{}")
    assert list_names(fs, d, ".json") == ["a.json", "b.json"]
    assert list_names(fs, d, ".parquet") == ["c.parquet"]


def test_explicit_credentials(s3_server, s3_bucket, monkeypatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    storage = StorageSection(
        key=SecretStr(s3_server.key), secret=SecretStr(s3_server.secret), endpoint_url=s3_server.endpoint_url
    )
    url = join(s3_bucket, "x.json")
    check_access(url, storage)
    fs, path = filesystem(url, storage)
    assert path == url.removeprefix("s3://")
    write_json(fs, path, {"ok": True})
    assert read_json(fs, path) == {"ok": True}
    assert filesystem(url, storage)[0].inner is fs.inner  # cached: one client per settings (each call wraps it for retries)
    assert storage_options(url, storage)["endpoint_url"] == s3_server.endpoint_url


def test_bad_credentials_clear_error_without_secret(s3_server, s3_bucket) -> None:
    wrong = "WRONG-secret-" + "9" * 20
    storage = StorageSection(key=SecretStr(s3_server.key), secret=SecretStr(wrong), endpoint_url=s3_server.endpoint_url)
    url = join(s3_bucket, "x.json")
    with pytest.raises(PermissionError) as e:
        check_access(url, storage)
    msg = str(e.value)
    assert url in msg and s3_server.endpoint_url in msg and "storage.key" in msg
    assert wrong not in msg and wrong not in repr(e.value) and wrong not in repr(storage)
    fs, path = filesystem(url, storage)
    assert wrong not in repr(fs)
    with pytest.raises(PermissionError) as e:
        put_exclusive(fs, path, b"x")
    assert wrong not in str(e.value) and wrong not in repr(e.value)


def test_env_credentials_are_read_per_environment(s3_env, s3_bucket, monkeypatch) -> None:
    url = join(s3_bucket, "x.json")
    check_access(url)
    good, _ = filesystem(url)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "WRONG-env-secret-123")
    assert filesystem(url)[0] is not good  # an environment change builds a new client
    with pytest.raises(PermissionError, match="AWS environment") as e:
        check_access(url)
    assert "WRONG-env-secret-123" not in str(e.value)
