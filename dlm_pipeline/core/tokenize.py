"""Tokenizers, identified by what they are (a hash of their canonical serialisation), not where they live."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

DEFAULT_TOKENIZER = Path(__file__).resolve().parent.parent / "data" / "dlm-bpe-8k.json"
DEFAULT_MAX_SEQ_LEN = 2048
TOKEN_FILE = "tokenizer.json"
ENCODE_BATCH = 512

TOKENS_SCHEMA = pa.schema(
    [
        ("section_id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("n_tokens", pa.int32()),
        ("truncated", pa.bool_()),
    ]
)


class TokenizerError(ValueError):
    """The tokenizer cannot be loaded; the message says what was tried and how to fix it."""


@dataclass(frozen=True)
class LoadedTokenizer:
    tokenizer: Tokenizer
    fingerprint: str  # sha256 of the canonical serialisation
    source: str
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    add_special_tokens: bool = False

    @property
    def cache_namespace(self) -> str:
        """Everything that changes the ids of a given text: which tokenizer, how long, which specials."""
        specials = "-special" if self.add_special_tokens else ""
        return f"{self.fingerprint[:32]}-L{self.max_seq_len}{specials}"

    def encode(self, texts: Sequence[str], progress=None) -> pa.Table:
        """Token ids per text (truncated to max_seq_len), in batches so progress can be reported."""
        ids_chunks, lengths, truncated = [], [], []
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        for start in range(0, len(texts), ENCODE_BATCH):
            batch = encode(list(texts[start : start + ENCODE_BATCH]), add_special_tokens=self.add_special_tokens)
            for encoding in batch:
                ids = encoding.ids
                truncated.append(len(ids) > self.max_seq_len)
                ids = ids[: self.max_seq_len]
                lengths.append(len(ids))
                ids_chunks.append(np.asarray(ids, dtype=np.int32))
            if progress is not None:
                progress(min(start + ENCODE_BATCH, len(texts)), len(texts))
        flat = np.concatenate(ids_chunks) if ids_chunks else np.zeros(0, np.int32)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        return pa.table(
            {
                "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int32())),
                "n_tokens": pa.array(lengths, pa.int32()),
                "truncated": pa.array(truncated, pa.bool_()),
            }
        )


def fingerprint_of(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def load_tokenizer(spec: str = "", *, max_seq_len: int = DEFAULT_MAX_SEQ_LEN, add_special_tokens: bool = False) -> LoadedTokenizer:
    """`spec`: a tokenizer.json path, a directory holding one, a hub id, or "" for the bundled default."""
    if max_seq_len <= 0:
        raise TokenizerError(f"max_seq_len must be > 0, got {max_seq_len}")
    source = spec or str(DEFAULT_TOKENIZER)
    path = Path(source).expanduser()
    try:
        if path.is_dir():
            if not (path / TOKEN_FILE).is_file():
                raise TokenizerError(f"{path} is a directory without a {TOKEN_FILE}")
            tokenizer = Tokenizer.from_file(str(path / TOKEN_FILE))
        elif path.is_file():
            tokenizer = Tokenizer.from_file(str(path))
        elif os.sep in source or source.endswith(".json"):
            raise TokenizerError(f"tokenizer file {source!r} does not exist")
        else:
            tokenizer = _from_hub(source)
    except TokenizerError:
        raise
    except Exception as exc:  # tokenizers raises bare Exceptions for unparsable files
        raise TokenizerError(f"cannot load tokenizer from {source!r}: {exc}") from None
    return LoadedTokenizer(tokenizer, fingerprint_of(tokenizer), source, max_seq_len, add_special_tokens)


def _from_hub(model_id: str) -> Tokenizer:
    try:
        return Tokenizer.from_pretrained(model_id)
    except Exception as exc:
        raise TokenizerError(
            f"{model_id!r} is not a local file or directory, and fetching it from the hub failed ({exc}); "
            "on an offline machine point DLM_TOKENIZER at a tokenizer.json"
        ) from None


def sample_positions(section_ids: Sequence[str], k: int) -> list[int]:
    """Deterministic sample: first position of each of the k smallest distinct section_ids."""
    first: dict[str, int] = {}
    for position, section in enumerate(section_ids):
        first.setdefault(section, position)
    return [first[s] for s in sorted(first)[:k]]


def mismatched_sections(loaded: LoadedTokenizer, tokens: pa.Table, texts: dict[str, str], k: int) -> tuple[int, list[str]]:
    """(sample size, section_ids whose stored ids/truncation differ from a fresh encode or lack a text)."""
    ids = tokens["section_id"].to_pylist()
    sample = sample_positions(ids, k)
    stored = tokens.take(pa.array(sample, pa.int64()))
    fresh = loaded.encode([texts.get(ids[i], "") for i in sample])
    bad = {ids[i] for i in sample if ids[i] not in texts}
    for i, old, new, old_cut, new_cut in zip(
        sample,
        stored["input_ids"].to_pylist(),
        fresh["input_ids"].to_pylist(),
        stored["truncated"].to_pylist(),
        fresh["truncated"].to_pylist(),
    ):
        if old != new or old_cut != new_cut:
            bad.add(ids[i])
    return len(sample), sorted(bad)
