"""Seed-independent work done once (issue 11 item 2): `training_configs`, `weights_map` and
`raw_corpus` are stored once (per-seed hard links to content-addressed objects), and `raw_corpus`
is reused from any seed whose inputs (configs, settings, file stats) match, byte for byte."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest

import dlm_pipeline.core.tree_signature as tree_signature_module
from dlm_pipeline.core.blob_store import OBJECTS_DIR, BlobStore
from dlm_pipeline.core.parquet_io import write_parquet, write_parquet_atomic
from dlm_pipeline.core.tree import scan_tree
from dlm_pipeline.core.tree_signature import RACY_WINDOW_NS, tree_signature
from dlm_pipeline.defs.resources import DatasetResource
from tests.conftest import EXAMPLE, Pipeline, check_evaluations

SHARED = ("training_configs", "weights_map", "raw_corpus")


@pytest.fixture
def example(tmp_path) -> Path:
    return shutil.copytree(EXAMPLE, tmp_path / "corpus", symlinks=True)


@pytest.fixture
def trusted_timestamps(monkeypatch):
    """Files written by the test just before a run count as settled (the racy rule has its own tests)."""
    monkeypatch.setattr(tree_signature_module, "RACY_WINDOW_NS", 0)


def disk_usage(*paths: Path) -> int:
    """Bytes allocated under `paths`, each inode counted once (what `du` reports)."""
    seen, total = set(), 0
    for folder in paths:
        for dirpath, dirnames, filenames in os.walk(folder):
            for name in [".", *dirnames, *filenames]:
                info = os.lstat(os.path.join(dirpath, name))
                if (info.st_dev, info.st_ino) not in seen:
                    seen.add((info.st_dev, info.st_ino))
                    total += info.st_blocks * 512
    return total


def recomputed(root: Path, seed: str, tmp_path: Path) -> bytes:
    """raw_corpus for `seed` from a fresh instance and output folder: nothing to reuse."""
    with dg.DagsterInstance.ephemeral() as fresh:
        other = Pipeline(fresh, root, Path(tempfile.mkdtemp(dir=tmp_path)) / "out")
        other.run(seed)
        assert "reused_from_seed" not in other.metadata("raw_corpus", seed)
        return other.output("raw_corpus", seed).read_bytes()


def test_eight_seeds_cost_less_than_twice_one_seed(pipeline, example, tmp_path):
    """The seed-independent assets cost the same for 8 seeds as for one (their files are hard links
    to one object each). (The whole output folder grows by each seed's own expanded_corpus and
    tokenized_cache where they differ per seed, and by its training dataset.)"""
    p = pipeline(example)

    def usage() -> tuple[int, int]:
        return disk_usage(*(p.out / name for name in SHARED)), disk_usage(p.out)

    p.run("0")
    one_seed, one_seed_all = usage()
    for seed in range(1, 8):
        p.run(str(seed))
    eight_seeds, eight_seeds_all = usage()
    print(
        f"seed-independent: 1 seed {one_seed:,} B, 8 seeds {eight_seeds:,} B; "
        f"whole output: 1 seed {one_seed_all:,} B, 8 seeds {eight_seeds_all:,} B"
    )
    assert eight_seeds < 2 * one_seed
    assert eight_seeds_all - one_seed_all < 7 * (one_seed_all - one_seed)  # no seed pays for shared bytes
    for asset in SHARED:
        inodes = {os.stat(p.output(asset, str(s))).st_ino for s in range(8)}
        assert len(inodes) == 1, asset
        metadata = p.metadata(asset, "5")
        assert metadata["storage"] == f"hard link to {OBJECTS_DIR}/{metadata['file_sha256']}.parquet"


def test_every_seed_keeps_its_own_materialization_metadata_and_data_version(pipeline, example, trusted_timestamps):
    p = pipeline(example)
    p.run("1")
    p.run("2")
    for asset in SHARED:
        records = {
            seed: p.instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[seed]), limit=1
            ).records[0]
            for seed in ("1", "2")
        }
        one, two = (records[s].asset_materialization for s in ("1", "2"))
        assert records["1"].storage_id != records["2"].storage_id
        assert (one.partition, two.partition) == ("1", "2")
        assert one.metadata["seed"].value == 1 and two.metadata["seed"].value == 2
        assert one.metadata["fingerprint"] == two.metadata["fingerprint"]
        assert one.tags["dagster/data_version"] == two.tags["dagster/data_version"] == one.metadata["fingerprint"].value
        assert one.metadata["dagster/row_count"] == two.metadata["dagster/row_count"]
    assert p.metadata("raw_corpus", "2")["reused_from_seed"] == 1


def test_a_new_seed_reuses_raw_corpus_byte_identical_to_a_recompute(pipeline, example, tmp_path, trusted_timestamps):
    p = pipeline(example)
    p.run("1")
    first = p.metadata("raw_corpus", "1")
    assert "reused_from_seed" not in first and first["reuse_key"]
    p.run("2")
    second = p.metadata("raw_corpus", "2")
    assert second["reused_from_seed"] == 1
    assert second["reuse"].startswith("reused from seed 1")
    assert second["skip_counts"] == first["skip_counts"] and second["files_seen"] == first["files_seen"]
    assert p.output("raw_corpus", "2").read_bytes() == recomputed(example, "2", tmp_path)
    p.run("1")  # an unchanged re-run reuses the seed's own result
    assert p.metadata("raw_corpus", "1")["reused_from_seed"] in (1, 2)


def test_an_edit_is_read_again_not_reused(pipeline, example, tmp_path, trusted_timestamps):
    p = pipeline(example)
    p.run("1")
    target = example / "src" / "acme" / "core.py"
    target.write_text(target.read_text() + "\n# an edit\n")
    p.run("2")
    metadata = p.metadata("raw_corpus", "2")
    assert "reused_from_seed" not in metadata
    assert metadata["fingerprint"] != p.metadata("raw_corpus", "1")["fingerprint"]
    assert p.output("raw_corpus", "2").read_bytes() == recomputed(example, "2", tmp_path)


def test_a_same_size_rewrite_within_one_mtime_tick_is_read_again(pipeline, example, tmp_path, trusted_timestamps):
    p = pipeline(example)
    target = example / "src" / "acme" / "core.py"
    p.run("1")
    before = os.stat(target)
    text = target.read_text()
    with open(target, "r+", encoding="utf-8") as fh:  # same inode, same size, other bytes
        fh.write("X" + text[1:])
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # the same mtime, as within one tick
    after = os.stat(target)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    p.run("2")
    assert "reused_from_seed" not in p.metadata("raw_corpus", "2")  # the ctime moved
    stored = p.output("raw_corpus", "2").read_bytes()
    assert stored == recomputed(example, "2", tmp_path)
    assert stored != p.output("raw_corpus", "1").read_bytes()


def test_files_changed_too_recently_are_not_trusted(pipeline, example):
    """With the real window: files whose timestamps are too new to trust (here dated an hour ahead,
    so a slow machine cannot age them past the window) record no reuse key, and nothing reuses them."""
    ahead = time.time() + 3600
    for path in example.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.utime(path, (ahead, ahead))
    p = pipeline(example)
    p.run("1")
    first = p.metadata("raw_corpus", "1")
    assert first["reuse_key"] == "" and "too recently" in first["reuse"]
    p.run("2")
    assert "reused_from_seed" not in p.metadata("raw_corpus", "2")


def test_racy_rule_on_the_signature(tree):
    root = tree({"a.txt": "a", "sub/b.txt": "b"})
    scan = scan_tree(root)
    now = time.time_ns()
    assert tree_signature(scan, scan.files, now).racy == ["a.txt", "sub/b.txt"]
    later = tree_signature(scan, scan.files, now + RACY_WINDOW_NS + 10**9)
    assert later.racy == [] and later.digest == tree_signature(scan, scan.files, now).digest
    os.chmod(root / "a.txt", 0o600)  # a permission change alone changes the signature (ctime, mode)
    assert tree_signature(scan, scan.files, now).digest != later.digest


def test_a_tampered_source_file_is_not_reused(pipeline, example, tmp_path, trusted_timestamps):
    p = pipeline(example)
    p.run("1")
    stored = p.output("raw_corpus", "1")
    write_parquet_atomic(pa.Table.from_batches([], schema=pa.schema([("x", pa.int8())])), stored)
    p.run("2")
    assert "reused_from_seed" not in p.metadata("raw_corpus", "2")
    assert p.output("raw_corpus", "2").read_bytes() == recomputed(example, "2", tmp_path)


def test_objects_no_seed_links_to_are_pruned(pipeline, example, trusted_timestamps):
    p = pipeline(example)
    p.run("1")
    p.run("2")
    objects = p.out / OBJECTS_DIR
    old = p.metadata("raw_corpus", "1")["file_sha256"]
    (example / "added.md").write_text("# new\n")
    p.run("1")
    p.run("2")
    new = p.metadata("raw_corpus", "1")["file_sha256"]
    assert new != old and not (objects / f"{old}.parquet").exists()  # no seed links the old raw corpus
    assert os.stat(objects / f"{new}.parquet").st_nlink == 3  # the object + two seeds
    assert all(os.stat(objects / name).st_nlink >= 2 for name in os.listdir(objects))  # each is some seed's


def test_a_symlink_in_the_output_folder_is_refused_not_followed(pipeline, example, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    p = pipeline(example)
    p.out.mkdir(parents=True)
    (p.out / OBJECTS_DIR).symlink_to(outside)
    result = p.run("1", raise_on_error=False)
    assert not result.success
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "is not a plain folder" in failures[0].event_specific_data.error.message
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_objects_and_links_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        store = BlobStore(tmp_path / "out")
        first = store.put("raw_corpus", "1.parquet", lambda fh: write_parquet(pa.table({"a": [1]}), fh))
        second = store.put("raw_corpus", "2.parquet", lambda fh: write_parquet(pa.table({"a": [1]}), fh))
    finally:
        os.umask(old)
    assert first.sha256 == second.sha256 and first.linked and second.linked
    for path in (first.path, second.path, tmp_path / "out" / OBJECTS_DIR / f"{first.sha256}.parquet"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(os.stat(tmp_path / "out" / OBJECTS_DIR).st_mode) == 0o777 & ~umask


def test_reuse_across_file_systems_falls_back_to_a_copy(tmp_path):
    other_fs = Path("/dev/shm")
    if not other_fs.is_dir() or os.stat(other_fs).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system")
    with tempfile.TemporaryDirectory(dir=other_fs) as elsewhere:
        source = BlobStore(elsewhere).put("raw_corpus", "1.parquet", lambda fh: write_parquet(pa.table({"a": [1]}), fh))
        copied = BlobStore(tmp_path / "out").link_from(source.path, "raw_corpus", "2.parquet", source.sha256)
        assert copied is not None and not copied.linked
        assert Path(copied.path).read_bytes() == Path(source.path).read_bytes()
        assert BlobStore(tmp_path / "out").link_from(source.path, "raw_corpus", "3.parquet", "0" * 64) is None


def test_a_symlink_planted_at_an_output_path_is_not_read(pipeline, example, tmp_path):
    p = pipeline(example)
    p.run("1")
    elsewhere = tmp_path / "elsewhere.parquet"
    shutil.copyfile(p.output("raw_corpus", "1"), elsewhere)
    p.output("raw_corpus", "1").unlink()
    p.output("raw_corpus", "1").symlink_to(elsewhere)
    result = p.run_checks("1", "expansion_matches_weights")
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures and "is a symlink" in failures[0].event_specific_data.error.message


def test_a_fifo_or_a_symlinked_folder_at_an_output_path_fails_in_one_line_and_never_hangs(pipeline, example, tmp_path):
    """A FIFO where raw_corpus is stored made the streamed input of expanded_corpus block forever,
    and a check end in pyarrow's FileNotFoundError; a symlinked asset folder was followed."""
    import threading

    p = pipeline(example)
    p.run("1")
    stored = p.output("raw_corpus", "1")
    stored.unlink()
    os.mkfifo(stored)

    def unblock() -> None:  # only on the old code: lets a blocked reader go on (and the test fail)
        try:
            os.close(os.open(stored, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass

    watchdog = threading.Timer(20, unblock)
    watchdog.start()
    try:
        job = p.defs.resolve_job_def("corpus_job")
        expanded = job.get_subset(asset_selection={dg.AssetKey("expanded_corpus")}).execute_in_process(
            instance=p.instance, partition_key="1", raise_on_error=False
        )
        check = p.run_checks("1", "expansion_matches_weights")
    finally:
        watchdog.cancel()
    for result in (expanded, check):
        failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        message = failures[0].event_specific_data.error.message
        assert "is not a regular file" in message and "\n" not in message.strip()
    stored.unlink()
    folder = stored.parent
    shutil.copytree(folder, tmp_path / "elsewhere")
    shutil.rmtree(folder)
    folder.symlink_to(tmp_path / "elsewhere")
    result = p.run_checks("1", "expansion_matches_weights")
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures and f"{folder} is a symlink" in failures[0].event_specific_data.error.message


def test_the_temp_file_of_a_run_killed_mid_write_is_deleted_by_a_later_write(tmp_path):
    """A run killed while streaming an output leaves `.<seed>.parquet.<hex>.tmp` (a whole output's
    bytes) beside the old file; it was never deleted. A later write of that name deletes temp files
    no writer touched for an hour, never a fresh one, another name's, or a symlink's target."""
    folder = tmp_path / "out" / "expanded_corpus"
    folder.mkdir(parents=True)
    outside = tmp_path / "outside.parquet"
    outside.write_bytes(b"not ours")
    stale, fresh, other = (folder / f".{n}.parquet.{h * 16}.tmp" for n, h in (("0", "a"), ("0", "b"), ("1", "c")))
    link = folder / f".0.parquet.{'d' * 16}.tmp"
    for path in (stale, fresh, other):
        path.write_bytes(b"killed mid-write")
    link.symlink_to(outside)
    hours_ago = time.time() - 2 * 3600
    for path in (stale, other):
        os.utime(path, (hours_ago, hours_ago))
    os.utime(link, (hours_ago, hours_ago), follow_symlinks=False)
    BlobStore(tmp_path / "out").put("expanded_corpus", "0.parquet", lambda fh: write_parquet(pa.table({"x": [1]}), fh))
    assert not stale.exists() and fresh.exists() and other.exists() and link.is_symlink()
    assert outside.read_bytes() == b"not ours" and (folder / "0.parquet").exists()


@pytest.mark.parametrize("content", ["foreign_schema", "garbage", "empty"])
def test_a_stored_output_that_is_no_output_of_ours_fails_in_one_line(pipeline, example, content):
    """A foreign Parquet file, garbage or an empty file where raw_corpus is stored: the streamed input
    of expanded_corpus and the checks that read it fail with one line naming the file and what to do
    (they ended in pyarrow's errors from deep inside the step)."""
    p = pipeline(example)
    p.run("1")
    stored = p.output("raw_corpus", "1")
    stored.unlink()
    if content == "foreign_schema":
        write_parquet_atomic(pa.table({"a": [1, 2]}), stored)
    else:
        stored.write_bytes(os.urandom(3000) if content == "garbage" else b"")
    job = p.defs.resolve_job_def("corpus_job")
    expanded = job.get_subset(asset_selection={dg.AssetKey("expanded_corpus")}).execute_in_process(
        instance=p.instance, partition_key="1", raise_on_error=False
    )
    for result in (expanded, p.run_checks("1", "expansion_matches_weights", "tokens_match_tokenizer")):
        failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        assert failures
        for failure in failures:
            error = failure.event_specific_data.error
            assert error.cls_name == "Failure", error.message
            assert f"{stored} is not a raw_corpus output the pipeline wrote" in error.message
            assert "re-materialize raw_corpus for seed 1" in error.message


class Waited(Exception):
    pass


def _wait_refused():
    raise Waited


def test_a_held_seed_lock_makes_the_next_run_wait_and_a_planted_one_is_never_followed(tmp_path):
    """`BlobStore.seed_lock`: another holder means waiting (told first); a symlink or a folder planted
    where the lock belongs is refused, and what it points at is left untouched."""
    import fcntl

    from dlm_pipeline.core.blob_store import LOCKS_DIR, BlobStoreError

    out = tmp_path / "out"
    store = BlobStore(out)
    with store.seed_lock("1", _wait_refused):  # free: taken without waiting
        assert (out / LOCKS_DIR / "1.lock").is_file()
        with store.seed_lock("2", _wait_refused):  # another seed's lock is another lock
            pass
    with open(out / LOCKS_DIR / "1.lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(Waited), store.seed_lock("1", _wait_refused):
            pass
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("not ours")
    (out / LOCKS_DIR / "3.lock").symlink_to(elsewhere)
    with pytest.raises(OSError), store.seed_lock("3", _wait_refused):
        pass
    (out / LOCKS_DIR / "5.lock").mkdir()
    with pytest.raises((OSError, BlobStoreError)), store.seed_lock("5", _wait_refused):
        pass
    shutil.rmtree(out / LOCKS_DIR)
    (out / LOCKS_DIR).symlink_to(tmp_path)
    with pytest.raises(BlobStoreError), store.seed_lock("1", _wait_refused):
        pass
    assert elsewhere.read_text() == "not ours" and not (tmp_path / "1.lock").exists()


def test_seeds_whose_per_seed_outputs_are_equal_share_their_bytes(tree, pipeline):
    """With whole-number weights no seed's roll matters: every seed's expanded_corpus and
    tokenized_cache are the same bytes, stored once. A fraction makes them differ: each its own."""
    root = tree({".dlm/training.yaml": WEIGHTED.format(weight="2"), **TEXTS})
    p = pipeline(root, max_seq_len=64)
    for weight, shared in (("2", True), ("1.5", False)):
        (root / ".dlm" / "training.yaml").write_text(WEIGHTED.format(weight=weight))
        p.run("1")
        p.run("2")
        for asset in ("expanded_corpus", "tokenized_cache"):
            one, two = p.output(asset, "1"), p.output(asset, "2")
            assert (one.read_bytes() == two.read_bytes()) is shared, (weight, asset)
            assert (os.stat(one).st_ino == os.stat(two).st_ino) is shared, (weight, asset)
            assert p.metadata(asset, "2")["storage"].startswith(f"hard link to {OBJECTS_DIR}/")


WEIGHTED = "dlm_training_version: 1\nmetadata: {{kind: doc}}\nweights: {{kind: {{doc: {weight}}}}}\n"
TEXTS = {f"doc{i:02d}.md": f"# page {i}\n" + "word " * (i + 1) for i in range(40)}


def test_the_steps_of_one_run_share_the_seed_lock_and_another_run_still_waits(tmp_path):
    """With a process per step (DLM_DEPLOYMENT=shared, k8s) each step takes the lock: holders named
    by one run id share it (each open file stands for a step's process), another run's id waits,
    and once they have all left the other run takes it at once."""
    store = BlobStore(tmp_path / "out")
    with store.seed_lock("1", _wait_refused, holder="run-a"):
        with store.seed_lock("1", _wait_refused, holder="run-a"):  # a sibling step: no waiting
            with pytest.raises(Waited), store.seed_lock("1", _wait_refused, holder="run-b"):
                pass
        with pytest.raises(Waited), store.seed_lock("1", _wait_refused, holder="run-b"):  # one step still holds it
            pass
    with store.seed_lock("1", _wait_refused, holder="run-b"):
        with pytest.raises(Waited), store.seed_lock("1", _wait_refused, holder="run-a"):
            pass
        with pytest.raises(Waited), store.seed_lock("1", _wait_refused):  # no name: shares with none
            pass
    assert (tmp_path / "out" / ".locks" / "1.lock").read_bytes() == b""  # the last to leave names no run


def test_seeds_store_their_identical_dataset_files_once_and_replaced_ones_are_pruned(tree, pipeline):
    """The validation split does not depend on the seed: seeds with the same settings store its
    files once, as for the Parquet outputs; the train files (in each seed's order) stay each seed's
    own. A replaced dataset leaves no object that no seed links to, and the checks still pass."""
    root = tree({".dlm/training.yaml": WEIGHTED.format(weight="1.5"), **TEXTS})
    p = pipeline(root, max_seq_len=64, dataset=DatasetResource(val_fraction=0.3))
    p.run("1")
    p.run("2")
    one, two = p.out / "training_dataset" / "1", p.out / "training_dataset" / "2"
    assert json.loads((one / "dataset.json").read_text())["splits"]["validation"]["documents"] > 0
    for name in ("validation.parquet", "validation.bin", "validation.idx"):
        assert os.stat(one / name).st_ino == os.stat(two / name).st_ino, name
    for name in ("train.parquet", "train.bin", "dataset.json"):
        assert os.stat(one / name).st_ino != os.stat(two / name).st_ino, name
    objects = p.out / OBJECTS_DIR
    old = os.stat(one / "validation.bin").st_ino
    p = pipeline(root, max_seq_len=64, dataset=DatasetResource(val_fraction=0.4))  # another validation split
    for seed in ("1", "2"):
        result = p.run(seed)
        assert all(e.passed for e in check_evaluations(result).values())
    assert os.stat(one / "validation.bin").st_ino == os.stat(two / "validation.bin").st_ino != old
    assert all(os.stat(objects / name).st_nlink >= 2 for name in os.listdir(objects))  # each is some seed's
    assert old not in {os.stat(objects / name).st_ino for name in os.listdir(objects)}
