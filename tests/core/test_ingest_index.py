"""Incremental ingest on real files: each run through the index gives exactly what a full read gives,
and reads only the files whose stat changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import without_permission_override

from dlm_pipeline.core import ingest_index
from dlm_pipeline.core.config_records import anchors_from_table, load_configs, records_table
from dlm_pipeline.core.corpus import build_raw_corpus
from dlm_pipeline.core.ingest_index import FINE_SLACK_NS, INDEX_FILE, IngestIndex, index_dir
from dlm_pipeline.core.tree import scan_tree

V1 = "dlm_training_version: 1\n"
# A GitHub token pattern (fake): the credential scan skips the file that holds it.
FAKE_TOKEN = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"


def settle() -> None:
    """Let the files just written age past the racy window (entries as new as the walk are not kept)."""
    time.sleep(FINE_SLACK_NS / 1e9 + 0.02)


def ingest(root, home, **options):
    """A run through the index, checked against a full read of the same tree."""
    scan = scan_tree(root)
    anchors = anchors_from_table(records_table(load_configs(scan)))
    index = IngestIndex(
        home,
        scan.root,
        max_file_bytes=options.get("max_file_bytes", 1 << 20),
        secret_entropy=options.get("secret_entropy", False),
        full_rescan=options.pop("full_rescan", False),
    )
    result = build_raw_corpus(scan, anchors, index=index, **options)
    full = build_raw_corpus(scan_tree(root), anchors, **options)
    assert result.table.equals(full.table, check_metadata=True)
    assert _parquet_bytes(result.table) == _parquet_bytes(full.table)
    assert (result.skips, result.skipped) == (full.skips, full.skipped)
    looked_up = len(result.skipped) - len(scan.skipped) + result.table.num_rows
    assert result.files_read + result.files_from_index == looked_up
    result.status = index.status
    return result


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


@pytest.fixture
def home(tmp_path):
    path = tmp_path / "home"
    path.mkdir()
    return path


def test_nothing_changed_reads_nothing_and_edits_read_only_the_edited_file(tree, home):
    root = tree({"a.txt": "alpha\n", "b/c.md": "gamma\r\n", "d.dat": b"\x00\x01", "e.txt": "x" * 100})
    settle()
    first = ingest(root, home, max_file_bytes=50)
    assert (first.files_read, first.files_from_index, first.status) == (4, 0, "new: every file read")
    assert first.skips["binary"] == 1 and first.skips["too_large"] == 1
    again = ingest(root, home, max_file_bytes=50)
    assert (again.files_read, again.files_from_index) == (0, 4)
    assert again.status == "used (4 entries)"

    (root / "a.txt").write_text("alpha, longer now\n")
    settle()
    edited = ingest(root, home, max_file_bytes=50)
    assert (edited.files_read, edited.files_from_index) == (1, 3)
    assert ingest(root, home, max_file_bytes=50).files_read == 0


def test_renames_deletes_and_new_files(tree, home):
    root = tree({"a.txt": "alpha\n", "b.txt": "beta\n", "c.txt": "gamma\n"})
    settle()
    ingest(root, home)
    (root / "b.txt").rename(root / "renamed.txt")
    (root / "c.txt").unlink()
    (root / "new.txt").write_text("new\n")
    settle()
    result = ingest(root, home)
    assert result.table["path"].to_pylist() == ["a.txt", "new.txt", "renamed.txt"]
    assert (result.files_read, result.files_from_index) == (2, 1)
    assert ingest(root, home).files_read == 0


def test_same_size_rewrite_with_the_old_mtime_is_read_again(tree, home):
    """The content changes, the size stays and the mtime is set back: the ctime still tells."""
    root = tree({"a.txt": "aaaa\n", "b.txt": "bbbb\n"})
    settle()
    ingest(root, home)
    before = os.stat(root / "a.txt")
    (root / "a.txt").write_text("zzzz\n")
    os.utime(root / "a.txt", ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(root / "a.txt").st_mtime_ns == before.st_mtime_ns
    result = ingest(root, home)
    assert result.files_read == 1 and result.table["text"].to_pylist() == ["zzzz\n", "bbbb\n"]


def test_racy_entry_as_new_as_the_walk_is_read_again(tree, home):
    """A file changed within one timestamp tick of being read keeps its whole stat: git's racy case.
    The entry is not kept, so the next run reads the file again, whatever its stat says."""
    root = tree({"a.txt": "aaaa\n", "old.txt": "old\n"})
    os.utime(root / "old.txt", ns=(0, 10**18))  # an mtime far in the past would be trusted...
    settle()
    scan = scan_tree(root)
    scan.started_ns = os.stat(root / "a.txt").st_mtime_ns  # the walk began in a.txt's tick
    build_raw_corpus(scan, [], index=IngestIndex(home, scan.root, max_file_bytes=1 << 20))
    stored = pq.read_table(index_dir(home, scan.root) / INDEX_FILE)["path"].to_pylist()
    assert stored == []  # ...but its ctime is as new as the walk: both are racy
    assert ingest(root, home).files_read == 2
    settle()
    assert ingest(root, home).files_read == 0


def test_file_replaced_by_symlink_and_symlink_retargeted(tree, home):
    root = tree({"a.txt": "alpha\n", "b.txt": "beta\n", "c.txt": "gamma\n"})
    settle()
    ingest(root, home)
    (root / "a.txt").unlink()
    (root / "a.txt").symlink_to("c.txt")
    result = ingest(root, home)
    assert result.table["text"].to_pylist() == ["gamma\n", "beta\n", "gamma\n"]
    assert result.files_read == 1
    settle()
    (root / "a.txt").unlink()
    (root / "a.txt").symlink_to("b.txt")
    result = ingest(root, home)
    assert result.table["text"].to_pylist() == ["beta\n", "beta\n", "gamma\n"] and result.files_read == 1


def test_settings_change_rebuilds_and_full_rescan_reads_everything(tree, home):
    root = tree({"a.txt": "alpha\n", "big.txt": "x" * 64})
    settle()
    ingest(root, home)
    smaller = ingest(root, home, max_file_bytes=32)
    assert smaller.files_read == 2 and smaller.skips["too_large"] == 1
    assert smaller.status == "ignored (settings, tools or source root changed), rebuilt"
    entropy = ingest(root, home, max_file_bytes=32, secret_entropy=True)
    assert entropy.files_read == 2
    settle()
    rescan = ingest(root, home, max_file_bytes=32, secret_entropy=True, full_rescan=True)
    assert rescan.files_read == 2 and rescan.status.startswith("full rescan")
    assert ingest(root, home, max_file_bytes=32, secret_entropy=True).files_read == 0


def test_secret_text_is_never_kept_and_scan_switch_reads_again(tree, home):
    root = tree({"a.txt": "alpha\n", "conf.txt": f"token = {FAKE_TOKEN}\n"})
    settle()
    assert ingest(root, home).skips["secret"] == 1
    assert FAKE_TOKEN.encode() not in (index_dir(home, root.resolve()) / INDEX_FILE).read_bytes()
    assert ingest(root, home).files_read == 0
    (root / ".dlm").mkdir()
    (root / ".dlm" / "training.yaml").write_text(V1 + "scan_secrets: false\n")
    off = ingest(root, home)
    assert off.files_read == 1 and off.table["path"].to_pylist() == ["a.txt", "conf.txt"]
    (root / ".dlm" / "training.yaml").write_text(V1)
    on = ingest(root, home)  # the text is in the index now: scanned again without reading the file
    assert on.files_read == 0 and on.skips["secret"] == 1


def test_hostile_index_is_ignored_reported_and_rebuilt(tree, home, monkeypatch):
    root = tree({"a.txt": "alpha\n", "b.txt": "beta\n"})
    settle()
    ingest(root, home)
    path = index_dir(home, root.resolve()) / INDEX_FILE
    good = path.read_bytes()

    path.write_bytes(good[: len(good) // 2])
    assert ingest(root, home).status == "ignored (unreadable: ArrowInvalid), rebuilt"
    settle()
    pq.write_table(pa.table({"path": ["a.txt"]}), path)
    assert ingest(root, home).status == "ignored (not an index of this version), rebuilt"
    settle()
    ingest(root, home)
    table = pq.read_table(path)  # a text altered behind its content key is not trusted
    texts = [
        "tampered\n" if p == "a.txt" else t
        for p, t in zip(table["path"].to_pylist(), table["text"].to_pylist(), strict=True)
    ]
    pq.write_table(table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts)), path)
    tampered = ingest(root, home)
    assert tampered.files_read == 1 and tampered.table["text"].to_pylist() == ["alpha\n", "beta\n"]

    monkeypatch.setattr(ingest_index, "MAX_INDEX_BYTES", 10)
    assert ingest(root, home).status.startswith("ignored (")


def test_index_is_never_read_or_written_through_a_symlink(tree, home, tmp_path):
    root = tree({"a.txt": "alpha\n"})
    settle()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (home / ingest_index.INDEX_DIR).symlink_to(elsewhere)
    result = ingest(root, home)
    assert result.status == "ignored (a symlink or not a folder), rebuilt; not saved (a symlink or not a folder)"
    assert list(elsewhere.iterdir()) == []


def test_index_file_follows_the_umask(tree, home):
    root = tree({"a.txt": "alpha\n"})
    settle()
    old = os.umask(0o027)
    try:
        ingest(root, home)
    finally:
        os.umask(old)
    assert (index_dir(home, root.resolve()) / INDEX_FILE).stat().st_mode & 0o777 == 0o640


PERMISSION_RUNS = """
import json, os, sys
from dlm_pipeline.core.corpus import build_raw_corpus
from dlm_pipeline.core.ingest_index import IngestIndex
from dlm_pipeline.core.tree import scan_tree

