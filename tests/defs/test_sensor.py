"""The config change sensor, evaluated for real (`dg.build_sensor_context`) on a real instance and tree."""

from __future__ import annotations

import os
import shutil
import time

import dagster as dg
import pytest
from conftest import EXAMPLE

from dlm_pipeline.definitions import build_defs
from dlm_pipeline.defs.automation import config_change_sensor, nightly_all_seeds, parse_cursor
from dlm_pipeline.defs.constants import CONFIG_CHANGE_SENSOR, NIGHTLY_SCHEDULE
from dlm_pipeline.defs.partitions import SEEDS_PARTITION


def tick(pipe, cursor):
    context = dg.build_sensor_context(
        instance=pipe.instance,
        cursor=cursor,
        definitions=pipe.defs,
        resources={"source": pipe.defs.resources["source"]},
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


def test_going_back_to_an_earlier_config_requests_runs_every_time(watched):
    """A -> B -> A -> B: Dagster never starts two runs with one run key, so every change needs new keys."""
    config = watched.root / "docs" / ".dlm" / "training.yaml"
    version_a = config.read_text()
    version_b = version_a.replace("docs: 2.5", "docs: 3.5")
    _, cursor = tick(watched, None)
    run_keys = []
    for text in (version_b, version_a, version_b, version_a):
        config.write_text(text)
        result, cursor = tick(watched, cursor)
        assert sorted(r.partition_key for r in requests(result)) == ["0", "12", "5"]
        run_keys += [r.run_key for r in requests(result)]
    assert len(set(run_keys)) == len(run_keys) == 12
    assert parse_cursor(cursor)[1] == 4


def test_a_cursor_without_a_counter_still_counts_as_the_baseline(watched):
    """Cursors stored before the counter existed hold the bare fingerprint: no spurious run on upgrade."""
    _, cursor = tick(watched, None)
    bare = parse_cursor(cursor)[0]
    result, cursor = tick(watched, bare)
    assert isinstance(result, dg.SkipReason) and "no config change" in result.skip_message


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
    assert lineage == parse_cursor(cursor)[0] == watched.metadata("training_configs", "0")["config_fingerprint"]


def test_sensor_interval_and_nightly_cron_come_from_settings(monkeypatch):
    monkeypatch.setenv("DLM_SENSOR_INTERVAL", "5")
    monkeypatch.setenv("DLM_NIGHTLY_CRON", "15 1 * * 1")
    defs = build_defs()
    assert defs.resolve_sensor_def(CONFIG_CHANGE_SENSOR).minimum_interval_seconds == 5
    assert defs.resolve_schedule_def(NIGHTLY_SCHEDULE).cron_schedule == "15 1 * * 1"


def test_nightly_schedule_is_off_by_default_and_requests_every_seed():
    from datetime import datetime

    assert nightly_all_seeds.default_status == dg.DefaultScheduleStatus.STOPPED
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(SEEDS_PARTITION, ["0", "5", "12"])
        with dg.build_schedule_context(
            instance=instance, scheduled_execution_time=datetime(2026, 1, 2, 3, 0)
        ) as context:
            result = nightly_all_seeds(context)
    assert [r.partition_key for r in result] == ["0", "5", "12"]
    assert result[0].run_key == "nightly-20260102T0300-seed-0"
