"""infra/: every KubeRay manifest passes the KubeRay v1.7.0 CRD schemas strictly, names entrypoints and
configs that exist and validate, keeps credentials out of the manifest, and one RayJob's entrypoint runs
as written through `ray job submit` against a local head; the `ray up` config passes Ray's own schema."""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import pytest
import s3fs
import yaml

from dgbatch import backfill
from dgbatch.config import load_config
from tests.helpers import ray_head_ports

REPO = Path(__file__).resolve().parent.parent
KUBERAY = REPO / "infra" / "kuberay"
CRDS = REPO / "tests" / "data" / "kuberay-crds"  # KubeRay v1.7.0, copied from ray-operator/config/crd/bases
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
# What Kubernetes accepts in an object's own metadata (ObjectMeta); the CRDs leave it as a bare object.
OBJECT_META = {"name", "generateName", "namespace", "labels", "annotations", "finalizers", "ownerReferences"}
SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")


@functools.cache
def _crds() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema, for every served version of the three CRDs."""
    out = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        for v in crd["spec"]["versions"]:
            if v.get("served"):
                out[(f"{crd['spec']['group']}/{v['name']}", crd["spec"]["names"]["kind"])] = v["schema"]["openAPIV3Schema"]
    return out


def unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not declare (Kubernetes prunes them silently; `--validate=strict` refuses them)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(obj, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, value in obj.items():
            where = f"{path}.{key}" if path else key
            if path == "" and key == "metadata":
                continue  # ObjectMeta, below
            if props is not None and key in props:
                found += unknown_fields(value, props[key], where)
            elif isinstance(extra, dict):
                found += unknown_fields(value, extra, where)
            elif extra is not True:
                found.append(where)
        if path == "" and isinstance(obj.get("metadata"), dict):
            found += [f"metadata.{k}" for k in obj["metadata"] if k not in OBJECT_META]
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(obj):
            found += unknown_fields(value, schema["items"], f"{path}[{i}]")
    return found


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _job_specs() -> list[tuple[str, dict]]:
    """(manifest, RayJob spec) for every RayJob and every RayCronJob's job template."""
    out = []
    for path in MANIFESTS:
        for doc in _docs(path):
            if doc["kind"] == "RayJob":
                out.append((path.name, doc["spec"]))
            elif doc["kind"] == "RayCronJob":
                out.append((path.name, doc["spec"]["jobTemplate"]))
    return out


def test_the_strict_walker_refuses_what_the_schema_lets_through():
    schema = _crds()[("ray.io/v1", "RayCluster")]
    doc = _docs(KUBERAY / "raycluster.yaml")[0]
    jsonschema.validate(doc, schema)
    assert unknown_fields(doc, schema) == []
    bad = copy.deepcopy(doc)
    bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"  # a typo
    bad["spec"]["authOption"] = {"mode": "token"}
    bad["metadata"]["lables"] = {}
    jsonschema.validate(bad, schema)  # the schema alone accepts all three
    assert unknown_fields(bad, schema) == [
        "spec.headGroupSpec.template.spec.containers[0].imagePullPolcy", "spec.authOption", "metadata.lables"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_passes_the_kuberay_crd_schema_strictly(path):
    crds = _crds()
    for doc in _docs(path):
        schema = crds.get((doc.get("apiVersion"), doc.get("kind")))
        assert schema is not None, f"{path.name}: no KubeRay v1.7.0 CRD serves {doc.get('apiVersion')} {doc.get('kind')}"
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
        assert errors == [], f"{path.name}: {errors}"
        assert unknown_fields(doc, schema) == [], f"{path.name}: fields the CRD does not know"


def test_the_manifests_cover_every_use_case():
    kinds = {(d["kind"], d["metadata"]["name"]) for p in MANIFESTS for d in _docs(p)}
    assert kinds >= {("RayCluster", "dgbatch"), ("RayJob", "dgbatch-generate"), ("RayJob", "dgbatch-eval"),
                     ("RayJob", "dgbatch-synth"), ("RayJob", "dgbatch-backfill"),
                     ("RayCronJob", "dgbatch-nightly-backfill")}
    for name, spec in _job_specs():
        for key in ("entrypoint", "runtimeEnvYAML", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
                    "backoffLimit", "activeDeadlineSeconds", "rayClusterSpec"):
            assert key in spec, f"{name}: {key} not set"
        assert spec["shutdownAfterJobFinishes"] is True
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    cron = next(d for p in MANIFESTS for d in _docs(p) if d["kind"] == "RayCronJob")
    assert "--end yesterday" in cron["spec"]["jobTemplate"]["entrypoint"]


def _pods(cluster_spec: dict) -> dict:
    """What must be the same in every cluster: auth, head, and each worker group's pod and start params."""
    groups = [{k: v for k, v in g.items() if k not in ("replicas", "minReplicas", "maxReplicas")}
              for g in cluster_spec["workerGroupSpecs"]]
    return {**{k: v for k, v in cluster_spec.items() if k != "workerGroupSpecs"}, "workerGroupSpecs": groups}


def test_every_job_runs_the_rayclusters_pods():
    """One pod layout (image, auth, ClusterIP dashboard, secrets, cache): the jobs' clusters may differ only in size."""
    cluster = _docs(KUBERAY / "raycluster.yaml")[0]["spec"]
    assert cluster["authOptions"] == {"mode": "token"} and cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    for name, spec in _job_specs():
        assert _pods(spec["rayClusterSpec"]) == _pods(cluster), name
    gpus = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpus["nvidia.com/gpu"]) >= 1


