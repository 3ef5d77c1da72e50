"""Tree walk, inclusion rules and tags on real files: nested anchors, negation, symlinks, odd files."""

from __future__ import annotations

import os

import pytest

from dlm_pipeline.core.config_records import anchors_from_table, load_configs, records_table
from dlm_pipeline.core.corpus import build_raw_corpus, normalise_text, section_id
from dlm_pipeline.core.tree import SourceTreeError, scan_tree

V1 = "dlm_training_version: 1\n"


def corpus(root, **kwargs):
    scan = scan_tree(root)
    table = records_table(load_configs(scan))
    return build_raw_corpus(scan, anchors_from_table(table), **kwargs)


def paths(root, **kwargs):
    return corpus(root, **kwargs).table["path"].to_pylist()


def test_tree_without_anchor_takes_every_text_file_minus_defaults(tree):
    root = tree(
        {
            "a.py": "x = 1\n",
            "docs/b.md": "# b\n",
            ".git/config": "[core]\n",
            "node_modules/x/index.js": "1\n",
            "pkg/__pycache__/m.cpython-311.pyc": b"\x00\x01",
            "build/out.py": "1\n",
            "dist/x.txt": "1\n",
            ".venv/lib.py": "1\n",
            "venv/lib.py": "1\n",
            "poetry.lock": "x\n",
            "package-lock.json": "{}\n",
            ".env": "SECRET=1\n",
            ".env.local": "SECRET=1\n",
            "certs/server.pem": "---\n",
            "certs/server.key": "---\n",
            "id_rsa": "---\n",
            "id_rsa.pub": "ssh-rsa\n",
            "store.p12": "x\n",
            "logo.png": "not really png\n",
        }
    )
    assert paths(root) == ["a.py", "docs/b.md"]


def test_empty_tree(tree):
    result = corpus(tree({}))
    assert result.table.num_rows == 0
    assert sum(result.skips.values()) == 0


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(SourceTreeError, match="does not exist; set DLM_SOURCE_ROOT"):
        scan_tree(tmp_path / "nope")


def test_root_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SourceTreeError, match="is not a directory"):
        scan_tree(tmp_path / "f")


def test_include_exclude_relative_to_anchor(tree):
    root = tree(
        {
            ".dlm/training.yaml": V1 + 'include: ["**/*.py"]\n',
            "a.py": "1\n",
            "a.md": "1\n",
            "sub/.dlm/training.yaml": V1 + 'exclude: ["test_*.py", "gen/**"]\n',
            "sub/x.py": "1\n",
            "sub/test_x.py": "1\n",
            "sub/deep/test_y.py": "1\n",
            "sub/gen/z.py": "1\n",
            "other/gen/z.py": "1\n",
        }
    )
    # `test_*.py` has no slash, so (gitignore-style) it matches at any depth below the anchor.
    assert paths(root) == ["a.py", "other/gen/z.py", "sub/x.py"]


def test_deeper_include_readmits_what_a_shallower_rule_excluded(tree):
    root = tree(
        {
            ".dlm/training.yaml": V1 + 'exclude: ["docs/**"]\n',
            "docs/.dlm/training.yaml": V1 + 'include: ["api/**"]\n',
            "docs/api/a.md": "1\n",
            "docs/guide.md": "1\n",
            "x.md": "1\n",
        }
    )
    assert paths(root) == ["docs/api/a.md", "x.md"]


def test_ignore_negation_and_last_match_wins(tree):
    root = tree(
        {
            ".dlm/ignore": "*.log\n!keep.log\nsecret/\n",
            "a.log": "1\n",
            "keep.log": "1\n",
            "sub/b.log": "1\n",
            "sub/keep.log": "1\n",
            "secret/s.txt": "1\n",
            "main.txt": "1\n",
            "sub/.dlm/ignore": "!b.log\n",
        }
    )
    assert paths(root) == ["keep.log", "main.txt", "sub/b.log", "sub/keep.log"]


def test_deeper_ignore_negation_readmits_a_root_include_miss(tree):
    root = tree(
        {
            ".dlm/training.yaml": V1 + 'include: ["*.py"]\n',
            "notes/.dlm/ignore": "*\n!*.md\n",
            "notes/a.md": "1\n",
            "notes/b.txt": "1\n",
            "x.py": "1\n",
        }
    )
    assert paths(root) == ["notes/a.md", "x.py"]


