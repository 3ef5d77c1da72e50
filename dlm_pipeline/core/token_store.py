"""Content-addressed token store: immutable Parquet shards plus one manifest, shared by all seeds.

Layout under the cache root:

    manifest.json                    {"version": 2, "shards": {"<namespace>/<shard>": {rows, bytes, sha256, last_used}}}
    .lock                            flock'd while the manifest changes
    <namespace>/shard-<hex>.parquet  content_key, packed_ids (each text's full ids, never truncated), n_tokens
    <namespace>/shard-<hex>.keys     its key index (`token_index`): sorted key prefixes, per-text ranges and checksums

A namespace is (tokenizer fingerprint, special tokens); a key is the sha256 of the text, so a
renamed, moved or duplicated file hits, and `max_seq_len` is applied by the reader. Shards are
written atomically and never modified; the manifest is replaced atomically under an exclusive
lock, so concurrent runs (one per seed) and killed runs leave a readable store. A lookup finds
keys through each shard's key index and reads only the wanted texts' packed ids (the row groups
holding them, for a shard written before packing), so it reads O(requested), not the store. A
shard is trusted only when its size (always) and the checksums of what is read (the whole file's
sha256; or each text's checksum, or the footer's and row groups' sha256s, taken by the index from
the verified shard, the index itself bound to the manifest's sha256) match; a bad one is deleted
and what it held is tokenized again; a missing, stale or malformed index is rebuilt from its shard. Eviction is least-recently-used by
shard and never removes a shard the calling run is using.

The store never reaches outside itself: it only opens, writes or deletes regular files whose
names it could have created (`manifest.json`, `.lock`, `<namespace>/shard-<hex>.parquet`,
`<namespace>/shard-<hex>.keys` and their temp files), below its root, never through a symlink. Any other manifest key or folder entry is
ignored and reported.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import math
import os
import re
import secrets
import stat
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dlm_pipeline.core import token_index
from dlm_pipeline.core.arrow_utils import one_chunk, representative_rows
from dlm_pipeline.core.corpus import DEFAULT_MAX_FILE_BYTES
from dlm_pipeline.core.parquet_io import (
    PARQUET_OPTIONS,
    ParquetRows,
    RowStream,
    TableRows,
    byte_bounded_slices,
    write_bytes_atomic,
)
from dlm_pipeline.core.safe_read import open_regular, read_regular_file
from dlm_pipeline.core.split import content_keys
from dlm_pipeline.core.tokenize import TOKENS_SCHEMA, LoadedTokenizer, chunk_bounds, cut

MANIFEST = "manifest.json"
LOCK = ".lock"
MANIFEST_VERSION = 2
DEFAULT_MAX_BYTES = 10 * 1024**3
COMPACT_AT_SHARDS = 16  # a namespace with more shards than this has its small ones merged
COMPACT_SHARD_BYTES = 16 * 1024**2  # the smallest shards are merged up to this size in all (memory: a merge
# reads them whole, several times their size); larger ones are left alone
SHARD_MAX_IDS = 2**28  # a fresh shard holds at most this many ids (1 GiB as int32); more get more shards
GROUP_MAX_ROWS = 256  # a row group (what a lookup reads of a text it cannot read alone) holds at most this many texts
GROUP_MAX_IDS = 2**18  # and at most this many ids (1 MiB as int32), unless one text alone has more
MAX_SHARD_BYTES = 2 * 1024**3  # a shard file above this is not ours (ours stay far below)
COMPACT_MAX_IDS = 2**25  # a merge decodes at most this many ids (128 MiB as int32); shards beyond it are left alone
MAX_MANIFEST_BYTES = 256 * 1024**2
MAX_FOOTER_BYTES = 64 * 1024**2  # a shard's Parquet footer above this is not ours (ours: ~200 bytes per row group)
STALE_TEMP_SECONDS = 3600.0
LOCK_POLL_SECONDS = 0.05  # how often a bounded wait (`lock_wait`) tries the lock again

# Names the store creates; nothing else is ever opened, written or deleted.
NAMESPACE = re.compile(r"[0-9a-f]{32}(-special)?")
LEGACY_NAMESPACE = re.compile(r"[0-9a-f]{32}-L[1-9][0-9]{0,9}(-special)?")  # before v2: aged out by LRU
SHARD = re.compile(r"shard-[0-9a-f]{32}\.parquet")
KEYS = re.compile(rf"shard-[0-9a-f]{{32}}{re.escape(token_index.SUFFIX)}")
SHARD_KEY = re.compile(rf"(?P<ns>{NAMESPACE.pattern}|{LEGACY_NAMESPACE.pattern})/(?P<shard>{SHARD.pattern})")
TEMP = re.compile(rf"\.({re.escape(MANIFEST)}|{SHARD.pattern}|{KEYS.pattern})\.[A-Za-z0-9_]{{1,32}}\.tmp")
SHA256 = re.compile(r"[0-9a-f]{64}")

STORE_SCHEMA = pa.schema([("content_key", pa.string()), ("input_ids", pa.list_(pa.int32())), ("n_tokens", pa.int32())])
SHARD_SCHEMA = pa.schema([("content_key", pa.string()), (token_index.PACKED, pa.binary()), ("n_tokens", pa.int32())])
# (shards written before packing hold STORE_SCHEMA: they are read a row group at a time)
SHARD_WRITE_OPTIONS = {
    **PARQUET_OPTIONS,
    "write_statistics": False,  # nothing reads them; they bloat the footer
    # each text's ids packed on their own (`token_index.pack_ids`), the column not compressed again and one
    # page per row group: a text's ids are then one byte range a lookup reads alone (`token_index.read_direct`)
    "compression": {**dict.fromkeys(SHARD_SCHEMA.names, PARQUET_OPTIONS["compression"]), token_index.PACKED: "none"},
    "data_page_size": 8 * GROUP_MAX_IDS,  # twice a group's plain ids: one page, unless one text alone has more
}  # (and no dictionaries: a shard's keys are unique, so one only slows decoding)

Encoder = Callable[[Sequence[str]], pa.Table]  # texts -> input_ids (full), n_tokens
# (namespace, keys, texts) -> ((shard name, manifest entry) written by workers, encode seconds, tokens)
RemoteWriter = Callable[[str, Sequence[str], Sequence[str]], tuple[Sequence[tuple[str, dict]], float, int]]


class TokenStoreError(ValueError):
    """The store cannot be used as configured; the message names the path and what to set."""


def _taken(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """`table.take(rows)`, without copying any id when `rows` are consecutive rows in order (the
    usual case: a seed asks for texts in the order an earlier one stored them): a slice."""
    if len(rows) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
        return table.slice(int(rows[0]), len(rows))
    return table.take(pa.array(rows, pa.int64()))


def _as_stored(table: pa.Table, lengths: np.ndarray) -> pa.Table:
    """STORE_SCHEMA rows as a shard holds them (SHARD_SCHEMA: each text's ids packed on their own)."""
    return pa.table(
        {
            "content_key": table["content_key"],
            token_index.PACKED: token_index.pack_ids(table["input_ids"], lengths),
            "n_tokens": table["n_tokens"],
        },
        schema=SHARD_SCHEMA,
    )


class CorruptShard(Exception):
    """A shard whose file does not match its manifest entry."""

    pointed: np.ndarray = np.zeros(0, np.int64)  # positions of the wanted keys its index points at


@dataclass
class Lookup:
    """Result of get_or_compute, aligned with the requested content keys."""

    table: pa.Table  # STORE_SCHEMA (no input_ids when asked `lengths_only`), one row per requested key, same order
    hits: int = 0
    misses: int = 0
    shards_used: set[str] = field(default_factory=set)
    encode_seconds: float = 0.0
    encoded_tokens: int = 0  # tokens produced for the misses (before any were stored)
    repaired: list[str] = field(default_factory=list)  # shards found corrupt, deleted and re-tokenized
    ignored: list[str] = field(default_factory=list)  # manifest keys and folder entries the store left alone
    reasons: dict[str, str] = field(default_factory=dict)  # content key -> why it was tokenized (misses only)
    shard_bytes_read: int = 0  # shard bytes read to answer the lookup (footers and row groups, or whole shards)


NOT_IN_STORE = "not in store"  # never tokenized with this tokenizer, or evicted, or its shard was lost
SHARD_CORRUPT = "shard corrupt"  # the shard holding it failed its checksum and was deleted


def _is_count(value: object, limit: int = 2**53) -> bool:
    return type(value) is int and 0 <= value < limit


def valid_entry(name: object, info: object) -> bool:
    """A manifest entry the store could have written: a shard name it creates and sane numbers
    (current namespaces also need a sha256; legacy ones only need what eviction uses)."""
    if not isinstance(name, str) or not isinstance(info, dict):
        return False
    match = SHARD_KEY.fullmatch(name)
    if match is None:
        return False
    last_used = info.get("last_used")
    if not (_is_count(info.get("rows")) and _is_count(info.get("bytes"), MAX_SHARD_BYTES + 1)):
        return False
    if type(last_used) not in (int, float) or not math.isfinite(last_used):
        return False
    return LEGACY_NAMESPACE.fullmatch(match["ns"]) is not None or (
        isinstance(info.get("sha256"), str) and SHA256.fullmatch(info["sha256"]) is not None
    )


def lock_holder(lock: os.stat_result, locks_table: str = "/proc/locks") -> str:
    """Who holds the flock on the file `lock` (its stat), as `process <pid>` read from Linux's lock
    table, or `another process` where that table is missing or does not say."""
    try:
        with open(locks_table, encoding="ascii", errors="replace") as fh:
            table = fh.read(1 << 20)
    except OSError:
        return "another process"
    wanted = f"{os.major(lock.st_dev):02x}:{os.minor(lock.st_dev):02x}:{lock.st_ino}"
    for line in table.splitlines():  # `1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF`; waiters have `->`
        fields = line.split()
        if (
            len(fields) >= 6
            and fields[1] == "FLOCK"
            and fields[5] == wanted
            and fields[4].isdigit()
            and fields[4] != "0"
        ):
            return f"process {fields[4]}"
    return "another process"


def _index_name(shard: str) -> str:
    return shard.removesuffix(".parquet") + token_index.SUFFIX


def _is_namespace(name: str) -> bool:
    return NAMESPACE.fullmatch(name) is not None or LEGACY_NAMESPACE.fullmatch(name) is not None


def _show(name: object, limit: int = 120) -> str:
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class TokenStore:
    def __init__(
        self,
        root: str | os.PathLike,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_text_bytes: int = DEFAULT_MAX_FILE_BYTES,
        lock_wait: float | None = None,
    ):
        """`max_text_bytes`: the largest text a run reads (DLM_MAX_FILE_BYTES); it bounds the ids a
        stored text may have (`token_index.text_ids_bound`), so no count read from the store sizes more.
        `lock_wait`: seconds to wait for the lock before TokenStoreError (None: as long as it takes, as
        runs do: another run's update always ends; a command a user waits on should not hang)."""
        self.root = Path(root).absolute()
        self.max_bytes = max_bytes
        self.lock_wait = lock_wait
        self.max_text_bytes = max_text_bytes  # what a worker's store (`--compute ray`) is built with too
        self.max_text_ids = token_index.text_ids_bound(max_text_bytes)  # the largest text a run reads
        self.bytes_read = 0  # shard bytes read by lookups, whole or in row groups (for tests and benchmarks)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with self._root_fd() as fd:
                os.close(self._open_lock(fd))
                self._check_manifest_name(fd)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            if self.root.exists() and not self.root.is_dir():
                reason = "not a directory"
            elif self.root.is_symlink() and not self.root.exists():
                reason = "a symlink that leads nowhere: dangling or a loop"
            raise TokenStoreError(
                f"token cache folder {self.root} cannot be used ({reason}); set DLM_CACHE_DIR to a writable folder"
            ) from None

    # -- file access: only names we create, never through a symlink -------------------------
    @contextmanager
    def _root_fd(self) -> Iterator[int]:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def _namespace_fd(self, namespace: str, create: bool = False) -> Iterator[int]:
        """The namespace folder, opened without following a symlink (a symlinked one is refused)."""
        if not _is_namespace(namespace):
            raise TokenStoreError(f"{namespace!r} is not a token store namespace")
        with self._root_fd() as root:
            if create:
                try:
                    os.mkdir(namespace, 0o777, dir_fd=root)
                except FileExistsError:
                    pass
            try:
                fd = os.open(namespace, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise TokenStoreError(
                        f"{self.root / namespace} is not a plain folder (a symlink?); the token store never "
                        "follows one: remove it"
                    ) from None
                raise
        try:
            yield fd
        finally:
            os.close(fd)

    def _open_lock(self, root_fd: int) -> int:
        try:
            fd = os.open(
                LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o666, dir_fd=root_fd
            )
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise TokenStoreError(
                    f"{self.root / LOCK} is a symlink; the token store never follows one: remove it"
                ) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise TokenStoreError(f"{self.root / LOCK} is not a regular file: remove it")
        return fd

    def _check_manifest_name(self, root_fd: int) -> None:
        """A folder at the manifest's name could never be replaced (every write would fail): refused at
        once, with what to do. (Any other file there reads as no manifest and is replaced atomically,
        never followed or opened for writing.)"""
        try:
            found = os.stat(MANIFEST, dir_fd=root_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(found.st_mode):
            raise TokenStoreError(f"{self.root / MANIFEST} is a folder, not the token store's manifest: remove it")

    @staticmethod
    def _unlink_regular(dir_fd: int, name: str) -> bool:
        """Delete a regular file (never a symlink or anything else); True when it was deleted."""
        try:
            if not stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                return False
            os.unlink(name, dir_fd=dir_fd)
            return True
        except FileNotFoundError:
            return False

    def _delete_shard(self, name: str) -> bool:
        """Delete a shard and its key index."""
        namespace, shard = name.split("/")
        try:
            with self._namespace_fd(namespace) as fd:
                self._unlink_regular(fd, _index_name(shard))
                return self._unlink_regular(fd, shard)
        except (FileNotFoundError, TokenStoreError):
            return False

    def _shard_bytes(self, name: str, info: dict) -> bytes:
        """The whole shard file, after its size and sha256 are checked against the manifest (a file
        larger than the manifest says is refused before it is read)."""
        namespace, shard = name.split("/")
        try:
            with self._namespace_fd(namespace) as fd:
                data = read_regular_file(shard, info["bytes"], dir_fd=fd, follow_symlinks=False)
        except (OSError, TokenStoreError) as exc:
            raise CorruptShard(f"{name}: {exc}") from None
        if len(data) != info["bytes"] or hashlib.sha256(data).hexdigest() != info.get("sha256"):
            raise CorruptShard(f"{name}: size or sha256 differs from the manifest")
        return data

    @staticmethod
    def _decode(name: str, data: bytes) -> pa.Table:
        """A verified shard's rows as stored (SHARD_SCHEMA, or STORE_SCHEMA if older)."""
        try:
            table = pq.read_table(pa.BufferReader(data))
            return table.select(SHARD_SCHEMA.names if token_index.PACKED in table.column_names else STORE_SCHEMA.names)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise CorruptShard(f"{name}: {exc}") from None

    def _unpack(self, name: str, stored: pa.Table) -> pa.Table:
        """A shard's rows as stored -> STORE_SCHEMA; CorruptShard when a text claims more ids than any may have."""
        try:
            return token_index.unpacked(stored, self.max_text_ids).select(STORE_SCHEMA.names).cast(STORE_SCHEMA)
        except Exception as exc:  # ValueError, or pyarrow's several types for a damaged file
            raise CorruptShard(f"{name}: {exc}") from None

    # -- manifest -------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[dict]:
        """Exclusive access to the manifest; the yielded dict is written back on exit if it changed
        (most lookups change nothing, and every write is an fsync)."""
        with self._root_fd() as root:
            lock = self._open_lock(root)
            try:
                self._acquire(lock)
                manifest = self._read_manifest(root)
                before = json.dumps(manifest, sort_keys=True)
                yield manifest
                if json.dumps(manifest, sort_keys=True) != before:
                    data = json.dumps(manifest, sort_keys=True, indent=1).encode()
                    write_bytes_atomic(root, MANIFEST, lambda fh: fh.write(data))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
                os.close(lock)

    def _acquire(self, lock: int) -> None:
        """flock the lock file, waiting at most `lock_wait` seconds when it is set."""
        if self.lock_wait is None:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return
        deadline = time.monotonic() + self.lock_wait
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(LOCK_POLL_SECONDS)
        holder = lock_holder(os.fstat(lock))
        raise TokenStoreError(
            f"{self.root / LOCK} is still held after {self.lock_wait:g} s by {holder}: a run or a `cache` command "
            "is using the token store; retry when it ends, or stop it"
        )

    def _read_manifest(self, root_fd: int | None = None) -> dict:
        """The manifest as stored (malformed entries included; `_entries` filters them); an
        unreadable or foreign manifest reads as empty and is rebuilt from the shards."""
        try:
            if root_fd is None:
                with self._root_fd() as fd:
                    data = read_regular_file(MANIFEST, MAX_MANIFEST_BYTES, dir_fd=fd, follow_symlinks=False)
            else:
                data = read_regular_file(MANIFEST, MAX_MANIFEST_BYTES, dir_fd=root_fd, follow_symlinks=False)
            manifest = json.loads(data)
            if isinstance(manifest, dict) and isinstance(manifest.get("shards"), dict):
                return manifest
        except (OSError, ValueError, RecursionError):  # missing, symlink, huge, torn, huge numbers
            pass
        return {"version": MANIFEST_VERSION, "shards": {}}

    def namespace_mark(self, namespace: str) -> str:
        """sha256 of what the manifest lists for `namespace` (each shard's name, size and sha256):
        it changes whenever texts are added, evicted, cleared, repaired, merged or rewritten. While a
        listed shard is missing or not its listed size (damaged by hand), it is new at every call.
        An output made from the store at one mark may count on the same ids being there at that mark."""
        good, _ = self._entries(self._read_manifest())
        listed = sorted(
            (name.split("/")[1], info["bytes"], str(info.get("sha256")))
            for name, info in good.items()
            if name.split("/")[0] == namespace
        )
        try:
            with self._namespace_fd(namespace) if listed else nullcontext() as fd:
                for shard, size, _ in listed:
                    found = os.stat(shard, dir_fd=fd, follow_symlinks=False)
                    if not stat.S_ISREG(found.st_mode) or found.st_size != size:
                        return f"damaged:{secrets.token_hex(8)}"
        except (OSError, TokenStoreError):
            return f"damaged:{secrets.token_hex(8)}"
        return hashlib.sha256(json.dumps(listed).encode()).hexdigest()

    @staticmethod
    def _entries(manifest: dict) -> tuple[dict[str, dict], list[str]]:
        """(the entries the store could have written, the others shown for reports)."""
        good, ignored = {}, []
        for name, info in manifest["shards"].items():
            if valid_entry(name, info):
                good[name] = info
            else:
                ignored.append(_show(name))
        return good, sorted(ignored)

    # -- repair, eviction, stats ------------------------------------------------------------
    def repair(self, stale_after: float = STALE_TEMP_SECONDS) -> dict:
        """Drop manifest entries whose shard is gone; delete shards whose size differs from the
        manifest (`corrupt`); adopt complete shards the manifest lost; delete unreadable shards and
        temp files left by killed writers. Malformed manifest entries and foreign folder entries
        are left alone and listed under `ignored`."""
        report: dict = {"dropped": 0, "adopted": 0, "deleted": 0, "corrupt": [], "ignored": []}
        now = time.time()
        with self._locked() as manifest, self._root_fd() as root:
            shards = manifest["shards"]
            good, report["ignored"] = self._entries(manifest)
            report["deleted"] += self._delete_stale_temps(root, now, stale_after)  # manifest temps
            folders = set()
            for entry in sorted(os.scandir(root), key=lambda e: e.name):
                if entry.name in (MANIFEST, LOCK) or TEMP.fullmatch(entry.name):
                    continue
                if not (entry.is_dir(follow_symlinks=False) and _is_namespace(entry.name)):
                    report["ignored"].append(f"{_show(entry.name)} (not a namespace folder)")
                    continue
                folders.add(entry.name)
                self._repair_namespace(entry.name, shards, good, report, now, stale_after)
            for name in good:  # entries whose folder is gone (or is not a plain folder)
                if name.split("/")[0] not in folders:
                    del shards[name]
                    report["dropped"] += 1
        report["ignored"].sort()  # not in the folder's listing order
        return report

    def _delete_stale_temps(self, fd: int, now: float, stale_after: float) -> int:
        deleted = 0
        for entry in os.scandir(fd):
            if not TEMP.fullmatch(entry.name):
                continue
            try:
                stale = now - entry.stat(follow_symlinks=False).st_mtime >= stale_after
            except FileNotFoundError:  # its writer finished meanwhile
                continue
            if stale and self._unlink_regular(fd, entry.name):
                deleted += 1
        return deleted

    def _repair_namespace(
        self, namespace: str, shards: dict, good: dict, report: dict, now: float, stale_after: float
    ) -> None:
        with self._namespace_fd(namespace) as fd:
            report["deleted"] += self._delete_stale_temps(fd, now, stale_after)  # shard temps
            present, indexes = {}, []
            for entry in os.scandir(fd):
                if SHARD.fullmatch(entry.name):
                    present[entry.name] = entry.stat(follow_symlinks=False)
                elif KEYS.fullmatch(entry.name):
                    indexes.append(entry.name)
                elif not TEMP.fullmatch(entry.name):
                    report["ignored"].append(f"{_show(namespace + '/' + entry.name)} (not a shard)")
            for name in [n for n in good if n.split("/")[0] == namespace]:
                info = present.get(name.split("/")[1])
                if info is None or not stat.S_ISREG(info.st_mode):
                    del shards[name]
                    report["dropped"] += 1
                elif info.st_size != good[name]["bytes"]:  # truncated or grown in place
                    self._unlink_regular(fd, name.split("/")[1])
                    present.pop(name.split("/")[1])
                    del shards[name]
                    report["corrupt"].append(name)
            for shard, info in sorted(present.items()):
                name = f"{namespace}/{shard}"
                if name in good:
                    continue
                if not stat.S_ISREG(info.st_mode):
                    report["ignored"].append(f"{_show(name)} (not a regular file)")
                    continue
                try:
                    if NAMESPACE.fullmatch(namespace) is None:
                        raise ValueError("a shard of a namespace before v2")
                    rows, size, digest = self._unlisted_shard(fd, shard)
                except Exception:  # unreadable or foreign, at a name we create: not ours to keep
                    if self._unlink_regular(fd, shard):
                        report["deleted"] += 1
                    continue
                shards[name] = {"rows": rows, "bytes": size, "sha256": digest, "last_used": now}
                report["adopted"] += 1
            shards_left = {entry.name for entry in os.scandir(fd) if SHARD.fullmatch(entry.name)}
            for index in indexes:  # an index whose shard is gone (a shard is written before its index)
                if index.removesuffix(token_index.SUFFIX) + ".parquet" not in shards_left:
                    self._unlink_regular(fd, index)

    @staticmethod
    def _unlisted_shard(fd: int, shard: str) -> tuple[int, int, str]:
        """(rows, bytes, sha256) of a shard the manifest lost, in bounded memory: its footer (at most
        MAX_FOOTER_BYTES) is read and its schema checked first, then the file is hashed a block at a
        time, so a file of MAX_SHARD_BYTES at a shard's name costs a read, never its size in memory.
        ValueError or OSError when it is no token shard of this version."""
        file_fd, info = open_regular(shard, dir_fd=fd, follow_symlinks=False)
        with os.fdopen(file_fd, "rb") as fh:
            if info.st_size > MAX_SHARD_BYTES:
                raise ValueError(f"over {MAX_SHARD_BYTES} bytes")
            fh.seek(max(info.st_size - 8, 0))
            _, footer_length = token_index.footer_range(info.st_size, fh.read(8))
            if footer_length > MAX_FOOTER_BYTES:
                raise ValueError("a footer larger than a shard of ours has")
            metadata = pq.read_metadata(pa.PythonFile(fh, mode="r"))
            if metadata.schema.to_arrow_schema().names not in (SHARD_SCHEMA.names, STORE_SCHEMA.names):
                raise ValueError("not a token shard of this version")
            fh.seek(0)
            digest = hashlib.file_digest(fh, "sha256")
            if fh.tell() != info.st_size:
                raise ValueError("changed while it was read")
        return metadata.num_rows, info.st_size, digest.hexdigest()

    def evict(self, protect: set[str] = frozenset(), max_bytes: int | None = None) -> list[str]:
        """Remove least-recently-used shards until the store fits; `protect` is never removed."""
        limit = self.max_bytes if max_bytes is None else max_bytes
        removed = []
        with self._locked() as manifest:
            good, _ = self._entries(manifest)
            total = sum(info["bytes"] for info in good.values())
            for name, info in sorted(good.items(), key=lambda kv: (kv[1]["last_used"], kv[0])):
                if total <= limit:
                    break
                if name in protect:
                    continue
                self._delete_shard(name)
                total -= info["bytes"]
                removed.append(name)
            for name in removed:
                del manifest["shards"][name]
        return removed

    def stats(self) -> dict:
        good, ignored = self._entries(self._read_manifest())
        namespaces: dict[str, dict[str, int]] = {}
        for name, info in good.items():
            ns = namespaces.setdefault(name.split("/")[0], {"shards": 0, "rows": 0, "bytes": 0})
            ns["shards"] += 1
            ns["rows"] += info["rows"]
            ns["bytes"] += info["bytes"]
        return {
            "root": str(self.root),
            "shards": len(good),
            "rows": sum(s["rows"] for s in good.values()),
            "bytes": sum(s["bytes"] for s in good.values()),
            "max_bytes": self.max_bytes,
            "namespaces": namespaces,
            "ignored": ignored,
        }

    def clear(self) -> None:
        """Delete every shard and temp file the store named, and the namespace folders they
        leave empty; anything else is left where it is."""
        with self._locked() as manifest, self._root_fd() as root:
            for entry in os.scandir(root):
                if not (entry.is_dir(follow_symlinks=False) and _is_namespace(entry.name)):
                    continue
                with self._namespace_fd(entry.name) as fd:
                    for child in os.scandir(fd):
                        if SHARD.fullmatch(child.name) or KEYS.fullmatch(child.name) or TEMP.fullmatch(child.name):
                            self._unlink_regular(fd, child.name)
                try:
                    os.rmdir(entry.name, dir_fd=root)
                except OSError:  # something foreign is left in it
                    pass
            good, _ = self._entries(manifest)
            for name in good:
                del manifest["shards"][name]

    # -- reads and writes -------------------------------------------------------------------
    def _write_shards(self, namespace: str, table: pa.Table, limits: np.ndarray | None = None) -> list[str]:
        """Store rows as new shards of at most SHARD_MAX_IDS ids each (but those over their `limits`,
        `max_text_ids` unless given); their names."""
        table = self._storable(table, self.max_text_ids if limits is None else limits)
        lengths = table["n_tokens"].to_numpy(zero_copy_only=False).astype(np.int64)
        names = []
        if not table.num_rows:
            return names
        with self._namespace_fd(namespace, create=True) as fd:
            for start, end in chunk_bounds(lengths, SHARD_MAX_IDS):
                name, entry = self._put_shard(fd, namespace, table.slice(start, end - start), time.time())
                with self._locked() as manifest:
                    manifest["shards"][name] = entry
                names.append(name)
        return names

    def _storable(self, table: pa.Table, limits: np.ndarray | int) -> pa.Table:
        """STORE_SCHEMA rows but those with more ids than their text may have (`limits`, from `_limits`
        or `max_text_ids`): a lookup would read them as corrupt, so they are returned to the caller and
        tokenized again next time instead of stored."""
        table = table.cast(STORE_SCHEMA)
        fits = table["n_tokens"].to_numpy(zero_copy_only=False) <= limits
        return table if fits.all() else table.filter(pa.array(fits))

    def _limits(self, texts: Sequence[str] | Callable, text_bytes: np.ndarray | None, count: int) -> np.ndarray:
        """The most ids each of `count` texts may have: by its size when known, else `max_text_ids`."""
        if text_bytes is None and not callable(texts):
            text_bytes = pc.binary_length(pa.array(list(texts), pa.string())).to_numpy(zero_copy_only=False)
        if text_bytes is None:
            return np.full(count, self.max_text_ids, np.int64)
        sizes = np.asarray(text_bytes, np.int64)
        return np.minimum(token_index.text_ids_bound(sizes), self.max_text_ids)

    def write_unlisted(self, namespace: str, table: pa.Table) -> list[tuple[str, dict]]:
        """A worker's part (SPEC §6, `--compute ray`): store rows as immutable shards named by the
        sha256 of their bytes, without touching the manifest; (name, entry) pairs for `commit`.
        A retried task writes the same bytes under the same name, so a rerun replaces nothing."""
        table = self._storable(table, self.max_text_ids)
        if not table.num_rows:
            return []
        lengths = table["n_tokens"].to_numpy(zero_copy_only=False).astype(np.int64)
        with self._namespace_fd(namespace, create=True) as fd:
            return [
                self._put_shard(fd, namespace, table.slice(start, end - start), time.time(), content_named=True)
                for start, end in chunk_bounds(lengths, SHARD_MAX_IDS)
            ]

    def commit(self, written: Sequence[tuple[str, dict]]) -> dict[str, dict]:
        """The driver's part: list shards that workers wrote in the manifest, in one locked update.
        Only entries the store could have written, for a current namespace, whose file is a regular
        file of the stated size, are listed (the sha256 is checked when a shard is read); the
        listed ones are returned."""
        committed, now = {}, time.time()
        with self._locked() as manifest:
            for name, entry in written:
                entry = {**entry, "last_used": now} if isinstance(entry, dict) else entry
                if not valid_entry(name, entry) or NAMESPACE.fullmatch(name.split("/")[0]) is None:
                    continue
                namespace, shard = name.split("/")
                try:
                    with self._namespace_fd(namespace) as fd:
                        info = os.stat(shard, dir_fd=fd, follow_symlinks=False)
                except (OSError, TokenStoreError):
                    continue
                if stat.S_ISREG(info.st_mode) and info.st_size == entry["bytes"]:
                    manifest["shards"][name] = committed[name] = entry
        return committed

    @staticmethod
    def _put_shard(
        fd: int, namespace: str, table: pa.Table, last_used: float, content_named: bool = False
    ) -> tuple[str, dict]:
        """Write one shard and then its key index into the namespace folder `fd`; (its name, its
        manifest entry). Named by a random id, or by its content (`content_named`: the same bytes
        always get the same name). Row groups stay small: a row that cannot be read alone is read with
        its whole row group."""
        sink = io.BytesIO()
        lengths = table["n_tokens"].to_numpy(zero_copy_only=False).astype(np.int64)
        table = _as_stored(table, lengths)
        with pq.ParquetWriter(sink, table.schema, use_dictionary=False, **SHARD_WRITE_OPTIONS) as writer:
            for start, end in chunk_bounds(lengths, GROUP_MAX_IDS):
                for at in range(start, max(end, start + 1), GROUP_MAX_ROWS):
                    writer.write_table(
                        table.slice(at, min(end, at + GROUP_MAX_ROWS) - at), row_group_size=GROUP_MAX_ROWS
                    )
        data = sink.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        shard = f"shard-{digest[:32] if content_named else uuid.uuid4().hex}.parquet"
        write_bytes_atomic(fd, shard, lambda fh: fh.write(data))
        index = token_index.build(data, table, digest)
        write_bytes_atomic(fd, _index_name(shard), lambda fh: fh.write(index))
        entry = {"rows": table.num_rows, "bytes": len(data), "sha256": digest, "last_used": last_used}
        return f"{namespace}/{shard}", entry

    def _drop_corrupt(self, name: str, info: dict) -> bool:
        """Delete a shard that failed verification, unless the manifest changed it meanwhile (a
        concurrent compaction or eviction removes shards a reader may still be about to read)."""
        with self._locked() as manifest:
            if manifest["shards"].get(name) != info:
                return False
            del manifest["shards"][name]
            self._delete_shard(name)
            return True

    def compact(self, namespace: str | None = None, at_shards: int = COMPACT_AT_SHARDS) -> int:
        """Merge the smallest shards of each namespace that has more than `at_shards` of them into one
        of at most COMPACT_SHARD_BYTES (duplicates dropped); returns how many shards were merged away. Runs under the lock, so
        writers wait; a reader holding an older snapshot finds a merged shard gone and recomputes."""
        merged_away = 0
        with self._locked() as manifest:
            shards = manifest["shards"]
            good, _ = self._entries(manifest)
            current = {n.split("/")[0] for n in good if NAMESPACE.fullmatch(n.split("/")[0])}
            for ns in sorted(current if namespace is None else current & {namespace}):
                members = sorted(n for n in good if n.split("/")[0] == ns)
                small, total = [], 0  # the smallest, while together they stay within COMPACT_SHARD_BYTES (memory)
                for name in sorted(members, key=lambda n: (good[n]["bytes"], n)):
                    if total + good[name]["bytes"] > COMPACT_SHARD_BYTES:
                        break
                    small.append(name)
                    total += good[name]["bytes"]
                small.sort()  # merged in name order, as before the size cap
                if len(members) <= at_shards or len(small) < 2:
                    continue
                tables, merged_names, ids = [], [], 0
                for name in small:
                    try:
                        stored = self._decode(name, self._shard_bytes(name, good[name]))
                        try:
                            n_ids = int(token_index.checked_counts(stored["n_tokens"], self.max_text_ids).sum())
                        except ValueError as exc:
                            raise CorruptShard(f"{name}: {exc}") from None
                        if ids + n_ids > COMPACT_MAX_IDS:
                            continue  # left as it is: a merge's memory is bounded by the ids it decodes
                        tables.append(self._unpack(name, stored))
                        merged_names.append(name)
                        ids += n_ids
                    except CorruptShard:
                        del shards[name]
                        self._delete_shard(name)
                if len(tables) < 2:
                    continue
                merged = pa.concat_tables(tables)
                encoded = pc.dictionary_encode(merged["content_key"].combine_chunks())
                keep = representative_rows(encoded.indices.to_numpy(zero_copy_only=False), len(encoded.dictionary))
                merged = merged.take(pa.array(np.sort(keep), pa.int64()))
                with self._namespace_fd(ns) as fd:
                    name, entry = self._put_shard(fd, ns, merged, max(good[n]["last_used"] for n in merged_names))
                for old in merged_names:
                    del shards[old]
                    self._delete_shard(old)
                shards[name] = entry
                merged_away += len(merged_names) - 1
        return merged_away

    def _touch(self, names: set[str]) -> None:
        now = time.time()
        with self._locked() as manifest:
            for name in names:
                if isinstance(manifest["shards"].get(name), dict):
                    manifest["shards"][name]["last_used"] = now

    def _key_index(self, name: str, info: dict, rebuild: bool = False) -> token_index.KeyIndex:
        """The shard's key index; built again from the whole shard (verified, else CorruptShard)
        when it is missing, made for other bytes or malformed, or when `rebuild` is asked."""
        namespace, shard = name.split("/")
        if not rebuild:
            try:
                with self._namespace_fd(namespace) as fd:
                    return token_index.KeyIndex.open(fd, _index_name(shard), info)
            except (token_index.BadIndex, TokenStoreError, OSError):
                pass
        data = self._shard_bytes(name, info)
        table = self._decode(name, data)
        try:
            content = token_index.build(data, table, info["sha256"])
        except Exception as exc:  # a shard that passed its sha256 but is no Parquet file of ours
            raise CorruptShard(f"{name}: {exc}") from None
        del table
        self.bytes_read += len(data)
        with self._locked() as manifest:  # never for a shard that was deleted or replaced meanwhile
            current = manifest["shards"].get(name)
            if isinstance(current, dict) and current.get("sha256") == info["sha256"]:
                try:  # the index is only a shortcut: one that cannot be saved (a folder at its name) is used unsaved
                    with self._namespace_fd(namespace) as fd:
                        write_bytes_atomic(fd, _index_name(shard), lambda fh: fh.write(content))
                except (OSError, TokenStoreError):
                    pass
        try:
            return token_index.KeyIndex.parse(content, info)
        except token_index.BadIndex as exc:  # the manifest entry does not describe its shard (its row count)
            raise CorruptShard(f"{name}: {exc}") from None

    def _read_rows(
        self,
        name: str,
        info: dict,
        index: token_index.KeyIndex,
        rows: np.ndarray,
        keys: pa.Array,
        columns: Sequence[str],
        limits: np.ndarray,
    ) -> tuple[pa.Table, np.ndarray]:
        """Rows `rows` of the shard (`columns` of STORE_SCHEMA; `keys` the content keys wanted there,
        `limits` the most ids each may have), and which rows' own byte ranges did not match their
        checksum. A row in a group whose packed values can be read alone is (`token_index.read_direct`);
        the others, and any such row that does not match, are read as whole row groups with the footer
        (all their bytes verified; only `columns` of the rows asked for decoded)."""
        namespace, shard = name.split("/")
        direct = np.flatnonzero(index.packed_starts[index.group_of(rows)] != 0)
        suspect, slow = np.zeros(len(rows), bool), np.ones(len(rows), bool)
        parts: list[tuple[np.ndarray, pa.Table]] = []
        try:
            with self._namespace_fd(namespace) as dir_fd:
                fd, found = open_regular(shard, dir_fd=dir_fd, follow_symlinks=False)
            try:
                if found.st_size != info["bytes"]:
                    raise CorruptShard(f"{name}: not the size the manifest says")
                if len(direct):
                    wanted = keys.take(pa.array(direct, pa.int64())).cast(pa.binary()).to_pylist()
                    ok, counts, values, read = token_index.read_direct(
                        fd, index, rows[direct], wanted, limits[direct], decode="input_ids" in columns
                    )
                    self.bytes_read += read
                    suspect[direct[~ok]], slow[direct[ok]] = True, False
                    parts.append((direct[ok], self._direct_table(keys, direct[ok], counts[ok], values, columns)))
                if slow.any():
                    at = np.flatnonzero(slow)
                    parts.append((at, self._read_groups(info, fd, index, rows[at], columns, limits[at])))
            finally:
                os.close(fd)
        except CorruptShard:
            raise
        except Exception as exc:  # OSError, a checksum mismatch, or pyarrow's several types for a damaged file
            raise CorruptShard(f"{name}: {exc}") from None
        table = pa.concat_tables([part for _, part in parts])
        return _taken(table, np.argsort(np.concatenate([at for at, _ in parts]), kind="stable")), suspect

    @staticmethod
    def _direct_table(
        keys: pa.Array, at: np.ndarray, counts: np.ndarray, values: bytes, columns: Sequence[str]
    ) -> pa.Table:
        """The rows read by their byte ranges (checked with their keys, so the keys are the wanted ones)."""
        offsets = np.zeros(len(at) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        table = {
            "content_key": keys.take(pa.array(at, pa.int64())).cast(pa.string()),
            "n_tokens": pa.array(counts, pa.int32()),
        }
        if "input_ids" in columns:
            ids = np.frombuffer(values, "<i4").astype(np.int32, copy=False)
            table["input_ids"] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(ids, pa.int32()))
        return pa.table({c: table[c] for c in columns}, schema=pa.schema([STORE_SCHEMA.field(c) for c in columns]))

    def _read_groups(
        self,
        info: dict,
        fd: int,
        index: token_index.KeyIndex,
        rows: np.ndarray,
        columns: Sequence[str],
        limits: np.ndarray,
    ) -> pa.Table:
        """Rows `rows` (ascending) of the shard open at `fd`, reading only its footer and the row groups
        holding them (all their bytes are verified; only `columns` of the rows asked for are decoded)."""
        table = token_index.read_verified(fd, info["bytes"], index, rows, list(columns), limits)
        self.bytes_read += index.footer[1] + int(index.group_lengths[np.unique(index.group_of(rows))].sum())
        return table.cast(pa.schema([STORE_SCHEMA.field(c) for c in columns]))

    def _find_in_shard(
        self,
        name: str,
        info: dict,
        wanted: pa.Array,
        prefixes: np.ndarray,
        pending: np.ndarray,
        columns: Sequence[str],
        limits: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, pa.Table]:
        """(positions of `pending` keys the index points into this shard, positions found, their rows).
        Every returned row's full content key is compared; an index that points at other keys is
        rebuilt once (a 64-bit prefix shared by two keys is the only other cause). Row groups that
        fail their index's checksums mean the index or the shard lies: the index is rebuilt from the
        whole shard, verified, so only a shard proven bad is deleted."""
        pointed = np.zeros(0, np.int64)
        for rebuild in (False, True):
            try:
                index = self._key_index(name, info, rebuild)
            except CorruptShard as exc:
                exc.pointed = pointed  # the keys the first index pointed into this shard
                raise
            try:
                at, rows = index.candidates(prefixes[pending])
            except token_index.BadIndex:
                if rebuild:
                    raise CorruptShard(f"{name}: its index points outside it") from None
                continue
            in_shard_order = np.argsort(rows, kind="stable")  # whole row groups then need no reordering
            at, rows = at[in_shard_order], rows[in_shard_order]
            if not len(at):
                return at, at, STORE_SCHEMA.empty_table()
            try:
                table, suspect = self._read_rows(
                    name, info, index, rows, wanted.take(pa.array(pending[at])), columns, limits[pending[at]]
                )
            except CorruptShard as exc:
                pointed = exc.pointed = pending[at]
                if rebuild:
                    raise
                continue
            same = pc.equal(table["content_key"], wanted.take(pa.array(pending[at]))).to_numpy(zero_copy_only=False)
            if (same.all() and not suspect.any()) or rebuild:
                break
        hits = np.flatnonzero(same)
        _, first = np.unique(at[hits], return_index=True)  # one row per key, should a shard hold it twice
        hits = hits[first]
        return pending[at], pending[at[hits]], _taken(table, hits)

    def _gather(
        self,
        names: dict[str, dict],
        wanted: pa.Array,
        pending: np.ndarray,
        found_rows: list,
        used: set,
        repaired: list,
        corrupt: set | None,
        columns: Sequence[str],
        limits: np.ndarray,
    ) -> np.ndarray:
        """Look the keys at `pending` positions of `wanted` up in the shards `names` through their key
        indexes (`limits`: the most ids each may have); appends (positions, rows) to `found_rows`;
        returns the positions still missing. A corrupt shard is deleted, its keys stay missing and
        their positions go to `corrupt`."""
        prefixes, _ = token_index.key_prefixes(wanted)
        for name in sorted(names):
            if not len(pending):
                break
            try:
                pointed, found, rows = self._find_in_shard(
                    name, names[name], wanted, prefixes, pending, columns, limits
                )
            except CorruptShard as exc:
                if self._drop_corrupt(name, names[name]):
                    repaired.append(name)
                if corrupt is not None:
                    corrupt.update(exc.pointed.tolist())
                continue
            if not len(found):
                continue
            used.add(name)
            found_rows.append((found, rows))
            missing = np.ones(len(pending), bool)
            missing[np.searchsorted(pending, found)] = False  # `pending` is ascending; `found` within it
            pending = pending[missing]
        return pending

    def get_or_compute(
        self,
        namespace: str,
        keys: Sequence[str],
        texts: Sequence[str] | Callable[[np.ndarray], list[str]],
        encode: Encoder,
        write_elsewhere: RemoteWriter | None = None,
        lengths_only: bool = False,
        text_bytes: np.ndarray | None = None,
    ) -> Lookup:
        """Full token rows for unique content `keys` (texts aligned): read what the store has,
        encode and store the rest. Keys are found through each shard's key index and only their
        packed ids are read (or their row groups), verified; a corrupt shard is deleted and its keys
        are encoded again. With `write_elsewhere` (SPEC §6, `--compute ray`)
        the misses are tokenized and written as shards by workers, this process only commits them
        to the manifest and reads them back; whatever that leaves missing is encoded here. `texts`
        may be a function of the (ascending) positions of the misses, so only their texts are read.
        With `lengths_only`, the table has no input_ids: the stored ids are verified but not decoded.
        `text_bytes` (the UTF-8 size of each text; taken from `texts` when they are given as a list)
        bounds the ids each key may have (`token_index.text_ids_bound`), so what a lookup decodes is
        bounded by the texts asked for; without, by the store's `max_text_ids` per key."""
        columns = ("content_key", "n_tokens") if lengths_only else tuple(STORE_SCHEMA.names)
        report = self.repair()
        good, _ = self._entries(self._read_manifest())
        wanted = pa.array(list(keys), pa.string())
        found_rows: list[tuple[np.ndarray, pa.Table]] = []
        used, repaired, corrupt = set(), list(report["corrupt"]), set()
        bytes_before = self.bytes_read
        everything = np.arange(len(wanted), dtype=np.int64)
        limits = self._limits(texts, text_bytes, len(wanted))
        pending = self._gather(
            {n: i for n, i in good.items() if n.split("/")[0] == namespace},
            wanted,
            everything,
            found_rows,
            used,
            repaired,
            corrupt,
            columns,
            limits,
        )
        misses = len(pending)
        reasons = {
            key: SHARD_CORRUPT if position in corrupt else NOT_IN_STORE
            for position, key in zip(pending.tolist(), wanted.take(pa.array(pending)).to_pylist(), strict=True)
        }
        encode_seconds, encoded_tokens = 0.0, 0

        def texts_at(positions: np.ndarray) -> list[str]:
            return texts(positions) if callable(texts) else [texts[p] for p in positions.tolist()]

        if len(pending) and write_elsewhere is not None:
            written, encode_seconds, encoded_tokens = write_elsewhere(
                namespace, wanted.take(pa.array(pending)).to_pylist(), texts_at(pending)
            )
            pending = self._gather(
                self.commit(written), wanted, pending, found_rows, used, repaired, None, columns, limits
            )
        if len(pending):
            start = time.perf_counter()
            encoded = encode(texts_at(pending))
            encode_seconds += time.perf_counter() - start
            encoded_tokens += int(pc.sum(encoded["n_tokens"]).as_py() or 0)
            fresh = pa.table(
                {
                    "content_key": wanted.take(pa.array(pending)),
                    "input_ids": encoded["input_ids"],
                    "n_tokens": encoded["n_tokens"],
                },
                schema=STORE_SCHEMA,
            )
            used.update(self._write_shards(namespace, fresh, limits[pending]))
            found_rows.append((pending, fresh))
        combined = pa.concat_tables(
            [rows.select(columns) for _, rows in found_rows] or [STORE_SCHEMA.empty_table().select(columns)]
        )
        positions = np.concatenate([p for p, _ in found_rows]) if found_rows else np.zeros(0, np.int64)
        table = _taken(combined, np.argsort(positions, kind="stable"))
        self._touch(used)
        self.evict(protect=used)
        if misses:
            self.compact(namespace)
        return Lookup(
            table,
            len(wanted) - misses,
            misses,
            used,
            encode_seconds,
            encoded_tokens,
            repaired,
            report["ignored"],
            reasons,
            self.bytes_read - bytes_before,
        )


EXPANDED = "expanded row"  # needed for the seed's tokenized_cache rows (and its train set)
VALIDATION_ONLY = "validation row"  # needed only for the seed's validation set (SPEC §7)
TOKENIZED_SCHEMA = pa.schema(
    [("section_id", pa.string()), ("path", pa.string()), ("needed_for", pa.string()), ("reason", pa.string())]
)


BATCH_TEXT_BYTES = 32 << 20  # text bytes looked up (and their misses tokenized) at a time
BATCH_IDS = 1 << 22  # full ids (16 MiB as int32) read from the store at a time to write rows


@dataclass
class TokenizedRows:
    """What `tokenized_rows` gives: the rows as a stream (ids read from the store a bounded batch at
    a time while it is consumed), the lookup's counts, and which texts were tokenized and why.
    `n_tokens` collects each row's n_tokens as the stream is consumed (for the length histogram)."""

    rows: RowStream
    lookup: Lookup
    tokenized: pa.Table
    unique_sections: int
    n_tokens: list[np.ndarray] = field(default_factory=list)
    truncated: int = 0  # rows cut to max_seq_len, counted as the stream is consumed

    def table(self) -> pa.Table:
        """The rows as one table (for small corpora: tests and benchmarks)."""
        return pa.concat_tables([self.rows.schema.empty_table(), *self.rows.batches]).combine_chunks()


def _keys_of_rows(raw: ParquetRows | TableRows, rows: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(content key, text bytes) of each of the ascending raw `rows`, reading one batch of texts at a time."""
    keys: list[str] = []
    sizes: list[np.ndarray] = [np.zeros(0, np.int64)]
    base = 0
    for batch in raw.batches(["text"]):
        lo, hi = np.searchsorted(rows, [base, base + batch.num_rows])
        texts = one_chunk(batch["text"]).take(pa.array(rows[lo:hi] - base, pa.int64()))
        keys.extend(content_keys(texts))
        sizes.append(pc.binary_length(texts).to_numpy(zero_copy_only=False).astype(np.int64))
        base += batch.num_rows
    return keys, np.concatenate(sizes)


def _merge(total: Lookup, part: Lookup) -> None:
    total.hits += part.hits
    total.misses += part.misses
    total.shards_used |= part.shards_used
    total.encode_seconds += part.encode_seconds
    total.encoded_tokens += part.encoded_tokens
    total.repaired += part.repaired
    total.ignored = sorted(set(total.ignored) | set(part.ignored))
    total.reasons.update(part.reasons)
    total.shard_bytes_read += part.shard_bytes_read


def row_texts(raw: ParquetRows | TableRows, rows: np.ndarray) -> list[str]:
    """The texts of raw `rows` (any order), reading only the stored batches that hold them."""
    order = np.argsort(rows, kind="stable")
    taken = raw.take(rows[order], ["text"])["text"].to_pylist()
    texts = [""] * len(rows)
    for slot, text in zip(order.tolist(), taken, strict=True):
        texts[slot] = text
    return texts


def tokenized_rows(
    store: TokenStore,
    loaded: LoadedTokenizer,
    raw: pa.Table | ParquetRows,
    section_ids: pa.ChunkedArray,
    copies: pa.ChunkedArray,
    progress=None,
    write_elsewhere: RemoteWriter | None = None,
    validation_rows: Callable[[np.ndarray, list[str]], np.ndarray] | None = None,
    candidate_rows: np.ndarray | None = None,
) -> TokenizedRows:
    """SPEC §4 rows (section_id, copy, input_ids cut to max_seq_len, n_tokens, truncated) for the
    given rows of `raw` (section_id, path, text). The store is asked once for each distinct text
    the seed needs: those of these rows and of the raw rows `validation_rows(rows, their content
    keys)` picks among `candidate_rows` (the seed's validation set, SPEC §7), and nothing else, so a
    text no seed needs is never tokenized. Memory is bounded by batches, not the corpus: texts are
    read one stored batch at a time (keys), looked up and tokenized BATCH_TEXT_BYTES at a time, and
    the rows' ids are read back from the store BATCH_IDS at a time while the stream is written.
    Also gives which texts were tokenized (TOKENIZED_SCHEMA: a section holding each, what needed
    it, why the store did not have it)."""
    raw = TableRows(raw) if isinstance(raw, pa.Table) else raw
    raw_ids = one_chunk(raw.read(["section_id"])["section_id"])
    raw_row = pc.index_in(section_ids, value_set=raw_ids)
    if raw_row.null_count:
        raise ValueError("a section_id is not in raw_corpus; materialize the graph from raw_corpus down")
    expanded_rows = one_chunk(raw_row).to_numpy(zero_copy_only=False).astype(np.int64)
    candidates = np.unique(
        expanded_rows if validation_rows is None else np.concatenate([expanded_rows, candidate_rows])
    )
    keys, sizes = _keys_of_rows(raw, candidates)
    extra = np.zeros(0, np.int64)
    if validation_rows is not None:
        extra = np.asarray(validation_rows(candidates, keys), np.int64)
    needed = np.unique(np.concatenate([expanded_rows, extra]))
    at = np.searchsorted(candidates, needed)
    encoded = pc.dictionary_encode(pa.array([keys[i] for i in at.tolist()], pa.string()))
    del keys
    key_of_needed = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    unique_keys = encoded.dictionary
    _, first = np.unique(key_of_needed, return_index=True)  # the first needed raw row holding each text
    first_row, key_sizes = needed[first], sizes[at][first]

    def texts_of(indexes: np.ndarray) -> Callable[[np.ndarray], list[str]]:
        """The texts of the unique keys `indexes[positions]`, read from the stored batches holding them."""
        return lambda positions: row_texts(raw, first_row[indexes[positions]])

    def encode(texts: Sequence[str]) -> pa.Table:
        return loaded.encode(texts, progress)

    namespace = loaded.cache_namespace
    lookup = Lookup(STORE_SCHEMA.empty_table())
    full_tokens = np.zeros(len(unique_keys), np.int64)
    bounds = [0, *byte_bounded_slices(key_sizes, BATCH_TEXT_BYTES), len(unique_keys)]
    for start, end in zip(bounds, bounds[1:], strict=False):
        if end <= start:
            continue
        part = store.get_or_compute(
            namespace,
            unique_keys.slice(start, end - start).to_pylist(),
            texts_of(np.arange(start, end)),
            encode,
            write_elsewhere,
            lengths_only=True,  # the ids are read again, a batch at a time, when the rows are written
            text_bytes=key_sizes[start:end],
        )
        full_tokens[start:end] = part.table["n_tokens"].to_numpy()
        part.table = STORE_SCHEMA.empty_table()
        _merge(lookup, part)

    row_keys = key_of_needed[np.searchsorted(needed, expanded_rows)]
    schema = pa.schema(
        [("section_id", section_ids.type), ("copy", copies.type), *(f for f in TOKENS_SCHEMA if f.name != "section_id")]
    )
    result = TokenizedRows(
        RowStream(schema, ()),
        lookup,
        _tokenized_sections(raw, lookup.reasons, unique_keys, first_row, row_keys),
        len(pc.unique(section_ids)),
    )

    def batches() -> Iterator[pa.Table]:
        cuts = [0, *byte_bounded_slices(full_tokens[row_keys], BATCH_IDS), len(row_keys)]
        for start, end in zip(cuts, cuts[1:], strict=False):
            if end <= start:
                continue
            wanted = np.unique(row_keys[start:end])
            found = store.get_or_compute(
                namespace,
                unique_keys.take(pa.array(wanted, pa.int64())).to_pylist(),
                texts_of(wanted),
                encode,
                text_bytes=key_sizes[wanted],
            )  # all hit but for a shard evicted or damaged meanwhile, which is tokenized again
            per_row = cut(found.table, loaded.max_seq_len).take(
                pa.array(np.searchsorted(wanted, row_keys[start:end]), pa.int64())
            )
            result.n_tokens.append(per_row["n_tokens"].to_numpy())
            result.truncated += int(pc.sum(per_row["truncated"]).as_py() or 0)
            yield pa.table(
                {
                    "section_id": section_ids.slice(start, end - start),
                    "copy": copies.slice(start, end - start),
                    **{name: per_row[name] for name in per_row.column_names},
                }
            )

    result.rows = RowStream(schema, batches())
    return result


def _tokenized_sections(
    raw: ParquetRows | TableRows,
    reasons: dict[str, str],
    unique_keys: pa.Array,
    first_row: np.ndarray,
    expanded_texts: np.ndarray,
) -> pa.Table:
    """One row per text the lookup tokenized, ordered by path then section_id."""
    if not reasons:
        return TOKENIZED_SCHEMA.empty_table()
    position = dict(zip(unique_keys.to_pylist(), range(len(unique_keys)), strict=True))
    expanded_texts = set(np.unique(expanded_texts).tolist())
    indexes = np.array([position[key] for key in reasons], np.int64)
    rows = first_row[indexes]
    order = np.argsort(rows, kind="stable")
    held = raw.take(rows[order], ["section_id", "path"])
    unsorted = np.empty(len(rows), np.int64)
    unsorted[order] = np.arange(len(rows))
    held = held.take(pa.array(unsorted, pa.int64()))
    needed_for = [EXPANDED if i in expanded_texts else VALIDATION_ONLY for i in indexes.tolist()]
    table = pa.table(
        {
            "section_id": one_chunk(held["section_id"]),
            "path": one_chunk(held["path"]),
            "needed_for": pa.array(needed_for, pa.string()),
            "reason": pa.array(list(reasons.values()), pa.string()),
        },
        schema=TOKENIZED_SCHEMA,
    )
    return table.sort_by([("path", "ascending"), ("section_id", "ascending")])
