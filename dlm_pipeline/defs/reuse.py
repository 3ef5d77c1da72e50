"""Work done once per state of its inputs.

A step whose inputs, settings and code equal those its seed's latest materialization was computed
from, and whose stored output is still the file (or folder) that materialization wrote, is not
computed again: it re-records that output (`unchanged_output`), and its checks re-record the
evaluations that passed on it (`unchanged_check_results`). What the inputs are is named by a key
(`step_key`) recorded with every materialization; what the stored output is, by its files' stats
(`stored_files`), checked as git checks its index: size, mtime and inode.

Seed-independent work is shared across seeds as well: `raw_corpus` is reused from any seed whose latest
materialization was computed from the same inputs, instead of reading the tree again.

The inputs are named by a reuse key recorded in the materialization metadata: the configs'
fingerprint, the settings that change what is read, and a stat-only signature of the included
files (core/tree_signature.py; a racy signature gets no key, so it is never matched). A candidate
is reused only while it is still its seed's latest materialization and its file still hashes to
what was recorded; the output is then a hard link to the same bytes, with metadata of its own.
`training_configs` reads every config on every run (the proof of the tree state) and keeps its
last valid output only while their bytes, the root and the weight limit are the same (parsing loads
the credential scanner); its bytes are stored once.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
from dagster._core.event_api import PartitionKeyFilter
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from dlm_pipeline import settings
from dlm_pipeline.core.rules import Anchor, PathRules
from dlm_pipeline.core.tree import TreeScan
from dlm_pipeline.core.tree_signature import RACY_WINDOW_NS, tree_signature
from dlm_pipeline.defs.checked_output import input_untouched
from dlm_pipeline.defs.constants import FULL_RESCAN_TAG
from dlm_pipeline.defs.metadata import config_lineage
from dlm_pipeline.defs.resources import (
    STORED_FILES,
    ParquetIOManager,
    ReusedOutput,
    SourceTree,
    Unchanged,
    stored_files,
)

REUSE_KEY = "reuse_key"
REUSED_FROM_SEED = "reused_from_seed"
COMPUTED_IN_RUN = "computed_in_run"  # the run that computed an output; kept while it is re-recorded
# How many of the asset's newest materializations (any seed) are searched for a match.
SEARCH_LIMIT = 64
_FILE_FACTS = {"path", "file_sha256", "file_bytes", "storage", STORED_FILES}  # the IO manager's, of the file it stores
_NOT_COPIED = {"seed", "reuse", "input_fingerprints", *_FILE_FACTS}


# The libraries the core computes outputs with (each decides bytes or verdicts: Arrow and NumPy the
# tables, tokenizers the ids, detect-secrets and re2 which files are secrets, pathspec which are
# included, PyYAML and pydantic what a config says): a new version of any computes every step again.
SHAPING_DISTRIBUTIONS = (
    "numpy",
    "pyarrow",
    "tokenizers",
    "detect-secrets",
    "google-re2",
    "pathspec",
    "PyYAML",
    "pydantic",
)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


@functools.cache
def code_fingerprint() -> str:
    """sha256 of this package's code and of the versions of Python and the libraries that shape its
    outputs: any change to either computes every step again (no code version to forget to bump)."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.suffix in (".py", ".so", ".c") and p.is_file()):
        digest.update(f"{path.relative_to(package)}\0{path.stat().st_size}\0".encode())
        digest.update(path.read_bytes())
    versions = [platform.python_version(), *(f"{name}=={_version(name)}" for name in SHAPING_DISTRIBUTIONS)]
    digest.update("\0".join(versions).encode())
    return digest.hexdigest()


