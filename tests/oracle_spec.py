"""An independent oracle for SPEC.md: what the outputs of a tree must be, computed the slow, obvious way.

Written from SPEC alone (not from the package), for the black-box conformance tests in
`test_spec_conformance.py`. Expansion per row is delegated to the reference algorithm
(`shared/seed/weighted_rows.py`), passed in as a module. Gitignore matching uses `pathspec`'s
`GitIgnoreSpec`. The default excludes are a subset of SPEC §1's list: enough for the trees the tests
build, not a full re-implementation.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pathspec import GitIgnoreSpec

DEFAULT_EXCLUDES = GitIgnoreSpec.from_lines(
    [
        ".git/",
        ".hg/",
        ".svn/",
        ".dlm/",
        "__pycache__/",
        "node_modules/",
        ".venv/",
        "venv/",
        "build/",
        "dist/",
        "*.lock",
        "package-lock.json",
        ".env*",
        "*.pem",
        "*.key",
        "id_rsa*",
        "id_ed25519*",
        "*.p12",
        ".netrc",
        "kubeconfig",
        "*.tfstate",
        "*.png",
        "*.jpg",
        "*.gif",
        "*.zip",
        "*.pyc",
    ]
)
PRIVATE_KEY_MARK = "PRIVATE KEY-----"


def canonical(value) -> str:
    """SPEC §1: YAML scalars used as tag keys/values become strings (`true` -> "true", `1` -> "1")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def section_id(path: str, text: str) -> str:
    return hashlib.sha256(f"prose\n# source: {path}\n\n{text}".encode()).hexdigest()[:16]


def content_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def unit_hash(message: str) -> float:
    return int.from_bytes(hashlib.blake2b(message.encode(), digest_size=8).digest(), "big") / 2**64


def expansion_roll(seed: int, sid: str) -> float:
    return unit_hash(f"{seed}:{sid}")


def on_validation_side(text: str, split_seed: int, val_fraction: float) -> bool:
    return unit_hash(f"split:{split_seed}:{content_key(text)}") < val_fraction


def order_key(seed: int, sid: str, copy: int) -> tuple:
    digest = hashlib.blake2b(f"order:{seed}:{sid}:{copy}".encode(), digest_size=8).digest()
    return digest, sid, copy


@dataclass
class Anchor:
    directory: str  # relative to the root, "" for the root
    config: dict
    ignore: list[str] | None

    @property
    def depth(self) -> int:
        return 0 if not self.directory else self.directory.count("/") + 1

    def relative(self, path: str) -> str:
        return path if not self.directory else path[len(self.directory) + 1 :]

    def weights(self) -> dict[str, dict[str, float]]:
        return {
            canonical(k): {canonical(v): float(w) for v, w in inner.items()}
            for k, inner in (self.config.get("weights") or {}).items()
        }

    def metadata(self) -> dict[str, str]:
        return {canonical(k): canonical(v) for k, v in (self.config.get("metadata") or {}).items()}


@dataclass
class Row:
    section_id: str
    path: str
    text: str
    tags: dict[str, str]
    weights: dict[str, dict[str, float]]


@dataclass
class Corpus:
    rows: list[Row]
    skips: dict[str, int] = field(default_factory=dict)
    anchors: list[Anchor] = field(default_factory=list)
    global_weights: dict[str, dict[str, float]] = field(default_factory=dict)


def find_anchors(root: Path) -> dict[str, Anchor]:
    anchors = {}
    for directory, dirnames, _ in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in (".git", "node_modules")]
        dlm = Path(directory) / ".dlm"
        if not dlm.is_dir() or dlm.is_symlink():
            continue
        rel = Path(directory).relative_to(root).as_posix()
        rel = "" if rel == "." else rel
        config_file, ignore_file = dlm / "training.yaml", dlm / "ignore"
        config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
        ignore = ignore_file.read_text().splitlines() if ignore_file.is_file() else None
        anchors[rel] = Anchor(rel, config or {}, ignore)
    return anchors


def ancestors(anchors: dict[str, Anchor], path: str) -> list[Anchor]:
    """The anchors from the root down to the file's directory."""
    parts = path.split("/")[:-1]
    dirs = [""] + ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return [anchors[d] for d in dirs if d in anchors]


def nearest_setting(chain: list[Anchor], key: str, default: bool) -> bool:
    for anchor in reversed(chain):
        if key in anchor.config:
            return bool(anchor.config[key])
    return default


def included_by_rules(chain: list[Anchor], path: str) -> bool:
    if nearest_setting(chain, "exclude_defaults", True) and DEFAULT_EXCLUDES.match_file(path):
        return False
    verdict = True
    for anchor in chain:
        rel = anchor.relative(path)
        if "include" in anchor.config:
            verdict = GitIgnoreSpec.from_lines(anchor.config["include"]).match_file(rel)
        if anchor.config.get("exclude") and GitIgnoreSpec.from_lines(anchor.config["exclude"]).match_file(rel):
            verdict = False
        if anchor.ignore is not None:
            result = GitIgnoreSpec.from_lines(anchor.ignore).check_file(rel)
            if result.include is not None:
                verdict = not result.include
    return verdict


def read_text(file: Path, root: Path, max_file_bytes: int) -> tuple[str | None, str | None]:
    """(text, None) or (None, skip reason)."""
    if file.is_symlink() and not Path(os.path.realpath(file)).is_relative_to(os.path.realpath(root)):
        return None, "symlink"
    if file.stat().st_size > max_file_bytes:
        return None, "too_large"
    data = file.read_bytes()
    if b"\0" in data[:8192]:
        return None, "binary"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "encoding"
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return text, None


