"""Tokenizers, identified by what they are (a hash of their canonical serialisation), not where they live."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer

from dlm_pipeline.core.safe_read import FileTooLarge, NotRegularFile, read_regular_file

DEFAULT_TOKENIZER = Path(__file__).resolve().parent.parent / "data" / "dlm-bpe-8k.json"
DEFAULT_MAX_SEQ_LEN = 2048
TOKEN_FILE = "tokenizer.json"
ENCODE_BATCH = 512
# Characters per encode call: the tokenizer's Encoding objects take ~100 bytes per token (tokens,
# offsets, masks) until their ids are copied out, so a batch of 512 large files held over 1 GiB.
ENCODE_BATCH_CHARS = 4 << 20

MAX_TOKENIZER_BYTES = 256 * 1024**2  # a tokenizer.json above this is refused before it is read
MAX_LIST_IDS = 2**31 - 1  # ids per list<int32> chunk: its offsets are int32

# What the token store keeps per text (full ids) and what tokenized_cache keeps per row (cut ids).
ENCODED_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("n_tokens", pa.int32())])
TOKENS_SCHEMA = pa.schema(
    [
        ("section_id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("n_tokens", pa.int32()),
        ("truncated", pa.bool_()),
    ]
)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class TokenizerError(ValueError):
    """The tokenizer cannot be loaded; the message says what was tried and how to fix it."""


@dataclass(frozen=True)
class LoadedTokenizer:
    tokenizer: Tokenizer
    fingerprint: str  # sha256 of the canonical serialisation (after truncation and padding are turned off)
    source: str
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    add_special_tokens: bool = False
    truncation_disabled: bool = False  # the file asked for truncation; it was turned off
    padding_disabled: bool = False  # the file asked for padding; it was turned off

    @property
    def cache_namespace(self) -> str:
        """Everything that changes the full ids of a given text: which tokenizer and which specials.
        `max_seq_len` is applied when reading, so it is not part of it (old `<fp>-L<n>` namespaces
        never match and age out by LRU)."""
        return self.fingerprint[:32] + ("-special" if self.add_special_tokens else "")

    def encode(self, texts: Sequence[str], progress=None) -> pa.Table:
        """Full token ids per text (never truncated), in batches so progress can be reported.
        `input_ids` is chunked so no chunk holds more than 2^31-1 ids (int32 list offsets)."""
        rows: list[np.ndarray] = []
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        start = 0
        while start < len(texts):
            end, chars = start, 0  # at most ENCODE_BATCH texts and about ENCODE_BATCH_CHARS characters
            while end < len(texts) and end - start < ENCODE_BATCH and (end == start or chars < ENCODE_BATCH_CHARS):
                chars, end = chars + len(texts[end]), end + 1
            batch = encode(list(texts[start:end]), add_special_tokens=self.add_special_tokens)
            rows.extend(np.asarray(encoding.ids, dtype=np.int32) for encoding in batch)
            del batch
            if progress is not None:
                progress(end, len(texts))
            start = end
        return ids_table(rows)


def chunk_bounds(lengths: np.ndarray, limit: int = MAX_LIST_IDS) -> list[tuple[int, int]]:
    """Consecutive row ranges [start, end) whose summed lengths stay <= limit (a longer single row
    gets a range of its own); at least one range, even for no rows."""
    bounds, start, total = [], 0, 0
    for row, length in enumerate(lengths.tolist()):
        if total + length > limit and row > start:
            bounds.append((start, row))
            start, total = row, 0
        total += length
    bounds.append((start, len(lengths)))
    return bounds


def ids_table(rows: Sequence[np.ndarray], limit: int = MAX_LIST_IDS) -> pa.Table:
    """input_ids (list<int32>, chunked under `limit` ids per chunk) and n_tokens, one row per array."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    chunks = []
    for start, end in chunk_bounds(lengths, limit):
        offsets = np.zeros(end - start + 1, dtype=np.int32)
        np.cumsum(lengths[start:end], out=offsets[1:])
        flat = np.concatenate(rows[start:end]) if end > start else np.zeros(0, np.int32)
        chunks.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int32())))
    return pa.table(
        {"input_ids": pa.chunked_array(chunks, pa.list_(pa.int32())), "n_tokens": pa.array(lengths, pa.int32())},
        schema=ENCODED_SCHEMA,
    )


def cut(encoded: pa.Table, max_seq_len: int) -> pa.Table:
    """Full ids -> input_ids cut to max_seq_len, n_tokens after the cut, truncated (SPEC §4)."""
    full = encoded["n_tokens"]
    longest = pc.max(full).as_py()
    return pa.table(
        {
            "input_ids": pc.list_slice(encoded["input_ids"], 0, max_seq_len)
            if longest is not None and longest > max_seq_len
            else encoded["input_ids"],  # nothing to cut: the ids as they are, not a copy
            "n_tokens": pc.min_element_wise(full, pa.scalar(max_seq_len, pa.int32())),
            "truncated": pc.greater(full, max_seq_len),
        }
    )