def _containers(doc) -> list[dict]:
    found = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("containers"), list):
                found.extend(node["containers"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    return found


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_credentials_come_from_a_secret_never_inline(path):
    for doc in _docs(path):
        containers = _containers(doc)
        assert containers
        for c in containers:
            assert {"secretRef": {"name": "dgbatch-s3"}} in c.get("envFrom", []), f"{path.name}: {c['name']}"
            for env in c.get("env", []):
                if any(w in env["name"].upper() for w in SECRET_WORDS):
                    assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), env["name"]
    for name, spec in _job_specs():
        env_vars = yaml.safe_load(spec["runtimeEnvYAML"]).get("env_vars", {})
        assert not [k for k in env_vars if any(w in k.upper() for w in SECRET_WORDS)], name
        assert "@" not in spec["entrypoint"], f"{name}: credentials in a URL"


def _entrypoint(spec: dict) -> tuple[str, str, list[str]]:
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "-m"], spec["entrypoint"]
    return argv[2], argv[3], argv[4:]


@pytest.mark.parametrize("name, spec", _job_specs(), ids=[f"{n}:{s['entrypoint'].split()[2]}" for n, s in _job_specs()])
def test_every_entrypoint_names_a_module_and_a_config_that_exist_and_validate(name, spec):
    module, config, rest = _entrypoint(spec)
    assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"{name}: module {module} not in the repo"
    assert (REPO / config).is_file(), f"{name}: config {config} not in the repo"
    if module == "jobs.backfill":
        ap = argparse.ArgumentParser()
        backfill.add_arguments(ap)
        args = ap.parse_intermixed_args(backfill.join_date_options([config, *rest]))
        cwd = os.getcwd()
        os.chdir(REPO)  # the job's working_dir: the config's relative paths resolve from it
        try:
            bf = backfill.prepare(args)  # config, templates, dates, checkpoint: what runs before any partition
        finally:
            os.chdir(cwd)
        assert bf.parts and bf.cfg.output.path.startswith("s3://"), "a cluster job writes to shared storage"
    else:
        assert all("=" in a and not a.startswith("-") for a in rest), rest
        cfg = load_config(REPO / config, rest)
        assert cfg.output.path.startswith("s3://"), "a cluster job writes to shared storage"


