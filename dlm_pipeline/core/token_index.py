"""Key index of one token store shard: where each content key sits, and checksums of the byte ranges
a lookup reads, so a lookup reads O(requested) and never a whole shard.

One file per shard, `<namespace>/shard-<hex>.keys`, beside `shard-<hex>.parquet`; together they are
the namespace's index. A shard is immutable, so its index never goes stale: it names the shard's
sha256, size and row count, and is used only while they match the manifest entry. Layout:

    b"DLMKEYS2"  uint64 header length  header (JSON)  padding to 8
    uint64[groups] x 4  start, length, first row and packed start of each row group
    bytes32[groups]     sha256 of each row group's bytes
    uint32[rows + 1]    PACKED bytes before each row (4 + the value's length, summed)
    uint32[rows]        the id count of each row, then 4 bytes of padding
    bytes16[rows]       blake2b-128 of each row's content key (length-prefixed), id count and value
    uint64[keys]        first 16 hex digits of each content key, ascending
    uint32[keys]        the row of each, in the same order

The header holds the shard's identity (sha256, size, rows), the number of groups and keys, and the
byte range and sha256 of the Parquet footer. Nothing is parsed per key or per group. A lookup
memory-maps the arrays and binary-searches the wanted keys. A shard holds each text's ids packed on
their own (`pack_ids`) in its PACKED column, which Parquet stores plain, uncompressed and as one page
per row group: a group whose column chunk ends with exactly its values (checked byte for byte when
the index is built) has a packed start, and a row's value is then the bytes at `packed start +
(bytes before the row - bytes before the group) + 4`, read alone, checked with the wanted key against
the row's checksum and only then decoded, without the footer or pyarrow's reader. Other groups
(packed start 0: shards written before packing, or a text too large for one page) and rows whose
value does not check out are read as whole row groups: the footer and the group, each checked
against its sha256, and the full content key compared. The file is hostile input like the rest of
the store: anything that does not check out is rebuilt from the shard, read whole and verified.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dlm_pipeline.core.corpus import DEFAULT_MAX_FILE_BYTES
from dlm_pipeline.core.safe_read import open_regular

MAGIC = b"DLMKEYS2"  # DLMKEYS1 (no per-row ranges) reads as a bad index: rebuilt once from its shard
SUFFIX = ".keys"
MAX_HEADER_BYTES = 64 * 1024**2
MAX_GROUPS = 1_000_000  # pyarrow's default Thrift container limit: a footer listing more row groups does not parse
PREFIX_DIGITS = 16  # hex digits of a content key kept in the index (64 bits); the full key is compared on read
ROW_DIGEST_BYTES = 16
PACKED = "packed_ids"  # a shard's ids column: one value per row (`pack_ids`)
MIN_PACKED_BYTES = 64  # ids shorter than this are stored plain (a zstd frame would not be smaller)
_ZSTD = pa.Codec("zstd")
_blake2b = hashlib.blake2b
READ_GAP = 4096  # row ranges this close are read as one (a read costs more than copying a page)
IDS_PER_TEXT_BYTE = 4  # `text_ids_bound`: generous (byte-level BPE, WordPiece, Unigram with byte fallback give at
# most one id per byte; a normaliser such as NFKC can expand a few characters several times)
EXTRA_TEXT_IDS = 256  # and room for the special tokens a post-processor adds

_NIBBLE = np.full(256, 255, dtype=np.uint8)
for _value, _char in enumerate(b"0123456789abcdef"):
    _NIBBLE[_char] = _value
_PLACES = (np.uint64(16) ** np.arange(PREFIX_DIGITS - 1, -1, -1, dtype=np.uint64)).astype(np.uint64)


class BadIndex(Exception):
    """An index file that does not describe its shard; it is rebuilt."""


def key_prefixes(keys: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 of the first 16 hex digits of each key, whether the key starts with 16 lowercase hex
    digits); vectorised, so 10 M keys never become Python strings."""
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    heads = pc.utf8_slice_codeunits(keys.cast(pa.string()), 0, PREFIX_DIGITS)
    well_formed = pc.fill_null(pc.equal(pc.binary_length(heads), PREFIX_DIGITS), False)
    heads = pc.if_else(well_formed, heads, "g" * PREFIX_DIGITS).cast(pa.binary())
    data = np.frombuffer(heads.buffers()[2], dtype=np.uint8) if len(heads) else np.zeros(0, np.uint8)
    start = int(np.frombuffer(heads.buffers()[1], dtype=np.int32)[heads.offset]) if len(heads) else 0
    nibbles = _NIBBLE[data[start : start + PREFIX_DIGITS * len(heads)].reshape(len(heads), PREFIX_DIGITS)]
    valid = well_formed.to_numpy(zero_copy_only=False) & (nibbles < 16).all(axis=1)
    values = (np.where(nibbles < 16, nibbles, 0).astype(np.uint64) * _PLACES).sum(axis=1, dtype=np.uint64)
    return values, valid


