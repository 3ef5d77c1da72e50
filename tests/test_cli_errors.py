"""What `dlm-pipeline` says when something is wrong: one line naming the cause, never a traceback.

Every case runs the installed command in a fresh process: conftest imports the definitions first, so
an in-process test would miss failures at import time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, command, dlm, one_line_error, without_permission_override

from dlm_pipeline.core.token_index import unpacked
from dlm_pipeline.core.token_store import MANIFEST


def test_importing_the_definitions_builds_nothing(tmp_path):
    """Dagster's tools import the module, then call the lazy loader: a bad setting must not break the import."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLM_")}
    env.update(DAGSTER_HOME=str(tmp_path), DLM_NIGHTLY_CRON="never", DLM_SENSOR_INTERVAL="abc")
    code = "import dlm_pipeline.definitions as d; print('imported', flush=True); d.load_defs()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 1 and done.stdout == "imported\n"
    assert done.stderr.strip().splitlines()[-1].startswith("dlm_pipeline.settings.SettingsError: DLM_SENSOR_INTERVAL")


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("DLM_WEIGHTS_SCOPE", "local", "DLM_WEIGHTS_SCOPE: weights scope must be one of nearest, global"),
        ("DLM_MAX_FILE_BYTES", "lots", "DLM_MAX_FILE_BYTES must be a whole number"),
        ("DLM_MAX_WEIGHT", "nan", "DLM_MAX_WEIGHT must be a number, got 'nan'"),
        ("DLM_MAX_SEQ_LEN", "0", "DLM_MAX_SEQ_LEN must be a whole number > 0"),
        ("DLM_CACHE_MAX_BYTES", "1.5", "DLM_CACHE_MAX_BYTES must be a whole number"),
        ("DLM_VAL_FRACTION", "0.9", "DLM_VAL_FRACTION must be a number from 0 to 0.5"),
        ("DLM_SPLIT_SEED", "-1", "DLM_SPLIT_SEED must be a non-negative whole number of at most 20 digits"),
        ("DLM_EXPANSION_MODE", "random", "DLM_EXPANSION_MODE: expansion mode must be one of bernoulli, exact"),
        ("DLM_DEPLOYMENT", "cloud", "DLM_DEPLOYMENT must be one of local, shared, k8s"),
        ("DLM_SENSOR_INTERVAL", "abc", "DLM_SENSOR_INTERVAL must be a whole number, got 'abc'"),
        ("DLM_NIGHTLY_CRON", "61 * * * *", "DLM_NIGHTLY_CRON must be a cron expression of 5 fields"),
        ("DLM_NIGHTLY_CRON", "every night", "DLM_NIGHTLY_CRON must be a cron expression of 5 fields"),
    ],
)
def test_a_bad_setting_is_one_line_before_anything_runs(tmp_path, variable, value, message):
    done = dlm(["materialize"], tmp_path / "home", **{variable: value})
    one_line_error(done, 2, message)
    assert not (tmp_path / "home" / "storage").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--max-seq-len", "0"],
            "argument --max-seq-len: the maximum sequence length must be a whole number from 1 to 2147483647, got 0",
        ),
        (["--val-fraction", "0.7"], "argument --val-fraction: the validation fraction must be a number from 0 to 0.5"),
        (["--val-fraction", "many"], "argument --val-fraction: must be a number from 0 to 0.5, got 'many'"),
        (["--split-seed", "007"], "argument --split-seed: the split seed must be a non-negative whole number"),
        (["--expansion-mode", "fair"], "argument --expansion-mode: invalid choice: 'fair'"),
        (["--seed", "1" * 301], "is not a canonical non-negative decimal integer of at most 20 digits"),
    ],
)
def test_a_bad_flag_is_one_line_and_exit_2(tmp_path, flags, message):
    one_line_error(dlm(["materialize", *flags], tmp_path / "home"), 2, message)


