"""Red-team regressions for issue 9: hostile inputs found after the first round of fixes."""

from __future__ import annotations

import os
import re

import pathspec.pattern
import pytest
from conftest import dlm

from dlm_pipeline.core.globs import GlobSet
from dlm_pipeline.core.safe_read import read_regular_file
from dlm_pipeline.core.secrets import secret_scanner


@pytest.mark.parametrize(
    "text",
    [
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIFHDBOBgkqhkiG9w0BBQ0w\n-----END ENCRYPTED PRIVATE KEY-----\n",
        "Server=tcp:x.database.windows.net;Database=db;User ID=sa;Password=Hunter2isMine;\n",
        "jdbc:mysql://db.example.com:3306/app?user=root&password=Hunter2isMine\n",
        "GH=github_pat_11ABCDEFG0abcdefghij_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456\n",
        'key = "AIzaSyD0123456789abcdefghijklmnopqrstuv"\n',
        "HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyzABCDEFGH\n",
    ],
)
def test_credentials_detect_secrets_misses_are_found(text):
    assert secret_scanner().findings(text)


@pytest.mark.parametrize(
    "text",
    [
        "password = input()\n",
        "pwd = os.getcwd()\n",
        "connect(host, password=pw)\n",
        "url = '/login?password=<yours>'\n",
    ],
)
def test_ordinary_code_about_passwords_is_not_a_finding(text):
    assert secret_scanner().findings(text) == []


def test_a_glob_set_is_built_without_compiling_python_regexes(monkeypatch):
    """Matching is re2's; compiling every pattern with `re` too cost 7 s for a 20,000-line ignore file."""
    calls = []
    real = re.compile
    monkeypatch.setattr(pathspec.pattern.re, "compile", lambda *a, **k: calls.append(a) or real(*a, **k))
    spec = GlobSet([f"*.ext{i}" for i in range(300)] + ["!keep.ext7", "d/"])
    assert calls == []
    assert spec.check("a/b.ext7") is True and spec.check("keep.ext7") is False and spec.check("x/d/y") is True


def test_a_large_file_limit_does_not_allocate_the_limit(tmp_path):
    """read(n) allocates n bytes up front: DLM_MAX_FILE_BYTES=1e15 made every small file a MemoryError."""
    small = tmp_path / "small.txt"
    small.write_bytes(b"hello\n")
    assert read_regular_file(str(small), 10**15) == b"hello\n"
    assert read_regular_file(str(small), 2**63) == b"hello\n"


