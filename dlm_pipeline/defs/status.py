"""What is materialized per seed, and whether it is still current (`dlm-pipeline status`).

Only what the instance recorded is read (materializations, their metadata and data versions,
asset check executions) plus the config-only walk the sensor does: nothing is recomputed.

An asset is stale when
- the configs changed: the config fingerprint it recorded differs from the tree's now;
- a setting changed: a setting it recorded (source root, weights scope, expansion mode, max_seq_len,
  validation fraction, split seed; the tokenizer's fingerprint and the EOS id, with the tokenizer
  the settings name loaded now) differs from the current one;
- its stored files changed: a file it recorded (`stored_files`: size, mtime, inode) is missing or
  was rewritten since (by hand, or by a run killed before it recorded what it wrote);
- an upstream asset changed: the data version it loaded is not the upstream's newest for this seed
  (the upstream was materialized again since), or the upstream is itself stale or missing.
"""

from __future__ import annotations

import datetime
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import dagster as dg
from dagster._core.event_api import PartitionKeyFilter

from dlm_pipeline import settings
from dlm_pipeline.core.config_records import tree_configs_fingerprint
from dlm_pipeline.core.tree import scan_tree
from dlm_pipeline.defs.constants import PARTITION_TAG
from dlm_pipeline.defs.metadata import DATA_VERSION_TAG, _same_version
from dlm_pipeline.defs.resources import STORED_FILES, own_dirs, stored_files

INPUT_VERSION_TAG = "dagster/input_data_version/"


def current_settings() -> dict[str, Callable[[], object]]:
    """The settings an asset records in its metadata, and how to read each one's value now. The
    tokenizer the settings name is loaded once, when first asked (a file edited in place, or another
    file, changes its fingerprint while DLM_TOKENIZER stays the same)."""
    from dlm_pipeline.core.dataset import resolve_eos_id
    from dlm_pipeline.core.tokenize import load_tokenizer

    tokenizer = functools.cache(lambda: load_tokenizer(settings.tokenizer()))
    return {
        "source_root": lambda: os.path.realpath(settings.source_root()),
        "weights_scope": settings.weights_scope,
        "expansion_mode": settings.expansion_mode,
        "max_seq_len": settings.max_seq_len,
        "val_fraction": settings.val_fraction,
        "split_seed": settings.split_seed,
        "tokenizer_fingerprint": lambda: tokenizer().fingerprint,
        "eos_id": lambda: resolve_eos_id(tokenizer(), settings.eos_token()),
    }


@dataclass
class AssetStatus:
    asset: str
    timestamp: float | None = None
    rows: int | None = None
    stale: list[str] = field(default_factory=list)
    checks: list[tuple[str, str, float | None]] = field(default_factory=list)  # (name, status, when)

    @property
    def materialized(self) -> bool:
        return self.timestamp is not None


def current_config_fingerprint(instance: dg.DagsterInstance) -> str:
    """What the sensor compares against: the config files of the tree now, read without the files."""
    return tree_configs_fingerprint(scan_tree(settings.source_root(), files=False, exclude_dirs=own_dirs(instance)))[0]


def _latest(instance: dg.DagsterInstance, key: dg.AssetKey, seed: str) -> dg.EventLogRecord | None:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[seed]), limit=1
    ).records
    return records[0] if records else None


def _unpartitioned_execution(instance: dg.DagsterInstance, check_key: dg.AssetCheckKey, seed: str, look_back: int = 50):
    """A check reported by its asset's step (`configs_valid`) is stored without a partition: the
    newest execution whose run ran this seed."""
    for execution in instance.event_log_storage.get_asset_check_execution_history(check_key, limit=look_back):
        run = instance.get_run_by_id(execution.run_id)
        if run is not None and run.tags.get(PARTITION_TAG) == seed:
            return execution
    return None


def _changed_files(recorded: dict | None) -> list[str]:
    """What became of the stored files a materialization recorded, if they are not as it left them."""
    if not recorded:
        return []
    now = stored_files(recorded)
    return [
        f"stored file {path} {'rewritten' if path in now else 'missing'} since"
        for path in sorted(recorded)
        if now.get(path) != recorded[path]
    ]


