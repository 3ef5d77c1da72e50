"""Scale-out configurations, checked as far as this machine allows."""

from __future__ import annotations

import copy
import gzip
import json
import shutil
import subprocess

import dagster as dg
import pytest
import yaml
from conftest import REPO

from dlm_pipeline.definitions import CORPUS_JOB, build_defs
from dlm_pipeline.settings import SettingsError

DEPLOYMENTS = REPO / "examples" / "deployments"


def test_k8s_run_config_validates_against_the_definitions(monkeypatch):
    pytest.importorskip("dagster_k8s")
    monkeypatch.setenv("DLM_DEPLOYMENT", "k8s")
    job = build_defs().resolve_job_def(CORPUS_JOB)
    assert job.executor_def.name == "k8s"
    run_config = yaml.safe_load((DEPLOYMENTS / "k8s" / "run_config.yaml").read_text())
    assert dg.validate_run_config(job, run_config)
    broken = {"execution": {"config": {"job_image": 42}}}
    with pytest.raises(dg.DagsterInvalidConfigError):
        dg.validate_run_config(job, broken)


@pytest.mark.parametrize("deployment, executor", [("local", "in_process"), ("shared", "multiprocess")])
def test_deployment_picks_the_executor(monkeypatch, deployment, executor):
    monkeypatch.setenv("DLM_DEPLOYMENT", deployment)
    assert build_defs().resolve_job_def(CORPUS_JOB).executor_def.name == executor


def test_unknown_deployment_is_refused(monkeypatch):
    monkeypatch.setenv("DLM_DEPLOYMENT", "cloud")
    with pytest.raises(SettingsError, match="DLM_DEPLOYMENT must be one of local, shared, k8s"):
        build_defs()


def _docker_engine() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _docker_engine(), reason="no Docker engine on this machine (only the client, or nothing)")
def test_code_location_image_builds():
    done = subprocess.run(
        ["docker", "build", "-f", str(DEPLOYMENTS / "Dockerfile"), "-t", "dlm-pipeline:test", str(REPO)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-2000:]


KUBERAY = DEPLOYMENTS / "kuberay"
RAYCLUSTER_SCHEMA = REPO / "tests" / "data" / "kuberay" / "raycluster-v1.schema.json.gz"  # KubeRay v1.7.0's CRD
KUBERNETES_VERSION = "1.33.0"


def strict(schema):
    """The CRD schema with unknown fields refused (`kubectl --validate=strict`, `kubeconform -strict`):
    every object that lists its properties and keeps no unknown fields gets additionalProperties false."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def manifest_validator():
    """errors(doc) -> list of one line per schema violation: the Kubernetes kinds against
    kubernetes-validate's offline schemas (strict), RayCluster against KubeRay's CRD schema."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (the [dev] extra) is not installed"
    )
    import jsonschema

    raycluster = jsonschema.Draft7Validator(strict(json.loads(gzip.decompress(RAYCLUSTER_SCHEMA.read_bytes()))))

    def errors(doc: dict) -> list[str]:
        if (doc.get("apiVersion"), doc.get("kind")) == ("ray.io/v1", "RayCluster"):
            return [f"/{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in raycluster.iter_errors(doc)]
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            return [f"/{'/'.join(map(str, exc.absolute_path))}: {exc.message}"]
        except kubernetes_validate.SchemaNotFoundError:
            return [f"no schema for {doc.get('apiVersion')} {doc.get('kind')}"]
        return []

    return errors


def test_kuberay_manifests_validate_against_their_schemas():
    errors = manifest_validator()
    docs = {
        (path.name, doc["kind"]): doc
        for path in sorted(KUBERAY.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    }
    assert {kind for _, kind in docs} == {"PersistentVolumeClaim", "RayCluster", "Job"}
    for name, doc in docs.items():
        assert errors(doc) == [], name
    cluster, job, claim = (
        next(d for (_, k), d in docs.items() if k == kind) for kind in ("RayCluster", "Job", "PersistentVolumeClaim")
    )

    def broken(doc: dict, change) -> list[str]:
        doc = copy.deepcopy(doc)
        change(doc)
        return errors(doc)

    # each mistake is refused, and named where it is
    assert "/spec/workerGroupSpecs/0/replicas" in " ".join(
        broken(cluster, lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="four"))
    )
    assert "rayStartParam" in " ".join(  # a typo: unknown fields are refused
        broken(cluster, lambda d: d["spec"]["headGroupSpec"].update(rayStartParam={}))
    )
    assert "'name' is a required property" in " ".join(  # the pod template inside the CRD is checked too
        broken(cluster, lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name"))
    )
    assert "'comand' was unexpected" in " ".join(
        broken(job, lambda d: d["spec"]["template"]["spec"]["containers"][0].update(comand=["x"]))
    )
    assert "/spec/accessModes" in " ".join(broken(claim, lambda d: d["spec"].update(accessModes="ReadWriteMany")))
    assert broken(claim, lambda d: d.update(kind="PersistentVolumeClame")) == ["no schema for v1 PersistentVolumeClame"]
