"""Training datasets (SPEC §7): split by content before expansion, whole documents ended by EOS,
packed into `seq_len` sequences (Parquet) and one sequence per document (Megatron `.bin`/`.idx`),
with `dataset.json` describing them; written into a temp folder that replaces the old one whole.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dlm_pipeline.core.arrow_utils import one_chunk, representative_rows
from dlm_pipeline.core.expansion import TagEntries
from dlm_pipeline.core.megatron import DTYPE_CODES, IndexedDataset, dtype_for_vocab, index_bytes, read_indexed
from dlm_pipeline.core.packing import (
    SEQUENCE_SCHEMA,
    _list_parts,
    document_lengths,
    row_group_tokens,
    sequence_count,
    sequences_table,
    stream_parts,
)
from dlm_pipeline.core.parquet_io import ParquetRows, TableRows, byte_bounded_slices, error_line
from dlm_pipeline.core.split import content_keys, train_order, validation_order, validation_side
from dlm_pipeline.core.token_store import BATCH_IDS, BATCH_TEXT_BYTES, TokenStore, row_texts
from dlm_pipeline.core.tokenize import LoadedTokenizer

TRAIN, VALIDATION = "train", "validation"
SPLITS = (TRAIN, VALIDATION)
MANIFEST = "dataset.json"
# Special tokens that end a document in common tokenizers, tried in this order when none is named.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
STALE_TEMP_SECONDS = 3600.0
# zstd: token ids of real code take 0.93 bytes each against snappy's 1.43 (0.5x on generated text),
# read as fast, for ~10 % more time writing; a dictionary makes real code larger. Statistics of
# token ids help no reader and cost a third of the write.
SEQUENCE_PARQUET_OPTIONS = {"compression": "zstd", "use_dictionary": False, "write_statistics": ["n_tokens"]}
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
CHECK_CHUNK_TOKENS = 1 << 22  # ids the packing check compares at a time
CHECK_CHUNK_DOCUMENTS = 1 << 16  # and documents (each a Python slice per side)


class DatasetError(ValueError):
    """The dataset cannot be built as configured; the message says what to change."""


def resolve_eos_id(loaded: LoadedTokenizer, name: str = "") -> int:
    """The id that ends each document: the named token, else the tokenizer's own EOS token
    (`eos_token` of a tokenizer_config.json beside it, else a well-known special token it has)."""
    tokenizer = loaded.tokenizer
    if name:
        token_id = tokenizer.token_to_id(name)
        if token_id is None:
            raise DatasetError(
                f"EOS token {name!r} is not in the tokenizer {loaded.source} (DLM_EOS_TOKEN / --eos-token)"
            )
        return token_id
    named = _configured_eos(loaded.source)
    if named is not None and tokenizer.token_to_id(named) is not None:
        return tokenizer.token_to_id(named)
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    for candidate in EOS_CANDIDATES:
        if candidate in specials:
            return tokenizer.token_to_id(candidate)
    raise DatasetError(
        f"the tokenizer {loaded.source} has no end-of-document token we recognise ({', '.join(EOS_CANDIDATES)}); "
        "name one with DLM_EOS_TOKEN or --eos-token"
    )


def _configured_eos(source: str) -> str | None:
    """`eos_token` of the tokenizer_config.json beside a local tokenizer, if there is one."""
    path = Path(source).expanduser()
    try:
        config = json.loads(
            ((path if path.is_dir() else path.parent) / "tokenizer_config.json").read_text(encoding="utf-8")
        )
        named = config.get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    named = named.get("content") if isinstance(named, dict) else named
    return named if isinstance(named, str) else None


def full_token_ids(
    store: TokenStore, loaded: LoadedTokenizer, keys: Sequence[str], texts: Sequence[str], progress=None
) -> pa.Array:
    """Full ids (never truncated, no post-processor special tokens) per unique content key, from the
    content-keyed token store (the namespace `tokenized_cache` fills); misses are tokenized."""
    plain = dataclasses.replace(loaded, add_special_tokens=False)
    lookup = store.get_or_compute(plain.cache_namespace, keys, texts, lambda t: plain.encode(t, progress))
    return one_chunk(lookup.table["input_ids"])


class StoredIds:
    """Full ids per unique text of a plan, not held in memory: only their lengths are, and the ids of
    consecutive documents are read back a bounded group (BATCH_IDS) at a time from `spill`, a file
    of every used text's ids (int32, little-endian) at `positions` (in ids). Documents come in a
    hashed order, so reading them back from the store's shards would read every shard once per group."""

    def __init__(self, lengths: np.ndarray, positions: np.ndarray, spill: BinaryIO):
        self.lengths = lengths  # int64 full ids per unique text (0 for texts no document uses)
        self.positions, self.spill = positions, spill

    def document_lengths(self, rows: np.ndarray) -> np.ndarray:
        return self.lengths[rows] + 1

    def fetch(self, texts: np.ndarray) -> pa.Array:
        """The ids of the unique texts `texts` (list<int32>), in that order."""
        lengths = self.lengths[texts]
        offsets = np.zeros(len(texts) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.empty(int(offsets[-1]), "<i4")
        fd = self.spill.fileno()
        where = self.positions[texts]
        # Texts that lie back to back in the spill (the usual case: both are in ascending order) are one read.
        runs = np.flatnonzero(np.concatenate([[True], where[1:] != where[:-1] + lengths[:-1]])).tolist()
        for run, next_run in zip(runs, [*runs[1:], len(texts)], strict=False):
            start, end = int(offsets[run]), int(offsets[next_run])
            if (
                end > start
                and os.preadv(fd, [memoryview(values[start:end]).cast("B")], int(where[run]) * 4) != (end - start) * 4
            ):
                raise DatasetError("the dataset's spill file was cut short; run the step again")
        return pa.ListArray.from_arrays(
            pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.int32, copy=False))
        )

    def parts(self, rows: np.ndarray) -> Iterator[tuple[pa.Array, np.ndarray]]:
        """(ids, local rows) of consecutive groups of the documents `rows`, as `stream_parts` takes them."""
        cuts = [0, *byte_bounded_slices(self.lengths[rows], BATCH_IDS), len(rows)]
        for start, end in zip(cuts, cuts[1:], strict=False):
            if end > start:
                wanted = np.unique(rows[start:end])
                yield self.fetch(wanted), np.searchsorted(wanted, rows[start:end])


