"""Sensor, schedule and expansion checks against a real instance, real files and real runs."""

from __future__ import annotations

import os
import shutil
import time

import dagster as dg
import pyarrow.parquet as pq
import pytest
from conftest import EXAMPLE, check_evaluations

from dlm_pipeline.core.parquet_io import write_parquet_atomic
from dlm_pipeline.defs.automation import config_change_sensor, nightly_all_seeds
from dlm_pipeline.defs.constants import CONFIG_CHANGE_SENSOR, EXPANSION_DETERMINISTIC, EXPANSION_MATCHES_WEIGHTS, NIGHTLY_SCHEDULE
from dlm_pipeline.defs.partitions import SEEDS_PARTITION


def tick(pipe, cursor):
    context = dg.build_sensor_context(
        instance=pipe.instance, cursor=cursor, definitions=pipe.defs, resources={"source": pipe.defs.resources["source"]}
    )
    result = config_change_sensor(context)
    return result, context.cursor


def requests(result) -> list[dg.RunRequest]:
    return result if isinstance(result, list) else []


@pytest.fixture
def watched(pipeline, tmp_path):
    root = shutil.copytree(EXAMPLE, tmp_path / "corpus")
    pipe = pipeline(root)
    pipe.instance.add_dynamic_partitions(SEEDS_PARTITION, ["0", "5", "12"])
    return pipe


def test_sensor_requests_one_run_per_seed_exactly_on_content_changes(watched):
    root = watched.root
    result, cursor = tick(watched, None)
    assert isinstance(result, dg.SkipReason) and "baseline recorded: 6 config file(s)" in result.skip_message
    result, cursor = tick(watched, cursor)
    assert isinstance(result, dg.SkipReason) and "no config change" in result.skip_message

    config = root / "docs" / ".dlm" / "training.yaml"
    config.write_text(config.read_text().replace("docs: 2.5", "docs: 3.5"))
    result, cursor = tick(watched, cursor)
    runs = requests(result)
    assert sorted(r.partition_key for r in runs) == ["0", "12", "5"]
    assert len({r.run_key for r in runs}) == 3 and all(cursor[:16] in r.run_key for r in runs)

    # restart: a fresh context with the stored cursor does not request again
    result, cursor = tick(watched, cursor)
    assert isinstance(result, dg.SkipReason)

    later = time.time() + 10
    os.utime(config, (later, later))  # touch: same content
    assert isinstance(tick(watched, cursor)[0], dg.SkipReason)

    (root / "notes" / "deep" / ".dlm").mkdir(parents=True)
    (root / "notes" / "deep" / ".dlm" / "ignore").write_text("*.tmp\n")
    result, cursor = tick(watched, cursor)
    assert len(requests(result)) == 3

    (root / "notes" / ".dlm" / "training.yaml").unlink()
    result, cursor = tick(watched, cursor)
    assert len(requests(result)) == 3
    assert isinstance(tick(watched, cursor)[0], dg.SkipReason)


def test_sensor_skips_clearly_when_the_root_is_missing(pipeline, tmp_path):
    pipe = pipeline(tmp_path / "gone")
    result, cursor = tick(pipe, "abc")
    assert isinstance(result, dg.SkipReason) and "does not exist" in result.skip_message
    assert cursor == "abc"


def test_sensor_without_seeds_says_so(pipeline, tmp_path):
    root = shutil.copytree(EXAMPLE, tmp_path / "corpus")
    pipe = pipeline(root)
    _, cursor = tick(pipe, None)
    (root / ".dlm" / "ignore").write_text("*.log\n")
    result, _ = tick(pipe, cursor)
    assert isinstance(result, dg.SkipReason) and "no seed is registered" in result.skip_message


def test_sensor_runs_change_fingerprints_exactly_when_the_expansion_changes(watched):
    def run_requested(result) -> dict[str, str]:
        for request in requests(result):
            assert watched.run(request.partition_key).success
        return {s: watched.metadata("expanded_corpus", s)["fingerprint"] for s in ("0", "5", "12")}

    for seed in ("0", "5", "12"):
        assert watched.run(seed).success
    before = {s: watched.metadata("expanded_corpus", s)["fingerprint"] for s in ("0", "5", "12")}
    _, cursor = tick(watched, None)

    root_config = watched.root / ".dlm" / "training.yaml"
    root_config.write_text(root_config.read_text().replace("kind: {notes: 0.5}", "kind: {notes: 0.5, unused: 3.0}"))
    result, cursor = tick(watched, cursor)
    assert len(requests(result)) == 3
    assert run_requested(result) == before  # no row carries kind=unused: same expansion, same fingerprint

    docs = watched.root / "docs" / ".dlm" / "training.yaml"
    docs.write_text(docs.read_text().replace("docs: 2.5", "docs: 3.0"))  # every docs row gains a copy
    result, cursor = tick(watched, cursor)
    after = run_requested(result)
    assert all(after[s] != before[s] for s in before)
    lineage = watched.metadata("expanded_corpus", "0")["config_fingerprint"]
    assert lineage == cursor == watched.metadata("training_configs", "0")["config_fingerprint"]


def test_nightly_schedule_is_off_by_default_and_requests_every_seed():
    from datetime import datetime

    assert nightly_all_seeds.default_status == dg.DefaultScheduleStatus.STOPPED
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(SEEDS_PARTITION, ["0", "5", "12"])
        with dg.build_schedule_context(instance=instance, scheduled_execution_time=datetime(2026, 1, 2, 3, 0)) as context:
            result = nightly_all_seeds(context)
    assert [r.partition_key for r in result] == ["0", "5", "12"]
    assert result[0].run_key == "nightly-20260102T0300-seed-0"



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
    biased = raw.append_column("weight", [[0.5] * raw.num_rows]).append_column(
        "copy", [[0] * raw.num_rows]
    ).cast(pq.read_table(path).schema)  # every fractional row kept: allowed per row, impossible in aggregate
    write_parquet_atomic(biased, path)
    evaluation = check_evaluations(pipe.run_checks("0", EXPANSION_MATCHES_WEIGHTS))[EXPANSION_MATCHES_WEIGHTS]
    assert not evaluation.passed
    assert "outside the binomial bound" in evaluation.description
    assert evaluation.metadata["rows_out_of_range"].value == 0


def test_weights_check_fails_when_integer_parts_are_wrong(tree, pipeline):
    pipe = pipeline(tree({".dlm/training.yaml": "dlm_training_version: 1\nmetadata: {k: v}\nweights: {k: {v: 3}}\n", "a.txt": "a"}))
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
        "configs_valid", "expansion_deterministic", "expansion_matches_weights", "tokens_match_tokenizer",
        "split_is_leak_free", "packing_conserves_tokens",
    }
    assert defs.resolve_sensor_def(CONFIG_CHANGE_SENSOR).default_status == dg.DefaultSensorStatus.RUNNING
    assert defs.resolve_schedule_def(NIGHTLY_SCHEDULE) is not None
    assert defs.resolve_job_def(CORPUS_JOB) is not None
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.code_version and node.group_name and node.description