def _setting_changed(name: str, recorded: object, current: Callable[[], object]) -> list[str]:
    """Why a recorded setting no longer holds, if it does not: another value now, or none can be
    read (a tokenizer that no longer loads, an EOS token it lacks)."""
    from dlm_pipeline.core.dataset import DatasetError
    from dlm_pipeline.core.tokenize import TokenizerError

    try:
        now = current()
    except (TokenizerError, DatasetError) as exc:
        return [f"setting {name} cannot be read now: {exc}"]
    return [] if str(recorded) == str(now) else [f"setting {name} changed ({recorded} -> {now})"]


def seed_status(
    instance: dg.DagsterInstance, graph, seed: str, fingerprint: str, now: dict[str, Callable[[], object]]
) -> list[AssetStatus]:
    """One AssetStatus per asset of the graph, upstream first; `now`: `current_settings()`."""
    records: dict[dg.AssetKey, dg.EventLogRecord | None] = {}
    result: dict[dg.AssetKey, AssetStatus] = {}
    check_keys = list(graph.asset_check_keys)
    executions = (
        instance.event_log_storage.get_latest_asset_check_execution_by_key(
            check_keys, partition_filter=PartitionKeyFilter(key=seed)
        )
        if check_keys
        else {}
    )
    for key in graph.toposorted_asset_keys:
        status = result[key] = AssetStatus(key.to_user_string())
        record = records[key] = _latest(instance, key, seed)
        for check_key in sorted((c for c in check_keys if c.asset_key == key), key=lambda c: c.name):
            execution = executions.get(check_key) or _unpartitioned_execution(instance, check_key, seed)
            when = (execution.event.timestamp if execution.event else execution.create_timestamp) if execution else None
            status.checks.append((check_key.name, execution.status.value.lower() if execution else "never run", when))
        if record is None:
            continue
        materialization = record.asset_materialization
        metadata = {name: value.value for name, value in materialization.metadata.items()}
        status.timestamp, status.rows = record.timestamp, metadata.get("dagster/row_count")
        recorded_fp = metadata.get("config_fingerprint")
        if recorded_fp and recorded_fp != fingerprint:
            status.stale.append(f"configs changed (recorded {recorded_fp[:12]}, now {fingerprint[:12]})")
        for name, current in now.items():
            if name in metadata:
                status.stale += _setting_changed(name, metadata[name], current)
        status.stale += _changed_files(metadata.get(STORED_FILES))
        for parent in sorted(graph.get(key).parent_keys, key=lambda k: k.to_user_string()):
            name = parent.to_user_string()
            upstream = records.get(parent)
            if upstream is None:
                status.stale.append(f"upstream {name} not materialized")
                continue
            loaded = materialization.tags.get(INPUT_VERSION_TAG + name)
            newest = upstream.asset_materialization.tags.get(DATA_VERSION_TAG)
            if not _same_version(loaded, newest) and upstream.storage_id > record.storage_id:
                status.stale.append(f"upstream {name} materialized again since")
            elif result[parent].stale:
                status.stale.append(f"upstream {name} is stale")
    return list(result.values())


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def status_lines(seed: str, statuses: list[AssetStatus]) -> list[str]:
    if not any(s.materialized for s in statuses):
        return [f"seed {seed}: nothing materialized"]
    lines = [f"seed {seed}:"]
    for s in statuses:
        if not s.materialized:
            lines.append(f"  {s.asset:<18} not materialized")
        else:
            state = "current" if not s.stale else "STALE: " + "; ".join(s.stale)
            rows = f"{s.rows:,}" if isinstance(s.rows, int) else "?"
            lines.append(f"  {s.asset:<18} {_when(s.timestamp)}  {rows:>9} rows  {state}")
        lines += [f"    check {name}: {result} ({_when(when)})" for name, result, when in s.checks]
    return lines
