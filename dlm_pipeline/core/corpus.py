"""Raw corpus: one row per included text file, ordered by path, with tags and a content-derived id.

Files that cannot be training text are skipped and counted by reason, never silently lost.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from dlm_pipeline.core.rules import Anchor, PathRules, parent_dir
from dlm_pipeline.core.safe_read import FileReplaced, FileTooLarge, NotRegularFile, read_regular_file
from dlm_pipeline.core.tree import FileEntry, StatKey, TreeScan

if TYPE_CHECKING:
    from dlm_pipeline.core.ingest_index import IngestIndex
    from dlm_pipeline.core.secrets import SecretScanner

DEFAULT_MAX_FILE_BYTES = 1 << 20
BINARY_SNIFF_BYTES = 8192
TAGS_TYPE = pa.map_(pa.string(), pa.string())
ROW_SCHEMA = pa.schema([("section_id", pa.string()), ("path", pa.string()), ("text", pa.string()), ("tags", TAGS_TYPE)])
SKIP_REASONS = (
    "secret",
    "binary",
    "encoding",
    "too_large",
    "symlink_escape",
    "broken_symlink",
    "symlink_dir",
    "not_regular",
    "unreadable",
    "unreadable_dir",
    "bad_filename",
    "vanished",
)

Progress = Callable[[int, int], None]
# A compute backend's reader: (root, [(file, scan for secrets)]) -> {path: ingest_index.read_entry result}
ReadBatch = Callable[[Path, list[tuple[FileEntry, bool]]], dict]


def section_id(path: str, text: str) -> str:
    """First 16 hex chars of sha256("prose\\n# source: <path>\\n\\n<text>")."""
    return hashlib.sha256(f"prose\n# source: {path}\n\n{text}".encode()).hexdigest()[:16]


def content_key(text: str) -> str:
    """sha256 hex of the text: what the token store and the train/validation split key on (SPEC §7),
    so a renamed, moved or duplicated file maps to the same key."""
    return hashlib.sha256(text.encode()).hexdigest()


def normalise_text(data: bytes) -> str:
    """UTF-8 (strict) without a leading BOM, with \\r\\n and \\r turned into \\n."""
    text = data.decode("utf-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text(abspath: str, max_bytes: int, walked: StatKey | None = None) -> str | tuple[str, str]:
    """The file's normalised text, or (skip reason, detail); with `walked` (its stat from the walk),
    only that very file is read (a path swapped since then is `vanished`)."""
    try:
        data = read_regular_file(abspath, max_bytes, identity=(walked[3], walked[4]) if walked else None)
    except FileNotFoundError:
        return "vanished", "file disappeared after the walk"
    except FileReplaced:
        return "vanished", "file replaced after the walk"
    except NotRegularFile:
        return "not_regular", "not a regular file"
    except FileTooLarge as exc:
        return "too_large", f"{exc} (max_file_bytes)"
    except OSError as exc:
        return "unreadable", exc.strerror or str(exc)
    if b"\x00" in data[:BINARY_SNIFF_BYTES]:
        return "binary", "NUL byte in the first 8 KiB"
    try:
        return normalise_text(data)
    except UnicodeDecodeError as exc:
        return "encoding", f"invalid UTF-8 at byte {exc.start}"


def admitted(rules: PathRules, entry: FileEntry, trace: list | None = None) -> bool:
    """The path rules' verdict on a walked file; a symlink never re-admits what a default exclude
    drops at its target (`notes.txt -> .netrc`, `x -> .git/config`)."""
    if not rules.is_included(entry.path, trace):
        return False
    if entry.target and rules.is_default_excluded(entry.target):
        if trace is not None:
            trace.append(f"symlink to {entry.target}: a default exclude drops its target")
        return False
    return True


def scans_secrets(rules: PathRules, entry: FileEntry) -> bool:
    """Whether the credential scan runs on a walked file. A symlink is scanned when its own folder or
    its target's says so: a link in a `scan_secrets: false` folder must not carry a key kept where
    scanning is on past the scan."""
    return rules.scans_secrets(parent_dir(entry.path)) or (
        entry.target is not None and rules.scans_secrets(parent_dir(entry.target))
    )


def content_outcome(
    entry: FileEntry, rules: PathRules, scanner: SecretScanner, max_file_bytes: int
) -> str | tuple[str, str]:
    """The content rules for one included file: its text, or (skip reason, detail). For a
    credential the detail names the detectors, never what they found."""
    outcome = read_text(entry.abspath, max_file_bytes, entry.stat)
    if not isinstance(outcome, tuple) and scans_secrets(rules, entry):
        found = scanner.findings(outcome, entry.path)
        if found:
            return "secret", ", ".join(found)
    return outcome


READ_BATCH_BYTES = 16 << 20  # files read (and rows handed on) per batch, by size on disk


@dataclass
class RawCorpus:
    """What reading the tree gave. From `stream_raw_corpus`, the counts are final once its
    batches were all consumed; from `build_raw_corpus`, `table` holds every row."""

    table: pa.Table | None = None
    skips: Counter = field(default_factory=Counter)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    files_seen: int = 0
    files_excluded: int = 0
    bytes_read: int = 0
    files_read: int = 0  # opened and read in this run
    files_from_index: int = 0  # taken from the ingest index, not opened


def rows_table(section_ids: list[str], paths: list[str], texts: list[str], tags: list[dict[str, str]]) -> pa.Table:
    return pa.Table.from_arrays(
        [
            pa.array(section_ids, pa.string()),
            pa.array(paths, pa.string()),
            pa.array(texts, pa.string()),
            pa.array([list(t.items()) for t in tags], TAGS_TYPE),
        ],
        schema=ROW_SCHEMA,
    )


def read_batches(entries: list[FileEntry], batch_bytes: int | None = None) -> Iterator[list[FileEntry]]:
    """The entries, in order, in runs of about `batch_bytes` (READ_BATCH_BYTES) bytes on disk, at least one file each."""
    batch_bytes = batch_bytes or READ_BATCH_BYTES
    batch, size = [], 0
    for entry in entries:
        batch.append(entry)
        size += entry.stat[0] if entry.stat is not None else 0
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def read_entries(
    entries: list[FileEntry], rules: PathRules, scanner: SecretScanner, index: IngestIndex
) -> list[str | tuple[str, str]]:
    """The content rules for a batch of included files: each one's text or (skip reason, detail)."""
    return [index.read(entry, scanner if scans_secrets(rules, entry) else None) for entry in entries]


