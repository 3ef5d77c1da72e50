"""One deterministic walk of a source root: candidate files, config files, and what was passed over.

Symlinked directories are never descended (a link loop cannot hang the walk); symlinked files
are kept only when their target stays inside the root. Entries are visited in sorted name
order so the result does not depend on the file system's listing order.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dlm_pipeline.core.config import ANCHOR_DIR, IGNORE_FILE, TRAINING_FILE, is_utf8

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


# What the incremental ingest compares (core/ingest_index.py): a change in any of these means
# the file may have changed. `link` tells a symlink from the file it points at.
StatKey = tuple[int, int, int, int, int, int, bool]  # size, mtime_ns, ctime_ns, inode, device, mode, link


def stat_key(info: os.stat_result, link: bool) -> StatKey:
    return (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev, info.st_mode, link)


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the root, POSIX
    abspath: str  # what to open (a symlink's path; its target was checked to stay inside)
    stat: StatKey | None = None  # of what is read (a symlink's target), taken during the walk
    target: str | None = None  # a symlink's target, relative to the root, POSIX (None: not a symlink)


@dataclass
class TreeScan:
    root: Path
    files: list[FileEntry] = field(default_factory=list)
    config_files: list[ConfigFile] = field(default_factory=list)
    skips: Counter = field(default_factory=Counter)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    own_dirs: list[str] = field(default_factory=list)  # the pipeline's own folders, passed over whole
    started_ns: int = field(default_factory=time.time_ns)  # wall clock when the walk began (racy entries)

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


def scan_tree(
    root: str | os.PathLike, *, files: bool = True, exclude_dirs: Iterable[str | os.PathLike] = ()
) -> TreeScan:
    """Walk `root`; raise SourceTreeError if it cannot be walked at all.

    `files=False` looks for config files only (what the sensor and `training_configs` need):
    every directory is still listed, but no file entry is kept or checked.
    `exclude_dirs` (absolute paths; resolved here) are never descended into, whatever the configs
    say: the pipeline's own folders (instance, outputs, token store) are not source. Those met
    are listed once in `own_dirs`, not as a skip per file.
    """
    root_path = resolve_root(root)
    scan = TreeScan(root=root_path)
    excluded = {os.path.realpath(d) for d in exclude_dirs if d}
    for own in sorted(excluded):
        if is_inside(Path(own), str(root_path)):
            raise SourceTreeError(
                f"source root {str(root_path)!r} is inside the pipeline's own folder {own!r} (DAGSTER_HOME, "
                "DLM_OUTPUT_DIR or DLM_CACHE_DIR): its outputs and logs would become training text; "
                "point DLM_SOURCE_ROOT or --source at the source tree"
            )
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
            if exc.errno == errno.ENAMETOOLONG and _holds_anchor(dir_path):
                scan.config_files.append(
                    ConfigFile(rel_dir, "unknown", rel_dir, _TOO_DEEP.format(limit=os.pathconf("/", "PC_PATH_MAX")))
                )
            continue
        subdirs = []
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if not is_utf8(entry.name):  # undecodable bytes surface as lone surrogates
                scan.skip(rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), "bad_filename")
                continue
            if entry.name != ANCHOR_DIR and entry.name.lower() == ANCHOR_DIR:
                scan.config_files.append(ConfigFile(rel_dir, "unknown", rel, _ANCHOR_CASE))
            try:
                if entry.path in excluded and entry.is_dir(follow_symlinks=False):
                    scan.own_dirs.append(rel)
                elif not files and entry.name != ANCHOR_DIR:
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append((entry.path, rel))
                elif entry.is_symlink():
                    _visit_symlink(scan, root_path, entry, rel, excluded)
                elif entry.is_dir(follow_symlinks=False):
                    if entry.name == ANCHOR_DIR:
                        _scan_anchor_dir(scan, entry.path, rel_dir, rel)
                    subdirs.append((entry.path, rel))
                elif entry.name == ANCHOR_DIR:
                    scan.config_files.append(ConfigFile(rel_dir, "unknown", rel, _ANCHOR_NOT_DIR))
                elif entry.is_file(follow_symlinks=False):
                    scan.files.append(FileEntry(rel, entry.path, stat_key(entry.stat(follow_symlinks=False), False)))
                else:
                    scan.skip(rel, "not_regular")
            except OSError:
                scan.skip(rel, "unreadable")
        stack.extend(reversed(subdirs))
    scan.files.sort(key=lambda f: f.path)
    scan.config_files.sort(key=lambda c: c.path)
    scan.own_dirs.sort()
    return scan


# `.DLM/` (written on a case-insensitive file system, or by hand) would be silently no anchor, and its
# training.yaml a row of text.
_ANCHOR_CASE = f"not read: an anchor folder must be named exactly {ANCHOR_DIR}/ (lower case); rename it"
_ANCHOR_NOT_DIR = f"is a file; an anchor is a folder {ANCHOR_DIR}/ holding {TRAINING_FILE} (rename or remove it)"
_TOO_DEEP = (
    f"holds a {ANCHOR_DIR}/ folder, but its path is longer than PATH_MAX ({{limit}} bytes) and cannot be read; "
    "move it higher or remove it"
)
# How far below a too-long folder we look for an anchor, in folders deep and in folders listed.
PROBE_DEPTH = 64
PROBE_DIRS = 10_000


def _holds_anchor(path: str) -> bool:
    """Whether a folder whose path is too long to open holds a `.dlm` within PROBE_DEPTH levels.

    Opened relative to its parent's descriptor, so the length of the path does not matter; a search
    that hits its bounds answers True: an unread config must not pass silently.
    """
    parent, _, name = path.rpartition("/")
    budget = [PROBE_DIRS]

    def probe(dir_fd: int, name: str, depth: int) -> bool:
        budget[0] -= 1
        if depth > PROBE_DEPTH or budget[0] < 0:
            return True
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
        except OSError:
            return False
        try:
            with os.scandir(fd) as it:
                entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
            return any(n == ANCHOR_DIR for n, _ in entries) or any(
                probe(fd, n, depth + 1) for n, is_dir in entries if is_dir
            )
        finally:
            os.close(fd)

    try:
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return True
    try:
        return probe(parent_fd, name, 1)
    finally:
        os.close(parent_fd)


def _visit_symlink(scan: TreeScan, root: Path, entry: os.DirEntry, rel: str, own_dirs: set[str]) -> None:
    """A symlinked file is kept when its target is a regular file inside the root and outside the
    pipeline's own folders (`notes.txt -> home/logs/event.log` would feed our own logs back in)."""
    if entry.name == ANCHOR_DIR:
        scan.config_files.append(
            ConfigFile(rel.rpartition("/")[0], "unknown", rel, f"{ANCHOR_DIR} is a symlink; make it a real directory")
        )
        return
    target = os.path.realpath(entry.path)
    try:
        info = os.stat(target)
    except OSError:
        scan.skip(rel, "broken_symlink")
        return
    mode = info.st_mode
    if stat.S_ISDIR(mode):
        scan.skip(rel, "symlink_dir")
    elif not is_inside(root, target) or any(is_inside(Path(own), target) for own in own_dirs):
        scan.skip(rel, "symlink_escape")
    elif stat.S_ISREG(mode):
        scan.files.append(FileEntry(rel, entry.path, stat_key(info, True), Path(target).relative_to(root).as_posix()))
    else:
        scan.skip(rel, "not_regular")
