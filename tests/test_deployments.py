"""Scale-out configurations, checked as far as this machine allows."""

from __future__ import annotations

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
