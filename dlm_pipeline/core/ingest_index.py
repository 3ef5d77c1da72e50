"""Incremental ingest: what each file held when it was last read, keyed by its stat, in the spirit of git's index.

An entry maps a path and its stat (size, mtime_ns, ctime_ns, inode, device, mode, symlink or not)
to what reading it gave: the normalised text and its content key, or a skip reason that content
alone decides (binary, encoding, too_large), plus the credential verdict once one was needed.
A file whose stat matches its entry is not read again; anything else (unreadable, vanished) is
read again every time. The text of a file found to hold a credential is never kept.

Racy entries, as git handles them: a file changed twice within one timestamp tick keeps its stat,
so an entry whose mtime or ctime is not older than the walk that read it (less the file system's
granularity) is not kept; the next run reads that file again.

The index depends on the settings that decide a read's result (max_file_bytes, the entropy
scan, the detect-secrets version and plugins, the user): another value ignores it and rebuilds.
It lives in `<DAGSTER_HOME>/ingest_index/<hash of the source root>/index.parquet`, is opened and
written without following symlinks, replaced atomically (concurrent runs: the last writer wins,
each file a whole index), bounded in size, and checked on use: a text whose content key does
not match is read again. A corrupt, foreign or oversized index is ignored, reported and rebuilt.

Memory does not grow with the texts: only the small columns are loaded; a cached text is fetched
from the file when it is used (one row group at a time, rows in path order), a text read in this
run goes to an unlinked spill file in the index folder, and `save` writes the new index from both,
row group by row group.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dlm_pipeline.core import parquet_io
from dlm_pipeline.core.arrow_utils import one_chunk
from dlm_pipeline.core.corpus import content_key, read_text
from dlm_pipeline.core.parquet_io import RowStream, delete_stale_temps, write_bytes_atomic, write_parquet_stream
from dlm_pipeline.core.rules import PathRules
from dlm_pipeline.core.safe_read import FileTooLarge, NotRegularFile
from dlm_pipeline.core.tree import FileEntry, StatKey, TreeScan

if TYPE_CHECKING:  # detect-secrets is imported when an index is opened, not with this module
    from dlm_pipeline.core.secrets import SecretScanner

INDEX_DIR = "ingest_index"
INDEX_FILE = "index.parquet"
FORMAT = 1
SETTINGS_KEY = b"dlm.ingest_index"
MAX_INDEX_BYTES = 8 * 1024**3  # an index file above this is not ours: ignored, rebuilt
MAX_ENTRIES = 10_000_000
TEXT = "text"
CACHED_REASONS = ("binary", "encoding", "too_large")  # decided by the content alone; other skips are read again
SECRET_FOUND, SECRET_CLEAN = "secret", ""
# Timestamps are written from the kernel's coarse clock (a few ms behind the wall clock): a fine
# grained file system gets this much slack, one with whole-second timestamps (FAT, some NFS) 2 s.
FINE_SLACK_NS = 50_000_000
COARSE_SLACK_NS = 2_000_000_000

SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("ctime_ns", pa.int64()),
        ("inode", pa.uint64()),
        ("device", pa.uint64()),
        ("mode", pa.uint32()),
        ("link", pa.bool_()),
        ("outcome", pa.string()),  # TEXT or one of CACHED_REASONS
        ("text", pa.string()),  # null unless outcome is TEXT and no credential was found
        ("content_key", pa.string()),  # sha256 of the text (kept for a secret too: it is not the text)
        ("secret", pa.string()),  # null: not scanned; SECRET_CLEAN or SECRET_FOUND
    ]
)
_STAT_COLUMNS = ("size", "mtime_ns", "ctime_ns", "inode", "device", "mode", "link")
OLD, SPILL = 0, 1  # where a kept text is: the loaded index file, or this run's spill file
SPILL_FLUSH_BYTES = 8 << 20
NEED_TEXT, NEED_SCAN, NEED_KEY = "text", "scan", "key"


@dataclass(frozen=True)
class Entry:
    stat: StatKey
    outcome: str
    text: str | None = None  # only while it is being used; kept texts are found through `ref`
    key: str | None = None
    secret: str | None = None
    ref: tuple[int, int] | None = None  # (OLD or SPILL, row) of the kept text; None: not kept (a secret's)


class _RowTexts:
    """The `text` column of a Parquet file, fetched by row one row group at a time."""

    def __init__(self, file: pq.ParquetFile):
        self.file = file
        counts = [file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.group, self.texts = -1, None

    def get(self, row: int) -> str | None:
        """The text at `row`; None when it is null or its row group cannot be read (damaged file:
        the caller reads the source file again)."""
        group = int(np.searchsorted(self.starts, row, side="right")) - 1
        if group != self.group:
            self.texts, self.group = None, group  # the old group goes before the new one comes
            try:
                self.texts = one_chunk(self.file.read_row_group(group, columns=[TEXT])[TEXT])
            except Exception:  # pyarrow raises several types for a damaged page
                return None
        return None if self.texts is None else self.texts[row - int(self.starts[group])].as_py()


class _Spill:
    """Texts read in this run, appended to an unlinked temp file in the index folder (so nothing is
    left behind by a killed run); the first `get` ends the appending and reads them back by row."""

    def __init__(self, dir_fd: int):
        name = f".spill.{secrets.token_hex(8)}.tmp"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        os.unlink(name, dir_fd=dir_fd)
        self.fh = os.fdopen(fd, "w+b")
        self.schema = pa.schema([(TEXT, pa.string())])
        self.writer = pq.ParquetWriter(self.fh, self.schema, compression="zstd", compression_level=1)
        self.pending: list[str] = []
        self.pending_bytes = self.rows = 0
        self.reader: _RowTexts | None = None

    def add(self, text: str) -> int:
        self.pending.append(text)
        self.pending_bytes += len(text)
        if self.pending_bytes >= SPILL_FLUSH_BYTES:
            self._flush()
        self.rows += 1
        return self.rows - 1

    def _flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.table({TEXT: pa.array(self.pending, pa.string())}))
        self.pending, self.pending_bytes = [], 0

    def get(self, row: int) -> str | None:
        if self.reader is None:
            self._flush()
            self.writer.close()
            self.fh.flush()
            self.reader = _RowTexts(pq.ParquetFile(self.fh))
        return self.reader.get(row)

    def close(self) -> None:
        if self.reader is None:
            self.writer.close()
        self.fh.close()


def read_entry(file: FileEntry, max_file_bytes: int, scanner: SecretScanner | None = None) -> Entry | tuple[str, str]:
    """Read one file as the index records it: its text and content key (and, with a `scanner`, the
    credential verdict; a secret's text is dropped), a skip decided by content, or the (reason,
    detail) of a skip that is never cached. The same function runs in a compute backend's task."""
    result = read_text(file.abspath, max_file_bytes, file.stat)
    if isinstance(result, tuple):
        return result if result[0] not in CACHED_REASONS or file.stat is None else Entry(file.stat, result[0])
    entry = Entry(file.stat or (), TEXT, result, content_key(result))
    return entry if scanner is None else scanned(entry, scanner, file.path)


