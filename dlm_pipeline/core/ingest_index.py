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
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dlm_pipeline.core.corpus import content_key, read_text
from dlm_pipeline.core.parquet_io import PARQUET_OPTIONS, write_bytes_atomic
from dlm_pipeline.core.rules import PathRules
from dlm_pipeline.core.safe_read import read_regular_file
from dlm_pipeline.core.secrets import CREDENTIAL_PLUGINS, ENTROPY_PLUGINS, SecretScanner
from dlm_pipeline.core.tree import FileEntry, StatKey, TreeScan

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


@dataclass(frozen=True)
class Entry:
    stat: StatKey
    outcome: str
    text: str | None = None
    key: str | None = None
    secret: str | None = None


def read_entry(file: FileEntry, max_file_bytes: int, scanner: SecretScanner | None = None) -> Entry | tuple[str, str]:
    """Read one file as the index records it: its text and content key (and, with a `scanner`, the
    credential verdict; a secret's text is dropped), a skip decided by content, or the (reason,
    detail) of a skip that is never cached. The same function runs in a compute backend's task."""
    result = read_text(file.abspath, max_file_bytes)
    if isinstance(result, tuple):
        return result if result[0] not in CACHED_REASONS or file.stat is None else Entry(file.stat, result[0])
    entry = Entry(file.stat or (), TEXT, result, content_key(result))
    return entry if scanner is None else scanned(entry, scanner, file.path)


def scanned(entry: Entry, scanner: SecretScanner, path: str) -> Entry:
    """The entry with its credential verdict; the text is dropped when one is found."""
    found = bool(scanner.findings(entry.text, path))
    return replace(entry, secret=SECRET_FOUND if found else SECRET_CLEAN, text=None if found else entry.text)


def index_settings(root: str | os.PathLike, max_file_bytes: int, secret_entropy: bool) -> str:
    """Everything a cached read result depends on besides the file itself, as one string."""
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
            fd = self._open_dir(create=False)
            try:
                data = read_regular_file(INDEX_FILE, MAX_INDEX_BYTES, dir_fd=fd, follow_symlinks=False)
            finally:
                os.close(fd)
        except FileNotFoundError:
            return "new: every file read"
        except OSError as exc:
            return f"ignored ({_describe(exc)}), rebuilt"
        try:
            table = pq.read_table(pa.BufferReader(data))
        except Exception as exc:  # pyarrow raises several types for a damaged file
            return f"ignored (unreadable: {type(exc).__name__}), rebuilt"
        if not table.schema.remove_metadata().equals(SCHEMA):
            return "ignored (not an index of this version), rebuilt"
        if table.num_rows > MAX_ENTRIES:
            return f"ignored (more than {MAX_ENTRIES:,} entries), rebuilt"
        if (table.schema.metadata or {}).get(SETTINGS_KEY) != self.settings.encode():
            return "ignored (settings, tools or source root changed), rebuilt"
        columns = {name: table[name].to_pylist() for name in SCHEMA.names}
        stats = zip(*(columns[name] for name in _STAT_COLUMNS), strict=True)
        for path, stat, outcome, text, key, secret in zip(
            columns["path"],
            stats,
            columns["outcome"],
            columns["text"],
            columns["content_key"],
            columns["secret"],
            strict=True,
        ):
            if (
                path is None
                or path in self.entries
                or outcome not in (TEXT, *CACHED_REASONS)
                or secret not in (None, SECRET_CLEAN, SECRET_FOUND)
                or None in stat
            ):
                self.entries.clear()
                return "ignored (malformed entries), rebuilt"
            self.entries[path] = Entry(stat, outcome, text, key, secret)
        return f"used ({len(self.entries):,} entries)"

    def save(self, started_ns: int) -> None:
        """Write what this run knows, without racy entries, when it differs from what was loaded.
        A failed write costs re-reads next time, never this run: it is reported in `status`."""
        if self.dir is None or (not self.changed and self.fresh.keys() == self.entries.keys()):
            return
        limit = started_ns - racy_slack(self.fresh.values())
        kept = sorted((p, e) for p, e in self.fresh.items() if e.stat[1] < limit and e.stat[2] < limit)
        columns = [[p for p, _ in kept]] + [[e.stat[i] for _, e in kept] for i in range(len(_STAT_COLUMNS))]
        columns += [[getattr(e, name) for _, e in kept] for name in ("outcome", "text", "key", "secret")]
        table = pa.Table.from_arrays(
            [pa.array(values, field.type) for values, field in zip(columns, SCHEMA, strict=True)], schema=SCHEMA
        ).replace_schema_metadata({SETTINGS_KEY: self.settings})
        try:
            fd = self._open_dir(create=True)
            try:
                write_bytes_atomic(fd, INDEX_FILE, lambda fh: pq.write_table(table, fh, **PARQUET_OPTIONS))
            finally:
                os.close(fd)
        except OSError as exc:
            self.status += f"; not saved ({_describe(exc)})"

    # -- lookups ------------------------------------------------------------------------------
    def _cached(self, file: FileEntry, need_text: bool) -> Entry | None:
        entry = self.entries.get(file.path)
        if entry is None or file.stat is None or entry.stat != file.stat:
            return None
        if entry.outcome == TEXT:
            if entry.text is None:  # a secret's text is never kept
                return None if need_text or entry.secret != SECRET_FOUND else entry
            if len(entry.text) > self.max_file_bytes or content_key(entry.text) != entry.key:
                return None
        return entry

    def _entry(self, file: FileEntry, need_text: bool) -> Entry | tuple[str, str]:
        """The file's entry, from the index when its stat matches, else read now; or the (reason,
        detail) of a skip that is never cached."""
        entry = self._cached(file, need_text)
        if entry is not None:
            self.files_from_index += 1
        else:
            self.files_read += 1
            entry = self.reads.pop(file.path, None) or read_entry(file, self.max_file_bytes)
            if isinstance(entry, tuple):
                self.fresh.pop(file.path, None)
                return entry
            self.changed = True
        if file.stat is not None:
            self.fresh[file.path] = entry
        return entry

    def needs_read(self, file: FileEntry, scanner: SecretScanner | None = None) -> bool:
        """Whether `read(file, scanner)` would open the file (its stat changed, or it is new)."""
        return self._cached(file, need_text=scanner is None) is None

    def add_reads(self, reads: dict[str, Entry | tuple[str, str]]) -> None:
        """Results of `read_entry` done elsewhere (a compute backend), taken by `read` instead of
        opening the file; the index itself is still updated here."""
        self.reads.update(reads)

    def read(self, file: FileEntry, scanner: SecretScanner | None = None) -> str | tuple[str, str]:
        """What `corpus.read_text` gives, then ("secret", "") when `scanner` finds a credential."""
        entry = self._entry(file, need_text=scanner is None)
        if isinstance(entry, tuple):
            return entry
        if entry.outcome != TEXT:
            return entry.outcome, ""
        if scanner is not None:
            if entry.secret is None:
                entry = scanned(entry, scanner, file.path)
                if file.stat is not None:
                    self.fresh[file.path] = entry
                self.changed = True
            if entry.secret == SECRET_FOUND:
                return "secret", ""
        return entry.text

    def state(self, file: FileEntry) -> str:
        """What the file contributes, as a short string: its content key or its skip reason."""
        entry = self._entry(file, need_text=False)
        if isinstance(entry, tuple):
            return entry[0]
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