def _range_of(group: pq.RowGroupMetaData) -> tuple[int, int]:
    starts, ends = [], []
    for c in range(group.num_columns):
        column = group.column(c)
        start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
        starts.append(start)
        ends.append(start + column.total_compressed_size)
    return min(starts), max(ends) - min(starts)


def _group_ranges(metadata: pq.FileMetaData) -> list[tuple[int, int, int]]:
    """(start, length, first row) of every row group: the bytes of its column chunks."""
    ranges, first_row = [], 0
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        ranges.append((*_range_of(group), first_row))
        first_row += group.num_rows
    return ranges


def footer_range(data_size: int, tail: bytes) -> tuple[int, int]:
    """(start, length) of the footer, its length field and the closing magic, from the last 8 bytes."""
    if len(tail) != 8 or tail[4:] != b"PAR1":
        raise BadIndex("not a Parquet file")
    length = struct.unpack("<I", tail[:4])[0] + 8
    if length + 4 > data_size:
        raise BadIndex("footer longer than the file")
    return data_size - length, length


def pack_ids(ids: pa.Array | pa.ChunkedArray, n_tokens: np.ndarray) -> pa.Array:
    """Each row's ids as one stored value (the shard's PACKED column): a zstd frame of them as int32
    little-endian, or those bytes themselves when the frame would not be smaller (short texts). One
    text's ids are then one byte range of the shard, read and decoded alone."""
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    offsets = ids.offsets.to_numpy().astype(np.int64)
    if ids.null_count or ids.values.null_count or not np.array_equal(np.diff(offsets), n_tokens):
        raise ValueError("token rows need ids without nulls, as many as n_tokens")
    raw = memoryview(np.ascontiguousarray(ids.values.to_numpy(zero_copy_only=False), "<i4").view(np.uint8))
    packed = []
    for start, end in zip((4 * offsets[:-1]).tolist(), (4 * offsets[1:]).tolist(), strict=True):
        plain = raw[start:end].tobytes()
        frame = _ZSTD.compress(plain, asbytes=True) if end - start >= MIN_PACKED_BYTES else plain
        packed.append(frame if len(frame) < len(plain) else plain)
    return pa.array(packed, pa.binary())


def text_ids_bound(text_bytes: int | np.ndarray) -> int | np.ndarray:
    """The most ids a text of `text_bytes` UTF-8 bytes may have in the store: IDS_PER_TEXT_BYTE per
    byte plus EXTRA_TEXT_IDS for special tokens. Every count a shard, index or manifest states is
    checked against it (or the store's bound for its largest text) before anything is sized by it: a count above it is a
    forged or corrupt entry, never an allocation. A text that really has more ids is returned, not stored."""
    return IDS_PER_TEXT_BYTE * text_bytes + EXTRA_TEXT_IDS


DEFAULT_MAX_TEXT_IDS = text_ids_bound(DEFAULT_MAX_FILE_BYTES)  # any stored text's, at the default file limit