Ids = pa.Array | StoredIds  # full ids per unique text: in memory (tests, small corpora) or in the store


def _document_lengths(ids: Ids, rows: np.ndarray) -> np.ndarray:
    return ids.document_lengths(rows) if isinstance(ids, StoredIds) else document_lengths(ids, rows)


def _parts(ids: Ids, rows: np.ndarray) -> Iterable[tuple[pa.Array, np.ndarray]]:
    return ids.parts(rows) if isinstance(ids, StoredIds) else [(ids, rows)]


def used_text_ids(
    store: TokenStore, loaded: LoadedTokenizer, plan: DatasetPlan, raw: pa.Table | ParquetRows, progress=None
) -> Iterator[tuple[np.ndarray, pa.Table]]:
    """(unique-text indexes, the store's rows for them: `input_ids`, `n_tokens`) for the texts the
    plan's documents use (the others get no ids, so the dataset never asks for a text its seed does
    not need), ascending, BATCH_TEXT_BYTES of text at a time; after `tokenized_cache` ran with the same
    tokenizer, every one is in the store (misses are tokenized)."""
    raw = TableRows(raw) if isinstance(raw, pa.Table) else raw
    plain = dataclasses.replace(loaded, add_special_tokens=False)
    keys = pa.array(plan.unique_keys, pa.string())
    used = plan.used_texts()
    cuts = [0, *byte_bounded_slices(plan.text_bytes[plan.unique_rows[used]], BATCH_TEXT_BYTES), len(used)]
    for start, end in zip(cuts, cuts[1:], strict=False):
        texts = used[start:end]
        if len(texts):
            yield (
                texts,
                store.get_or_compute(
                    plain.cache_namespace,
                    keys.take(pa.array(texts, pa.int64())).to_pylist(),
                    lambda positions_, texts=texts: row_texts(raw, plan.unique_rows[texts[positions_]]),
                    lambda t: plain.encode(t, progress),
                    text_bytes=plan.text_bytes[plan.unique_rows[texts]],
                ).table,
            )