def scanned(entry: Entry, scanner: SecretScanner, path: str) -> Entry:
    """The entry with its credential verdict; the text (and where it is kept) is dropped when one is found."""
    found = bool(scanner.findings(entry.text, path))
    if found:
        return replace(entry, secret=SECRET_FOUND, text=None, ref=None)
    return replace(entry, secret=SECRET_CLEAN)


def index_settings(root: str | os.PathLike, max_file_bytes: int, secret_entropy: bool) -> str:
    """Everything a cached read result depends on besides the file itself, as one string."""
    from dlm_pipeline.core.secrets import CREDENTIAL_PLUGINS, ENTROPY_PLUGINS

    plugins = CREDENTIAL_PLUGINS + (ENTROPY_PLUGINS if secret_entropy else ())
    return json.dumps(
        {
            "format": FORMAT,
            "root": str(root),
            "max_file_bytes": max_file_bytes,
            "detect_secrets": version("detect-secrets"),
            "plugins": [p.__name__ for p in plugins],
            "user": os.geteuid(),  # what one user may read another may not
        },
        sort_keys=True,
    )


def index_dir(home: str | os.PathLike, root: str | os.PathLike) -> Path:
    return Path(home) / INDEX_DIR / hashlib.sha256(str(root).encode()).hexdigest()[:32]