def test_the_ray_up_config_passes_rays_cluster_schema():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "infra" / "ray-up" / "gpu-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_backfill_rayjob_runs_as_written_through_ray_job_submit(s3_server, tmp_path):
    """The RayJob's entrypoint and runtimeEnvYAML, unchanged, against a local head with token auth whose
    environment holds what the `dgbatch-s3` Secret maps into the pods; its bucket on SeaweedFS. Only the
    working_dir differs: this checkout instead of the image's copy of it."""
    spec = _docs(KUBERAY / "rayjob-backfill.yaml")[0]["spec"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env.pop("working_dir") == "/home/ray/dgbatch"
    fs = s3fs.S3FileSystem(key=s3_server.key, secret=s3_server.secret, endpoint_url=s3_server.endpoint_url,
                           skip_instance_cache=True)
    fs.mkdir("dgbatch-demo")
    try:
        _submit_and_check(spec, runtime_env, s3_server, fs)
    finally:
        fs.rm("dgbatch-demo", recursive=True)


def _submit_and_check(spec, runtime_env, s3_server, fs):
    ray_bin = str(Path(sys.executable).parent / "ray")
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")
    gcs, dash = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="token", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               AWS_ACCESS_KEY_ID=s3_server.key, AWS_SECRET_ACCESS_KEY=s3_server.secret,
               AWS_ENDPOINT_URL=s3_server.endpoint_url, AWS_REGION="us-east-1", DGBATCH_CACHE=f"{ray_tmp}/cache")
    run = lambda *a, **k: subprocess.run(list(a), env=env, cwd=REPO, capture_output=True, text=True, check=False, **k)
    try:
        run(ray_bin, "get-auth-token", "--generate", timeout=60)
        started = run(ray_bin, "start", "--head", "--num-cpus", "2", "--port", str(gcs), "--dashboard-host",
                      "127.0.0.1", "--dashboard-port", str(dash), "--disable-usage-stats", *ray_head_ports(), timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 60
        while time.time() < deadline and run(ray_bin, "job", "list", "--address", address, timeout=60).returncode:
            time.sleep(1)
        deadline = time.time() + 120
        while True:
            job = run(ray_bin, "job", "submit", "--address", address, "--working-dir", ".", "--runtime-env-json",
                      json.dumps(runtime_env), "--", *shlex.split(spec["entrypoint"]), timeout=900)
            if "No available agent to submit job" not in job.stderr or time.time() > deadline:
                break
            time.sleep(2)
        out = job.stdout + job.stderr
        assert job.returncode == 0, out[-4000:]
        lines = [ln for ln in out.splitlines() if ln.startswith("partition ")]
        assert [ln.split(":")[0] for ln in lines] == [f"partition 2026-11-{d}" for d in (28, 29, 30)], out[-4000:]
        assert all(": done (16 rows" in ln for ln in lines), lines
        assert s3_server.secret not in out
        for day in (28, 29, 30):
            root = f"dgbatch-demo/backfill/date=2026-11-{day}"
            assert json.loads(fs.cat(f"{root}/_SUCCESS"))["rows"] == 16
        report = json.loads(fs.cat("dgbatch-demo/backfill/_reports/2026-11-28_2026-11-30.json"))
        assert report["counts"] == {"done": 3, "skipped": 0, "missing": 0, "failed": 0} and report["exit_code"] == 0
        _read_back_as_the_readme_says(s3_server)
    finally:
        subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)


def _read_back_as_the_readme_says(s3_server) -> None:
    """The README's recipes for reading a job's output from S3: `datasets` and DuckDB (over fsspec)."""
    import datasets
    import duckdb
    import fsspec

    # A fresh dict each time: datasets adds its own keys to the storage_options it is given.
    opts = lambda: {"key": s3_server.key, "secret": s3_server.secret,
                    "client_kwargs": {"endpoint_url": s3_server.endpoint_url}}
    ds = datasets.load_dataset("parquet", data_files="s3://dgbatch-demo/backfill/date=2026-11-29/data/*.parquet",
                               split="train", storage_options=opts())
    assert ds.num_rows == 16 and set(ds["partition"]) == {"2026-11-29"}
    con = duckdb.connect()
    con.register_filesystem(fsspec.filesystem("s3", skip_instance_cache=True, **opts()))
    rows = con.sql("SELECT partition, count(*) FROM read_parquet('s3://dgbatch-demo/backfill/date=*/data/*.parquet') "
                   "GROUP BY partition ORDER BY partition").fetchall()
    assert rows == [("2026-11-28", 16), ("2026-11-29", 16), ("2026-11-30", 16)]
