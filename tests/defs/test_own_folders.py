"""The pipeline never ingests its own artefacts (issue 9 item 5): instance, outputs and token store
inside the source root are passed over whole, whatever the configs say, and reported once."""

from __future__ import annotations

import dagster as dg
import pyarrow.parquet as pq
from conftest import dlm

from dlm_pipeline.core.tree import scan_tree


def test_three_cli_runs_with_every_own_folder_inside_the_source_root_give_the_same_rows(tree):
    root = tree(
        {
            ".dlm/training.yaml": "dlm_training_version: 1\nexclude_defaults: false\n",
            "a.py": "x = 1\n",
            "docs/b.md": "# b\n",
        }
    )
    home, out, cache = root / "dagster_home", root / "outputs", root / "tok"
    home.mkdir()
    env = dict(DLM_OUTPUT_DIR=str(out), DLM_CACHE_DIR=str(cache), DLM_SOURCE_ROOT=str(root))
    rows = []
    for _ in range(3):
        done = dlm(["materialize"], home, **env)
        assert done.returncode == 0, done.stdout + done.stderr
        rows.append(pq.read_table(out / "raw_corpus" / "0.parquet")["path"].to_pylist())
    assert rows[0] == rows[1] == rows[2] == [".dlm/training.yaml", "a.py", "docs/b.md"]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        records = instance.fetch_materializations(dg.AssetKey("raw_corpus"), limit=1).records
        metadata = records[0].asset_materialization.metadata
        assert metadata["own_folders_excluded"].value == ["dagster_home", "outputs", "tok"]
        assert metadata["skipped_total"].value == 0  # reported once, not as a skip per file


def test_own_folders_are_not_descended_and_listed_once(tree):
    root = tree({"a.py": "1\n", "home/logs/x.log": "1\n", "home/.dlm/training.yaml": "bad", "out/raw/0.txt": "1\n"})
    scan = scan_tree(root, exclude_dirs=[str(root / "home"), str(root / "out"), "/nowhere/else"])
    assert [f.path for f in scan.files] == ["a.py"]
    assert scan.config_files == []  # a config inside an own folder is not ours either
    assert scan.own_dirs == ["home", "out"]
    assert not scan.skipped


def test_own_folder_reached_through_a_symlinked_path_is_still_excluded(tree, tmp_path):
    root = tree({"a.py": "1\n", "store/m.json": "{}\n"})
    link = tmp_path / "link_to_root"
    link.symlink_to(root)
    scan = scan_tree(root, exclude_dirs=[str(link / "store")])
    assert [f.path for f in scan.files] == ["a.py"] and scan.own_dirs == ["store"]


def test_validate_passes_over_the_pipelines_own_folders(tree):
    """A broken config inside $DAGSTER_HOME or DLM_CACHE_DIR is not the user's: validate skips those folders."""
    bad = "dlm_training_version: 7\n"
    root = tree(
        {
            ".dlm/training.yaml": "dlm_training_version: 1\n",
            "home/storage/x/.dlm/training.yaml": bad,
            "tok/ns/.dlm/training.yaml": bad,
        }
    )
    done = dlm(["validate", "--source", str(root)], root / "home", DLM_CACHE_DIR=str(root / "tok"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 config file(s) valid, 0 invalid" in done.stdout
    done = dlm(["validate", "--source", str(root)], None)
    assert done.returncode == 1 and "2 invalid" in done.stdout, done.stdout + done.stderr