def plan_token_ids(
    store: TokenStore,
    loaded: LoadedTokenizer,
    plan: DatasetPlan,
    raw: pa.Table | ParquetRows,
    progress=None,
    spill_dir: str | os.PathLike | None = None,
) -> StoredIds:
    """Full ids per unique text of the plan (`used_text_ids`), written to an unnamed spill file in
    `spill_dir` (gone when closed, or when the process dies)."""
    lengths = np.zeros(len(plan.unique_keys), dtype=np.int64)
    positions = np.zeros(len(plan.unique_keys), dtype=np.int64)
    spill = tempfile.TemporaryFile(dir=spill_dir)
    written = 0
    for texts, found in used_text_ids(store, loaded, plan, raw, progress):
        lengths[texts] = found["n_tokens"].to_numpy()
        positions[texts] = written + np.cumsum(lengths[texts]) - lengths[texts]
        for chunk in found["input_ids"].chunks:
            spill.write(memoryview(chunk.flatten().to_numpy(zero_copy_only=False).astype("<i4", copy=False)))
        written += int(lengths[texts].sum())
    spill.flush()
    return StoredIds(lengths, positions, spill)


def held_out_among(
    rows: np.ndarray, keys: Sequence[str], weights: np.ndarray, split_seed: int, val_fraction: float
) -> np.ndarray:
    """Those of the raw `rows` (content `keys`) that are in the validation set (SPEC §7)."""
    positive = weights[rows] > 0.0
    if not val_fraction or not positive.any():
        return np.zeros(0, np.int64)
    chosen = [key for key, keep in zip(keys, positive.tolist(), strict=True) if keep]
    return rows[positive][validation_side(chosen, split_seed, val_fraction)]


class RowTexts(Sequence):
    """Texts of chosen rows, converted to Python only when asked for (the store asks for misses)."""

    def __init__(self, texts: pa.Array, rows: np.ndarray):
        self.texts, self.rows = texts, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.texts[int(self.rows[i])].as_py()


@dataclass(frozen=True)
class DatasetPlan:
    """Which raw rows become which documents, in order; ids are looked up per unique text."""

    content_keys: list[str]  # per raw row
    text_bytes: np.ndarray  # int64 per raw row: its text's length in bytes
    validation: np.ndarray  # bool per raw row
    text_index: np.ndarray  # int64 per raw row: its unique text
    unique_keys: list[str]  # per unique text
    unique_rows: np.ndarray  # int64 per unique text: a raw row holding it
    train_rows: np.ndarray  # int64 raw row per train document, in order
    validation_rows: np.ndarray  # int64 raw row per validation document, in order

    def documents(self, split: str) -> np.ndarray:
        """Unique-text index per document of `split`, in order."""
        return self.text_index[self.train_rows if split == TRAIN else self.validation_rows]

    def used_texts(self) -> np.ndarray:
        """Unique-text indexes that some document of either split uses, ascending."""
        return np.unique(np.concatenate([self.documents(TRAIN), self.documents(VALIDATION)]))


def plan_dataset(
    raw: pa.Table | ParquetRows,
    expanded: pa.Table,
    weights: np.ndarray,
    *,
    seed: int,
    split_seed: int,
    val_fraction: float,
) -> DatasetPlan:
    """Split raw rows by content key, keep the train side's expanded rows and the validation side's
    rows of positive weight, and order both (§7). Texts are read one stored batch at a time."""
    raw = TableRows(raw) if isinstance(raw, pa.Table) else raw
    keys: list[str] = []
    sizes = [np.zeros(0, np.int64)]
    for batch in raw.batches(["text"]):
        keys.extend(content_keys(one_chunk(batch["text"])))
        sizes.append(pc.binary_length(batch["text"]).to_numpy().astype(np.int64))
    validation = validation_side(keys, split_seed, val_fraction)
    encoded = pc.dictionary_encode(pa.array(keys, pa.string()))
    text_index = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    unique_rows = representative_rows(text_index, len(encoded.dictionary))

    raw_ids = one_chunk(raw.read(["section_id"])["section_id"])
    source = pc.index_in(expanded["section_id"], value_set=raw_ids)
    if source.null_count:
        raise DatasetError("expanded_corpus holds a section_id that raw_corpus lacks: re-materialize the seed")
    source = one_chunk(source).to_numpy(zero_copy_only=False).astype(np.int64)
    copies = one_chunk(expanded["copy"]).to_numpy(zero_copy_only=False).astype(np.int64)
    train = np.flatnonzero(~validation[source])
    train = train[train_order(seed, raw_ids.take(pa.array(source[train])), copies[train])]

    held_out = np.flatnonzero(validation & (weights > 0.0))
    held_out = held_out[validation_order([keys[i] for i in held_out], raw_ids.take(pa.array(held_out, pa.int64())))]
    return DatasetPlan(
        keys,
        np.concatenate(sizes),
        validation,
        text_index,
        encoded.dictionary.to_pylist(),
        unique_rows,
        source[train],
        held_out,
    )


