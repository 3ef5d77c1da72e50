"""`--compute ray` (issue 13) on a real Ray cluster on this machine: one head for the whole module,
joined by every run through dagster-ray's LocalRay (RAY_ADDRESS) or by its address.

What is tested here is one machine; a multi-node cluster is not (README, "Beyond one machine").
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLE, REPO, Pipeline, write_tree

from dlm_pipeline import settings
from dlm_pipeline.core.token_store import TokenStore
from dlm_pipeline.core.tokenize import LoadedTokenizer
from dlm_pipeline.definitions import build_defs
from dlm_pipeline.defs.compute import ComputeResource
from dlm_pipeline.defs.resources import TokenCacheResource, TokenizerResource

ASSETS = ("training_configs", "weights_map", "raw_corpus", "expanded_corpus", "tokenized_cache")
KUBERAY = REPO / "examples" / "deployments" / "kuberay"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """One Ray head (2 CPUs) for every test here, started and stopped by this fixture alone."""
    # Authentication off, explicitly, before Ray is imported (it reads the mode once): a short-lived
    # test cluster bound to 127.0.0.1, independent of any ~/.ray/auth_token.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")
        yield from _head()


def _head():
    pytest.importorskip("ray", reason="the optional [ray] extra is not installed")
    pytest.importorskip("dagster_ray", reason="the optional [ray] extra is not installed")
    ray_cli = Path(sys.executable).parent / "ray"
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    head = subprocess.Popen(
        [
            str(ray_cli),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the Ray head at {address} did not start")
                time.sleep(0.5)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the head's own process group: only what it started
        try:
            head.wait(3)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def local_ray(ray_head, monkeypatch):
    """LocalRay joins the module's head instead of starting its own (ray.init reads RAY_ADDRESS)."""
    monkeypatch.setenv("RAY_ADDRESS", ray_head)
    return ComputeResource(backend="ray", batch_bytes=8_192)


def outputs(pipeline: Pipeline, seed: str) -> dict[str, bytes]:
    """Every file the run wrote (all assets, the training dataset's files included), by relative path."""
    files = {
        str(path.relative_to(pipeline.out)): path.read_bytes() for path in pipeline.out.rglob("*") if path.is_file()
    }
    assert {f"{asset}/{seed}.parquet" for asset in ASSETS} <= set(files)
    return files


def generated_tree(root: Path, n_files: int) -> Path:
    """`n_files` modules, plus a file of each kind the content rules skip and a symlink inside."""
    files = {
        ".dlm/training.yaml": "dlm_training_version: 1\nmetadata: {lang: py}\nweights: {lang: {py: 1.5}}\n",
        "odd/key.py": "aws_key = 'AKIA" + "Q3EGRYMNHCZ7XWPA'\n",  # secret
        "odd/blob.txt": b"ab\x00cd",  # binary
        "odd/latin1.txt": b"caf\xe9\n",  # encoding
        "odd/crlf.txt": b"\xef\xbb\xbfone\r\ntwo\n",  # BOM and line ends normalised
    }
    for i in range(n_files):
        files[f"pkg{i % 40:02d}/m{i:05d}.py"] = f"def f{i}(x):\n    return x * {i % 97} + {i}  # {'é' * (i % 5)}\n"
    write_tree(root, files)
    os.symlink("../pkg00/m00000.py", root / "odd" / "link.py")
    return root