def unpack_one(value: bytes | memoryview, count: int, max_ids: int) -> bytes:
    """The `count` ids (int32 little-endian bytes) of one PACKED value; ValueError when it holds others
    or `count` is over `max_ids` (the output buffer is sized by `count`, so it is checked first)."""
    if not 0 <= count <= max_ids:
        raise ValueError(f"a packed value claims {count} ids, over the {max_ids} a text may have")
    if len(value) == 4 * count:
        return bytes(value)
    if len(value) > 4 * count:
        raise ValueError("a packed value longer than its ids")
    try:
        plain = _ZSTD.decompress(value, decompressed_size=4 * count, asbytes=True)
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"a packed value does not decode: {exc}") from None
    if len(plain) != 4 * count:
        raise ValueError("a packed value holds another number of ids")
    return plain


def checked_counts(n_tokens: pa.Array | pa.ChunkedArray, max_ids: int | np.ndarray) -> np.ndarray:
    """A shard's n_tokens as int64; ValueError when one is missing, negative or over `max_ids` (one
    for all or one per row)."""
    counts = n_tokens.to_numpy(zero_copy_only=False).astype(np.int64)
    if n_tokens.null_count or (counts < 0).any():
        raise ValueError("n_tokens missing or negative")
    if (counts > max_ids).any():
        raise ValueError(f"n_tokens over the {max_ids} ids a text may have")
    return counts


def unpacked(table: pa.Table, max_ids: int | np.ndarray = DEFAULT_MAX_TEXT_IDS) -> pa.Table:
    """Rows read from a shard, with `input_ids` in place of PACKED (a shard written before holds
    `input_ids` itself); ValueError when a value does not decode to its n_tokens ids, or when a row's
    n_tokens is over `max_ids` (one for all rows or one per row; checked before anything is decoded,
    also when PACKED is not read: a caller sizes work by n_tokens)."""
    if "n_tokens" not in table.column_names:
        if PACKED in table.column_names:
            raise ValueError("packed ids without n_tokens")
        return table
    counts = checked_counts(table["n_tokens"], max_ids)
    if PACKED not in table.column_names:
        return table
    limits = np.broadcast_to(np.asarray(max_ids, np.int64), counts.shape).tolist()
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    values = b"".join(
        [
            unpack_one(v, n, limit)
            for v, n, limit in zip(table[PACKED].to_pylist(), counts.tolist(), limits, strict=True)
        ]
    )
    ids = pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), pa.array(np.frombuffer(values, "<i4").astype(np.int32, copy=False))
    )
    return table.set_column(table.column_names.index(PACKED), "input_ids", ids)


def _digest_head(key: bytes | memoryview, count: int) -> bytes:
    return len(key).to_bytes(8, "little") + key + count.to_bytes(4, "little")


def row_digest(key: bytes | memoryview, count: int, value: bytes | memoryview) -> bytes:
    """Checksum of one row: its content key, id count and PACKED value, so a value read by its range
    is proven to be the wanted key's (two keys sharing the 64-bit prefix the index searches never pass
    for each other) before it is decoded. (`read_direct` computes the same inline.)"""
    return _blake2b(_digest_head(key, count) + value, digest_size=ROW_DIGEST_BYTES).digest()