def corpus(root: Path, scope: str = "nearest", max_file_bytes: int = 1 << 20, own_folders=()) -> Corpus:
    """SPEC §1-§2: the rows of the tree (ordered by the UTF-8 bytes of the path) and the skip counts.
    `own_folders`: the pipeline's folders inside the root ("name/"), never part of the corpus."""
    anchors = find_anchors(root)
    global_map: dict[str, dict[str, float]] = {}
    for anchor in sorted(anchors.values(), key=lambda a: (a.depth, a.directory.encode())):
        for k, inner in anchor.weights().items():
            global_map.setdefault(k, {}).update(inner)
    rows, skips = [], {}
    for directory, _dirnames, filenames in os.walk(root):  # os.walk does not descend into symlinked dirs
        for name in filenames:
            file = Path(directory) / name
            path = file.relative_to(root).as_posix()
            if path.startswith(tuple(own_folders)):
                continue
            chain = ancestors(anchors, path)
            if not included_by_rules(chain, path):
                continue
            text, reason = read_text(file, root, max_file_bytes)
            if reason is None and nearest_setting(chain, "scan_secrets", True) and PRIVATE_KEY_MARK in text:
                reason = "secret"
            if reason is not None:
                skips[reason] = skips.get(reason, 0) + 1
                continue
            tags: dict[str, str] = {}
            weights: dict[str, dict[str, float]] = {}
            for anchor in chain:
                tags.update(anchor.metadata())
                for k, inner in anchor.weights().items():
                    weights.setdefault(k, {}).update(inner)
            weights = global_map if scope == "global" else weights
            rows.append(Row(section_id(path, text), path, text, dict(sorted(tags.items())), weights))
    rows.sort(key=lambda r: r.path.encode())
    return Corpus(rows, skips, list(anchors.values()), global_map)


def composed_weight(reference, row: Row) -> float:
    """SPEC §3: the product of matching factors in sorted tag-key order (tags are kept sorted)."""
    return reference.resolve_row_weight(row.tags, row.weights)


def copies(reference, rows: list[Row], seed: int, mode: str = "bernoulli") -> list[int]:
    """SPEC §3 (the reference, per row with that row's map) or §7 exact mode: copies per row."""
    counts = [
        len(
            reference.expand_rows_by_weight(
                [{"_dlm_row_tags": r.tags, "_dlm_section_id": r.section_id}], r.weights, seed=seed
            )
        )
        for r in rows
    ]
    if mode == "bernoulli":
        return counts
    weights = [composed_weight(reference, r) if r.weights else 1.0 for r in rows]
    exact = [int(w) if w > 0 else 0 for w in weights]
    groups: dict[float, list[int]] = {}
    for i, w in enumerate(weights):
        if w > 0 and w - int(w) > 0:
            groups.setdefault(w, []).append(i)
    for w, members in groups.items():
        quota = math.floor(len(members) * (w - int(w)) + 0.5)
        ranked = sorted(members, key=lambda i: (expansion_roll(seed, rows[i].section_id), rows[i].section_id))
        for i in ranked[:quota]:
            exact[i] += 1
    return exact


def expanded(reference, rows: list[Row], seed: int, mode: str = "bernoulli") -> list[tuple[Row, float, int]]:
    """(row, composed weight, copy) in order: copies adjacent, in row order."""
    out = []
    for row, n in zip(rows, copies(reference, rows, seed, mode), strict=True):
        weight = composed_weight(reference, row) if row.weights else 1.0
        out.extend((row, weight, c) for c in range(n))
    return out


@dataclass
class Split:
    documents: list[list[int]]
    sequences: list[list[int]]
    doc_starts: list[list[int]]


def pack(documents: list[list[int]], seq_len: int) -> Split:
    stream, starts = [], []
    for doc in documents:
        starts.append(len(stream))
        stream.extend(doc)
    sequences = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
    doc_starts = [[s - i for s in starts if i <= s < i + seq_len] for i in range(0, len(stream), seq_len)]
    return Split(documents, sequences, doc_starts)


def training_dataset(
    reference, rows, seed, ids_of, eos_id, seq_len, val_fraction=0.1, split_seed=0, mode="bernoulli"
) -> dict[str, Split]:
    """SPEC §7: the train and validation splits (documents in order, packed sequences)."""
    val_rows = [r for r in rows if on_validation_side(r.text, split_seed, val_fraction)]
    # The expanded corpus filtered to the train side (in exact mode, weight groups span the whole corpus).
    train = sorted(
        (
            e
            for e in expanded(reference, rows, seed, mode)
            if not on_validation_side(e[0].text, split_seed, val_fraction)
        ),
        key=lambda e: order_key(seed, e[0].section_id, e[2]),
    )
    validation = sorted(
        (r for r in val_rows if (composed_weight(reference, r) if r.weights else 1.0) > 0),
        key=lambda r: (content_key(r.text), r.section_id),
    )
    return {
        "train": pack([ids_of(e[0].text) + [eos_id] for e in train], seq_len),
        "validation": pack([ids_of(r.text) + [eos_id] for r in validation], seq_len),
    }


def megatron_index(documents: list[list[int]], dtype_code: int, itemsize: int) -> bytes:
    """megatron-core's `_IndexWriter` layout: one sequence per document, document indices 0..n."""
    sizes = [len(d) for d in documents]
    pointers, offset = [], 0
    for size in sizes:
        pointers.append(offset)
        offset += size * itemsize
    header = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", dtype_code)
    header += struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(sizes) + 1)
    return (
        header
        + struct.pack(f"<{len(sizes)}i", *sizes)
        + struct.pack(f"<{len(sizes)}q", *pointers)
        + struct.pack(f"<{len(sizes) + 1}q", *range(len(sizes) + 1))
    )