def test_ray_outputs_are_byte_identical_to_local(instance, tmp_path, local_ray):
    for name, root in (("example", EXAMPLE), ("generated", generated_tree(tmp_path / "gen", 2_000))):
        # Ray first, on a new ingest index: every file is read by Ray tasks; the local run then reads
        # every file itself (full rescan: neither the index nor the Ray run's raw_corpus is reused).
        on_ray = Pipeline(instance, root, tmp_path / name / "ray" / "out", compute=local_ray)
        local = Pipeline(instance, root, tmp_path / name / "local" / "out", full_rescan=True)
        run = on_ray.run("0")
        assert run.success
        ingest, meta = on_ray.metadata("raw_corpus", "0"), on_ray.metadata("tokenized_cache", "0")
        assert local.run("0").success
        assert outputs(on_ray, "0") == outputs(local, "0"), name
        messages = " ".join(entry.user_message for entry in instance.all_logs(run.run_id))
        assert ingest["compute"] == "ray" and ingest["files_read"] > 0 and ingest["files_from_index"] == 0
        assert sum(w["files"] for w in ingest["compute_workers"].values()) == ingest["files_read"]
        assert f"ingest read tasks: {ingest['compute_tasks']:,}/{ingest['compute_tasks']:,}" in messages
        assert local.metadata("raw_corpus", "0")["compute"] == "local"
        assert f"tokenization tasks: {meta['compute_tasks']:,}/{meta['compute_tasks']:,}" in messages
        assert meta["compute"] == "ray" and meta["compute_tasks"] >= 1 and meta["compute_bytes"] > 0
        assert sum(w["tasks"] for w in meta["compute_workers"].values()) == meta["compute_tasks"]
        assert all(w["tokens_per_second"] > 0 for w in meta["compute_workers"].values())
        stats = TokenStore(on_ray.cache).stats()
        assert stats["rows"] >= meta["cache_misses"] and not stats["ignored"]
    assert meta["compute_tasks"] > 4 and ingest["compute_tasks"] > 4  # the generated tree: many byte-sized batches
    assert ingest["skip_counts"]["secret"] == ingest["skip_counts"]["binary"] == ingest["skip_counts"]["encoding"] == 1
    # a second run finds everything in the store and does not reach the cluster
    assert on_ray.run("0").success and outputs(on_ray, "0") == outputs(local, "0")
    again = on_ray.metadata("tokenized_cache", "0")
    assert again["cache_misses"] == 0 and "compute_tasks" not in again


