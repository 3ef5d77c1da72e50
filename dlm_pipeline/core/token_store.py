"""Content-addressed token cache: immutable Parquet shards plus one manifest, shared by all seeds.

Layout under the cache root:

    manifest.json                    {"version": 1, "shards": {"<namespace>/<shard>": {rows, bytes, last_used}}}
    .lock                            flock'd while the manifest changes
    <namespace>/shard-<uuid>.parquet section_id, input_ids, n_tokens, truncated

A namespace is (tokenizer fingerprint, max_seq_len, special tokens), so a tokenizer change
misses without touching old entries. Shards are written atomically and never modified;
the manifest is replaced atomically under an exclusive lock, so concurrent runs (one per
seed) and killed runs leave a readable store. Eviction is least-recently-used by shard and
never removes a shard the calling run is using.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dlm_pipeline.core.arrow_maps import representative_rows
from dlm_pipeline.core.parquet_io import write_parquet_atomic
from dlm_pipeline.core.tokenize import TOKENS_SCHEMA

MANIFEST = "manifest.json"
LOCK = ".lock"
SHARD_GLOB = "shard-*.parquet"
DEFAULT_MAX_BYTES = 10 * 1024**3
COMPACT_AT_SHARDS = 16  # a namespace with more shards than this has its small ones merged
COMPACT_SHARD_BYTES = 64 * 1024**2  # shards up to this size are merged; larger ones are left alone
STALE_TEMP_SECONDS = 3600.0

Encoder = Callable[[Sequence[str]], pa.Table]  # texts -> input_ids, n_tokens, truncated


@dataclass
class Lookup:
    """Result of get_or_compute, aligned with the requested section_ids."""

    table: pa.Table  # TOKENS_SCHEMA, one row per requested id, same order
    hits: int = 0
    misses: int = 0
    shards_used: set[str] = field(default_factory=set)
    encode_seconds: float = 0.0
    encoded_tokens: int = 0  # tokens produced for the misses (before any were stored)


class TokenStore:
    def __init__(self, root: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    # -- manifest -------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[dict]:
        """Exclusive access to the manifest; the yielded dict is written back on exit if it changed
        (most lookups change nothing, and every write is an fsync)."""
        with open(self.root / LOCK, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                manifest = self._read_manifest()
                before = json.dumps(manifest, sort_keys=True)
                yield manifest
                if json.dumps(manifest, sort_keys=True) != before:
                    self._write_manifest(manifest)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_manifest(self) -> dict:
        try:
            manifest = json.loads((self.root / MANIFEST).read_text())
            if isinstance(manifest, dict) and isinstance(manifest.get("shards"), dict):
                return manifest
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            pass
        return {"version": 1, "shards": {}}

    def _write_manifest(self, manifest: dict) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", suffix=".tmp", dir=self.root)
        with os.fdopen(fd, "w") as fh:
            json.dump(manifest, fh, sort_keys=True, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / MANIFEST)

    # -- repair, eviction, stats ------------------------------------------------------------
    def repair(self, stale_after: float = STALE_TEMP_SECONDS) -> dict[str, int]:
        """Drop manifest entries whose shard is gone, adopt complete shards the manifest lost,
        delete unreadable shards and temp files left by killed writers."""
        report = {"dropped": 0, "adopted": 0, "deleted": 0}
        now = time.time()
        with self._locked() as manifest:
            shards = manifest["shards"]
            for name in [n for n in shards if not (self.root / n).exists()]:
                del shards[name]
                report["dropped"] += 1
            namespaces = [d for d in self.root.iterdir() if d.is_dir()]
            for folder in [self.root, *namespaces]:  # manifest temps live at the root, shard temps below
                for tmp in folder.glob(".*.tmp"):
                    try:
                        stale = now - tmp.stat().st_mtime >= stale_after
                    except FileNotFoundError:  # its writer finished meanwhile
                        continue
                    if stale:
                        tmp.unlink(missing_ok=True)
                        report["deleted"] += 1
            for namespace in namespaces:
                for shard in namespace.glob(SHARD_GLOB):
                    name = f"{namespace.name}/{shard.name}"
                    if name in shards:
                        continue
                    try:
                        rows = pq.read_metadata(shard).num_rows
                        if pq.read_schema(shard).names != TOKENS_SCHEMA.names:
                            raise ValueError("not a token shard")
                    except Exception:  # unreadable or foreign: not ours to keep
                        shard.unlink(missing_ok=True)
                        report["deleted"] += 1
                        continue
                    shards[name] = {"rows": rows, "bytes": shard.stat().st_size, "last_used": now}
                    report["adopted"] += 1
        return report

    def evict(self, protect: set[str] = frozenset(), max_bytes: int | None = None) -> list[str]:
        """Remove least-recently-used shards until the store fits; `protect` is never removed."""
        limit = self.max_bytes if max_bytes is None else max_bytes
        removed = []
        with self._locked() as manifest:
            shards = manifest["shards"]
            total = sum(s["bytes"] for s in shards.values())
            for name, info in sorted(shards.items(), key=lambda kv: (kv[1]["last_used"], kv[0])):
                if total <= limit:
                    break
                if name in protect:
                    continue
                (self.root / name).unlink(missing_ok=True)
                total -= info["bytes"]
                removed.append(name)
            for name in removed:
                del shards[name]
        return removed

    def stats(self) -> dict:
        shards = self._read_manifest()["shards"]
        namespaces: dict[str, dict[str, int]] = {}
        for name, info in shards.items():
            ns = namespaces.setdefault(name.split("/")[0], {"shards": 0, "rows": 0, "bytes": 0})
            ns["shards"] += 1
            ns["rows"] += info["rows"]
            ns["bytes"] += info["bytes"]
        return {
            "root": str(self.root),
            "shards": len(shards),
            "rows": sum(s["rows"] for s in shards.values()),
            "bytes": sum(s["bytes"] for s in shards.values()),
            "max_bytes": self.max_bytes,
            "namespaces": namespaces,
        }

    def clear(self) -> None:
        with self._locked() as manifest:
            for child in self.root.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
            manifest["shards"] = {}

    # -- reads and writes -------------------------------------------------------------------
    def _index(self, namespace: str) -> dict[str, tuple[str, int]]:
        """section_id -> (shard name, row) for one namespace, from a manifest snapshot."""
        index: dict[str, tuple[str, int]] = {}
        for name in sorted(n for n in self._read_manifest()["shards"] if n.startswith(namespace + "/")):
            try:
                ids = pq.read_table(self.root / name, columns=["section_id"])["section_id"].to_pylist()
            except (FileNotFoundError, OSError):
                continue  # evicted meanwhile: its entries are simply misses
            for row, section in enumerate(ids):
                index[section] = (name, row)
        return index

    def _write_shard(self, namespace: str, table: pa.Table) -> str:
        name = f"{namespace}/shard-{uuid.uuid4().hex}.parquet"
        path = write_parquet_atomic(table.cast(TOKENS_SCHEMA), self.root / name)
        with self._locked() as manifest:
            manifest["shards"][name] = {"rows": table.num_rows, "bytes": path.stat().st_size, "last_used": time.time()}
        return name

    def compact(self, namespace: str | None = None, at_shards: int = COMPACT_AT_SHARDS) -> int:
        """Merge the small shards of each namespace that has more than `at_shards` of them into one
        (duplicates dropped); returns how many shards were merged away. Runs under the lock, so
        writers wait; a reader holding an older index finds a merged shard gone and recomputes."""
        merged_away = 0
        with self._locked() as manifest:
            shards = manifest["shards"]
            namespaces = {n.split("/")[0] for n in shards} if namespace is None else {namespace}
            for ns in sorted(namespaces):
                small = sorted(
                    n for n, info in shards.items()
                    if n.startswith(ns + "/") and info["bytes"] <= COMPACT_SHARD_BYTES
                )
                if len([n for n in shards if n.startswith(ns + "/")]) <= at_shards or len(small) < 2:
                    continue
                tables = []
                for name in small:
                    try:
                        tables.append(pq.read_table(self.root / name).cast(TOKENS_SCHEMA))
                    except (FileNotFoundError, OSError):
                        continue
                merged = pa.concat_tables(tables)
                encoded = pc.dictionary_encode(merged["section_id"].combine_chunks())
                keep = representative_rows(encoded.indices.to_numpy(zero_copy_only=False), len(encoded.dictionary))
                merged = merged.take(pa.array(np.sort(keep), pa.int64()))
                name = f"{ns}/shard-{uuid.uuid4().hex}.parquet"
                path = write_parquet_atomic(merged, self.root / name)
                last_used = max(shards[n]["last_used"] for n in small)
                for old in small:
                    del shards[old]
                    (self.root / old).unlink(missing_ok=True)
                shards[name] = {"rows": merged.num_rows, "bytes": path.stat().st_size, "last_used": last_used}
                merged_away += len(small) - 1
        return merged_away

    def _touch(self, names: set[str]) -> None:
        now = time.time()
        with self._locked() as manifest:
            for name in names:
                if name in manifest["shards"]:
                    manifest["shards"][name]["last_used"] = now

    def get_or_compute(self, namespace: str, section_ids: Sequence[str], texts: Sequence[str], encode: Encoder) -> Lookup:
        """Token rows for unique `section_ids`: read what the store has, encode and store the rest."""
        self.repair()
        index = self._index(namespace)
        rows_by_shard: dict[str, list[tuple[int, int]]] = {}
        missing = []
        for position, section in enumerate(section_ids):
            hit = index.get(section)
            if hit is None:
                missing.append(position)
            else:
                rows_by_shard.setdefault(hit[0], []).append((position, hit[1]))
        parts, positions, used = [], [], set()
        for name, pairs in sorted(rows_by_shard.items()):
            try:
                shard = pq.read_table(self.root / name)
            except (FileNotFoundError, OSError):
                missing.extend(p for p, _ in pairs)  # evicted between index and read: recompute
                continue
            used.add(name)
            parts.append(shard.take(pa.array([r for _, r in pairs], pa.int64())).cast(TOKENS_SCHEMA))
            positions.extend(p for p, _ in pairs)
        hits = len(positions)
        encode_seconds, encoded_tokens = 0.0, 0
        if missing:
            missing.sort()
            start = time.perf_counter()
            encoded = encode([texts[p] for p in missing])
            encode_seconds = time.perf_counter() - start
            encoded_tokens = int(pc.sum(encoded["n_tokens"]).as_py() or 0)
            fresh = encoded.add_column(0, "section_id", pa.array([section_ids[p] for p in missing], pa.string()))
            used.add(self._write_shard(namespace, fresh))
            parts.append(fresh.select(TOKENS_SCHEMA.names).cast(TOKENS_SCHEMA))
            positions.extend(missing)
        combined = pa.concat_tables(parts) if parts else TOKENS_SCHEMA.empty_table()
        order = np.argsort(np.asarray(positions, dtype=np.int64), kind="stable")
        table = combined.take(pa.array(order, pa.int64())) if len(order) else combined
        self._touch(used)
        self.evict(protect=used)
        if missing:
            self.compact(namespace)
        return Lookup(table, hits, len(missing), used, encode_seconds, encoded_tokens)


def gather_rows(unique: pa.Table, section_ids: pa.ChunkedArray | pa.Array, copies: pa.ChunkedArray | pa.Array) -> pa.Table:
    """Per expanded row: section_id, copy, input_ids, n_tokens, truncated (from the unique sections)."""
    index = pc.index_in(section_ids, value_set=unique["section_id"])
    if index.null_count:
        raise ValueError("a section_id has no token entry; the store lookup is incomplete")
    gathered = unique.take(index)
    return pa.table(
        {
            "section_id": section_ids,
            "copy": copies,
            "input_ids": gathered["input_ids"],
            "n_tokens": gathered["n_tokens"],
            "truncated": gathered["truncated"],
        }
    )
