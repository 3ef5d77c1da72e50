"""Expansion checks against a real instance, real files and real runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import EXAMPLE, check_evaluations

from dlm_pipeline.core.parquet_io import write_parquet_atomic
from dlm_pipeline.defs.constants import (
    CONFIG_CHANGE_SENSOR,
    EXPANSION_DETERMINISTIC,
    EXPANSION_MATCHES_WEIGHTS,
    NIGHTLY_SCHEDULE,
)
from dlm_pipeline.defs.partitions import SEEDS_PARTITION


@pytest.fixture
def watched(pipeline, tmp_path):
    root = shutil.copytree(EXAMPLE, tmp_path / "corpus")
    pipe = pipeline(root)
    pipe.instance.add_dynamic_partitions(SEEDS_PARTITION, ["0", "5", "12"])
    return pipe


def test_expansion_checks_pass_on_a_normal_run(watched):
    evaluations = check_evaluations(watched.run("5"))
    assert evaluations[EXPANSION_DETERMINISTIC].passed
    assert evaluations[EXPANSION_MATCHES_WEIGHTS].passed
    assert evaluations[EXPANSION_DETERMINISTIC].metadata["method"].value == "row by row (hashlib)"


@pytest.mark.parametrize("corruption", ["drop", "duplicate"])
def test_determinism_check_fails_on_a_corrupted_output(watched, corruption):
    assert watched.run("0").success
    path = watched.output("expanded_corpus", "0")
    table = pq.read_table(path)
    bad = table.slice(1) if corruption == "drop" else pq.read_table(path).take([0] + list(range(table.num_rows)))
    write_parquet_atomic(bad, path)
    evaluation = check_evaluations(watched.run_checks("0", EXPANSION_DETERMINISTIC))[EXPANSION_DETERMINISTIC]
    assert not evaluation.passed
    assert "stored rows differ from a recomputation" in evaluation.description
    assert evaluation.metadata["first_differing_row"].value == (0 if corruption == "drop" else 1)


def test_weights_check_fails_on_a_biased_expansion(tree, pipeline):
    files = {".dlm/training.yaml": "dlm_training_version: 1\nmetadata: {kind: x}\nweights: {kind: {x: 0.5}}\n"}
    files.update({f"f{i:03d}.txt": f"row {i}\n" for i in range(200)})
    pipe = pipeline(tree(files))
    assert pipe.run("0").success
    path = pipe.output("expanded_corpus", "0")
    raw = pq.read_table(pipe.output("raw_corpus", "0"))
    biased = (
        raw.append_column("weight", [[0.5] * raw.num_rows])
        .append_column("copy", [[0] * raw.num_rows])
        .cast(pq.read_table(path).schema)
    )  # every fractional row kept: allowed per row, impossible in aggregate
    write_parquet_atomic(biased, path)
    evaluation = check_evaluations(pipe.run_checks("0", EXPANSION_MATCHES_WEIGHTS))[EXPANSION_MATCHES_WEIGHTS]
    assert not evaluation.passed
    assert "outside the binomial bound" in evaluation.description
    assert evaluation.metadata["rows_out_of_range"].value == 0


def test_weights_check_fails_when_integer_parts_are_wrong(tree, pipeline):
    pipe = pipeline(
        tree({".dlm/training.yaml": "dlm_training_version: 1\nmetadata: {k: v}\nweights: {k: {v: 3}}\n", "a.txt": "a"})
    )
    assert pipe.run("0").success
    path = pipe.output("expanded_corpus", "0")
    write_parquet_atomic(pq.read_table(path).slice(1), path)  # 2 copies where weight 3 demands 3
    evaluation = check_evaluations(pipe.run_checks("0", EXPANSION_MATCHES_WEIGHTS))[EXPANSION_MATCHES_WEIGHTS]
    assert not evaluation.passed and evaluation.metadata["rows_out_of_range"].value == 1


def test_definitions_hold_every_asset_check_sensor_schedule_and_job():
    from dlm_pipeline.definitions import CORPUS_JOB, defs

    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    assert {k.name for k in graph.asset_check_keys} == {
        "configs_valid",
        "expansion_deterministic",
        "expansion_matches_weights",
        "tokens_match_tokenizer",
        "split_is_leak_free",
        "packing_conserves_tokens",
    }
    assert defs.resolve_sensor_def(CONFIG_CHANGE_SENSOR).default_status == dg.DefaultSensorStatus.RUNNING
    assert defs.resolve_schedule_def(NIGHTLY_SCHEDULE) is not None
    assert defs.resolve_job_def(CORPUS_JOB) is not None
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.code_version and node.group_name and node.description


FRACTIONAL_TREE = {
    ".dlm/training.yaml": "dlm_training_version: 1\nmetadata: {kind: x}\nweights: {kind: {x: 0.5, y: 2}}\n"
}
FRACTIONAL_TREE.update({f"f{i:03d}.txt": f"row {i}\n" for i in range(200)})


@pytest.mark.parametrize("mode", ["bernoulli", "exact"])
def test_weights_check_fails_on_a_planted_fault_in_each_mode_and_is_exact_in_exact_mode(tree, pipeline, mode):
    pipe = pipeline(tree(FRACTIONAL_TREE), expansion_mode=mode)
    evaluations = check_evaluations(pipe.run("0"))
    assert (
        evaluations[EXPANSION_DETERMINISTIC].passed
        and evaluations[EXPANSION_DETERMINISTIC].metadata["expansion_mode"].value == mode
    )
    assert evaluations[EXPANSION_MATCHES_WEIGHTS].passed
    path = pipe.output("expanded_corpus", "0")
    stored = pq.read_table(path)
    if mode == "exact":
        assert stored.num_rows == 100  # floor(200 * 0.5 + 0.5)

    # one kept row dropped: still 0 or 1 copies per row, and well inside the binomial bound
    write_parquet_atomic(stored.slice(1), path)
    evaluation = check_evaluations(pipe.run_checks("0", EXPANSION_MATCHES_WEIGHTS))[EXPANSION_MATCHES_WEIGHTS]
    assert evaluation.passed == (mode == "bernoulli")
    if mode == "exact":
        assert "1 weight group(s) without exactly floor(n*f + 0.5) extra copies" in evaluation.description
        assert evaluation.metadata["exact_groups_off_quota"].value.records[0].data == {
            "weight": 0.5,
            "rows": 200,
            "quota": 100,
            "extra": 99,
        }

    # every row kept: fails in both modes
    raw = pq.read_table(pipe.output("raw_corpus", "0"))
    biased = (
        raw.append_column("weight", [[0.5] * raw.num_rows])
        .append_column("copy", [[0] * raw.num_rows])
        .cast(stored.schema)
    )
    write_parquet_atomic(biased, path)
    evaluation = check_evaluations(pipe.run_checks("0", EXPANSION_MATCHES_WEIGHTS))[EXPANSION_MATCHES_WEIGHTS]
    assert not evaluation.passed and "outside the binomial bound" in evaluation.description
    assert ("weight group(s)" in evaluation.description) == (mode == "exact")


def test_expansion_checks_share_one_step_read_no_text_and_report_weights_no_metadata_sets(tree, pipeline, monkeypatch):
    from dlm_pipeline.defs import resources

    pipe = pipeline(tree(FRACTIONAL_TREE))
    assert pipe.run("0").success
    reads, read = [], resources.read_parquet

    def recording(path, columns=None):
        reads.append((Path(path).parent.name, columns))
        return read(path, columns)

    monkeypatch.setattr(resources, "read_parquet", recording)  # what checks read goes through read_stored
    result = pipe.run_checks("0", EXPANSION_DETERMINISTIC, EXPANSION_MATCHES_WEIGHTS)
    evaluations = check_evaluations(result)
    assert evaluations[EXPANSION_DETERMINISTIC].passed
    assert len({e.step_key for e in result.all_events if e.event_type_value == "STEP_START"}) == 1
    # each stored file read once for both checks; the text-carrying ones without their text
    assert sorted(asset for asset, _ in reads) == ["expanded_corpus", "raw_corpus", "training_configs", "weights_map"]
    assert dict(reads)["expanded_corpus"] == ["section_id", "copy", "weight"]
    assert dict(reads)["raw_corpus"] == ["section_id", "path", "tags"]
    evaluation = evaluations[EXPANSION_MATCHES_WEIGHTS]
    assert evaluation.passed  # a warning, not a failure
    assert evaluation.metadata["unmatched_weights"].value == 1
    assert "weights.kind.y: no anchor's metadata sets kind: y" in evaluation.metadata["unmatched_weight_list"].value
    assert "1 weight(s) that no metadata sets can never apply" in evaluation.description


def test_determinism_check_fails_on_a_changed_weight_alone(watched):
    """Rows and copies intact, one stored weight changed: the recomputation compares weights too."""
    assert watched.run("0").success
    path = watched.output("expanded_corpus", "0")
    table = pq.read_table(path)
    weights = table["weight"].to_pylist()
    weights[2] += 0.25
    write_parquet_atomic(table.set_column(table.schema.get_field_index("weight"), "weight", pa.array(weights)), path)
    evaluation = check_evaluations(watched.run_checks("0", EXPANSION_DETERMINISTIC))[EXPANSION_DETERMINISTIC]
    assert not evaluation.passed and evaluation.metadata["first_differing_row"].value == -1