@dataclass(frozen=True)
class SplitSummary:
    documents: int
    tokens: int
    sequences: int
    last_padding: int  # ids missing from the last sequence to reach seq_len (0 when full or empty)

    def counts(self) -> dict[str, int]:
        return {"documents": self.documents, "tokens": self.tokens, "sequences": self.sequences}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:  # a fresh file in our own temp folder: permissions follow the umask
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_split(
    folder: Path, split: str, ids: Ids, documents: np.ndarray, eos_id: int, seq_len: int, dtype: np.dtype
) -> SplitSummary:
    """`<split>.parquet`, `<split>.bin` and `<split>.idx`, written in one pass over the token stream."""
    lengths = _document_lengths(ids, documents)
    limit = np.iinfo(dtype).max
    with open(folder / f"{split}.bin", "wb") as bin_file, open(folder / f"{split}.parquet", "wb") as parquet_file:
        # Row groups are encoded on another thread (Arrow releases the GIL), one at a time, while the
        # next one is gathered.
        with (
            pq.ParquetWriter(parquet_file, SEQUENCE_SCHEMA, **SEQUENCE_PARQUET_OPTIONS) as writer,
            ThreadPoolExecutor(1) as pool,
        ):
            pending = None
            for tokens, starts in stream_parts(_parts(ids, documents), eos_id, row_group_tokens(seq_len)):
                if tokens.min() < 0 or tokens.max() > limit:
                    raise DatasetError(
                        f"the token store holds an id outside 0..{limit}: run `dlm-pipeline cache clear`"
                    )
                bin_file.write(memoryview(tokens.astype(dtype.newbyteorder("<"), copy=False)))
                group = sequences_table(tokens, starts, seq_len)
                if pending is not None:
                    pending.result()
                pending = pool.submit(writer.write_table, group)
            if pending is not None:
                pending.result()
        for fh in (bin_file, parquet_file):
            fh.flush()
            os.fsync(fh.fileno())
    _write_bytes(folder / f"{split}.idx", index_bytes(lengths, dtype))
    tokens = int(lengths.sum())
    sequences = sequence_count(tokens, seq_len)
    return SplitSummary(len(documents), tokens, sequences, sequences * seq_len - tokens)


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _remove(path: Path) -> None:
    """Remove a file, a symlink (never followed) or a folder we wrote."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def remove_stale_builds(target: Path, stale_after: float = STALE_TEMP_SECONDS) -> None:
    """The temp and replaced folders beside `target` that killed runs left (`.<name>.tmp-*`,
    `.<name>.old-*`), once no writer touched them for `stale_after` seconds."""
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}.*"):
        try:
            if now - leftover.lstat().st_mtime >= stale_after:
                _remove(leftover)
        except FileNotFoundError:
            pass


def publish_folder(target: Path, build: Callable[[Path], None], stale_after: float = STALE_TEMP_SECONDS) -> None:
    """Build the folder's content in a temp folder beside it, then put it in place of `target` (an
    atomic exchange where the OS has one): a failed build leaves the old dataset untouched."""
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(target, stale_after)
    temp = parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    os.mkdir(temp)  # mode 0o777 & ~umask, like every folder a user creates
    try:
        build(temp)
        _fsync_dir(temp)
        old = parent / f".{target.name}.old-{uuid.uuid4().hex}"
        if target.is_dir() and not target.is_symlink() and _exchange(temp, target):
            os.rename(temp, old)  # temp now holds the previous dataset
        else:  # no folder yet, something else in its place, or no atomic exchange here
            if target.is_symlink() or target.exists():
                os.rename(target, old)
            os.rename(temp, target)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if old.is_symlink() or old.exists():
        _remove(old)


@dataclass(frozen=True)
class DatasetSettings:
    seed: int
    split_seed: int
    val_fraction: float
    seq_len: int
    expansion_mode: str
    tokenizer_fingerprint: str
    eos_id: int
    vocab_size: int

    @property
    def dtype(self) -> np.dtype:
        return dtype_for_vocab(self.vocab_size)


def write_dataset(
    target: Path,
    plan: DatasetPlan,
    ids: Ids,
    settings: DatasetSettings,
    share: Callable[[Path, str, str], object] | None = None,
) -> tuple[dict, dict[str, SplitSummary]]:
    """Every file of the dataset into `target` (replaced whole); returns (dataset.json content, summaries).
    `share(folder, name, sha256)` may store each split file once across datasets (the validation
    files of seeds with the same settings are the same bytes) before the folder is put in place."""
    summaries: dict[str, SplitSummary] = {}
    manifest: dict = {}

    def build(folder: Path) -> None:
        for split in SPLITS:
            summaries[split] = write_split(
                folder, split, ids, plan.documents(split), settings.eos_id, settings.seq_len, settings.dtype
            )
        manifest.update(
            {
                "seed": settings.seed,
                "split_seed": settings.split_seed,
                "val_fraction": settings.val_fraction,
                "seq_len": settings.seq_len,
                "expansion_mode": settings.expansion_mode,
                "tokenizer_fingerprint": settings.tokenizer_fingerprint,
                "eos_id": settings.eos_id,
                "dtype": settings.dtype.name,
                "splits": {split: summaries[split].counts() for split in SPLITS},
                "files": {p.name: _sha256(p) for p in sorted(folder.iterdir())},
            }
        )
        if share is not None:
            for name, sha256 in manifest["files"].items():
                share(folder, name, sha256)
        _write_bytes(folder / MANIFEST, manifest_bytes(manifest))

    publish_folder(target, build)
    return manifest, summaries


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def read_manifest(folder: Path) -> dict:
    """The manifest of a dataset folder whose entries are the plain files the pipeline writes: the
    checks read none through a symlink, nor a FIFO they would block on."""
    for where in (folder.parent, folder):
        if where.is_symlink():
            raise DatasetError(f"{where} is a symlink, not a folder the pipeline wrote: remove it and re-materialize")
    try:
        odd = sorted(entry.name for entry in os.scandir(folder) if not entry.is_file(follow_symlinks=False))
    except OSError:
        odd = []  # no folder: said below
    if odd:
        raise DatasetError(f"{folder / odd[0]} is not a regular file (a symlink or a FIFO?): re-materialize it")
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{folder / MANIFEST} cannot be read ({exc}): materialize training_dataset first") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise DatasetError(f"{folder / MANIFEST} is not a dataset manifest: re-materialize training_dataset")
    wrong = next((name for name, fits in _MANIFEST_FIELDS.items() if not fits(manifest.get(name))), None)
    if wrong is None and not all(isinstance(counts, dict) for counts in manifest["splits"].values()):
        wrong = "splits"
    if wrong is not None:
        raise DatasetError(
            f"{folder / MANIFEST}: {wrong} is not what the pipeline writes: re-materialize training_dataset"
        )
    return manifest


def _whole(low: int, high: int) -> Callable[[object], bool]:
    return lambda value: type(value) is int and low <= value < high


# What the checks take from a manifest (a hand-edited one fails them in one line, not a KeyError).
_MANIFEST_FIELDS: dict[str, Callable[[object], bool]] = {
    "eos_id": _whole(0, 1 << 31),
    "seq_len": _whole(1, 1 << 31),
    # Hashed as decimal text, so any size works; the settings decide which ones a run may use.
    "split_seed": lambda value: type(value) is int and value >= 0,
    "val_fraction": lambda value: type(value) in (int, float) and 0 <= value <= 1,
    "dtype": lambda value: value in {dtype.name for dtype in DTYPE_CODES},
}


def train_tag_tokens(
    tags: pa.ChunkedArray | pa.Array, train_rows: np.ndarray, ids: Ids, text_index: np.ndarray
) -> pa.Table:
    """Per (tag_key, tag_value): the train tokens of rows holding that tag, and their share of all train tokens."""
    row_tokens = np.bincount(
        train_rows, weights=_document_lengths(ids, text_index[train_rows]).astype(np.float64), minlength=len(text_index)
    ).astype(np.int64)
    total = int(row_tokens.sum())
    entries = TagEntries.of(tags)
    long = pa.table(
        {"tag_key": entries.keys, "tag_value": entries.values, "train_tokens": pa.array(row_tokens[entries.row])}
    )
    grouped = long.group_by(["tag_key", "tag_value"]).aggregate([("train_tokens", "sum")])
    tokens = grouped["train_tokens_sum"].cast(pa.int64())
    share = (
        pc.divide(pc.cast(tokens, pa.float64()), float(total))
        if total
        else pc.multiply(pc.cast(tokens, pa.float64()), 0.0)
    )
    table = pa.table(
        {"tag_key": grouped["tag_key"], "tag_value": grouped["tag_value"], "train_tokens": tokens, "share": share}
    )
    return table.sort_by([("tag_key", "ascending"), ("tag_value", "ascending")])


# -- verification (the asset checks) ------------------------------------------------------------
# What the checks take from the store: `used_text_ids`'s batches, read once per check.
TextIds = Iterable[tuple[np.ndarray, pa.Table]]


def _digest(*parts) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part)
    return digest.digest()


def _document_views(dataset: IndexedDataset) -> Iterator[memoryview]:
    """The bytes of each Megatron document, in place in the memory-mapped .bin."""
    data = memoryview(dataset.tokens).cast("B") if len(dataset.tokens) else memoryview(b"")
    lengths = dataset.lengths.astype(np.int64) * dataset.dtype.itemsize
    for start, size in zip(dataset.pointers.tolist(), lengths.tolist(), strict=True):
        yield data[start : start + size]


def leak_report(folder: Path, plan: DatasetPlan, text_ids: TextIds, eos_id: int, dtype: np.dtype) -> dict[str, int]:
    """Reads the Megatron documents of both splits back and finds, by their ids, which text each is:
    `leaked` texts appear on both sides, `misplaced` documents sit on a side the split rule does
    not give their text, `unknown` documents match no text of the corpus."""
    sides: dict[bytes, set[str]] = {}
    little = dtype.newbyteorder("<")
    eos = np.array([eos_id], little).tobytes()
    for texts, found in text_ids:
        offsets, values = _list_parts(one_chunk(found["input_ids"]))
        values = values.astype(little)
        for text, first, last in zip(texts.tolist(), offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
            side = VALIDATION if plan.validation[int(plan.unique_rows[text])] else TRAIN
            sides.setdefault(_digest(memoryview(values[first:last]), eos), set()).add(side)
    seen: dict[str, set[bytes]] = {}
    report = {"misplaced": 0, "unknown": 0}
    for split in SPLITS:
        dataset = read_indexed(folder / split)
        seen[split] = set()
        for document in _document_views(dataset):
            digest = _digest(document)
            seen[split].add(digest)
            expected = sides.get(digest)
            if expected is None:
                report["unknown"] += 1
            elif split not in expected:
                report["misplaced"] += 1
        report[f"{split}_documents"] = len(dataset)
    report["leaked"] = len(seen[TRAIN] & seen[VALIDATION])
    return report


def plan_leak_report(plan: DatasetPlan) -> dict[str, int]:
    """leak_report's counts from the plan alone: valid for files that conservation_problems found
    equal to the plan's documents, id for id (then no document is unknown)."""
    train_keys = set(plan.text_index[plan.train_rows].tolist())
    validation_keys = set(plan.text_index[plan.validation_rows].tolist())
    return {
        "misplaced": int(plan.validation[plan.train_rows].sum() + (~plan.validation[plan.validation_rows]).sum()),
        "unknown": 0,
        f"{TRAIN}_documents": len(plan.train_rows),
        f"{VALIDATION}_documents": len(plan.validation_rows),
        "leaked": len(train_keys & validation_keys),
    }


