"""The shared deployment: a real PostgreSQL server on 127.0.0.1 holds the instance; two seeds go through it.

The server is the one `.ci/run` installs from Debian's packages; this test starts a private
cluster of its own in a temporary folder and stops it at the end.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import dagster as dg
import pytest
from conftest import REPO

POSTGRES_CONFIG = REPO / "examples" / "deployments" / "postgres" / "dagster.yaml"


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL is not installed here (apt-get install postgresql; .ci/run does)")
    # Outside pytest's private (0700, root-owned) temp tree: the server's user must reach it.
    base = Path(tempfile.mkdtemp(prefix="dlm-pg-"))
    data = base / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the server as the postgres user
        shutil.chown(base, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    subprocess.run(
        [*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "dlm", "--no-sync"], check=True, capture_output=True
    )
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-o", options, "-w", "-l", str(data / "server.log"), "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield {"DLM_PG_URL": f"postgresql+psycopg2://dlm@127.0.0.1:{port}/postgres"}
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_two_seeds_through_a_postgres_instance(postgres, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(POSTGRES_CONFIG, home / "dagster.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLM_")}
    env.update(postgres, DAGSTER_HOME=str(home), DLM_OUTPUT_DIR=str(tmp_path / "out"))
    done = subprocess.run(
        [sys.executable, "-m", "dlm_pipeline.cli", "materialize", "--seed", "1", "--seed", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "seed 1: ok" in done.stdout and "seed 2: ok" in done.stdout

    for key, value in postgres.items():
        monkeypatch.setenv(key, value)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        runs = instance.get_runs()
        assert sorted(r.tags.get("dagster/partition") for r in runs) == ["1", "2"]
        assert all(r.is_success for r in runs)
        assert sorted(instance.get_dynamic_partitions("seeds")) == ["1", "2"]
        for seed in ("1", "2"):
            record = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("expanded_corpus"), asset_partitions=[seed]), limit=1
            ).records[0]
            metadata = record.asset_materialization.metadata
            assert metadata["seed"].value == int(seed)
            assert metadata["rows_in"].value == 12
            assert (tmp_path / "out" / "expanded_corpus" / f"{seed}.parquet").exists()
