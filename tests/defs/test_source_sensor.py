"""The source change sensor, evaluated for real (`dg.build_sensor_context`) on a real instance and tree."""

from __future__ import annotations

import os
import re
import shutil
import time

import dagster as dg
import pytest
from conftest import EXAMPLE

from dlm_pipeline.core.ingest_index import FINE_SLACK_NS
from dlm_pipeline.defs.automation import parse_cursor, source_change_sensor
from dlm_pipeline.defs.constants import SOURCE_CHANGE_SENSOR
from dlm_pipeline.defs.partitions import SEEDS_PARTITION


def settle() -> None:
    """Let files just written age past the racy window (entries as new as the walk are read again)."""
    time.sleep(FINE_SLACK_NS / 1e9 + 0.02)


def tick(pipe, cursor):
    context = dg.build_sensor_context(
        instance=pipe.instance,
        cursor=cursor,
        definitions=pipe.defs,
        resources={"source": pipe.defs.resources["source"]},
    )
    result = source_change_sensor(context)
    return result, context.cursor


def files_read(result) -> int:
    return int(re.search(r"(\d+) read", result.skip_message).group(1))


def requests(result) -> list[dg.RunRequest]:
    return result if isinstance(result, list) else []


@pytest.fixture
def watched(pipeline, tmp_path):
    root = shutil.copytree(EXAMPLE, tmp_path / "corpus")
    pipe = pipeline(root)
    pipe.instance.add_dynamic_partitions(SEEDS_PARTITION, ["0", "5"])
    settle()
    return pipe


def test_sensor_is_registered_and_stopped_by_default(watched):
    sensor = watched.defs.get_sensor_def(SOURCE_CHANGE_SENSOR)
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED


def test_touch_is_no_change_and_an_edit_requests_one_run_per_seed(watched):
    note = watched.root / "notes" / "ideas.md"
    assert note.exists()
    result, cursor = tick(watched, None)
    assert isinstance(result, dg.SkipReason) and "baseline recorded" in result.skip_message
    result, cursor = tick(watched, cursor)
    assert "no source change" in result.skip_message and files_read(result) == 0

    earlier = time.time() - 100
    os.utime(note, (earlier, earlier))  # touch: same content
    settle()
    result, cursor = tick(watched, cursor)
    assert "no source change" in result.skip_message and files_read(result) == 1

    note.write_text(note.read_text() + "one more idea\n")
    settle()
    result, cursor = tick(watched, cursor)
    runs = requests(result)
    assert sorted(r.partition_key for r in runs) == ["0", "5"]
    assert all(r.tags["dlm/trigger"] == SOURCE_CHANGE_SENSOR for r in runs)
    result, cursor = tick(watched, cursor)
    assert isinstance(result, dg.SkipReason) and files_read(result) == 0

    (watched.root / "notes" / "new.md").write_text("a new note\n")
    assert len(requests(tick(watched, cursor)[0])) == 2


def test_an_excluded_file_changing_is_no_change(watched):
    _, cursor = tick(watched, None)
    (watched.root / "node_modules").mkdir()
    (watched.root / "node_modules" / "x.js").write_text("1\n")
    result, _ = tick(watched, cursor)
    assert isinstance(result, dg.SkipReason) and "no source change" in result.skip_message


def test_going_back_to_earlier_content_requests_runs_every_time(watched):
    """A -> B -> A -> B: every change needs new run keys (Dagster never reuses one)."""
    note = watched.root / "notes" / "ideas.md"
    version_a = note.read_text()
    _, cursor = tick(watched, None)
    run_keys = []
    for text in (version_a + "B\n", version_a, version_a + "B\n"):
        note.write_text(text)
        result, cursor = tick(watched, cursor)
        assert sorted(r.partition_key for r in requests(result)) == ["0", "5"]
        run_keys += [r.run_key for r in requests(result)]
    assert len(set(run_keys)) == len(run_keys) == 6
    assert parse_cursor(cursor)[1] == 3


def test_sensor_reuses_what_raw_corpus_read(watched):
    """The sensor and raw_corpus share the index: after a run, a tick reads no file."""
    assert watched.run("0").success
    metadata = watched.metadata("raw_corpus", "0")
    assert metadata["files_read"] > 0 and metadata["files_from_index"] == 0
    result, _ = tick(watched, None)
    assert "baseline recorded" in result.skip_message and files_read(result) == 0
