"""Hostile operations, not hostile files: unusable or read-only folders, runs killed or run at once,
umasks. Every case runs the installed command in a fresh process on a real DAGSTER_HOME."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, command, dlm
from test_cli_errors import private_tmpfs

from dlm_pipeline.cli import INSTANCE_LOCK, INTERRUPTED


def read_only_bind(folder) -> tuple[str, ...]:
    """A command prefix that runs the command with `folder` bind-mounted read-only onto itself, in a
    private user and mount namespace: its files stay readable, nothing can be written (even by root)."""
    script = f"mount --bind '{folder}' '{folder}' && mount -o remount,bind,ro '{folder}'"
    probe = ["unshare", "-r", "-m", "sh", "-c", script]
    if not shutil.which("unshare") or subprocess.run(probe, capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount a folder read-only here (no unprivileged user namespaces)")
    return ("unshare", "-r", "-m", "sh", "-c", f'{script} && exec "$@"', "sh")


def assert_summary_only(done: subprocess.CompletedProcess, *phrases: str) -> None:
    """A failed seed: exit 1, the summary names the cause, and no stack trace anywhere on stderr
    (Dagster's console logger printed one per failed step or resource: "Stack Trace:", then frames)."""
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Stack Trace" not in done.stderr and 'File "' not in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    summary = done.stderr[done.stderr.index("seed 0: FAILED") :]
    for phrase in phrases:
        assert phrase in summary, done.stderr


@pytest.mark.parametrize(
    "variable, phrase",
    [
        ("DLM_OUTPUT_DIR", "resources: cannot lock seed 0's outputs: output folder"),  # fails a resource
        ("DLM_CACHE_DIR", "tokenized_cache: token cache folder"),  # fails a step
    ],
)
def test_an_unusable_folder_fails_the_seed_with_its_reason_and_no_stack_trace(tmp_path, variable, phrase):
    (tmp_path / "file").write_text("not a folder")
    done = dlm(["materialize"], tmp_path / "home", **{variable: str(tmp_path / "file")})
    assert_summary_only(done, phrase, "cannot be used", variable)


def test_a_read_only_output_folder_fails_the_seed_and_keeps_the_outputs(tmp_path):
    home, out = tmp_path / "home", tmp_path / "out"
    assert dlm(["materialize"], home, DLM_OUTPUT_DIR=str(out)).returncode == 0
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    done = dlm(["materialize", "--max-seq-len", "512"], home, prefix=read_only_bind(out), DLM_OUTPUT_DIR=str(out))
    assert_summary_only(done, "Read-only file system")
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def status_of(done: subprocess.CompletedProcess) -> dict[str, str]:
    assert done.returncode == 0, done.stderr
    return {
        line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("  ") and "check " not in line
    }


def test_status_does_not_call_a_deleted_or_rewritten_output_current(tmp_path):
    """`status` read only the instance: an output deleted or edited by hand (or rewritten by a run
    killed before it recorded it) was still `current`. Materializing again repairs it: current again."""
    home = tmp_path / "home"
    assert dlm(["materialize"], home).returncode == 0
    assert all(line.endswith("current") for line in status_of(dlm(["status"], home)).values())
    (home / "storage" / "raw_corpus" / "0.parquet").unlink()
    with open(home / "storage" / "training_dataset" / "0" / "train.bin", "r+b") as fh:
        fh.write(b"\xff")
    lines = status_of(dlm(["status"], home))
    assert f"STALE: stored file {home}/storage/raw_corpus/0.parquet missing since" in lines["raw_corpus"]
    assert "upstream raw_corpus is stale" in lines["expanded_corpus"]
    assert f"stored file {home}/storage/training_dataset/0/train.bin rewritten since" in lines["training_dataset"]
    assert lines["weights_map"].endswith("current")
    assert dlm(["materialize"], home).returncode == 0
    assert all(line.endswith("current") for line in status_of(dlm(["status"], home)).values())


@pytest.mark.parametrize(
    "variable, value, name", [("DLM_VAL_FRACTION", "0.2", "val_fraction"), ("DLM_SPLIT_SEED", "7", "split_seed")]
)
def test_status_calls_a_dataset_of_another_split_stale(tmp_path, variable, value, name):
    """The dataset records its split settings; a change of either was not reported."""
    home = tmp_path / "home"
    assert dlm(["materialize"], home).returncode == 0
    lines = status_of(dlm(["status"], home, **{variable: value}))
    assert f"STALE: setting {name} changed (" in lines["training_dataset"], lines
    assert lines["tokenized_cache"].endswith("current")


@pytest.mark.parametrize(
    "folder, size, variable",
    [
        ("out", "16k", "DLM_OUTPUT_DIR"),  # fills up at an early asset's output (weights_map, with Dagster 1.13)
        ("out", "28k", "DLM_OUTPUT_DIR"),  # at tokenized_cache's output
        ("out", "44k", "DLM_OUTPUT_DIR"),  # while the dataset is written (its spill, then its files)
        ("cache", "4k", "DLM_CACHE_DIR"),  # at the token store's first shard
    ],
)
def test_a_full_output_folder_or_token_cache_is_one_line_naming_it(tmp_path, folder, size, variable):
    """A full disk was Dagster's wrapper ("Error occurred while handling output ...") and a bare
    `OSError: [Errno 28] No space left on device`, naming neither the folder nor what to do."""
    full = tmp_path / folder
    env = {"DLM_OUTPUT_DIR": str(tmp_path / "out"), "DLM_CACHE_DIR": str(tmp_path / "cache")}
    done = dlm(["materialize"], tmp_path / "home", prefix=private_tmpfs(full, f"size={size}"), **env)
    assert_summary_only(done, f"cannot write into {full} (No space left on device)", variable)
    assert "OSError" not in done.stderr and "Error occurred while" not in done.stderr, done.stderr


def started(args: list[str], home, **env) -> subprocess.Popen:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DLM_", "KUBERNETES_"))}
    clean.update(DAGSTER_HOME=str(home), **env)
    return subprocess.Popen(
        [*command(), *args], env=clean, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def test_ctrl_c_while_a_run_waits_for_the_seeds_lock_says_interrupted(tmp_path):
    """The run waiting for another run of its seed is stopped with Ctrl-C: its summary said
    `see the run in the UI` (Dagster's RUN_FAILURE, whose event type is spelled PIPELINE_FAILURE, was
    never read), now what happened, and the exit is 130 as for any command stopped by Ctrl-C."""
    home = tmp_path / "home"
    (home / "storage" / ".locks").mkdir(parents=True)
    with open(home / "storage" / ".locks" / "4.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = started(["materialize", "--seed", "4"], home)
        for line in proc.stderr:  # the run is inside Dagster's execution, blocked on the lock
            if "waiting for another run of seed 4 to finish" in line:
                break
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "see the run in the UI" not in stderr, stderr
    assert stderr[stderr.index("seed 4: FAILED") :].splitlines()[1].strip() == f"run: {INTERRUPTED}"


def test_ctrl_c_before_any_run_is_one_line_not_a_traceback(tmp_path):
    """Ctrl-C while the command starts (here: blocked on the instance's lock, which another process
    holds) printed a KeyboardInterrupt traceback."""
    home = tmp_path / "home"
    home.mkdir()
    with open(home / INSTANCE_LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = started(["seeds", "list"], home)
        inode = os.fstat(held.fileno()).st_ino
        while not any(  # a blocked waiter on that file, as /proc/locks lists it ("->")
            "->" in line and f":{inode} " in line and f" {proc.pid} " in line
            for line in Path("/proc/locks").read_text().splitlines()
        ):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["dlm-pipeline: interrupted"], stderr


@pytest.mark.parametrize("planted", ["symlink", "file"])
def test_a_symlink_or_file_in_place_of_the_dataset_folder_is_refused_before_writing(tmp_path, planted):
    """`<output>/training_dataset` a symlink: the dataset was written through it, outside the output
    directory (its checks failed afterwards); a file: `FileExistsError` under Dagster's wrapper."""
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (home / "storage").mkdir(parents=True)
    place = home / "storage" / "training_dataset"
    if planted == "symlink":
        place.symlink_to(elsewhere)
    else:
        place.write_text("not a folder")
    done = dlm(["materialize"], home)
    assert_summary_only(done, f"training_dataset: {place}/ is not a plain folder (a symlink or a file)")
    assert list(elsewhere.iterdir()) == []


def test_what_a_killed_run_left_goes_once_stale_even_when_nothing_is_written_again(tmp_path):
    """A run SIGKILLed mid-write leaves `.<seed>.parquet.<hex>.tmp` (linked to its object already,
    past the link step) or a dataset build folder; a later write of the same output deleted them once
    stale (an hour), but a later run that finds the output unchanged writes nothing: they stayed for
    good, each holding its object's bytes. Now every run of the seed deletes its stale ones."""
    home = tmp_path / "home"
    assert dlm(["materialize"], home).returncode == 0
    storage = home / "storage"
    temp = storage / "raw_corpus" / ".0.parquet.0123456789abcdef.tmp"
    temp.write_bytes(b"bytes of a killed write")
    orphan = storage / ".objects" / ("ab" * 32 + ".parquet")
    os.link(temp, orphan)  # killed after linking the object, before renaming over the output
    build = storage / "training_dataset" / ".0.tmp-0123456789abcdef0123456789abcdef"
    build.mkdir()
    (build / "train.bin").write_bytes(b"half a dataset")
    other_seed = storage / "raw_corpus" / ".1.parquet.0123456789abcdef.tmp"  # another seed's: its own runs delete it
    other_seed.write_bytes(b"another seed's")
    fresh = storage / "raw_corpus" / ".0.parquet.fedcba9876543210.tmp"  # a live writer's, for all we know
    fresh.write_bytes(b"being written")
    hours_ago = time.time() - 2 * 3600
    for path in (temp, build, other_seed):
        os.utime(path, (hours_ago, hours_ago))
    done = dlm(["materialize"], home)
    assert done.returncode == 0, done.stderr
    assert "seed 0: ok" in done.stdout
    assert not temp.exists() and not orphan.exists() and not build.exists()
    assert other_seed.exists() and fresh.exists()