def fingerprint_of(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def is_hub_id(spec: str) -> bool:
    """`name` or `org/name` that is not an existing path: exactly one slash at most, no leading
    `/`, `.` or `~`, no `.json` ending."""
    return bool(HUB_ID.fullmatch(spec)) and not spec.endswith(".json") and not os.path.lexists(spec)


def read_tokenizer_file(path: Path, max_bytes: int = MAX_TOKENIZER_BYTES) -> str:
    """The file's text, refused before reading when it is not a regular file or is over the cap."""
    try:
        return read_regular_file(str(path), max_bytes).decode("utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer file {str(path)!r} does not exist") from None
    except NotRegularFile:
        raise TokenizerError(
            f"tokenizer {str(path)!r} is not a regular file (a device, FIFO or socket); point it at a tokenizer.json"
        ) from None
    except FileTooLarge:
        raise TokenizerError(f"tokenizer file {str(path)!r} is over the {max_bytes:,}-byte cap") from None


def load_tokenizer(
    spec: str = "", *, max_seq_len: int = DEFAULT_MAX_SEQ_LEN, add_special_tokens: bool = False
) -> LoadedTokenizer:
    """`spec`: a tokenizer.json path, a directory holding one, a hub id (`name` or `org/name`), or ""
    for the bundled default. The tokenizer's own truncation and padding are turned off: ids are
    never cut or padded behind our back."""
    if max_seq_len <= 0:
        raise TokenizerError(f"max_seq_len must be > 0, got {max_seq_len}")
    source = spec or str(DEFAULT_TOKENIZER)
    path = Path(source).expanduser()
    try:
        if is_hub_id(source):
            tokenizer, fingerprint, truncation_disabled, padding_disabled = _without_cuts(_from_hub(source))
        elif path.is_dir():
            if not os.path.lexists(path / TOKEN_FILE):
                raise TokenizerError(f"{path} is a directory without a {TOKEN_FILE}")
            tokenizer, fingerprint, truncation_disabled, padding_disabled = _parsed(
                read_tokenizer_file(path / TOKEN_FILE)
            )
        else:
            tokenizer, fingerprint, truncation_disabled, padding_disabled = _parsed(read_tokenizer_file(path))
    except TokenizerError:
        raise
    except Exception as exc:  # tokenizers raises bare Exceptions for unparsable files
        raise TokenizerError(f"cannot load tokenizer from {source!r}: {_one_line(exc)}") from None
    return LoadedTokenizer(
        tokenizer, fingerprint, source, max_seq_len, add_special_tokens, truncation_disabled, padding_disabled
    )


def _without_cuts(tokenizer: Tokenizer) -> tuple[Tokenizer, str, bool, bool]:
    """(the tokenizer with its own truncation and padding turned off, its fingerprint, whether each was on)."""
    truncation_disabled, padding_disabled = tokenizer.truncation is not None, tokenizer.padding is not None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer, fingerprint_of(tokenizer), truncation_disabled, padding_disabled


PARSED_KEPT = 2  # tokenizers kept parsed per process (by the sha256 of their file's text)
_parsed_by_digest: dict[str, tuple[Tokenizer, str, bool, bool]] = {}


def _parsed(text: str) -> tuple[Tokenizer, str, bool, bool]:
    """`_without_cuts` of the tokenizer serialised as `text`, parsed once per process per content:
    each step of a run loads the same file, and parsing was most of a step's load (the file is still
    read every time, so an edited file is parsed again; the text itself is not kept). Nothing
    changes a tokenizer after this."""
    digest = hashlib.sha256(text.encode()).hexdigest()
    if digest not in _parsed_by_digest:
        parsed = _without_cuts(Tokenizer.from_str(text))
        while len(_parsed_by_digest) >= PARSED_KEPT:
            _parsed_by_digest.pop(next(iter(_parsed_by_digest)))
        _parsed_by_digest[digest] = parsed
    return _parsed_by_digest[digest]


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _from_hub(model_id: str) -> Tokenizer:
    try:
        return Tokenizer.from_pretrained(model_id)
    except Exception as exc:
        raise TokenizerError(
            f"{model_id!r} is not a local file or directory, and fetching it from the hub failed "
            f"({type(exc).__name__}: {_one_line(exc, 160)}); on an offline machine point DLM_TOKENIZER at a tokenizer.json"
        ) from None


def sample_positions(section_ids: Sequence[str], k: int) -> list[int]:
    """Deterministic sample: first position of each of the k smallest distinct section_ids."""
    first: dict[str, int] = {}
    for position, section in enumerate(section_ids):
        first.setdefault(section, position)
    return [first[s] for s in sorted(first)[:k]]


def mismatched_sections(
    loaded: LoadedTokenizer, tokens: pa.Table, texts: dict[str, str], k: int
) -> tuple[int, list[str]]:
    """(sample size, section_ids whose stored ids/truncation differ from a fresh encode cut to
    max_seq_len, or that lack a text)."""
    ids = tokens["section_id"].to_pylist()
    sample = sample_positions(ids, k)
    stored = tokens.take(pa.array(sample, pa.int64()))
    fresh = cut(loaded.encode([texts.get(ids[i], "") for i in sample]), loaded.max_seq_len)
    bad = {ids[i] for i in sample if ids[i] not in texts}
    for i, old, new, old_cut, new_cut in zip(
        sample,
        stored["input_ids"].to_pylist(),
        fresh["input_ids"].to_pylist(),
        stored["truncated"].to_pylist(),
        fresh["truncated"].to_pylist(),
        strict=False,
    ):
        if old != new or old_cut != new_cut:
            bad.add(ids[i])
    return len(sample), sorted(bad)


LENGTH_BUCKETS = (0, 16, 64, 256, 1024, 4096, 16384)


def length_histogram(n_tokens: np.ndarray, max_seq_len: int) -> pa.Table:
    """Rows per token-count bucket, the last bucket being rows cut at `max_seq_len` (for the UI)."""
    edges = [b for b in LENGTH_BUCKETS if b < max_seq_len] + [max_seq_len, max_seq_len + 1]
    counts, _ = np.histogram(n_tokens, bins=edges)
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-2], edges[1:-1], strict=False)] + [f"{max_seq_len} (full)"]
    return pa.table({"tokens": labels, "rows": counts.astype(np.int64)})