def _describe(exc: OSError) -> str:
    return "a symlink or not a folder" if exc.errno in (errno.ELOOP, errno.ENOTDIR) else exc.strerror or str(exc)


def racy_slack(entries: Iterable[Entry]) -> int:
    """The file system's timestamp granularity, as seen: whole seconds everywhere means a coarse one."""
    stamps = [t for e in entries for t in (e.stat[1], e.stat[2])]
    return COARSE_SLACK_NS if stamps and all(t % 1_000_000_000 == 0 for t in stamps) else FINE_SLACK_NS


class IngestIndex:
    """Read files through the index. `home=None` (or `full_rescan`) reads every file and keeps nothing."""

    def __init__(
        self,
        home: str | os.PathLike | None,
        root: str | os.PathLike,
        *,
        max_file_bytes: int,
        secret_entropy: bool = False,
        full_rescan: bool = False,
    ):
        self.max_file_bytes = max_file_bytes
        self.settings = index_settings(root, max_file_bytes, secret_entropy)
        self.dir = index_dir(home, root) if home is not None else None
        self.entries: dict[str, Entry] = {}
        self.fresh: dict[str, Entry] = {}  # what this run knows; written back by save()
        self.files_read = 0
        self.files_from_index = 0
        self.changed = False
        self.old: _RowTexts | None = None  # the loaded index's texts
        self.old_fh = None
        self.spill: _Spill | None = None
        self.spill_failed = False
        self.reads: dict[str, Entry | tuple[str, str]] = {}  # add_reads: files read elsewhere
        if self.dir is None:
            self.status = "off"
        elif full_rescan:
            self.status = "full rescan: every file read, the index rebuilt"
        else:
            self.status = self._load()

    # -- disk ---------------------------------------------------------------------------------
    def _open_dir(self, create: bool) -> int:
        """The index folder, each level below DAGSTER_HOME opened without following a symlink."""
        fd = os.open(self.dir.parent.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in (INDEX_DIR, self.dir.name):
                if create:
                    try:
                        os.mkdir(name, 0o777, dir_fd=fd)
                    except FileExistsError:
                        pass
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _load(self) -> str:
        """Fill `entries` from disk; the status line says what was found."""
        try:
            fh = self._open_index()
        except FileNotFoundError:
            return "new: every file read"
        except OSError as exc:
            return f"ignored ({_describe(exc)}), rebuilt"
        try:
            file = pq.ParquetFile(fh)
            schema = file.schema_arrow
            if not schema.remove_metadata().equals(SCHEMA):
                status = "ignored (not an index of this version), rebuilt"
            elif file.metadata.num_rows > MAX_ENTRIES:
                status = f"ignored (more than {MAX_ENTRIES:,} entries), rebuilt"
            elif (schema.metadata or {}).get(SETTINGS_KEY) != self.settings.encode():
                status = "ignored (settings, tools or source root changed), rebuilt"
            else:
                status = self._load_entries(file.read(columns=[n for n in SCHEMA.names if n != TEXT]))
        except Exception as exc:  # pyarrow raises several types for a damaged file
            self.entries.clear()
            status = f"ignored (unreadable: {type(exc).__name__}), rebuilt"
        if self.entries:
            self.old, self.old_fh = _RowTexts(file), fh
        else:
            fh.close()
        return status

    def _open_index(self):
        """The index file, opened without following a symlink, refused when not a regular file or too large."""
        fd = self._open_dir(create=False)
        try:
            file_fd = os.open(INDEX_FILE, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        finally:
            os.close(fd)
        info = os.fstat(file_fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_INDEX_BYTES:
            os.close(file_fd)
            raise (
                NotRegularFile("not a regular file") if not stat.S_ISREG(info.st_mode) else FileTooLarge("too large")
            )
        return os.fdopen(file_fd, "rb")

    def _load_entries(self, table: pa.Table) -> str:
        columns = {name: table[name].to_pylist() for name in table.column_names}
        stats = zip(*(columns[name] for name in _STAT_COLUMNS), strict=True)
        for row, (path, stat_key, outcome, key, secret) in enumerate(
            zip(columns["path"], stats, columns["outcome"], columns["content_key"], columns["secret"], strict=True)
        ):
            if (
                path is None
                or path in self.entries
                or outcome not in (TEXT, *CACHED_REASONS)
                or secret not in (None, SECRET_CLEAN, SECRET_FOUND)
                or None in stat_key
            ):
                self.entries.clear()
                return "ignored (malformed entries), rebuilt"
            kept = outcome == TEXT and secret != SECRET_FOUND
            self.entries[path] = Entry(stat_key, outcome, None, key, secret, (OLD, row) if kept else None)
        return f"used ({len(self.entries):,} entries)"

    def _text(self, ref: tuple[int, int]) -> str | None:
        where, row = ref
        return (self.old if where == OLD else self.spill).get(row)

    def _keep(self, text: str) -> tuple[int, int] | None:
        """Where a text read now is kept until `save`; None when no spill file can be made (the
        index is then not saved: it would lack the text)."""
        if self.dir is None or self.spill_failed:
            return None
        if self.spill is None:
            try:
                fd = self._open_dir(create=True)
                try:
                    self.spill = _Spill(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                self.spill_failed = True
                self.status += f"; not saved ({_describe(exc)})"
                return None
        return SPILL, self.spill.add(text)

    def close(self) -> None:
        """Release the loaded index and the spill file (`save` does it too)."""
        for handle in (self.old_fh, self.spill):
            if handle is not None:
                handle.close()
        self.old = self.old_fh = self.spill = None

    def save(self, started_ns: int) -> None:
        """Write what this run knows, without racy entries, when it differs from what was loaded.
        A failed write costs re-reads next time, never this run: it is reported in `status`."""
        try:
            if self.dir is None or self.spill_failed or (not self.changed and self.fresh.keys() == self.entries.keys()):
                return
            limit = started_ns - racy_slack(self.fresh.values())
            kept = sorted((p, e) for p, e in self.fresh.items() if e.stat[1] < limit and e.stat[2] < limit)
            rows = RowStream(SCHEMA.with_metadata({SETTINGS_KEY: self.settings}), self._batches(kept))
            try:
                fd = self._open_dir(create=True)
                try:
                    delete_stale_temps(fd, INDEX_FILE)  # a save killed mid-write leaves a whole index behind
                    write_bytes_atomic(fd, INDEX_FILE, lambda fh: write_parquet_stream(rows, fh))
                finally:
                    os.close(fd)
            except OSError as exc:
                self.status += f"; not saved ({_describe(exc)})"
        finally:
            self.close()

    def _batches(self, kept: list[tuple[str, Entry]]) -> Iterator[pa.Table]:
        """The kept entries as index rows, with their texts fetched, about a row group's bytes at a time."""
        start = 0
        while start < len(kept):
            end, size = start, 0
            while end < len(kept) and (end == start or size < parquet_io.ROW_GROUP_BYTES):
                size += kept[end][1].stat[0]
                end += 1
            part = kept[start:end]
            columns = [[p for p, _ in part]] + [[e.stat[i] for _, e in part] for i in range(len(_STAT_COLUMNS))]
            columns += [[e.outcome for _, e in part], [self._text(e.ref) if e.ref else None for _, e in part]]
            columns += [[getattr(e, name) for _, e in part] for name in ("key", "secret")]
            yield pa.Table.from_arrays(
                [pa.array(values, field.type) for values, field in zip(columns, SCHEMA, strict=True)], schema=SCHEMA
            )
            start = end

    # -- lookups ------------------------------------------------------------------------------
    def _cached(self, file: FileEntry, need: str) -> Entry | None:
        """The file's entry when its stat matches. `need`: NEED_TEXT (its text, fetched and
        checked against its content key), NEED_SCAN (the same, unless it is a known secret) or
        NEED_KEY (no text)."""
        entry = self.entries.get(file.path)
        if entry is None or file.stat is None or entry.stat != file.stat:
            return None
        if entry.outcome == TEXT and need != NEED_KEY:
            if entry.ref is None:  # a secret's text is never kept
                return entry if need == NEED_SCAN and entry.secret == SECRET_FOUND else None
            text = self._text(entry.ref)
            if text is None or len(text) > self.max_file_bytes or content_key(text) != entry.key:
                return None
            entry = replace(entry, text=text)
        return entry

    def _entry(self, file: FileEntry, need: str) -> Entry | tuple[str, str]:
        """The file's entry, from the index when its stat matches, else read now; or the (reason,
        detail) of a skip that is never cached."""
        entry = self._cached(file, need)
        if entry is not None:
            self.files_from_index += 1
            return entry
        self.files_read += 1
        entry = self.reads.pop(file.path, None) or read_entry(file, self.max_file_bytes)
        if isinstance(entry, tuple):
            self.fresh.pop(file.path, None)
            return entry
        self.changed = True
        return entry

    def _remember(self, file: FileEntry, entry: Entry) -> None:
        """What `save` writes for this file: the entry without its text, which stays where it is
        kept (the old index, or the spill file for a text read now)."""
        if file.stat is None:
            return
        if entry.text is not None and entry.ref is None:
            entry = replace(entry, ref=self._keep(entry.text))
        self.fresh[file.path] = replace(entry, text=None)

    def needs_read(self, file: FileEntry, scanner: SecretScanner | None = None) -> bool:
        """Whether `read(file, scanner)` would open the file (its stat changed, or it is new)."""
        return self._cached(file, NEED_TEXT if scanner is None else NEED_SCAN) is None

    def add_reads(self, reads: dict[str, Entry | tuple[str, str]]) -> None:
        """Results of `read_entry` done elsewhere (a compute backend), taken by `read` instead of
        opening the file; the index itself is still updated here."""
        self.reads.update(reads)

    def read(self, file: FileEntry, scanner: SecretScanner | None = None) -> str | tuple[str, str]:
        """What `corpus.read_text` gives, then ("secret", "") when `scanner` finds a credential."""
        entry = self._entry(file, NEED_TEXT if scanner is None else NEED_SCAN)
        if isinstance(entry, tuple):
            return entry
        if entry.outcome == TEXT and scanner is not None and entry.secret is None:
            entry = scanned(entry, scanner, file.path)
            self.changed = True
        self._remember(file, entry)
        if entry.outcome != TEXT:
            return entry.outcome, ""
        if entry.secret == SECRET_FOUND:
            return "secret", ""
        return entry.text

    def state(self, file: FileEntry) -> str:
        """What the file contributes, as a short string: its content key or its skip reason. A text
        read here is not scanned for credentials, so it is not kept (only its key): `read` reads it again."""
        entry = self._entry(file, NEED_KEY)
        if isinstance(entry, tuple):
            return entry[0]
        self._remember(file, replace(entry, text=None) if entry.secret is None else entry)
        return entry.key if entry.outcome == TEXT else entry.outcome


def source_fingerprint(scan: TreeScan, rules: PathRules, index: IngestIndex) -> tuple[str, int]:
    """(sha256 over each included file's path and content state, number of included files).
    A touch changes no state; a file read again only when its stat changed (cheap enough for a sensor)."""
    digest = hashlib.sha256()
    included = [f for f in scan.files if rules.is_included(f.path)]
    for file in included:
        digest.update(f"{file.path}\0{index.state(file)}\n".encode())
    index.save(scan.started_ns)
    return digest.hexdigest(), len(included)
