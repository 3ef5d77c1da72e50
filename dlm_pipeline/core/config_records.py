"""Read every config file the walk found into a record (ok or error), and back into anchors.

The records are what the `training_configs` asset stores: later steps rebuild anchors from
them instead of re-reading the tree, so one run sees one consistent set of configs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import pyarrow as pa

from dlm_pipeline.core.config import (
    DEFAULT_MAX_WEIGHT,
    MAX_METADATA_KEYS,
    ConfigInvalid,
    ConfigIssue,
    TrainingConfig,
    decode_config_bytes,
    parse_ignore_file,
    parse_training_config,
    printable,
)
from dlm_pipeline.core.rules import Anchor, ancestor_dirs, unapplied_anchors
from dlm_pipeline.core.safe_read import FileTooLarge, NotRegularFile, read_regular_file
from dlm_pipeline.core.tree import IGNORE_KIND, TRAINING_KIND, ConfigFile, TreeScan, is_inside

STATUS_OK = "ok"
STATUS_ERROR = "error"
MAX_CONFIG_BYTES = 1 << 20

CONFIGS_SCHEMA = pa.schema(
    [
        ("anchor", pa.string()),
        ("path", pa.string()),
        ("kind", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("sha256", pa.string()),
        ("config", pa.string()),
    ]
)


@dataclasses.dataclass(frozen=True)
class ConfigRecord:
    anchor: str  # "." for the root, else the directory relative to the root
    path: str
    kind: str
    status: str
    error: str | None
    sha256: str | None
    config: str | None  # canonical JSON of what was parsed


def anchor_label(directory: str) -> str:
    return directory or "."


def anchor_dir(label: str) -> str:
    return "" if label == "." else label


def _read(root: str, file: ConfigFile) -> bytes:
    abspath = os.path.join(root, file.path)
    if os.path.islink(abspath) and not is_inside(root, os.path.realpath(abspath)):
        raise ConfigInvalid([_issue(file, "is a symlink that leaves the source root; copy the file instead")])
    try:
        return read_regular_file(abspath, MAX_CONFIG_BYTES)
    except NotRegularFile:
        raise ConfigInvalid([_issue(file, "is not a regular file (a directory, FIFO or device)")]) from None
    except FileTooLarge:
        raise ConfigInvalid(
            [_issue(file, f"is larger than {MAX_CONFIG_BYTES} bytes; is this really a config?")]
        ) from None


def _issue(file: ConfigFile, message: str) -> ConfigIssue:
    return ConfigIssue(file.path, None, None, message)


def load_config(root: str, file: ConfigFile, *, max_weight: float = DEFAULT_MAX_WEIGHT) -> ConfigRecord:
    """Read and validate one config file; every failure becomes an error record, never an exception."""
    digest = None
    try:
        if file.problem:
            raise ConfigInvalid([_issue(file, file.problem)])
        data = _read(root, file)
        digest = hashlib.sha256(data).hexdigest()
        text = decode_config_bytes(data, file.path)
        if file.kind == TRAINING_KIND:
            parsed = parse_training_config(text, file.path, max_weight=max_weight)
            canonical = parsed.model_dump(mode="json")
        else:
            canonical = {"patterns": list(parse_ignore_file(text, file.path))}
    except ConfigInvalid as exc:
        return ConfigRecord(anchor_label(file.anchor), file.path, file.kind, STATUS_ERROR, str(exc), digest, None)
    except OSError as exc:
        error = f"{printable(file.path)}: cannot read: {exc.strerror or exc}"
        return ConfigRecord(anchor_label(file.anchor), file.path, file.kind, STATUS_ERROR, error, digest, None)
    config = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return ConfigRecord(anchor_label(file.anchor), file.path, file.kind, STATUS_OK, None, digest, config)


def load_configs(scan: TreeScan, *, max_weight: float = DEFAULT_MAX_WEIGHT) -> list[ConfigRecord]:
    records = [load_config(str(scan.root), f, max_weight=max_weight) for f in scan.config_files]
    return _cap_merged_tags(records)


def _cap_merged_tags(records: list[ConfigRecord]) -> list[ConfigRecord]:
    """Tags merge down the tree and are stored on every row, so the cap holds for the merged set, not
    only per file: nested anchors of 64 tags each would otherwise give every row 64 × depth tags."""
    keys = {
        anchor_dir(r.anchor): set(json.loads(r.config).get("metadata") or ())
        for r in records
        if r.kind == TRAINING_KIND and r.status == STATUS_OK
    }
    capped = []
    for record in records:
        directory = anchor_dir(record.anchor)
        if directory in keys:
            merged = set().union(*(keys.get(d, ()) for d in ancestor_dirs(directory)))
            if len(merged) > MAX_METADATA_KEYS:
                error = (
                    f"{record.path}: metadata: with its ancestors' tags, files below here would carry "
                    f"{len(merged)} tags; at most {MAX_METADATA_KEYS} per file are allowed (drop or merge tags)"
                )
                record = dataclasses.replace(record, status=STATUS_ERROR, error=error, config=None)
        capped.append(record)
    return capped


def records_table(records: list[ConfigRecord]) -> pa.Table:
    columns = {name: [getattr(r, name) for r in records] for name in CONFIGS_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=CONFIGS_SCHEMA)


def anchors_from_table(table: pa.Table) -> list[Anchor]:
    """The anchors whose settings apply (see `unapplied_anchors`), from a `training_configs` table."""
    anchors = all_anchors_from_table(table)
    unapplied = unapplied_anchors(anchors)
    return [a for a in anchors if a.dir not in unapplied]


def all_anchors_from_table(table: pa.Table) -> list[Anchor]:
    """Valid anchors from a `training_configs` table; refuses a table that still holds errors."""
    errors = [
        e for e, s in zip(table["error"].to_pylist(), table["status"].to_pylist(), strict=False) if s != STATUS_OK
    ]
    if errors:
        raise ValueError("invalid configs must be fixed first:\n" + "\n".join(errors))
    by_dir: dict[str, dict] = {}
    for label, kind, config in zip(
        table["anchor"].to_pylist(), table["kind"].to_pylist(), table["config"].to_pylist(), strict=False
    ):
        parts = by_dir.setdefault(anchor_dir(label), {})
        if kind == TRAINING_KIND:
            parts["config"] = TrainingConfig.model_validate_json(config, context={"max_weight": float("inf")})
        elif kind == IGNORE_KIND:
            parts["ignore"] = tuple(json.loads(config)["patterns"])
    return [Anchor(d, **parts) for d, parts in sorted(by_dir.items())]


def configs_fingerprint(entries: list[tuple[str, str | None]]) -> str:
    """One sha256 over (config path, content sha256) pairs: changes exactly when a config file's
    content changes, or one appears or disappears."""
    h = hashlib.sha256(b"dlm-configs-v1\n")
    for path, digest in sorted(entries):
        h.update(f"{path}\0{digest or 'unreadable'}\n".encode())
    return h.hexdigest()


def _content_digests(scan: TreeScan) -> list[str | None]:
    """The sha256 of each config file the walk found, read now (None: it cannot be read)."""
    digests = []
    for file in scan.config_files:
        try:
            digests.append(hashlib.sha256(_read(str(scan.root), file)).hexdigest())
        except (OSError, ConfigInvalid):
            digests.append(None)
    return digests


def tree_configs_fingerprint(scan: TreeScan) -> tuple[str, int]:
    """(fingerprint, number of config files) of every config file the walk found, read now."""
    entries = [(file.path, digest) for file, digest in zip(scan.config_files, _content_digests(scan), strict=True)]
    return configs_fingerprint(entries), len(entries)


def records_source(scan: TreeScan, digests: list[str | None] | None = None) -> str | None:
    """All that `load_configs(scan)` makes its records from, without parsing: the root, and each
    config file's path, kind, anchor, problem and content sha256 (read now, or the `digests` of the
    records made: a file edited meanwhile then names the bytes that were parsed). Equal sources give
    equal records (for one `max_weight`), so a step can keep its last records instead of parsing
    again. None when a file cannot be read: its record holds the read's error, not worth comparing."""
    digests = _content_digests(scan) if digests is None else digests
    if None in digests:
        return None
    files = [[f.path, f.kind, f.anchor, f.problem, d] for f, d in zip(scan.config_files, digests, strict=True)]
    return json.dumps({"root": str(scan.root), "files": files})


def table_configs_fingerprint(table: pa.Table) -> str:
    """The same fingerprint, from a `training_configs` table."""
    return configs_fingerprint(list(zip(table["path"].to_pylist(), table["sha256"].to_pylist(), strict=False)))