def _first_difference(a: np.ndarray, b: np.ndarray) -> int | None:
    if len(a) != len(b):
        return min(len(a), len(b))
    differs = np.flatnonzero(a != b)
    return int(differs[0]) if len(differs) else None


class _SplitDocuments:
    """A split's Megatron documents beside the plan's, grouped by text, so that each batch of texts
    from the store is compared with every document that uses one of them, wherever it lies."""

    def __init__(self, dataset: IndexedDataset, documents: np.ndarray):
        self.dataset, self.documents = dataset, documents
        self.by_text = np.argsort(documents, kind="stable")
        self.sorted_texts = documents[self.by_text]
        self.starts = dataset.pointers // dataset.dtype.itemsize
        self.first_bad: tuple[int, str] | None = None  # (position in the .bin, problem)

    def layout_problem(self) -> str | None:
        """One sequence per document, back to back in the .bin, as many as the plan has."""
        if len(self.dataset) != len(self.documents) or not np.array_equal(
            self.dataset.document_indices, np.arange(len(self.documents) + 1)
        ):
            return f"{len(self.dataset)} Megatron documents, the plan gives {len(self.documents)}"
        lengths = self.dataset.lengths.astype(np.int64)
        if not np.array_equal(self.dataset.pointers, (np.cumsum(lengths) - lengths) * self.dataset.dtype.itemsize):
            return "the Megatron index's pointers do not lay the documents back to back"
        return None

    def _found(self, position: int, problem: str) -> None:
        if self.first_bad is None or position < self.first_bad[0]:
            self.first_bad = (position, problem)

    def compare(self, texts: np.ndarray, offsets: np.ndarray, values: np.ndarray, eos_id: int) -> None:
        """The documents of `texts` (ascending; their ids `values` at `offsets`) against the .bin:
        lengths and EOS ids vectorised, the ids as one concatenation per side (at most
        CHECK_CHUNK_TOKENS ids and CHECK_CHUNK_DOCUMENTS documents at a time) and one comparison."""
        low = int(np.searchsorted(self.sorted_texts, texts[0], side="left"))
        high = int(np.searchsorted(self.sorted_texts, texts[-1], side="right"))
        chosen = self.by_text[low:high]  # document numbers
        at = np.searchsorted(texts, self.documents[chosen])
        first, lengths = offsets[at], offsets[at + 1] - offsets[at]
        starts, tokens = self.starts[chosen], self.dataset.tokens.view(np.ndarray)  # no memmap per slice
        wrong = np.flatnonzero(self.dataset.lengths[chosen] != lengths + 1)
        if len(wrong):
            bad = wrong[np.argmin(chosen[wrong])]
            self._found(
                int(starts[bad]),
                f"Megatron document {int(chosen[bad])} holds {int(self.dataset.lengths[chosen[bad]])} ids, "
                f"the token store gives {int(lengths[bad])} + EOS",
            )
            return
        ends = tokens[starts + lengths] if len(chosen) else np.zeros(0, tokens.dtype)
        if len(no_eos := np.flatnonzero(ends != eos_id)):
            position = int((starts + lengths)[no_eos].min())
            self._found(position, f"Megatron id {position} is not the end-of-document id")
        weights = lengths + CHECK_CHUNK_TOKENS // CHECK_CHUNK_DOCUMENTS  # bounds both ids and documents
        cuts = [0, *byte_bounded_slices(weights, CHECK_CHUNK_TOKENS), len(chosen)]
        for a, b in zip(cuts, cuts[1:], strict=False):
            if b <= a:
                continue
            spans = list(zip(starts[a:b].tolist(), first[a:b].tolist(), lengths[a:b].tolist(), strict=True))
            stored = np.concatenate([tokens[s : s + n] for s, _, n in spans])
            expected = np.concatenate([values[f : f + n] for _, f, n in spans])
            differs = np.flatnonzero(stored != expected)  # numpy widens both
            if len(differs):
                begins = np.cumsum(lengths[a:b]) - lengths[a:b]
                document = np.searchsorted(begins, differs, side="right") - 1
                position = int((starts[a:b][document] + differs - begins[document]).min())
                self._found(position, f"Megatron id {position} differs from the token store")