def step_key(context: dg.AssetExecutionContext, inputs: Mapping[str, str], settings: Mapping) -> str:
    """What this seed's output of this asset is computed from: the input fingerprints, the settings
    that change it, and the code."""
    material = {
        "asset": context.asset_key.to_user_string(),
        "seed": context.partition_key,
        "code": code_fingerprint(),
        "settings": settings,
        "inputs": inputs,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def full_rescan(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext, source: SourceTree) -> bool:
    """Whether this run trusts nothing remembered: the source's setting (--full-rescan,
    DLM_FULL_RESCAN) or the run's tag `dlm/full_rescan=1` (the nightly schedule's runs; a run
    launched from the UI with that tag). A tag value that is not an on/off value fails the step."""
    try:
        tagged = settings.parse_switch(f"the run tag {FULL_RESCAN_TAG}", context.run.tags.get(FULL_RESCAN_TAG, ""))
    except settings.SettingsError as exc:
        raise dg.Failure(description=f"{exc}: fix the tag and launch the run again") from None
    return source.full_rescan or tagged


def stored_output_path(context: dg.AssetExecutionContext, io_manager: ParquetIOManager) -> Path:
    """Where the IO manager stores this step's output."""
    return io_manager.output_path(context.instance, context.asset_key.path[-1], context.partition_key)


def computed_metadata(context: dg.AssetExecutionContext, key: str) -> dict:
    """What a computed output records so that a later run can find it unchanged."""
    return {REUSE_KEY: dg.MetadataValue.text(key), COMPUTED_IN_RUN: dg.MetadataValue.text(context.run.run_id)}


def _latest_of_seed(
    context: dg.AssetExecutionContext, asset: dg.AssetKey, seed: str | None = None
) -> dg.EventLogRecord | None:
    """The newest materialization of `asset` for `seed` (default: this step's)."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset, asset_partitions=[seed or context.partition_key]), limit=1
    ).records
    return records[0] if records and records[0].asset_materialization is not None else None


def _untouched(record: dg.EventLogRecord, key: str, paths: list[Path]) -> bool:
    """Whether `record` was computed from `key` and its stored files at `paths` still have the stats
    it recorded (none rewritten, none missing)."""
    files = _metadata_value(record, STORED_FILES)
    return _metadata_value(record, REUSE_KEY) == key and files is not None and files == stored_files(paths)


def _inputs_untouched(context: dg.AssetExecutionContext, inputs: Iterable[str]) -> bool:
    """Whether each input this step reads is still the stored file its loaded materialization wrote:
    the key names an input by its recorded fingerprint, which a file rewritten since (by hand, and
    its step not run again) no longer has."""
    return all(input_untouched(context, asset) for asset in inputs)


def unchanged_output(
    context: dg.AssetExecutionContext,
    key: str,
    inputs: Iterable[str],
    paths: list[Path],
    source: SourceTree,
    *,
    what_this_run_did: Callable[[dict], dict] | None = None,
    own_files: bool = False,
    still: Mapping[str, object] | None = None,
) -> dg.Output | dg.MaterializeResult | None:
    """This seed's latest output again, when it was computed from `key` and its stored `paths` are
    the files it wrote (none rewritten, none missing), the `inputs` it reads are the files their materializations
    wrote, and each metadata value it recorded that is named in `still` is still that value; None
    when the step must compute, or on a full rescan (`full_rescan`).

    Its metadata is the recorded one (it describes the same bytes), except what describes the work
    of a run: `what_this_run_did(recorded values)`. The output value is `Unchanged` (the IO manager
    writes nothing); for an asset that writes its own files (`own_files`), a MaterializeResult.
    """
    if full_rescan(context, source):
        return None
    record = _latest_of_seed(context, context.asset_key)
    if record is None or not _untouched(record, key, paths):
        return None
    if any(_metadata_value(record, name) != value for name, value in (still or {}).items()):
        return None
    if not _inputs_untouched(context, inputs):
        return None
    recorded = record.asset_materialization.metadata
    origin = _metadata_value(record, COMPUTED_IN_RUN) or record.run_id
    metadata = {
        **{name: value for name, value in recorded.items() if not name.startswith("compute")},
        **(what_this_run_did({name: value.value for name, value in recorded.items()}) if what_this_run_did else {}),
        **config_lineage(context),  # the configs now (a comment edit changes them, not the output)
        "reuse": dg.MetadataValue.text(
            f"unchanged: same inputs, settings and code as run {origin}, which computed it; its stored "
            "files are untouched (--full-rescan computes it again)"
        ),
        COMPUTED_IN_RUN: dg.MetadataValue.text(origin),
    }
    with warnings.catch_warnings():  # data versions are beta in Dagster 1.13 (as in metadata.versioned_output)
        warnings.simplefilter("ignore", dg.BetaWarning)
        version = dg.DataVersion(recorded["fingerprint"].value)
        if own_files:
            return dg.MaterializeResult(metadata=metadata, data_version=version)
        return dg.Output(Unchanged(str(paths[0])), metadata=metadata, data_version=version)


def unchanged_check_results(
    context: dg.AssetCheckExecutionContext, asset: str, check_names: Iterable[str], source: SourceTree
) -> list[dg.AssetCheckResult] | None:
    """The evaluations of `check_names` that passed on this very output, when this run did not
    compute it (it re-recorded an unchanged one), the run that computed it evaluated them all and
    none failed since; else None: the checks run. What they check (inputs, settings, code, stored
    files) is what made the output unchanged, so evaluating them again would read the same bytes to
    the same verdict."""
    record = None if full_rescan(context, source) else _latest_of_seed(context, dg.AssetKey(asset))
    if record is None or record.run_id != context.run.run_id:
        return None
    origin = _metadata_value(record, COMPUTED_IN_RUN)
    if not origin or origin == context.run.run_id:
        return None
    wanted = set(check_names)
    passed = {}
    for entry in context.instance.all_logs(origin, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        evaluation = entry.dagster_event.event_specific_data if entry.dagster_event else None
        if (
            evaluation is not None
            and evaluation.check_name in wanted
            and evaluation.asset_key == dg.AssetKey(asset)
            and evaluation.partition in (None, context.partition_key)
        ):
            passed[evaluation.check_name] = evaluation if evaluation.passed else None
    if set(passed) != wanted or not all(passed.values()):
        return None
    if not all(_last_verdict_passed(context, dg.AssetCheckKey(dg.AssetKey(asset), name)) for name in wanted):
        return None
    note = dg.MetadataValue.text(
        f"passed in run {origin} on this same output, unchanged since (--full-rescan evaluates it again)"
    )
    return [
        dg.AssetCheckResult(
            check_name=name,
            passed=True,
            description=passed[name].description,
            metadata={**passed[name].metadata, "reuse": note, "evaluated_in_run": dg.MetadataValue.text(origin)},
        )
        for name in sorted(wanted)
    ]


def _last_verdict_passed(context: dg.AssetCheckExecutionContext, check: dg.AssetCheckKey) -> bool:
    """Whether the newest evaluation of `check` for this seed passed: one that failed since the
    output was computed (a run of the checks alone, say) is not overruled by the older pass."""
    newest = context.instance.event_log_storage.get_asset_check_execution_history(
        check,
        limit=1,
        status={AssetCheckExecutionRecordStatus.SUCCEEDED, AssetCheckExecutionRecordStatus.FAILED},
        partition_filter=PartitionKeyFilter(key=context.partition_key),
    )
    return bool(newest) and newest[0].status == AssetCheckExecutionRecordStatus.SUCCEEDED


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
    newest = _latest_of_seed(context, context.asset_key, record.partition_key)
    return newest is not None and newest.storage_id == record.storage_id


def _own_unchanged(context: dg.AssetExecutionContext, key: str, path: Path) -> dg.EventLogRecord | None:
    """This seed's latest materialization, when it has this reuse key and its file at `path` is untouched."""
    own = _latest_of_seed(context, context.asset_key)
    return own if own is not None and _untouched(own, key, [path]) else None


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
    path: Path,
) -> Reuse:
    """The reused output when another materialization was made from these exact inputs, else the
    metadata the computed one records (its reuse key, or why it has none). `path`: where this
    seed's output is stored; when it still holds this seed's own result from these inputs, untouched
    since (its recorded stats), nothing is hashed or linked."""
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
        "code": code_fingerprint(),
        "max_file_bytes": source.max_file_bytes,
        "secret_entropy": source.secret_entropy,
        "euid": os.geteuid(),  # what is readable depends on who reads
        "configs": inputs,
        "tree": signature.digest,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    rescan = full_rescan(context, source)
    own = None if rescan else _own_unchanged(context, key, path)
    found = own or (None if rescan else _find(context, key))
    if found is None and rescan:
        why = "computed: a full rescan was asked for (--full-rescan / DLM_FULL_RESCAN / run tag dlm/full_rescan)"
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
            if name not in (_NOT_COPIED - _FILE_FACTS if own else _NOT_COPIED)
            and name != REUSED_FROM_SEED
            and not name.startswith("compute")
        },
        # What this run did, not what the reused one did: it read no file and used no index entry.
        "files_read": dg.MetadataValue.int(0),
        "files_from_index": dg.MetadataValue.int(0),
        "ingest_index": dg.MetadataValue.text(f"not needed: reused from seed {source_seed}"),
        **config_lineage(context),
        "input_fingerprints": dg.MetadataValue.json(inputs),
    }
    output = (  # its own stored file, untouched: nothing to write or link
        Unchanged(str(path))
        if own
        else ReusedOutput(path=_metadata_value(found, "path"), sha256=_metadata_value(found, "file_sha256"))
    )
    with warnings.catch_warnings():  # data versions are beta in Dagster 1.13 (as in metadata.versioned_output)
        warnings.simplefilter("ignore", dg.BetaWarning)
        return Reuse(key, output=dg.Output(output, metadata=metadata, data_version=dg.DataVersion(fingerprint)))