def _row_arrays(data: bytes, metadata: pq.FileMetaData, groups: np.ndarray, table: pa.Table):
    """(packed start per group, stored bytes before each row, id count of each, each row's digest) of
    a shard's verified bytes `data` and its rows `table` as stored. A group gets a packed start only if
    its PACKED column chunk ends with exactly its values, plain-encoded (4-byte length, then the
    value, each); a row's digest is only ever checked in such a group."""
    n_rows = table.num_rows
    starts = np.zeros(len(groups), np.uint64)
    no_ranges = starts, np.zeros(n_rows + 1, np.uint32), np.zeros(n_rows, np.uint32), bytes(16 * n_rows)
    if PACKED not in table.column_names or table[PACKED].null_count or table["n_tokens"].null_count:
        return no_ranges  # a shard written before packing, or not by us: every group is read whole
    packed = table[PACKED].combine_chunks()
    counts = table["n_tokens"].to_numpy(zero_copy_only=False).astype(np.int64)
    value_offsets = np.frombuffer(packed.buffers()[1], np.int32)[packed.offset : packed.offset + n_rows + 1]
    value_offsets = value_offsets.astype(np.int64)
    lengths = np.diff(value_offsets)
    before = np.zeros(n_rows + 1, np.int64)
    np.cumsum(4 + lengths, out=before[1:])
    if before[-1] >= 2**32 or (counts < 0).any() or (counts >= 2**32).any():
        return no_ranges
    value_data = np.frombuffer(packed.buffers()[2] or b"", np.uint8)
    stored = np.frombuffer(data, np.uint8)
    (column,) = [c for c in range(metadata.num_columns) if metadata.schema.column(c).path == PACKED]
    ends = np.append(groups[:, 2].astype(np.int64), n_rows)
    for g in range(len(groups)):
        chunk = metadata.row_group(g).column(column)
        end = chunk.data_page_offset + chunk.total_compressed_size
        first, last = int(ends[g]), int(ends[g + 1])
        size = int(before[last] - before[first])
        if size > end:
            continue
        tail = stored[end - size : end]
        length_at = (before[first:last] - before[first])[:, None] + np.arange(4)
        is_value = np.ones(size, bool)
        is_value[length_at.ravel()] = False
        if np.array_equal(
            tail[length_at].astype(np.int64) @ (256 ** np.arange(4)), lengths[first:last]
        ) and np.array_equal(tail[is_value], value_data[value_offsets[first] : value_offsets[last]]):
            starts[g] = end - size
    keys = table["content_key"].combine_chunks().cast(pa.binary())
    key_offsets = np.frombuffer(keys.buffers()[1], np.int32)[keys.offset : keys.offset + n_rows + 1].tolist()
    key_data = memoryview(keys.buffers()[2] or b"")
    values = memoryview(value_data)
    at = value_offsets.tolist()
    digests = b"".join(
        [
            row_digest(key_data[key_offsets[row] : key_offsets[row + 1]], count, values[at[row] : at[row + 1]])
            for row, count in enumerate(counts.tolist())
        ]
    )
    return starts, before.astype(np.uint32), counts.astype(np.uint32), digests


def build(data: bytes, table: pa.Table, shard_sha256: str) -> bytes:
    """The index file of the shard whose verified bytes are `data` and whose rows, as stored, are `table`."""
    metadata = pq.read_metadata(pa.BufferReader(data))
    footer_start, footer_length = footer_range(len(data), data[-8:])
    groups = np.array(_group_ranges(metadata), dtype="<u8").reshape(-1, 3)
    digests = b"".join(hashlib.sha256(data[start : start + length]).digest() for start, length, _ in groups.tolist())
    packed_starts, stored_before, counts, row_digests = _row_arrays(data, metadata, groups, table)
    prefixes, valid = key_prefixes(table["content_key"])
    rows = np.flatnonzero(valid)  # a key that is no sha256 hex is never asked for
    order = np.argsort(prefixes[rows], kind="stable")
    header = {
        "sha256": shard_sha256,
        "bytes": len(data),
        "rows": metadata.num_rows,
        "groups": len(groups),
        "keys": len(rows),
        "footer": [footer_start, footer_length, hashlib.sha256(data[footer_start:]).hexdigest()],
    }
    encoded = json.dumps(header, sort_keys=True).encode()
    padding = b"\0" * (-(len(MAGIC) + 8 + len(encoded)) % 8)
    return b"".join(
        [
            MAGIC,
            struct.pack("<Q", len(encoded)),
            encoded,
            padding,
            np.vstack([groups.T, packed_starts[None, :]]).astype("<u8").tobytes(),
            digests,
            stored_before.astype("<u4").tobytes(),
            counts.astype("<u4").tobytes(),
            b"\0" * 4,  # to 8 bytes
            row_digests,
            prefixes[rows][order].astype("<u8").tobytes(),
            rows[order].astype("<u4").tobytes(),
        ]
    )


def _is_count(value: object) -> bool:
    return type(value) is int and 0 <= value < 2**53


