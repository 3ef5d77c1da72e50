"""One deterministic walk of a source root: candidate files, config files, and what was passed over.

Symlinked directories are never descended (a link loop cannot hang the walk); symlinked files
are kept only when their target stays inside the root. Entries are visited in sorted name
order so the result does not depend on the file system's listing order.
"""

from __future__ import annotations

import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dlm_pipeline.core.config import ANCHOR_DIR, IGNORE_FILE, TRAINING_FILE

TRAINING_KIND = "training.yaml"
IGNORE_KIND = "ignore"
# Near-misses of training.yaml that a user almost certainly meant: reported, never ignored.
_TRAINING_LOOKALIKE = re.compile(r"^training\.(ya?ml|json)$", re.IGNORECASE)


class SourceTreeError(Exception):
    """The source root cannot be walked at all (missing, not a directory, unreadable)."""


@dataclass(frozen=True)
class ConfigFile:
    """A file under some `.dlm/` that configures the anchor at `anchor` ("" is the root)."""

    anchor: str
    kind: str  # TRAINING_KIND | IGNORE_KIND | "unknown"
    path: str  # relative to the root, POSIX
    problem: str | None = None  # set when the file cannot be a valid config whatever it holds


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the root, POSIX
    abspath: str  # what to open (a symlink's path; its target was checked to stay inside)


@dataclass
class TreeScan:
    root: Path
    files: list[FileEntry] = field(default_factory=list)
    config_files: list[ConfigFile] = field(default_factory=list)
    skips: Counter = field(default_factory=Counter)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def skip(self, path: str, reason: str) -> None:
        self.skips[reason] += 1
        self.skipped.append((path, reason))


def resolve_root(root: str | os.PathLike) -> Path:
    """Absolute, resolved root, or SourceTreeError saying what is wrong and how to fix it."""
    path = Path(root).expanduser()
    if not path.exists():
        raise SourceTreeError(f"source root {str(path)!r} does not exist; set DLM_SOURCE_ROOT or --source")
    if not path.is_dir():
        raise SourceTreeError(f"source root {str(path)!r} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise SourceTreeError(f"source root {str(path)!r} is not readable by this user")
    return path.resolve()


def is_inside(root: Path, target: str) -> bool:
    try:
        return os.path.commonpath([str(root), target]) == str(root)
    except ValueError:
        return False


def _is_utf8_name(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes surface as lone surrogates
        return False
    return True


def _scan_anchor_dir(scan: TreeScan, dir_path: str, anchor: str, rel: str) -> None:
    try:
        names = sorted(os.listdir(dir_path))
    except OSError as exc:
        scan.config_files.append(ConfigFile(anchor, "unknown", rel, f"cannot list {ANCHOR_DIR}/: {exc.strerror}"))
        return
    for name in names:
        path = f"{rel}/{name}"
        if name == TRAINING_FILE:
            scan.config_files.append(ConfigFile(anchor, TRAINING_KIND, path))
        elif name == IGNORE_FILE:
            scan.config_files.append(ConfigFile(anchor, IGNORE_KIND, path))
        elif _TRAINING_LOOKALIKE.match(name):
            scan.config_files.append(
                ConfigFile(anchor, "unknown", path, f"not read: the config must be named exactly {TRAINING_FILE}")
            )


def scan_tree(root: str | os.PathLike, *, files: bool = True) -> TreeScan:
    """Walk `root`; raise SourceTreeError if it cannot be walked at all.

    `files=False` looks for config files only (what the sensor and `training_configs` need):
    every directory is still listed, but no file entry is kept or checked.
    """
    root_path = resolve_root(root)
    scan = TreeScan(root=root_path)
    stack: list[tuple[str, str]] = [(str(root_path), "")]
    while stack:
        dir_path, rel_dir = stack.pop()
        try:
            with os.scandir(dir_path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            if not rel_dir:
                raise SourceTreeError(f"source root {str(root_path)!r} vanished during the walk") from None
            scan.skip(rel_dir, "vanished")
            continue
        except OSError as exc:
            if not rel_dir:
                raise SourceTreeError(f"cannot list source root {str(root_path)!r}: {exc.strerror}") from None
            scan.skip(rel_dir, "unreadable_dir")
            continue
        subdirs = []
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if not _is_utf8_name(entry.name):
                scan.skip(rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), "bad_filename")
                continue
            try:
                if not files and entry.name != ANCHOR_DIR:
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append((entry.path, rel))
                elif entry.is_symlink():
                    _visit_symlink(scan, root_path, entry, rel)
                elif entry.is_dir(follow_symlinks=False):
                    if entry.name == ANCHOR_DIR:
                        _scan_anchor_dir(scan, entry.path, rel_dir, rel)
                    subdirs.append((entry.path, rel))
                elif entry.is_file(follow_symlinks=False):
                    scan.files.append(FileEntry(rel, entry.path))
                else:
                    scan.skip(rel, "not_regular")
            except OSError:
                scan.skip(rel, "unreadable")
        stack.extend(reversed(subdirs))
    scan.files.sort(key=lambda f: f.path)
    scan.config_files.sort(key=lambda c: c.path)
    return scan


def _visit_symlink(scan: TreeScan, root: Path, entry: os.DirEntry, rel: str) -> None:
    if entry.name == ANCHOR_DIR:
        scan.config_files.append(
            ConfigFile(rel.rpartition("/")[0], "unknown", rel, f"{ANCHOR_DIR} is a symlink; make it a real directory")
        )
        return
    target = os.path.realpath(entry.path)
    try:
        mode = os.stat(target).st_mode
    except OSError:
        scan.skip(rel, "broken_symlink")
        return
    if stat.S_ISDIR(mode):
        scan.skip(rel, "symlink_dir")
    elif not is_inside(root, target):
        scan.skip(rel, "symlink_escape")
    elif stat.S_ISREG(mode):
        scan.files.append(FileEntry(rel, entry.path))
    else:
        scan.skip(rel, "not_regular")