@pytest.mark.parametrize(
    "args, env",
    [
        ((), {"DLM_MAX_SEQ_LEN": str(10**30)}),
        ((), {"DLM_MAX_SEQ_LEN": str(2**31)}),
        (("--max-seq-len", str(10**30)), {}),
    ],
)
def test_a_huge_max_seq_len_is_refused_before_any_run(tmp_path, args, env):
    done = dlm(["materialize", *args], tmp_path / "home", **env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "OverflowError" not in done.stderr
    assert "2147483647" in done.stderr
    assert not (tmp_path / "home" / "history").exists()  # refused before the instance was touched


def test_merged_tags_of_nested_anchors_are_capped(tmp_path):
    """Nested anchors of 64 tags each gave every row 64 × depth tags (40 levels, 1,000 files: 4.7 GB)."""
    from dlm_pipeline.core.config import MAX_METADATA_KEYS

    folder = tmp_path / "src"
    for level in range(2):
        (folder / ".dlm").mkdir(parents=True)
        tags = ", ".join(f"L{level}k{i}: v" for i in range(MAX_METADATA_KEYS))
        (folder / ".dlm" / "training.yaml").write_text(f"dlm_training_version: 1\nmetadata: {{{tags}}}\n")
        folder = folder / f"n{level}"
    folder.mkdir()
    (folder / "a.py").write_text("x = 1\n")
    done = dlm(["validate", "--source", str(tmp_path / "src")], None)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "n0/.dlm/training.yaml: metadata: with its ancestors' tags" in done.stderr


def test_merged_tags_up_to_the_cap_are_valid(tree):
    from dlm_pipeline.core.config import MAX_METADATA_KEYS
    from dlm_pipeline.core.config_records import load_configs
    from dlm_pipeline.core.tree import scan_tree

    half = MAX_METADATA_KEYS // 2
    root = tree(
        {
            ".dlm/training.yaml": "dlm_training_version: 1\nmetadata: {"
            + ", ".join(f"a{i}: v" for i in range(half))
            + "}\n",
            "n/.dlm/training.yaml": "dlm_training_version: 1\nmetadata: {"
            + ", ".join(f"b{i}: v" for i in range(MAX_METADATA_KEYS - half))
            + ", a0: w}\n",
        }
    )
    assert [r.status for r in load_configs(scan_tree(root))] == ["ok", "ok"]


def test_a_symlink_never_readmits_a_default_excluded_file(tmp_path):
    """`notes.txt -> .netrc` put the credential file into the corpus under the link's name."""
    from dlm_pipeline.core.config_records import anchors_from_table, load_configs, records_table
    from dlm_pipeline.core.corpus import build_raw_corpus
    from dlm_pipeline.core.tree import scan_tree

    (tmp_path / ".dlm").mkdir()
    (tmp_path / ".dlm" / "training.yaml").write_text("dlm_training_version: 1\n")
    (tmp_path / ".netrc").write_text("machine example.com login bob password hunter2\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("[remote]\n")
    (tmp_path / "real.txt").write_text("ordinary text\n")
    (tmp_path / "notes.txt").symlink_to(".netrc")
    (tmp_path / "gitcfg.txt").symlink_to(".git/config")
    (tmp_path / "alias.txt").symlink_to("real.txt")
    scan = scan_tree(tmp_path)
    anchors = anchors_from_table(records_table(load_configs(scan)))
    assert build_raw_corpus(scan, anchors).table["path"].to_pylist() == ["alias.txt", "real.txt"]


@pytest.mark.parametrize("swap", ["file_to_symlink", "folder_to_symlink", "symlink_retargeted"])
def test_a_path_swapped_after_the_walk_is_never_read_outside_the_root(tmp_path, swap):
    """Between the walk and the read (locally or in a Ray task) a file, a folder or a symlink's
    target is swapped for a way out of the root: the file read must be the one the walk checked."""
    from dlm_pipeline.core.compute import read_batch
    from dlm_pipeline.core.corpus import build_raw_corpus
    from dlm_pipeline.core.ingest_index import IngestIndex
    from dlm_pipeline.core.tree import scan_tree

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "a.txt").write_text("PRIVATE, outside the root\n")
    (root / "sub" / "a.txt").write_text("inside\n")
    (root / "inside.txt").write_text("inside too\n")
    if swap == "symlink_retargeted":
        (root / "sub" / "link.txt").symlink_to(root / "inside.txt")
    scan = scan_tree(root)
    if swap == "file_to_symlink":
        (root / "sub" / "a.txt").unlink()
        (root / "sub" / "a.txt").symlink_to(outside / "a.txt")
    elif swap == "folder_to_symlink":
        (root / "sub").rename(root / "sub.old")
        (root / "sub").symlink_to(outside)
    else:
        (root / "sub" / "link.txt").unlink()
        (root / "sub" / "link.txt").symlink_to(outside / "a.txt")
    task = read_batch(str(root), [(f.path, f.stat, False) for f in scan.files], 4_096, False)
    texts = [entry.text for _, entry in task.entries if not isinstance(entry, tuple)]
    assert texts and not any("PRIVATE" in text for text in texts)
    index = IngestIndex(None, root, max_file_bytes=4_096)
    local = build_raw_corpus(scan, [], max_file_bytes=4_096, index=index)
    assert not any("PRIVATE" in text for text in local.table["text"].to_pylist())
    assert local.skips["vanished"] == 1


def test_the_source_sensor_never_keeps_an_unscanned_text_in_the_ingest_index(tmp_path):
    """The sensor needs only content keys: a text it read (not scanned for credentials) must not be
    written to the index file on disk, where a credential in it would sit until the next run."""
    import pyarrow.parquet as pq

    from dlm_pipeline.core.corpus import build_raw_corpus
    from dlm_pipeline.core.ingest_index import INDEX_FILE, IngestIndex, index_dir, source_fingerprint
    from dlm_pipeline.core.rules import PathRules
    from dlm_pipeline.core.tree import scan_tree

    home, root = tmp_path / "home", tmp_path / "root"
    home.mkdir()
    root.mkdir()
    (root / "leak.py").write_text("HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyzABCDEFGH\n")
    (root / "ok.py").write_text("x = 1\n")
    scan = scan_tree(root)
    scan.started_ns += 10**10  # no entry is racy
    index = IngestIndex(home, scan.root, max_file_bytes=4_096)
    source_fingerprint(scan, PathRules([]), index)
    stored = pq.read_table(index_dir(home, scan.root) / INDEX_FILE)
    assert stored.num_rows == 2 and not any("hf_" in (t or "") for t in stored["text"].to_pylist())
    again = IngestIndex(home, scan.root, max_file_bytes=4_096)
    raw = build_raw_corpus(scan, [], max_file_bytes=4_096, index=again)
    assert raw.table["path"].to_pylist() == ["ok.py"] and raw.skips["secret"] == 1


def test_an_ingest_index_save_killed_mid_write_leaves_no_lasting_temp_file(tmp_path):
    """A run killed while saving the ingest index leaves `.index.parquet.<hex>.tmp` (a whole index);
    the next save deletes it once no writer touched it for an hour, and never a fresh one."""
    import time

    from dlm_pipeline.core.corpus import build_raw_corpus
    from dlm_pipeline.core.ingest_index import INDEX_FILE, IngestIndex, index_dir
    from dlm_pipeline.core.tree import scan_tree

    home, root = tmp_path / "home", tmp_path / "root"
    root.mkdir()
    (root / "a.py").write_text("x = 1\n")
    scan = scan_tree(root)
    folder = index_dir(home, scan.root)
    folder.mkdir(parents=True)
    stale, fresh = (folder / f".{INDEX_FILE}.{h * 16}.tmp" for h in "ab")
    for path in (stale, fresh):
        path.write_bytes(b"killed mid-save")
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    build_raw_corpus(scan, [], max_file_bytes=4_096, index=IngestIndex(home, scan.root, max_file_bytes=4_096))
    assert (folder / INDEX_FILE).exists() and not stale.exists() and fresh.exists()
