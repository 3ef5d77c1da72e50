"""CLI start-up: each command imports only what it needs, and `materialize` builds the definitions
and opens the instance once. Counts of modules and calls, not times."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref

import dagster as dg
import pytest
from conftest import REPO

from dlm_pipeline import cli, definitions, settings

HEAVY = ["dagster", "pyarrow", "tokenizers", "ray", "detect_secrets", "sqlalchemy"]
PROBE = """
import sys
import weakref
from dlm_pipeline import cli
try:
    cli.main(sys.argv[1:])
except SystemExit:
    pass
print("LOADED", *sorted({m.split(".")[0] for m in sys.modules}))
"""


def loaded_modules(home, *args: str) -> set[str]:
    """Top-level packages imported by the CLI for `args`, in a fresh process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLM_")}
    env.update(DAGSTER_HOME=str(home), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("LOADED"))
    return set(line.split()[1:]) & set(HEAVY)


@pytest.mark.parametrize(
    ("args", "allowed"),
    [
        (["--help"], set()),
        # config records are Arrow; config strings are scanned for credentials
        (["validate", "--source", str(REPO / "examples" / "corpus")], {"pyarrow", "detect_secrets"}),
        (["seeds", "list"], {"dagster", "sqlalchemy"}),  # the instance
    ],
)
def test_light_commands_import_no_heavy_module_they_do_not_need(tmp_path, args, allowed):
    assert loaded_modules(tmp_path, *args) <= allowed


def test_the_choices_help_lists_are_the_core_modules_own():
    from dlm_pipeline.core.compute import BACKENDS
    from dlm_pipeline.core.expansion import EXPANSION_BERNOULLI, EXPANSION_EXACT, EXPANSION_MODES
    from dlm_pipeline.core.weights import SCOPE_NEAREST, SCOPES

    assert settings.EXPANSION_MODES == EXPANSION_MODES and settings.COMPUTE_BACKENDS == BACKENDS
    assert (settings.EXPANSION_BERNOULLI, settings.EXPANSION_EXACT) == (EXPANSION_BERNOULLI, EXPANSION_EXACT)
    assert settings.SCOPES == SCOPES and settings.SCOPE_NEAREST == SCOPE_NEAREST
    from dlm_pipeline.core.tokenize import DEFAULT_MAX_SEQ_LEN

    assert settings.DEFAULT_MAX_SEQ_LEN == DEFAULT_MAX_SEQ_LEN == settings.max_seq_len()


def test_materialize_builds_the_definitions_once_and_opens_the_instance_once(tree, tmp_path, monkeypatch, capsys):
    root = tree({".dlm/training.yaml": "dlm_training_version: 1\nmetadata: {k: v}\n", "a.txt": "one file\n"})
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    for name in [v for v in os.environ if v.startswith("DLM_")]:
        monkeypatch.delenv(name)
    calls = {"build_defs": 0, "instance": 0}
    build, get = definitions.build_defs, dg.DagsterInstance.get

    def counted_build(*args, **kwargs):
        calls["build_defs"] += 1
        return build(*args, **kwargs)

    def counted_get():
        calls["instance"] += 1
        return get()

    monkeypatch.setattr(definitions, "build_defs", counted_build)
    monkeypatch.setattr(dg.DagsterInstance, "get", staticmethod(counted_get))
    monkeypatch.setattr(cli, "_worker", {})  # what the run leaves there goes with the test
    assert cli.main(["materialize", "--source", str(root), "--seed", "3"]) == cli.EXIT_OK, capsys.readouterr().err
    assert calls == {"build_defs": 1, "instance": 1}


RUN_PROBE = """
import gc, sys
from dlm_pipeline import cli

seen = {}
run_seed = cli._materialize_seed

def probed(seed):
    seen["modules"] = {m.split(".")[0] for m in sys.modules}
    seen["gc"] = (gc.get_freeze_count(), gc.isenabled())
    return run_seed(seed)

cli._materialize_seed = probed
code = cli.main(sys.argv[1:])
print("BEFORE_RUN", *sorted(seen["modules"]))
print("GC", *seen["gc"])
print("AFTER_RUN", *sorted({m.split(".")[0] for m in sys.modules}))
sys.exit(code)
"""
# Not needed before a run starts: pandas (pyarrow imports it at its first conversion of Python
# values, inside a step), detect-secrets (only when configs or files are read) and what it pulls in.
NOT_BEFORE_THE_RUN = {"pandas", "detect_secrets", "requests", "ray"}


def probe_materialize(tmp_path, root) -> dict[str, list[str]]:
    """`materialize --seed 1` in a fresh process: the lines of RUN_PROBE, by their first word."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLM_")}
    env.update(DAGSTER_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    args = [sys.executable, "-c", RUN_PROBE, "materialize", "--source", str(root), "--seed", "1"]
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    assert done.returncode == cli.EXIT_OK, done.stderr[-2000:]
    return {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines() if line.strip()}


def test_materialize_starts_its_run_without_the_modules_only_steps_need_and_with_start_up_frozen(tree, tmp_path):
    root = tree({".dlm/training.yaml": "dlm_training_version: 1\nmetadata: {k: v}\n", "a.txt": "one file\n"})
    cold = probe_materialize(tmp_path, root)
    assert not NOT_BEFORE_THE_RUN & set(cold["BEFORE_RUN"])
    frozen, collecting = cold["GC"]
    # What start-up made is out of the collector's sight (gc.freeze), and it runs again for the run.
    assert int(frozen) > 10_000 and collecting == "True"
    assert "detect_secrets" in cold["AFTER_RUN"]  # the cold run read the file, so it scanned it


def test_loading_again_in_one_process_gives_what_the_last_call_froze_back_to_the_collector():
    """Tests call main() many times in one process: start-up's freeze must not keep their garbage for good."""

    class Node:
        pass

    try:
        with cli._loading():
            node = Node()
            node.cycle = node  # garbage once `node` is gone, freed only by the collector
            freed = weakref.ref(node)
            del node
        gc.collect()
        assert freed() is not None  # frozen: out of the collector's sight
        with cli._loading():
            pass
        assert freed() is None
    finally:
        gc.unfreeze()