@dataclass(frozen=True)
class KillsItsWorkerOnce(LoadedTokenizer):
    """Encodes half a batch, then SIGKILLs its own Ray worker process, the first time only (a
    marker file records it); never in the Dagster process itself."""

    marker: str = ""
    driver_pid: int = 0

    def encode(self, texts, progress=None):
        if os.getpid() != self.driver_pid:
            LoadedTokenizer.encode(self, texts[: len(texts) // 2])
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                os.kill(os.getpid(), signal.SIGKILL)
            except FileExistsError:
                pass
        return LoadedTokenizer.encode(self, texts, progress)


class KillingTokenizer(TokenizerResource):
    marker: str

    def load(self) -> LoadedTokenizer:
        base = super().load()
        return KillsItsWorkerOnce(
            **{f.name: getattr(base, f.name) for f in fields(LoadedTokenizer)},
            marker=self.marker,
            driver_pid=os.getpid(),
        )


def test_a_killed_worker_is_retried_and_the_run_matches_local(instance, tmp_path, ray_head):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    root = generated_tree(tmp_path / "tree", 400)
    local = Pipeline(instance, root, tmp_path / "local" / "out")
    # by address this time (not LocalRay): the other way to name a cluster
    on_ray = Pipeline(
        instance,
        root,
        tmp_path / "ray" / "out",
        compute=ComputeResource(backend="ray", ray_address=ray_head, batch_bytes=4_096),
    )
    marker = tmp_path / "killed-once"
    on_ray.defs = build_defs({**on_ray.defs.resources, "tokenizer": KillingTokenizer(marker=str(marker))})
    assert local.run("0").success and on_ray.run("0").success
    assert marker.exists()  # a worker really died mid-batch
    assert outputs(on_ray, "0") == outputs(local, "0")
    meta = on_ray.metadata("tokenized_cache", "0")
    assert meta["compute_retries"] >= 1 and meta["compute_tasks"] > 1
    store = TokenStore(on_ray.cache)
    report = store.repair(stale_after=0)  # temp files of the killed attempt, if any, go too
    assert report["corrupt"] == [] and report["ignored"] == [] and report["dropped"] == 0
    assert not [p for p in on_ray.cache.rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    assert on_ray.run("0").success and on_ray.metadata("tokenized_cache", "0")["cache_misses"] == 0


def test_an_unreachable_cluster_fails_at_once_naming_the_address(pipeline, tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    run = pipeline(EXAMPLE, compute=ComputeResource(backend="ray", ray_address=address)).run("0", raise_on_error=False)
    assert not run.success
    failure = next(e for e in run.all_events if e.event_type_value == "STEP_FAILURE")
    assert (
        address in failure.event_specific_data.error.message
        and "cannot be reached" in failure.event_specific_data.error.message
    )


def test_cli_compute_flag_fails_at_once_on_an_unreachable_address(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DAGSTER_HOME": str(tmp_path / "home"),
        "DLM_OUTPUT_DIR": str(tmp_path / "out"),
    }
    address = f"127.0.0.1:{free_port()}"
    run = subprocess.run(
        [sys.executable, "-m", "dlm_pipeline.cli", "materialize", "--compute", "ray", "--ray-address", address],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode != 0 and address in run.stderr and "Traceback" not in run.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "dlm_pipeline.cli", "materialize"],
        env={**env, "DLM_COMPUTE": "spark"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert bad.returncode != 0 and "DLM_COMPUTE must be one of local, ray" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_compute_setting_defaults_to_local(monkeypatch):
    monkeypatch.delenv(settings.ENV_COMPUTE, raising=False)
    assert settings.compute() == "local" and ComputeResource.from_env().backend == "local"
    monkeypatch.setenv(settings.ENV_COMPUTE, "ray")
    monkeypatch.setenv(settings.ENV_RAY_ADDRESS, "ray://head:10001")
    assert ComputeResource.from_env().ray_address == "ray://head:10001"
    monkeypatch.setenv(settings.ENV_COMPUTE, "spark")
    with pytest.raises(settings.SettingsError, match="DLM_COMPUTE must be one of local, ray, got 'spark'"):
        settings.compute()


def test_kuberay_manifest_shares_one_volume_with_the_dagster_run():
    """Parse every document; check the fields KubeRay and Kubernetes require, and that the token
    store and outputs live on one ReadWriteMany claim mounted at the same path everywhere."""
    docs = [d for path in sorted(KUBERAY.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"], doc.get("kind")
    claim = kinds["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    cluster = kinds["RayCluster"]
    assert cluster["apiVersion"].startswith("ray.io/")
    pod_specs = [cluster["spec"]["headGroupSpec"]["template"]["spec"]]
    pod_specs += [group["template"]["spec"] for group in cluster["spec"]["workerGroupSpecs"]]
    pod_specs.append(kinds["Job"]["spec"]["template"]["spec"])  # the Dagster run
    mounts = set()
    for spec in pod_specs:
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            assert container["image"] and container["name"]
            for mount in container["volumeMounts"]:
                if (
                    volumes[mount["name"]].get("persistentVolumeClaim", {}).get("claimName")
                    == claim["metadata"]["name"]
                ):
                    mounts.add(mount["mountPath"])
    assert len(mounts) == 1, mounts  # one path in the run and in every Ray pod
    run_env = {e["name"]: e.get("value") for e in kinds["Job"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert run_env["DLM_COMPUTE"] == "ray" and run_env["DLM_RAY_ADDRESS"]
    assert run_env["DLM_CACHE_DIR"].startswith(mounts.pop())


def test_workers_store_with_the_configured_text_bound(instance, tmp_path, local_ray):
    """Ray's tasks built their token store with the default max_text_bytes, whatever DLM_MAX_FILE_BYTES
    said: a text over the configured bound was stored by a worker, then read back as corrupt by the run."""
    root = tmp_path / "tree"
    write_tree(root, {"long.txt": "".join(f"w{i} " for i in range(400)), "short.txt": "one line\n"})
    on_ray = Pipeline(instance, root, tmp_path / "out", compute=local_ray)
    store = TokenCacheResource(cache_dir=str(on_ray.cache), max_text_bytes=16)  # at most 4 * 16 + 256 = 320 ids
    on_ray.defs = build_defs({**on_ray.defs.resources, "token_cache": store})
    assert on_ray.run("0").success
    meta = on_ray.metadata("tokenized_cache", "0")
    assert meta["compute"] == "ray" and meta["compute_tasks"] >= 1
    assert meta["cache_repaired_shards"] == 0  # no shard a worker wrote was refused by the run
    assert TokenStore(on_ray.cache).stats()["rows"] == 1  # the long text is tokenized, never stored