def _check_parquet(path: Path, dataset: IndexedDataset, seq_len: int) -> list[str]:
    """Sequences equal the Megatron stream cut at seq_len, and doc_starts mark its documents; a file
    that is not such a Parquet file (garbled, a column missing) is one problem line, not an error."""
    try:
        return _compare_parquet(path, dataset, seq_len)
    except (pa.ArrowException, KeyError) as exc:
        reason = error_line(exc)
        return [f"{path.name} is not a sequence file the pipeline wrote ({reason}): re-materialize training_dataset"]


def _compare_parquet(path: Path, dataset: IndexedDataset, seq_len: int) -> list[str]:
    stream = dataset.tokens
    starts = np.cumsum(dataset.lengths.astype(np.int64)) - dataset.lengths
    position, sequence, previous_short, starts_seen = 0, 0, False, []
    parquet = pq.ParquetFile(path, memory_map=True)  # like the .bin: no copy of the file into memory first
    for group in range(parquet.num_row_groups):  # written in row groups of bounded ids
        batch = parquet.read_row_group(group, columns=["input_ids", "n_tokens", "doc_starts"])
        lists = one_chunk(batch.column("input_ids"))
        lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
        if not len(lengths):  # an empty row group holds no sequence
            continue
        if not np.array_equal(lengths, batch.column("n_tokens").to_numpy()):
            return [f"{path.name}: n_tokens differs from the length of input_ids near sequence {sequence}"]
        if previous_short or np.any(lengths[:-1] != seq_len) or not 0 < lengths[-1] <= seq_len:
            return [f"{path.name}: a sequence other than the last is not {seq_len} ids long near sequence {sequence}"]
        previous_short = lengths[-1] != seq_len
        flat = lists.flatten().to_numpy(zero_copy_only=False)
        first = _first_difference(flat, stream[position : position + len(flat)])  # numpy widens both
        if first is not None:
            return [f"{path.name}: id {position + first} differs from the Megatron documents"]
        doc_starts = one_chunk(batch.column("doc_starts"))
        counts = pc.list_value_length(doc_starts).to_numpy(zero_copy_only=False)
        bases = position + np.repeat(np.cumsum(lengths) - lengths, counts)
        starts_seen.append(doc_starts.flatten().to_numpy(zero_copy_only=False) + bases)
        position += len(flat)
        sequence += len(lengths)
    if position != len(stream):
        return [f"{path.name} holds {position} ids, the Megatron documents {len(stream)}"]
    found = np.concatenate(starts_seen) if starts_seen else np.zeros(0, np.int64)
    if not np.array_equal(found, starts):
        return [f"{path.name}: doc_starts do not mark where the documents begin"]
    return []