@dataclass
class KeyIndex:
    """A parsed, memory-mapped index file, checked against the shard's manifest entry."""

    prefixes: np.ndarray  # uint64, ascending (read-only view of the mapped file)
    rows: np.ndarray  # uint32
    footer: tuple[int, int, str]  # start, length, sha256 hex
    group_starts: np.ndarray  # uint64 per row group
    group_lengths: np.ndarray
    group_first_rows: np.ndarray  # ascending, from 0
    group_digests: np.ndarray  # uint8, 32 per row group (not numpy's bytes type: it drops trailing NULs)
    n_rows: int
    packed_starts: np.ndarray  # int64 per row group: where its PACKED values start; 0 when they cannot be read alone
    stored_before: np.ndarray  # uint32 per row, and one more: PACKED bytes (4 + value) in the shard before it
    counts: np.ndarray  # uint32 per row: its ids
    row_digests: np.ndarray  # uint8, ROW_DIGEST_BYTES per row

    @classmethod
    def open(cls, dir_fd: int, name: str, entry: dict) -> KeyIndex:
        """The index file `name` in `dir_fd` (never through a symlink), if it describes the shard of
        manifest `entry`; else BadIndex."""
        try:
            fd, info = open_regular(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            raise BadIndex(f"{name}: {exc.strerror or exc}") from None
        try:
            if info.st_size < len(MAGIC) + 8:
                raise BadIndex(f"{name}: not an index file")
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        return cls.parse(mapped, entry)

    @classmethod
    def parse(cls, buffer, entry: dict) -> KeyIndex:
        size = len(buffer)
        if bytes(buffer[: len(MAGIC)]) != MAGIC:
            raise BadIndex("not an index file")
        (length,) = struct.unpack("<Q", bytes(buffer[len(MAGIC) : len(MAGIC) + 8]))
        if length > min(MAX_HEADER_BYTES, size):
            raise BadIndex("header too long")
        try:
            header = json.loads(bytes(buffer[len(MAGIC) + 8 : len(MAGIC) + 8 + length]))
        except (ValueError, RecursionError):
            raise BadIndex("header unreadable") from None
        if not isinstance(header, dict) or (header.get("sha256"), header.get("bytes"), header.get("rows")) != (
            entry["sha256"],
            entry["bytes"],
            entry["rows"],
        ):
            raise BadIndex("made for another shard")
        n_groups, n_keys, footer = header.get("groups"), header.get("keys"), header.get("footer")
        shard_size, n_rows = entry["bytes"], entry["rows"]
        if not (
            _is_count(n_groups)
            and _is_count(n_keys)
            and n_keys <= n_rows
            and n_groups <= min(max(n_rows, 1), MAX_GROUPS)
        ):
            raise BadIndex("malformed counts")  # (group arrays are copied below: their count is bounded first)
        if not (
            isinstance(footer, list)
            and len(footer) == 3
            and _is_count(footer[0])
            and _is_count(footer[1])
            and footer[0] + footer[1] == shard_size
            and isinstance(footer[2], str)
            and len(footer[2]) == 64
        ):
            raise BadIndex("malformed footer range")
        start = len(MAGIC) + 8 + length
        start += -start % 8
        if start + 64 * n_groups + (8 + ROW_DIGEST_BYTES) * n_rows + 8 + 12 * n_keys != size:
            raise BadIndex("arrays do not fit the file")
        groups = np.frombuffer(buffer, dtype="<u8", count=4 * n_groups, offset=start).reshape(4, n_groups)
        digests = np.frombuffer(buffer, dtype=np.uint8, count=32 * n_groups, offset=start + 32 * n_groups)
        at = start + 64 * n_groups
        stored_before = np.frombuffer(buffer, dtype="<u4", count=n_rows + 1, offset=at)
        counts = np.frombuffer(buffer, dtype="<u4", count=n_rows, offset=at + 4 * (n_rows + 1))
        at += 8 * n_rows + 8
        row_digests = np.frombuffer(buffer, dtype=np.uint8, count=ROW_DIGEST_BYTES * n_rows, offset=at)
        at += ROW_DIGEST_BYTES * n_rows
        starts, lengths, first_rows = groups[:3].astype(np.int64)
        packed_starts = groups[3]
        if n_groups and (
            first_rows[0] != 0
            or np.any(np.diff(first_rows) < 0)
            or first_rows[-1] > n_rows
            or np.any(starts + lengths > footer[0])
            or np.any((packed_starts != 0) & ((packed_starts < groups[0]) | (packed_starts > groups[0] + groups[1])))
        ):
            raise BadIndex("row groups out of order or outside the shard")
        return cls(
            np.frombuffer(buffer, dtype="<u8", count=n_keys, offset=at),
            np.frombuffer(buffer, dtype="<u4", count=n_keys, offset=at + 8 * n_keys),
            tuple(footer),
            starts,
            lengths,
            first_rows,
            digests,
            n_rows,
            packed_starts.astype(np.int64),
            stored_before,
            counts,
            row_digests,
        )

    def candidates(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in `wanted`, shard row) of every entry whose prefix equals a wanted prefix; a
        row outside the shard means the file lies (BadIndex)."""
        order = np.argsort(wanted, kind="stable")  # sorted needles: each search starts where the last ended
        ordered = wanted[order]
        low = np.searchsorted(self.prefixes, ordered, side="left")
        hit = (
            np.flatnonzero(self.prefixes[np.minimum(low, len(self.prefixes) - 1)] == ordered)
            if len(self.prefixes)
            else np.zeros(0, np.int64)
        )
        low = low[hit]  # the upper bound only for prefixes present (most needles are not, in most shards)
        counts = (np.searchsorted(self.prefixes, ordered[hit], side="right") - low).astype(np.int64)
        total = int(counts.sum())
        positions = np.repeat(order[hit].astype(np.int64), counts)
        within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        rows = self.rows[np.repeat(low, counts) + within].astype(np.int64)
        if total and (int(rows.max()) >= self.n_rows or not len(self.group_first_rows)):
            raise BadIndex("a row outside the shard")
        return positions, rows

    def group_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.group_first_rows, rows, side="right") - 1

    def group_sizes(self) -> np.ndarray:
        return np.diff(np.append(self.group_first_rows, self.n_rows))


def read_verified(
    fd: int, size: int, index: KeyIndex, rows: np.ndarray, columns: list[str], max_ids: np.ndarray
) -> pa.Table:
    """Shard `rows` (ascending) of the shard open at `fd` (`columns` of STORE_SCHEMA, ids unpacked),
    reading only the footer and the row groups holding them, each checked against its sha256 first;
    ValueError or OSError when anything differs, or when a row claims more ids than its `max_ids`
    (`unpacked`). The groups are read into a zero-filled file-sized buffer (untouched pages cost no
    memory); the verified footer must place each group exactly where its checked bytes are. Groups
    are decoded one at a time and only the wanted rows' ids are unpacked, so what is decoded is
    bounded by the rows asked for, whatever the other rows of their groups claim."""
    if os.fstat(fd).st_size != size:
        raise ValueError("size differs from the manifest")
    image = np.zeros(size, dtype=np.uint8)
    view = memoryview(image)

    def checked(start: int, length: int, digest: bytes) -> memoryview:
        part = view[start : start + length]
        if os.preadv(fd, [part], start) != length or hashlib.sha256(part).digest() != digest:
            raise ValueError(f"bytes {start}..{start + length} differ from their checksum")
        return part

    footer = checked(index.footer[0], index.footer[1], bytes.fromhex(index.footer[2]))
    metadata = pq.read_metadata(pa.BufferReader(b"PAR1" + bytes(footer)))
    sizes = index.group_sizes()
    groups = index.group_of(rows)
    needed = np.unique(groups)
    for g in needed.tolist():
        start, length = int(index.group_starts[g]), int(index.group_lengths[g])
        group = metadata.row_group(g) if g < metadata.num_row_groups else None
        if group is None or group.num_rows != sizes[g] or _range_of(group) != (start, length):
            raise ValueError("the footer and the index describe different row groups")
        checked(start, length, index.group_digests[32 * g : 32 * g + 32].tobytes())
    reader = pq.ParquetFile(pa.BufferReader(pa.py_buffer(image)), metadata=metadata, pre_buffer=False)
    if PACKED in reader.schema_arrow.names and "input_ids" in columns:
        columns = [*(PACKED if c == "input_ids" else c for c in columns), *(["n_tokens"] * ("n_tokens" not in columns))]
    bounds = np.searchsorted(groups, needed, side="left").tolist() + [len(rows)]
    parts = []
    for g, first, last in zip(needed.tolist(), bounds[:-1], bounds[1:], strict=True):
        table = reader.read_row_group(g, columns=columns)
        if table.num_rows != sizes[g]:
            raise ValueError("a row group holds other rows than the index says")
        local = rows[first:last] - index.group_first_rows[g]
        parts.append(unpacked(table.take(pa.array(local, pa.int64())), max_ids[first:last]))
    return pa.concat_tables(parts)


def read_direct(
    fd: int, index: KeyIndex, rows: np.ndarray, keys: list[bytes], max_ids: np.ndarray, decode: bool = True
) -> tuple[np.ndarray, np.ndarray, bytes, int]:
    """The ids of shard `rows` (in row groups with a packed start; `keys` their wanted content keys),
    reading only each row's own PACKED value (ranges closer than READ_GAP read as one): (whether each
    row's range lies inside its row group, its bytes, key and id count match the row's checksum and it
    decodes, the id count of each, the ids of the rows that match as int32 little-endian bytes in
    `rows` order (none unless `decode`), bytes read). A row that does not match, or whose id count is
    over its `max_ids` (checked before anything is read or sized by it), is never returned; the
    caller reads its row group the checked way."""
    groups = index.group_of(rows)
    before = index.stored_before[rows].astype(np.int64)
    starts = index.packed_starts[groups] + before - index.stored_before[index.group_first_rows[groups]] + 4
    lengths = index.stored_before[rows + 1].astype(np.int64) - before - 4
    counts = index.counts[rows].astype(np.int64)
    ends = starts + lengths
    inside = (lengths >= 0) & (counts <= max_ids) & (starts >= index.group_starts[groups])
    inside &= ends <= index.group_starts[groups] + index.group_lengths[groups]  # bounded by the groups' sizes
    ok = inside.copy()
    if not inside.any():
        return ok, counts, b"", 0
    take = np.flatnonzero(inside)[np.argsort(starts[inside], kind="stable")]
    reach = np.maximum.accumulate(ends[take])
    span_of = np.concatenate([[0], np.cumsum(starts[take][1:] > reach[:-1] + READ_GAP)])
    firsts = np.flatnonzero(np.diff(span_of, prepend=-1))
    span_starts = starts[take][firsts]
    span_lengths = reach[np.append(firsts[1:] - 1, len(take) - 1)] - span_starts
    span_at = np.cumsum(span_lengths) - span_lengths  # where each span lands in the buffer
    buffer = bytearray(int(span_lengths.sum()))
    view = memoryview(buffer)
    for start, length, at in zip(span_starts.tolist(), span_lengths.tolist(), span_at.tolist(), strict=True):
        if os.preadv(fd, [view[at : at + length]], start) != length:
            ok[:] = False  # the file is shorter than its index says
            return ok, counts, b"", len(buffer)
    kept = np.flatnonzero(inside)
    where = np.zeros(len(rows), np.int64)
    where[take] = span_at[span_of] + starts[take] - span_starts[span_of]
    values = [view[at : at + n] for at, n in zip(where[kept].tolist(), lengths[kept].tolist(), strict=True)]
    heads = [_digest_head(keys[row], count) for row, count in zip(kept.tolist(), counts[kept].tolist(), strict=True)]
    digests = b"".join(
        [
            _blake2b(head + value, digest_size=ROW_DIGEST_BYTES).digest()
            for head, value in zip(heads, values, strict=True)
        ]
    )
    expected = index.row_digests.reshape(-1, ROW_DIGEST_BYTES)[rows[kept]]
    ok[kept] = (np.frombuffer(digests, np.uint8).reshape(-1, ROW_DIGEST_BYTES) == expected).all(axis=1)
    ids = []
    if decode:
        for position, value, count in zip(kept.tolist(), values, counts[kept].tolist(), strict=True):
            if not ok[position]:
                continue
            if len(value) == 4 * count:  # stored plain (most short texts): no copy until the join
                ids.append(value)
                continue
            try:
                ids.append(unpack_one(value, count, int(max_ids[position])))
            except ValueError:
                ok[position] = False
    return ok, counts, b"".join(ids), len(buffer)