def stream_raw_corpus(
    scan: TreeScan,
    anchors: list[Anchor],
    *,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    secret_entropy: bool = False,
    progress: Progress | None = None,
    index: IngestIndex | None = None,
    batch_bytes: int | None = None,
    read_batch: ReadBatch | None = None,
) -> tuple[RawCorpus, Iterator[pa.Table]]:
    """Apply the path rules and content rules to a tree scan: (counts, tables of rows ordered by
    path). Files are read in path order, a batch of about `batch_bytes` (READ_BATCH_BYTES) at a time, so no more text
    than one batch is held; the counts are final when the tables were all consumed.

    A file in which a credential is found is skipped as `secret` (unless its nearest anchor says
    `scan_secrets: false`); only its path is kept, never what was found. With an `index` (built
    with the same limits), files whose stat did not change are not read again. `read_batch` (a
    compute backend) reads the files of each batch that the index misses; by default they are read here.
    """
    from dlm_pipeline.core.ingest_index import IngestIndex  # it builds on this module
    from dlm_pipeline.core.secrets import secret_scanner  # detect-secrets: only when files may be read

    if index is None:
        index = IngestIndex(None, scan.root, max_file_bytes=max_file_bytes, secret_entropy=secret_entropy)
    rules = PathRules(anchors)
    scanner = secret_scanner(secret_entropy)
    result = RawCorpus(skips=Counter(scan.skips), skipped=list(scan.skipped))
    included = sorted((f for f in scan.files if admitted(rules, f)), key=lambda f: f.path.encode())
    result.files_seen = len(scan.files)
    result.files_excluded = len(scan.files) - len(included)

    def tables() -> Iterator[pa.Table]:
        done = 0
        try:
            for batch in read_batches(included, batch_bytes):
                if read_batch is not None:
                    wanted = [(f, scans_secrets(rules, f)) for f in batch]
                    index.add_reads(
                        read_batch(
                            scan.root, [(f, s) for f, s in wanted if index.needs_read(f, scanner if s else None)]
                        )
                    )
                ids, paths, texts, tags = [], [], [], []
                for entry, outcome in zip(batch, read_entries(batch, rules, scanner, index), strict=True):
                    if isinstance(outcome, tuple):
                        result.skips[outcome[0]] += 1
                        result.skipped.append((entry.path, outcome[0]))
                    else:
                        ids.append(section_id(entry.path, outcome))
                        paths.append(entry.path)
                        texts.append(outcome)
                        tags.append(rules.tags(parent_dir(entry.path)))
                        result.bytes_read += len(outcome)
                done += len(batch)
                if progress is not None:
                    progress(done, len(included))
                yield rows_table(ids, paths, texts, tags)
            result.skipped.sort()
            result.files_read, result.files_from_index = index.files_read, index.files_from_index
            index.save(scan.started_ns)
        finally:
            index.close()

    return result, tables()


def build_raw_corpus(scan: TreeScan, anchors: list[Anchor], **options) -> RawCorpus:
    """`stream_raw_corpus` with every row in `table` (for callers that want the corpus whole)."""
    result, tables = stream_raw_corpus(scan, anchors, **options)
    result.table = pa.concat_tables([rows_table([], [], [], []), *tables]).combine_chunks()
    return result
