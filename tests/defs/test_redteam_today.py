"""Hostile inputs against today's changes (the seed lock, dependencies read from the stored files,
the dataset checks): each gives one clear line, never a traceback from deep inside."""

from __future__ import annotations

import json
import os
import shutil

import dagster as dg
import pyarrow.parquet as pq
import pytest
from conftest import check_evaluations

from dlm_pipeline.core.fingerprint import parquet_fingerprint
from dlm_pipeline.defs.constants import (
    CORPUS_JOB,
    FULL_RESCAN_TAG,
    PACKING_CONSERVES_TOKENS,
    SPLIT_IS_LEAK_FREE,
    TOKENS_MATCH_TOKENIZER,
)
from dlm_pipeline.defs.partitions import SEEDS_PARTITION
from dlm_pipeline.defs.resources import DatasetResource

FILES = {
    ".dlm/training.yaml": "dlm_training_version: 1\nmetadata: {lang: py}\nweights: {lang: {py: 2.5}}\n",
    **{f"src/m{i}.py": f"x_{i} = {i}\n" * (1 + i) for i in range(12)},
}


@pytest.fixture
def built(tree, pipeline):
    pipe = pipeline(tree(FILES), max_seq_len=64, dataset=DatasetResource(val_fraction=0.3))
    assert pipe.run("0").success
    return pipe


def _step_failures(result) -> list:
    return [e.step_failure_data for e in result.all_events if e.event_type_value == "STEP_FAILURE"]


@pytest.mark.parametrize("fault", ["garbled", "column missing", "empty row group"])
def test_a_hand_made_sequence_file_fails_the_packing_check_in_one_line_not_the_step(built, fault):
    path = built.out / "training_dataset" / "0" / "train.parquet"
    table = pq.read_table(path)
    if fault == "garbled":
        path.write_bytes(b"not a parquet file " * 10)
    elif fault == "column missing":
        pq.write_table(table.drop_columns(["doc_starts"]), path)
    else:  # the same sequences, after a row group of none
        with pq.ParquetWriter(path, table.schema) as writer:
            writer.write_table(table.slice(0, 0))
            writer.write_table(table)
    result = built.run_checks("0", SPLIT_IS_LEAK_FREE, PACKING_CONSERVES_TOKENS)
    assert _step_failures(result) == []
    evaluations = check_evaluations(result)
    packing = evaluations[PACKING_CONSERVES_TOKENS]
    if fault == "empty row group":
        assert packing.passed, packing.description
    else:
        assert not packing.passed
        assert packing.description.startswith("train: train.parquet is not a sequence file the pipeline wrote (")
        assert "\n" not in packing.description
    assert evaluations[SPLIT_IS_LEAK_FREE].passed  # the Megatron files are intact


@pytest.mark.parametrize(
    ("upstream", "column", "downstream"),
    [("weights_map", "weight", "expanded_corpus"), ("training_configs", "config", "weights_map")],
)
def test_an_upstream_output_lacking_a_column_fails_its_reader_in_one_line(built, upstream, column, downstream):
    """Read as a dependency, whole: the columns it must have are checked like an input's were."""
    path = built.output(upstream, "0")
    table = pq.read_table(path)
    os.unlink(path)  # its bytes may be shared with other seeds (a hard link): a file of its own
    pq.write_table(table.drop_columns([column]), path)
    job = built.defs.resolve_job_def(CORPUS_JOB).get_subset(asset_selection={dg.AssetKey(downstream)})
    result = job.execute_in_process(instance=built.instance, partition_key="0", raise_on_error=False)
    (failure,) = _step_failures(result)
    assert failure.user_failure_data is not None, failure.error.to_string()
    assert failure.user_failure_data.description == (
        f"{path} is not a {upstream} output the pipeline wrote (it has no column {column!r}): "
        f"re-materialize {upstream} for seed 0"
    )


