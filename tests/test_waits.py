"""Every wait is bounded and says what it waits for: placement, replica start, the Ray connection (real local Ray,
the toy model). The scheduler's side (Fatal, Gone with a reason, the pool left consistent) is tested over fake
handles in tests/test_scheduler.py; a store that stays down in tests/test_storage_retries.py."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from dgbatch import cli, driver
from dgbatch.capacity import Shape, placeable
from dgbatch.pool import RayUnreachable, check_reachable
from tests.helpers import DEMO_CONFIG, TP2, write_prompts


def run(capsys, *args) -> tuple[int, str]:
    code = cli.main(["run", *map(str, args)])
    return code, capsys.readouterr().err


def job_args(tmp_path, model, *extra):
    inp = write_prompts(tmp_path / "in.parquet", ["reverse abc", "repeat 2 ab", "reverse xy", "repeat 3 q"])
    return [DEMO_CONFIG, f"model.path={model}", f"input.path={inp}", f"output.path={tmp_path / 'out'}",
            "sampling.max_new_tokens=16", "plan.shard_rows=2", *extra]


def error_line(code: int, err: str) -> str:
    """The job's one error line. Log lines may come around it (Ray's forwarding of a replica's, planning that
    was still running beside the replicas' start when it failed), but no traceback."""
    assert code == driver.EXIT_BAD_INPUT, err
    lines = [ln for ln in err.splitlines() if ln.startswith("dgbatch: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def replica_actors(ray) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("replica-")]


@pytest.mark.parametrize("extra, asked", [
    (["replicas.num_gpus=1"], "{CPU: 1, GPU: 1} (replicas.num_cpus, replicas.num_gpus)"),
    (["replicas.accelerator_type=H100"], "{CPU: 1, accelerator_type:H100: 0.001}"),
    (["replicas.num_cpus=3"], "{CPU: 3} (replicas.num_cpus)"),
], ids=["a GPU", "an accelerator type", "more CPUs than a node has"])
def test_a_replica_no_node_can_hold_fails_at_once_naming_what_it_asks_and_what_the_nodes_have(
        ray_local, tmp_path, toy_model_dir, capsys, extra, asked):
    code, err = run(capsys, *job_args(tmp_path, toy_model_dir, *extra))
    line = error_line(code, err)
    assert f"no node of the Ray cluster can hold a replica: each replica asks for {asked}" in line, line
    assert "its 1 node(s) have: 127.0.0.1 {CPU: 2}" in line, line
    assert not replica_actors(ray_local)  # none was created


@pytest.mark.parametrize("extra, asked", [
    (["replicas.num_cpus=2"], "each replica asks for {CPU: 2}"),
    # a parallel replica: its placement group of two 1-CPU ranks is what waits, then is removed
    (["replicas.num_cpus=1", *TP2], "each replica asks for {CPU: 1} (replicas.num_cpus) per rank, 2 ranks"),
], ids=["one replica", "a 2-rank replica"])
def test_a_replica_that_could_be_placed_but_finds_the_cluster_busy_waits_its_timeout_then_names_what_is_missing(
        ray_local, tmp_path, toy_model_dir, capsys, extra, asked):
    from ray.util import placement_group_table

    @ray_local.remote(num_cpus=1)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()  # another job's actor holds one of the two CPUs
    try:
        ray_local.get(holder.ready.remote(), timeout=60)
        code, err = run(capsys, *job_args(tmp_path, toy_model_dir, *extra, "replicas.placement_timeout_s=2"))
    finally:
        ray_local.kill(holder)
    line = error_line(code, err)
    assert f"replica 0 was not placed in 2 s (replicas.placement_timeout_s): {asked}" in line, line
    assert "free in the cluster now: {CPU: 1} of {CPU: 2}; short of CPU" in line, line
    assert not replica_actors(ray_local)  # the waiting actors were removed
    pending = [g["name"] for g in placement_group_table().values() if g["state"] == "PENDING"]
    assert not pending, pending  # and a group's placement group with them


def corrupt_checkpoint(tmp_path, toy_model_dir):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(toy_model_dir, ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # same name, half the bytes
    return ckpt


@pytest.mark.parametrize("make_model, extra, reason, starts", [
    (lambda tmp, toy: toy, ["model.device=cuda"], "AssertionError: Torch not compiled with CUDA enabled", 2),
    (corrupt_checkpoint, [], "SafetensorError: Error while deserializing header", 1),
    # a parallel replica: a real 2-rank group (gloo), torn down whole and started again
    (lambda tmp, toy: toy, ["model.device=cuda", *TP2], "Torch not compiled with CUDA enabled", 2),
], ids=["an unknown device", "a corrupt weights file", "a 2-rank replica on an unknown device"])
def test_a_replica_that_fails_to_start_n_times_fails_the_job_with_its_own_error(
        ray_local, tmp_path, toy_model_dir, capsys, make_model, extra, reason, starts):
    model = make_model(tmp_path, toy_model_dir)
    code, err = run(capsys, *job_args(tmp_path, model, *extra, f"replicas.max_start_failures={starts}"))
    line = error_line(code, err)
    assert (f"replica 0 failed to start {starts} time(s) in a row (replicas.max_start_failures={starts}): "
            in line), line
    assert reason in line, line
    assert not replica_actors(ray_local)
    assert not list((tmp_path / "out").glob("data/*.parquet"))


def not_ray(port: int) -> None:
    """A TCP server on `port` that answers, but is not Ray: it closes every connection."""
    import threading

    srv = socket.create_server(("127.0.0.1", port))
    threading.Thread(target=lambda: [srv.accept()[0].close() for _ in iter(int, 1)], daemon=True).start()


@pytest.mark.parametrize("listener, message", [
    (None, "cannot reach the Ray cluster at ray.address '127.0.0.1:{port}' (127.0.0.1:{port}): Connection refused"),
    (not_ray, ("cannot join the Ray cluster at ray.address '127.0.0.1:{port}': something answers there, but no Ray "
              "GCS within 10 s (ray.connect_timeout_s)")),
], ids=["refused", "answered by something else"])
def test_an_unreachable_ray_address_fails_in_bounded_time_with_one_line(tmp_path, toy_model_dir, listener, message):
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if listener is not None:
        listener(port)
    cmd = [sys.executable, "-m", "dgbatch.cli", "run", *map(str, job_args(tmp_path, toy_model_dir)),
           f"ray.address=127.0.0.1:{port}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    line = error_line(proc.returncode, proc.stderr)
    assert message.format(port=port) in line, line
    assert not (tmp_path / "out" / "data").exists()


def test_an_address_that_does_not_answer_is_given_up_after_the_connect_timeout():
    with pytest.raises(RayUnreachable, match=r"cannot reach .* \(ray.connect_timeout_s\)"):
        check_reachable("127.0.0.1:1", 0.5, "ray.address")
    check_reachable("auto", 0.5, "ray.address")  # names no host: Ray's own lookup


NODE = Shape("n", {"CPU": 2, "GPU": 1})


@pytest.mark.parametrize("bundle, count, strategy, shapes, ok", [
    ({"CPU": 1, "GPU": 1}, 1, "STRICT_PACK", [NODE], True),
    ({"GPU": 2}, 1, "STRICT_PACK", [NODE, NODE], False),
    ({"GPU": 1}, 2, "STRICT_PACK", [NODE, NODE], False),  # both ranks on one node
    ({"GPU": 1}, 2, "PACK", [NODE, NODE], True),
    ({"GPU": 1}, 3, "SPREAD", [NODE, NODE], False),
    ({"GPU": 1}, 2, "STRICT_SPREAD", [NODE, NODE], True),
    ({"GPU": 1}, 3, "STRICT_SPREAD", [NODE, NODE], False),
    ({"GPU": 1}, 3, "STRICT_SPREAD", [NODE, Shape("gpu type", {"CPU": 8, "GPU": 1}, may_add=True)], True),
    ({"GPU": 1}, 1, "STRICT_PACK", [Shape("cpu", {"CPU": 8}), Shape("gpu type", {"GPU": 8}, may_add=True)], True),
    ({"accelerator_type:H100": 0.001}, 1, "STRICT_PACK", [NODE], False),
])
def test_whether_a_replica_could_ever_be_placed_follows_its_placement_strategy(bundle, count, strategy, shapes, ok):
    assert placeable(bundle, count, strategy, shapes) is ok