@pytest.mark.parametrize(
    "variable, value, phrases",
    [
        ("DLM_TOKENIZER", "/nonexistent/tokenizer.json", ["tokenizer file"]),
        ("DLM_CACHE_DIR", "/dev/null", ["tokenized_cache", "/dev/null", "DLM_CACHE_DIR"]),
    ],
)
def test_a_setting_that_fails_the_run_names_the_cause(tmp_path, variable, value, phrases):
    done = dlm(["materialize"], tmp_path / "home", **{variable: value})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "seed 0: FAILED" in done.stderr
    for phrase in phrases:
        assert phrase in done.stderr


@pytest.mark.parametrize("kind", ["missing", "a file", "unreadable"])
def test_a_source_that_cannot_be_walked_is_refused_like_validate_before_anything_is_registered(tmp_path, kind):
    """`materialize --source /missing` registered seed 0 and recorded a failed run; `validate` refused it at once."""
    import dagster as dg

    home, source = tmp_path / "home", tmp_path / "source"
    if kind == "a file":
        source.write_text("x")
    elif kind == "unreadable":
        source.mkdir(mode=0o000)
    prefix = tuple(without_permission_override()) if kind == "unreadable" else ()
    assert dlm(["seeds", "add", "5"], home).returncode == 0
    expected = dlm(["validate", "--source", str(source)], home, prefix)
    one_line_error(expected, 2, f"source root {str(source)!r}")
    commands = [["materialize", "--source", str(source)], ["materialize", "--source", str(source), "--seed", "7"]]
    commands += [["status", "--source", str(source)], ["explain", "a.txt", "--source", str(source)]]
    for args in commands:
        done = dlm(args, home, prefix)
        one_line_error(done, 2)
        assert done.stderr == expected.stderr, args
    done = dlm(["materialize"], home, prefix, DLM_SOURCE_ROOT=str(source))  # the setting, not the flag: the same
    assert (done.returncode, done.stderr) == (2, expected.stderr)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_dynamic_partitions("seeds") == ["5"]  # no seed 0 or 7 registered
        assert instance.get_runs() == []  # and no run made


@pytest.mark.parametrize("where", ["not-a-folder", "not-a-folder/below", "/proc/no-such-folder"])
def test_an_output_folder_that_cannot_be_used_is_one_line_naming_the_setting(tmp_path, where):
    """DLM_OUTPUT_DIR is a file, below one, or cannot be created: the summary names the folder, the
    OS error and the setting (it was Dagster's wrapper and a chained FileNotFoundError)."""
    (tmp_path / "not-a-folder").write_text("x")
    folder = tmp_path / where
    done = dlm(["materialize"], tmp_path / "home", DLM_OUTPUT_DIR=str(folder))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "Error occurred while handling output" not in done.stderr, done.stderr
    assert f"output folder {folder} cannot be used (" in done.stderr
    assert "set DLM_OUTPUT_DIR to a writable folder" in done.stderr


def test_cache_stats_on_a_cache_dir_that_is_not_a_folder(tmp_path):
    done = dlm(["cache", "stats"], tmp_path / "home", DLM_CACHE_DIR="/dev/null")
    one_line_error(done, 1, "token cache /dev/null (DLM_CACHE_DIR)")


def test_k8s_outside_a_cluster_is_one_line(tmp_path):
    pytest.importorskip("dagster_k8s")
    done = dlm(["materialize"], tmp_path / "home", DLM_DEPLOYMENT="k8s")
    one_line_error(done, 1, "DLM_DEPLOYMENT=k8s", "not inside a cluster")