@pytest.mark.parametrize("planted", ["fifo manifest", "fifo index", "symlinked folder"])
def test_a_dataset_folder_holding_a_fifo_or_a_symlink_fails_the_checks_instead_of_hanging(built, tmp_path, planted):
    folder = built.out / "training_dataset" / "0"
    if planted == "symlinked folder":
        moved = tmp_path / "moved"
        folder.rename(moved)
        folder.symlink_to(moved)
        expected = f"{folder} is a symlink, not a folder the pipeline wrote"
    else:
        name = "dataset.json" if planted == "fifo manifest" else "train.idx"
        (folder / name).unlink()
        os.mkfifo(folder / name)  # a reader would block on it for ever
        expected = f"{folder / name} is not a regular file"
    result = built.run_checks("0", SPLIT_IS_LEAK_FREE, PACKING_CONSERVES_TOKENS)
    assert _step_failures(result) == []
    for evaluation in check_evaluations(result).values():
        assert not evaluation.passed and evaluation.description.startswith(expected), evaluation.description


@pytest.mark.parametrize("check", [TOKENS_MATCH_TOKENIZER, PACKING_CONSERVES_TOKENS])
def test_a_check_of_a_hostile_partition_key_reads_nothing_outside_the_output_folder(built, tmp_path, check):
    """A key added by hand in the UI can be a path: `../../escape` would name files beside the output folder."""
    key = "../../escape"
    shutil.copy(built.output("tokenized_cache", "0"), tmp_path / "escape.parquet")
    shutil.copytree(built.out / "training_dataset" / "0", tmp_path / "escape")
    built.instance.add_dynamic_partitions(SEEDS_PARTITION, [key])
    assert (built.out / "tokenized_cache" / f"{key}.parquet").resolve() == tmp_path / "escape.parquet"
    (failure,) = _step_failures(built.run_checks(key, check))
    assert "is not a canonical non-negative decimal integer" in failure.user_failure_data.description


def test_lineage_names_the_input_file_read_not_the_record_of_a_file_rewritten_since(built):
    """An upstream output rewritten by hand, then its downstream run alone: the recorded input
    fingerprint is that of the file the step read (it computes: the input is not what was recorded)."""
    path = built.output("raw_corpus", "0")
    recorded = built.metadata("raw_corpus", "0")["fingerprint"]
    assert parquet_fingerprint(path) == recorded  # the file as written: its record is trusted
    table = pq.read_table(path)
    os.unlink(path)
    pq.write_table(table.slice(1), path)
    job = built.defs.resolve_job_def(CORPUS_JOB).get_subset(asset_selection={dg.AssetKey("expanded_corpus")})
    assert job.execute_in_process(instance=built.instance, partition_key="0").success
    meta = built.metadata("expanded_corpus", "0")
    assert meta["input_fingerprint/raw_corpus"] == parquet_fingerprint(path) != recorded


@pytest.mark.parametrize(
    ("field", "value"),
    [("seq_len", None), ("eos_id", 1 << 70), ("dtype", "float7"), ("val_fraction", "x"), ("splits", {"train": 3})],
)
def test_a_hand_edited_manifest_fails_the_dataset_checks_in_one_line(built, field, value):
    path = built.out / "training_dataset" / "0" / "dataset.json"
    manifest = json.loads(path.read_text())
    if value is None:
        del manifest[field]
    else:
        manifest[field] = value
    path.write_text(json.dumps(manifest))
    result = built.run_checks("0", SPLIT_IS_LEAK_FREE, PACKING_CONSERVES_TOKENS)
    assert _step_failures(result) == []
    for evaluation in check_evaluations(result).values():
        assert not evaluation.passed
        assert (
            evaluation.description
            == f"{path}: {field} is not what the pipeline writes: re-materialize training_dataset"
        )


def test_a_huge_full_rescan_tag_is_quoted_in_part(tree, pipeline):
    """A tag typed (or pasted) in the UI can be any length: the Failure line quotes its start only."""
    pipe = pipeline(tree(FILES), max_seq_len=64)
    pipe.instance.add_dynamic_partitions(SEEDS_PARTITION, ["1"])
    job = pipe.defs.resolve_job_def(CORPUS_JOB)
    result = job.execute_in_process(
        instance=pipe.instance, partition_key="1", tags={FULL_RESCAN_TAG: "maybe" * 20_000}, raise_on_error=False
    )
    descriptions = [f.user_failure_data.description for f in _step_failures(result)]
    assert descriptions and all(len(d) < 200 and "got 'maybemaybe" in d for d in descriptions), descriptions[:1]
