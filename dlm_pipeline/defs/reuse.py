"""Seed-independent work done once per tree state: `raw_corpus` is reused from any seed whose latest
materialization was computed from the same inputs, instead of reading the tree again.

The inputs are named by a reuse key recorded in the materialization metadata: the configs'
fingerprint, the settings that change what is read, and a stat-only signature of the included
files (core/tree_signature.py; a racy signature gets no key, so it is never matched). A candidate
is reused only while it is still its seed's latest materialization and its file still hashes to
what was recorded; the output is then a hard link to the same bytes, with metadata of its own.
`training_configs` and `weights_map` are always recomputed (reading the configs is their proof
of the tree state, and costs milliseconds); their bytes are still stored once.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field

import dagster as dg

from dlm_pipeline.core.rules import Anchor, PathRules
from dlm_pipeline.core.tree import TreeScan
from dlm_pipeline.core.tree_signature import RACY_WINDOW_NS, tree_signature
from dlm_pipeline.defs.metadata import config_lineage
from dlm_pipeline.defs.resources import ReusedOutput, SourceTree

REUSE_KEY = "reuse_key"
REUSED_FROM_SEED = "reused_from_seed"
# How many of the asset's newest materializations (any seed) are searched for a match.
SEARCH_LIMIT = 64
_NOT_COPIED = {"seed", "path", "file_sha256", "file_bytes", "storage", "reuse", "input_fingerprints"}


@dataclass
class Reuse:
    key: str  # "" when the tree state cannot be proven (racy entries)
    output: dg.Output | None = None
    metadata: dict = field(default_factory=dict)  # what the computed output records about reuse


def _metadata_value(record: dg.EventLogRecord, name: str):
    value = record.asset_materialization.metadata.get(name)
    return value.value if value is not None else None


def _file_sha256(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    finally:
        os.close(fd)


def _latest_of_its_seed(context: dg.AssetExecutionContext, record: dg.EventLogRecord) -> bool:
    newest = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=context.asset_key, asset_partitions=[record.partition_key]), limit=1
    ).records
    return bool(newest) and newest[0].storage_id == record.storage_id


def _find(context: dg.AssetExecutionContext, key: str) -> dg.EventLogRecord | None:
    """The newest materialization, of any seed, with this reuse key whose stored file is intact."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=context.asset_key), limit=SEARCH_LIMIT
    ).records
    for record in records:
        if record.asset_materialization is None or _metadata_value(record, REUSE_KEY) != key:
            continue
        path, sha = _metadata_value(record, "path"), _metadata_value(record, "file_sha256")
        if path and sha and _latest_of_its_seed(context, record) and _file_sha256(path) == sha:
            return record
    return None


def raw_corpus_reuse(
    context: dg.AssetExecutionContext,
    source: SourceTree,
    scan: TreeScan,
    anchors: list[Anchor],
    inputs: dict[str, str],
    seed: int,
) -> Reuse:
    """The reused output when another materialization was made from these exact inputs, else the
    metadata the computed one records (its reuse key, or why it has none)."""
    fence = time.time_ns()
    rules = PathRules(anchors)
    signature = tree_signature(scan, (f for f in scan.files if rules.is_included(f.path)), fence)
    if signature.racy:
        shown = ", ".join(signature.racy[:5]) + (" …" if len(signature.racy) > 5 else "")
        why = (
            f"computed: {len(signature.racy)} file(s) changed within {RACY_WINDOW_NS / 1e9:g} s of this run, too "
            f"recently to trust their timestamps ({shown}); this result will not be reused"
        )
        return Reuse("", metadata={REUSE_KEY: dg.MetadataValue.text(""), "reuse": dg.MetadataValue.text(why)})
    settings = {
        "code_version": context.assets_def.code_versions_by_key[context.asset_key],
        "max_file_bytes": source.max_file_bytes,
        "secret_entropy": source.secret_entropy,
        "euid": os.geteuid(),  # what is readable depends on who reads
        "configs": inputs,
        "tree": signature.digest,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    found = None if source.full_rescan else _find(context, key)
    if found is None and source.full_rescan:
        why = "computed: a full rescan was asked for (--full-rescan / DLM_FULL_RESCAN)"
        return Reuse(key, metadata={REUSE_KEY: dg.MetadataValue.text(key), "reuse": dg.MetadataValue.text(why)})
    if found is None:
        why = "computed: no materialization of any seed has these inputs (configs, settings, file stats)"
        return Reuse(key, metadata={REUSE_KEY: dg.MetadataValue.text(key), "reuse": dg.MetadataValue.text(why)})
    source_seed = found.partition_key
    recorded = found.asset_materialization.metadata
    fingerprint = recorded["fingerprint"].value
    metadata = {
        "seed": dg.MetadataValue.int(seed),
        REUSED_FROM_SEED: dg.MetadataValue.int(int(source_seed)),
        "reuse": dg.MetadataValue.text(
            f"reused from seed {source_seed}: same configs, settings and file stats "
            f"({signature.entries:,} files stat'ed, none read)"
        ),
        **{
            name: value
            for name, value in recorded.items()
            if name not in _NOT_COPIED and name != REUSED_FROM_SEED and not name.startswith("compute")
        },
        # What this run did, not what the reused one did: it read no file and used no index entry.
        "files_read": dg.MetadataValue.int(0),
        "files_from_index": dg.MetadataValue.int(0),
        "ingest_index": dg.MetadataValue.text(f"not needed: reused from seed {source_seed}"),
        **config_lineage(context),
        "input_fingerprints": dg.MetadataValue.json(inputs),
    }
    context.log.info(f"raw_corpus reused from seed {source_seed}: the tree is unchanged since it was read")
    output = ReusedOutput(path=_metadata_value(found, "path"), sha256=_metadata_value(found, "file_sha256"))
    with warnings.catch_warnings():  # data versions are beta in Dagster 1.13 (as in metadata.versioned_output)
        warnings.simplefilter("ignore", dg.BetaWarning)
        return Reuse(key, output=dg.Output(output, metadata=metadata, data_version=dg.DataVersion(fingerprint)))