def private_tmpfs(folder: Path, options: str, then: str = "") -> tuple[str, ...]:
    """A command prefix that runs the command with a fresh tmpfs (mount `options`) on `folder`, after
    the shell commands `then`, in a private user and mount namespace: a read-only or full disk
    without root on the host."""
    folder.mkdir()
    probe = ["unshare", "-r", "-m", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs '{folder}'"]
    if not shutil.which("unshare") or subprocess.run(probe, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a private tmpfs here (no unprivileged user namespaces)")
    script = f"mount -t tmpfs -o {options} tmpfs '{folder}' && {then} exec \"$@\""
    return ("unshare", "-r", "-m", "sh", "-c", script, "sh")


@pytest.mark.parametrize("options, cause", [("ro", "Read-only file system"), ("size=64k", "database or disk is full")])
def test_a_read_only_or_full_dagster_home_is_one_line(tmp_path, options, cause):
    home = tmp_path / "home"
    done = dlm(["materialize"], home, prefix=private_tmpfs(home, options))
    one_line_error(done, 1, f"cannot open the Dagster instance in DAGSTER_HOME {home}", cause)


def test_a_dagster_home_that_fills_up_during_the_run_is_one_line(tmp_path):
    """512 KiB hold the instance's tables (with Dagster 1.13) but not a run's records: the disk fills up
    while the run writes its event log. (Wherever it fills up, the error is the same one line.)"""
    home = tmp_path / "home"
    done = dlm(["materialize"], home, prefix=private_tmpfs(home, "size=512k"))
    one_line_error(done, 1, f"Dagster instance in DAGSTER_HOME {home}", "disk")


def test_two_materialize_calls_at_once_on_a_fresh_home_both_succeed(tmp_path):
    """The first opening of an instance creates its tables; two at once used to collide. Four cheap
    `seeds add` calls start alongside, so that the race, which depends on timing, is all but certain."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLM_")}
    env.update(DAGSTER_HOME=str(home))
    commands = [["materialize", "--seed", "1"], ["materialize", "--seed", "2"]] + [["seeds", "add", s] for s in "3456"]
    runs = [
        subprocess.Popen(
            [*command(), *args], env=env, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for args in commands
    ]
    outputs = [run.communicate(timeout=600) for run in runs]
    for args, run, (_, err) in zip(commands, runs, outputs, strict=True):
        assert run.returncode == 0, f"{args}: {err}"
    assert "seed 1: ok" in outputs[0][0] and "seed 2: ok" in outputs[1][0]
    assert dlm(["seeds", "list"], home).stdout.split() == ["1", "2", "3", "4", "5", "6"]


def plant_wrong_token_ids(cache: Path) -> None:
    """Shift every stored id by one in every token-store shard, and record the new shards' size and
    checksum in the manifest: a store that is intact on disk but wrong (say, written by a broken
    tokenizer build). Only re-tokenizing, what `tokens_match_tokenizer` does, can catch it."""
    manifest = json.loads((cache / MANIFEST).read_text())
    for name, entry in manifest["shards"].items():
        shard = cache / name
        table = unpacked(pq.read_table(shard))  # written back as a shard of the unpacked layout, still read
        ids_type = table.schema.field("input_ids").type
        shifted = pa.array([[i + 1 for i in ids] for ids in table["input_ids"].to_pylist()], ids_type)
        pq.write_table(table.set_column(table.schema.get_field_index("input_ids"), "input_ids", shifted), shard)
        data = shard.read_bytes()
        for key in entry:
            if key in ("bytes", "size"):
                entry[key] = len(data)
            elif "sha256" in key:
                entry[key] = hashlib.sha256(data).hexdigest()
    (cache / MANIFEST).write_text(json.dumps(manifest))


def test_a_failed_check_fails_the_seed_with_its_name_and_description(tmp_path):
    home, cache = tmp_path / "home", tmp_path / "cache"
    assert dlm(["materialize"], home, DLM_CACHE_DIR=str(cache)).returncode == 0
    plant_wrong_token_ids(cache)
    done = dlm(["materialize"], home, DLM_CACHE_DIR=str(cache))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "seed 0: ok" not in done.stdout and "seed 0: FAILED" in done.stderr
    assert "check tokens_match_tokenizer failed: " in done.stderr
    assert "sampled section(s) differ from the live tokenizer" in done.stderr