def parquet_problems(folder: Path, seq_len: int) -> dict[str, list[str]]:
    """Per split: the Parquet sequences are the Megatron documents cut at seq_len. Files only (no
    plan, no store), so it can run while the plan is recomputed; Arrow decodes without the GIL."""
    return {
        split: _check_parquet(folder / f"{split}.parquet", read_indexed(folder / split), seq_len) for split in SPLITS
    }


def conservation_problems(
    folder: Path, plan: DatasetPlan, text_ids: TextIds, eos_id: int, parquet: dict[str, list[str]]
) -> list[str]:
    """The Parquet sequences (`parquet`: parquet_problems), the Megatron documents and the token
    store agree id for id, per split. The store is read once, a batch of texts at a time, for both
    splits; each file is read once."""
    splits = {split: _SplitDocuments(read_indexed(folder / split), plan.documents(split)) for split in SPLITS}
    problems = {split: [p] if (p := files.layout_problem()) else [] for split, files in splits.items()}
    if not any(problems.values()):
        for texts, found in text_ids:
            offsets, values = _list_parts(one_chunk(found["input_ids"]))
            for files in splits.values():
                files.compare(texts, offsets, values, eos_id)
    for split, files in splits.items():
        if files.first_bad is not None:
            problems[split].append(files.first_bad[1])
    return [f"{split}: {p}" for split in SPLITS for p in (problems[split] or parquet[split])]
