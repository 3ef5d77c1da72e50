"""A stat-only signature of the files a raw corpus is read from, to prove cheaply that they are
unchanged since another run read them (seed-independent work done once).

Each entry contributes its path and lstat (mode, size, mtime_ns, ctime_ns, inode) and, for a
symlink, the same of its target. Timestamps are trusted as git trusts its index: an entry whose
mtime or ctime is not older than the fence (taken before anything is stat'ed or read) by
RACY_WINDOW_NS could still change within the same timestamp tick without any field changing, so
a signature holding such an entry is marked racy and is never matched. The window covers coarse
file-system timestamps (1 s, FAT's 2 s) and the kernel's coarse clock; ctime cannot be set back by
users, so a rewrite after the fence that restores size and mtime still changes the signature.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from dlm_pipeline.core.tree import FileEntry, TreeScan

SIGNATURE_VERSION = "dlm-tree-signature-v1"
RACY_WINDOW_NS = 2_000_000_000


@dataclass(frozen=True)
class TreeSignature:
    digest: str
    entries: int
    racy: list[str]  # paths changed too recently to trust their timestamps


def _fields(info: os.stat_result) -> list[int]:
    return [info.st_mode, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]


def tree_signature(scan: TreeScan, files: Iterable[FileEntry], fence_ns: int) -> TreeSignature:
    """The signature of `files` (entries of `scan`) plus what the walk passed over, stat'ed after `fence_ns`."""
    digest = hashlib.sha256(f"{SIGNATURE_VERSION}\n{scan.root}\n".encode())
    racy_after = fence_ns - RACY_WINDOW_NS
    racy: list[str] = []
    count = 0
    for entry in files:
        count += 1
        record: list = [entry.path]
        try:
            info = os.lstat(entry.abspath)
            stats = [info] + ([os.stat(entry.abspath)] if stat.S_ISLNK(info.st_mode) else [])
        except OSError as exc:
            stats = []
            record.append(f"error {exc.errno}")
        for one in stats:
            record += _fields(one)
            if max(one.st_mtime_ns, one.st_ctime_ns) >= racy_after:
                racy.append(entry.path)
        digest.update(json.dumps(record).encode() + b"\n")
    digest.update(json.dumps([sorted(scan.skipped), scan.own_dirs]).encode())
    return TreeSignature(digest.hexdigest(), count, sorted(set(racy)))