def run():
    scan = scan_tree(sys.argv[1])
    result = build_raw_corpus(scan, [], index=IngestIndex(sys.argv[2], scan.root, max_file_bytes=1 << 20))
    return [result.table["path"].to_pylist(), dict(result.skips), result.files_read]

locked = os.path.join(sys.argv[1], "b.txt")
runs = [run()]
os.chmod(locked, 0)
runs += [run(), run()]
os.chmod(locked, 0o644)
runs.append(run())
print(json.dumps(runs))
"""


def test_permission_changes_are_seen(tree, home):
    """chmod 000 makes a file unreadable (never cached: tried again each run), chmod back makes it
    text again. Root reads everything, so as root the runs go without the capabilities that bypass
    file permissions (in one process: it may still chmod the files it owns)."""
    prefix = without_permission_override()
    root = tree({"a.txt": "alpha\n", "b.txt": "beta\n"})
    settle()
    command = [*prefix, sys.executable, "-c", PERMISSION_RUNS, str(root), str(home)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [
        [["a.txt", "b.txt"], {}, 2],
        [["a.txt"], {"unreadable": 1}, 1],
        [["a.txt"], {"unreadable": 1}, 1],
        [["a.txt", "b.txt"], {}, 1],
    ]


def _run_in_child(root, home) -> None:
    scan = scan_tree(root)
    build_raw_corpus(scan, [], index=IngestIndex(home, scan.root, max_file_bytes=1 << 20))


def test_concurrent_runs_leave_a_whole_index(tree, home):
    """Four runs at once in four processes (as seeds in parallel): each replaces the index
    atomically, none tears it."""
    import multiprocessing

    root = tree({f"d{i}/f{j}.txt": f"{i} {j}\n" * 50 for i in range(10) for j in range(20)})
    settle()
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_run_in_child, args=(root, home)) for _ in range(4)]
    for child in children:
        child.start()
    for child in children:
        child.join()
    assert [child.exitcode for child in children] == [0] * 4
    after = ingest(root, home)
    assert after.status == "used (200 entries)" and after.files_read == 0


def test_raw_corpus_asset_reads_only_changes_and_full_rescan_gives_the_same_bytes(pipeline, tree):
    root = tree({"a.txt": "alpha\n", "b.md": "beta\n", "c.txt": "gamma\n"})
    settle()
    pipe = pipeline(root)
    assert pipe.run("1").success
    cold = pipe.metadata("raw_corpus", "1")
    assert (cold["files_read"], cold["files_from_index"]) == (3, 0)
    assert pipe.run("1").success
    metadata = pipe.metadata("raw_corpus", "1")
    # Nothing is read again: through the index, or (when the first run's stats were old enough to
    # trust, as on a loaded machine) by reusing that run's output whole.
    assert metadata["files_read"] == 0
    if "reused_from_seed" in metadata:
        assert (metadata["files_from_index"], metadata["ingest_index"]) == (0, "not needed: reused from seed 1")
    else:
        assert (metadata["files_from_index"], metadata["ingest_index"]) == (3, "used (3 entries)")
    incremental = pipe.output("raw_corpus", "1").read_bytes()
    assert pipeline(root, full_rescan=True).run("1").success
    assert pipe.metadata("raw_corpus", "1")["files_read"] == 3
    assert pipe.output("raw_corpus", "1").read_bytes() == incremental


def test_cli_full_rescan_flag_and_variable(tree, tmp_path, monkeypatch):
    """The second materialize reads every file again only because of --full-rescan (else none)."""
    import dagster as dg

    from dlm_pipeline import settings
    from dlm_pipeline.cli import main

    root = tree({"a.txt": "alpha\n", "b.txt": "beta\n"})
    settle()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    for name in [v for v in os.environ if v.startswith("DLM_")] + [settings.ENV_FULL_RESCAN]:
        monkeypatch.setenv(name, "")  # monkeypatch then also removes what the CLI's flags set
        monkeypatch.delenv(name)
    for flags in ([], ["--full-rescan"]):
        assert main(["materialize", "--source", str(root), *flags]) == 0
    with dg.DagsterInstance.get() as instance:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("raw_corpus"), asset_partitions=["0"]), limit=2
        ).records
        assert [r.asset_materialization.metadata["files_read"].value for r in records] == [2, 2]  # else [0, 2]
    monkeypatch.setenv(settings.ENV_FULL_RESCAN, "maybe")
    assert main(["materialize", "--source", str(root)]) == 2