def test_default_excludes_are_final_and_can_be_switched_off(tree):
    root = tree(
        {
            ".dlm/training.yaml": V1 + 'include: ["**"]\n',
            "build/a.py": "1\n",
            "vendor/.dlm/training.yaml": V1 + "exclude_defaults: false\n",
            "vendor/build/b.py": "1\n",
            "vendor/deep/.dlm/training.yaml": V1 + "exclude_defaults: true\n",
            "vendor/deep/build/c.py": "1\n",
            "vendor/deep/d.py": "1\n",
        }
    )
    found = paths(root)
    assert "build/a.py" not in found
    assert "vendor/build/b.py" in found
    assert "vendor/deep/build/c.py" not in found
    assert "vendor/deep/d.py" in found


def test_tags_merge_shallowest_to_deepest_and_are_sorted(tree):
    root = tree(
        {
            ".dlm/training.yaml": V1 + "metadata: {z: root, lang: text, generated: false}\n",
            "a.txt": "1\n",
            "src/.dlm/training.yaml": V1 + "metadata: {lang: python}\n",
            "src/gen/.dlm/training.yaml": V1 + "metadata: {generated: true}\n",
            "src/gen/b.py": "1\n",
        }
    )
    rows = corpus(root).table.to_pylist()
    assert rows[0]["tags"] == [("generated", "false"), ("lang", "text"), ("z", "root")]
    assert rows[1]["tags"] == [("generated", "true"), ("lang", "python"), ("z", "root")]


def test_rows_are_ordered_by_utf8_bytes_of_the_path(tree):
    root = tree({"b.txt": "1", "a/z.txt": "1", "a-b.txt": "1", "é.txt": "1", "Z.txt": "1", "a.txt": "1"})
    found = paths(root)
    assert found == sorted(found, key=lambda p: p.encode())
    assert found == ["Z.txt", "a-b.txt", "a.txt", "a/z.txt", "b.txt", "é.txt"]


def test_text_normalisation_and_section_id(tree):
    root = tree({"w.txt": b"\xef\xbb\xbfline1\r\nline2\rline3\n"})
    row = corpus(root).table.to_pylist()[0]
    assert row["text"] == "line1\nline2\nline3\n"
    assert row["section_id"] == section_id("w.txt", "line1\nline2\nline3\n")
    import hashlib

    expected = hashlib.sha256(b"prose\n# source: w.txt\n\nline1\nline2\nline3\n").hexdigest()[:16]
    assert row["section_id"] == expected
    assert normalise_text(b"a\r\r\nb") == "a\n\nb"


def test_binary_encoding_and_size_skips_are_counted(tree):
    root = tree(
        {
            "ok.txt": "fine\n",
            "nul.txt": b"abc\x00def",
            "late_nul.txt": b"a" * 9000 + b"\x00",
            "latin1.txt": b"caf\xe9\n",
            "big.txt": "x" * 20000,
        }
    )
    result = corpus(root, max_file_bytes=10000)
    assert result.table["path"].to_pylist() == ["late_nul.txt", "ok.txt"]
    assert result.skips == {"binary": 1, "encoding": 1, "too_large": 1}
    assert sorted(result.skipped) == [("big.txt", "too_large"), ("latin1.txt", "encoding"), ("nul.txt", "binary")]


def test_symlinks_inside_followed_outside_skipped_loops_terminate(tree, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret\n")
    root = tree({"real/a.txt": "inside\n", "sub/b.txt": "b\n"})
    os.symlink(root / "real" / "a.txt", root / "link_in.txt")
    os.symlink(outside, root / "link_out.txt")
    os.symlink(root / "missing", root / "dangling.txt")
    os.symlink(root, root / "sub" / "loop")  # directory loop
    os.symlink("../..", root / "real" / "up")
    result = corpus(root)
    assert result.table["path"].to_pylist() == ["link_in.txt", "real/a.txt", "sub/b.txt"]
    assert result.table["text"].to_pylist()[0] == "inside\n"
    assert result.skips["symlink_escape"] == 1
    assert result.skips["broken_symlink"] == 1
    assert result.skips["symlink_dir"] == 2


UNREADABLE_SCAN = """
import json, sys
from dlm_pipeline.core.corpus import build_raw_corpus
from dlm_pipeline.core.tree import scan_tree
result = build_raw_corpus(scan_tree(sys.argv[1]), [])
print(json.dumps({"paths": result.table["path"].to_pylist(), "skips": dict(result.skips)}))
"""


def test_unreadable_files_and_dirs_are_counted(tree):
    """A file and a folder the scanning process may not read. Root reads everything, so as root
    the scan runs without the capabilities that bypass file permissions."""
    import json
    import subprocess
    import sys

    from conftest import without_permission_override  # here: other processes import this module by path

    without_override = without_permission_override()
    root = tree({"a.txt": "1", "b.txt": "2", "locked/c.txt": "3"})
    (root / "b.txt").chmod(0)
    (root / "locked").chmod(0)
    try:
        done = subprocess.run(
            [*without_override, sys.executable, "-c", UNREADABLE_SCAN, str(root)],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        (root / "locked").chmod(0o755)
    result = json.loads(done.stdout)
    assert result["paths"] == ["a.txt"]
    assert result["skips"] == {"unreadable": 1, "unreadable_dir": 1}


def test_fifo_is_skipped_not_read(tree):
    root = tree({"a.txt": "1"})
    os.mkfifo(root / "pipe.txt")
    result = corpus(root)
    assert result.table["path"].to_pylist() == ["a.txt"]
    assert result.skips["not_regular"] == 1


def test_non_utf8_file_name_is_counted(tree):
    root = tree({"a.txt": "1"})
    with open(os.path.join(os.fsencode(root), b"bad\xff.txt"), "wb") as fh:
        fh.write(b"x")
    result = corpus(root)
    assert result.table["path"].to_pylist() == ["a.txt"]
    assert result.skips["bad_filename"] == 1


def test_file_vanishing_after_the_walk_is_counted(tree):
    root = tree({"a.txt": "1", "b.txt": "2"})
    scan = scan_tree(root)
    (root / "b.txt").unlink()
    result = build_raw_corpus(scan, [])
    assert result.table["path"].to_pylist() == ["a.txt"]
    assert result.skips["vanished"] == 1


def test_walk_order_does_not_depend_on_creation_order(tmp_path):
    from conftest import write_tree

    names = [f"d{i % 7}/f{i}.txt" for i in range(60)]
    a = write_tree(tmp_path / "a", {n: n for n in names})
    b = write_tree(tmp_path / "b", {n: n for n in reversed(names)})
    assert paths(a) == paths(b)
    assert corpus(a).table.equals(corpus(b).table)


def test_config_lookalike_and_symlinked_anchor_are_reported(tree, tmp_path):
    root = tree({"a/.dlm/training.yml": V1, "a/x.txt": "1"})
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / ".dlm")
    records = load_configs(scan_tree(root))
    errors = {r.path: r.error for r in records if r.status == "error"}
    assert "must be named exactly training.yaml" in errors["a/.dlm/training.yml"]
    assert ".dlm is a symlink" in errors[".dlm"]


def test_config_records_carry_status_error_and_sha256(tree):
    import hashlib

    root = tree(
        {".dlm/training.yaml": V1, "bad/.dlm/training.yaml": "dlm_training_version: 9\n", "bad/.dlm/ignore": "*.tmp\n"}
    )
    records = {r.path: r for r in load_configs(scan_tree(root))}
    ok = records[".dlm/training.yaml"]
    assert (ok.anchor, ok.kind, ok.status, ok.error) == (".", "training.yaml", "ok", None)
    assert ok.sha256 == hashlib.sha256(V1.encode()).hexdigest()
    bad = records["bad/.dlm/training.yaml"]
    assert bad.status == "error" and bad.anchor == "bad"
    assert bad.error.startswith("bad/.dlm/training.yaml:1: dlm_training_version: only version 1")
    assert records["bad/.dlm/ignore"].status == "ok"
    with pytest.raises(ValueError, match="invalid configs must be fixed first"):
        anchors_from_table(records_table(list(records.values())))


def test_non_utf8_config_is_an_error(tree):
    root = tree({".dlm/training.yaml": b"dlm_training_version: 1\nmetadata: {a: caf\xe9}\n"})
    (record,) = load_configs(scan_tree(root))
    assert record.status == "error" and "not UTF-8" in record.error


def test_fifo_configs_are_errors_not_hangs(tree):
    root = tree({"a.txt": "1"})
    (root / ".dlm").mkdir()
    os.mkfifo(root / ".dlm" / "training.yaml")
    (root / "sub" / ".dlm").mkdir(parents=True)
    os.mkfifo(root / "sub" / ".dlm" / "ignore")
    records = {r.path: r for r in load_configs(scan_tree(root))}
    assert "not a regular file" in records[".dlm/training.yaml"].error
    assert "not a regular file" in records["sub/.dlm/ignore"].error


def test_config_that_is_a_directory_is_an_error(tree):
    root = tree({".dlm/training.yaml/oops.txt": "x"})
    (record,) = load_configs(scan_tree(root))
    assert record.status == "error" and "not a regular file" in record.error


def test_config_only_walk_finds_the_same_configs_and_no_files(tree, tmp_path):
    root = tree({".dlm/training.yaml": V1, "a/b/.dlm/ignore": "*.tmp\n", "a/b/c.txt": "1", "x/.dlm/training.yml": V1})
    os.symlink(tmp_path, root / "a" / ".dlm")
    full, light = scan_tree(root), scan_tree(root, files=False)
    assert light.config_files == full.config_files and len(light.config_files) == 4
    assert light.files == [] and full.files


def test_a_regular_file_named_dlm_is_a_config_error_not_a_row(tree):
    root = tree({".dlm/training.yaml": V1, "pkg/.dlm": "dlm_training_version: 1\n", "pkg/a.py": "1\n"})
    for files in (True, False):
        records = load_configs(scan_tree(root, files=files))
        errors = [r.error for r in records if r.status == "error"]
        assert errors == [
            "pkg/.dlm: is a file; an anchor is a folder .dlm/ holding training.yaml (rename or remove it)"
        ]
    assert "pkg/.dlm" not in [f.path for f in scan_tree(root).files]


def _deep_tree(root, depth: int, name: str = "d" * 200, config: bool = True) -> str:
    """`depth` nested folders below root, built with directory descriptors (the path outgrows PATH_MAX)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        if config:
            os.mkdir(".dlm", dir_fd=fd)
            file = os.open(".dlm/training.yaml", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
            os.write(file, b"dlm_training_version: 1\n")
            os.close(file)
    finally:
        os.close(fd)
    return "/".join([name] * depth)


def test_config_deeper_than_path_max_is_reported_not_missed(tree):
    root = tree({"a.py": "1\n"})
    depth = os.pathconf("/", "PC_PATH_MAX") // 201 + 2
    deep = _deep_tree(root, depth)
    records = load_configs(scan_tree(root, files=False))
    errors = [r for r in records if r.status == "error"]
    assert len(errors) == 1 and "longer than PATH_MAX" in errors[0].error
    assert deep.startswith(errors[0].path) and errors[0].error.startswith(errors[0].path + ": holds a .dlm/ folder")


def test_too_long_folder_without_configs_is_only_counted(tree):
    root = tree({"a.py": "1\n"})
    depth = os.pathconf("/", "PC_PATH_MAX") // 201 + 2
    _deep_tree(root, depth, config=False)
    scan = scan_tree(root)
    assert scan.config_files == [] and scan.skips["unreadable_dir"] == 1


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        (".ENV", True),  # credentials and binary media: in any case
        ("keys/PROD.PEM", True),
        ("img/LOGO.PNG", True),
        ("Build/main.py", False),  # folders and lockfiles: as git matches them (SPEC §1's `build/`)
        ("Dist/setup.py", False),
        ("Target/lib.rs", False),
        ("NODE_MODULES/x.js", False),
        ("Poetry.LOCK", False),
        ("build/main.py", True),
        ("poetry.lock", True),
    ],
)
def test_credential_and_media_defaults_match_in_any_case_folders_and_lockfiles_as_git_does(path, excluded):
    from dlm_pipeline.core.rules import is_default_excluded

    assert is_default_excluded(path) is excluded
