"""Outputs stored once per distinct bytes: content-addressed objects, per-seed hard links.

    <output_dir>/.objects/<sha256 of the bytes>.parquet    the bytes, once (.bin, .idx: a dataset's files)
    <output_dir>/<asset>/<seed>.parquet                     a hard link to the object (SPEC §4 path)
    <output_dir>/training_dataset/<seed>/<split>.<ext>      the same, for a dataset's split files
    <output_dir>/.locks/<seed>.lock, <seed>.turn            flock'd by the run writing that seed (its id inside)

Readers of the per-seed path see an ordinary file. A publish is atomic: the bytes go to a temp
file beside the target, the temp file is linked into `.objects` (or an identical object already
there is linked instead, after its bytes were re-hashed), then renamed over the target. Where hard
links are impossible (another file system, a file system without them, too many links) the
per-seed file stays a full copy and `Stored.linked` says so. An object whose only name left is its
own (st_nlink == 1) belongs to no seed: `prune` removes it, and every publish calls it; a publish
that loses its object to a concurrent prune retries. Entries under the output directory are never
followed through symlinks (the directory itself, chosen by the user, may be one).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import stat
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from dlm_pipeline.core.parquet_io import STALE_TEMP_SECONDS, delete_stale_temps, temp_name

OBJECTS_DIR = ".objects"
LOCKS_DIR = ".locks"
OBJECT_NAME = re.compile(r"[0-9a-f]{64}\.(?:parquet|bin|idx)")
# Errors that mean "no hard link here", not "something is wrong": fall back to a copy.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
_CREATE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC  # a new file, never through a symlink
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_HASH_CHUNK = 1 << 20
_RETRIES = 3


class BlobStoreError(Exception):
    """Something in the output directory is not what the pipeline wrote there (e.g. a symlink)."""


@dataclass(frozen=True)
class Stored:
    path: str  # the per-seed file
    sha256: str  # of its bytes
    size: int
    linked: bool  # a hard link to .objects/<sha256>.<ext>; False: a full copy


class _HashingWriter:
    """A binary file that hashes what goes through it (Parquet writers only call write/flush/tell)."""

    def __init__(self, fh: BinaryIO):
        self.fh, self.digest, self.size = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(memoryview(data))
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()

    def tell(self) -> int:
        return self.size

    @property
    def closed(self) -> bool:
        return self.fh.closed


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _hash_fd(fd: int) -> str:
    digest = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, _HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def open_subdir(parent_fd: int, name: str, shown: str) -> int:
    """`name` inside `parent_fd`, created if missing (mode 0777 & ~umask), never through a symlink."""
    try:
        os.mkdir(name, 0o777, dir_fd=parent_fd)
    except FileExistsError:
        pass
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise BlobStoreError(
                f"{shown} is not a plain folder (a symlink or a file); the output directory holds only what "
                "the pipeline writes: remove it and re-run"
            ) from None
        raise


class BlobStore:
    """The output directory of one IO manager: per-asset folders and the shared `.objects` folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(root)

    def _open_root(self) -> int:
        """The output directory itself (the user's choice, so a symlink to it is followed)."""
        try:
            try:
                return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                os.makedirs(self.root, exist_ok=True)
                return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise BlobStoreError(
                f"output folder {self.root} cannot be used ({exc.strerror or type(exc).__name__}); "
                "set DLM_OUTPUT_DIR to a writable folder"
            ) from None

    def path(self, folder: str, name: str) -> str:
        return os.path.join(self.root, folder, name)

    @contextmanager
    def _opened(self, folder: str) -> Iterator[tuple[int, int]]:
        """(root fd, `folder` fd), the folder created if missing, both closed after the block."""
        root_fd = self._open_root()
        try:
            folder_fd = open_subdir(root_fd, folder, self.path(folder, ""))
            try:
                yield root_fd, folder_fd
            finally:
                os.close(folder_fd)
        finally:
            os.close(root_fd)

    def delete_stale_temps(self, seed: str, stale_after: float = STALE_TEMP_SECONDS) -> int:
        """Delete the temp files that runs of `seed` killed mid-write left in the asset folders, once
        stale; returns how many. (`put` deletes those of the output it writes, but an output found
        unchanged is not written again: its temp file stayed, holding its object, for good.)"""
        root_fd = self._open_root()
        try:
            deleted = 0
            for entry in os.scandir(root_fd):
                if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                    continue
                folder_fd = os.open(entry.name, _DIR_FLAGS, dir_fd=root_fd)
                try:
                    deleted += delete_stale_temps(folder_fd, f"{seed}.parquet", stale_after)
                finally:
                    os.close(folder_fd)
            return deleted
        finally:
            os.close(root_fd)

    def folder(self, name: str) -> str:
        """The folder `name` of the output directory, created if missing; BlobStoreError where a
        symlink or a file is in its place (what is written into it would land elsewhere)."""
        with self._opened(name):
            return self.path(name, "")

    @contextmanager
    def seed_lock(self, seed: str, waiting: Callable[[], object], holder: str = "") -> Iterator[None]:
        """Held while a run writes and records `seed`'s outputs, so that two runs of one seed take
        turns (a run that found an output unchanged must not record it while another rewrites it);
        `waiting()` is called once if another run holds it. Holders of one name (`holder`, the run
        id) share it: the steps of one run, each in a process of its own, do not wait for each other.
        The lock dies with its process."""
        with self._opened(LOCKS_DIR) as (_, folder_fd), ExitStack() as opened:
            fd = self._lock_file(folder_fd, f"{seed}.lock")
            opened.callback(os.close, fd)  # closing it releases the lock
            turn = self._lock_file(folder_fd, f"{seed}.turn")
            opened.callback(os.close, turn)
            told = False
            while True:
                fcntl.flock(turn, fcntl.LOCK_EX)  # each "free, or held by my name?" is answered alone
                try:
                    if _join(fd, holder.encode()):
                        break
                finally:
                    fcntl.flock(turn, fcntl.LOCK_UN)
                if not told:
                    waiting()
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)  # until every holder of the other name has left
                fcntl.flock(fd, fcntl.LOCK_UN)
            try:
                yield
            finally:
                _leave(fd, turn)

    def _lock_file(self, folder_fd: int, name: str) -> int:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=folder_fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise BlobStoreError(f"{self.path(LOCKS_DIR, name)} is not a regular file: remove it")
        return fd

    def put(self, folder: str, name: str, write: Callable[[BinaryIO], object]) -> Stored:
        """Write `folder/name` through `write(fh)`, storing its bytes once across all names."""
        with self._opened(folder) as (root_fd, folder_fd):
            delete_stale_temps(folder_fd, name)
            tmp = temp_name(name)
            fd = os.open(tmp, os.O_RDWR | _CREATE_FLAGS, 0o666, dir_fd=folder_fd)
            try:
                with os.fdopen(os.dup(fd), "wb") as fh:
                    writer = _HashingWriter(fh)
                    write(writer)
                    fh.flush()
                    os.fsync(fh.fileno())
                return self._publish(root_fd, folder, folder_fd, tmp, fd, name, writer.digest.hexdigest())
            finally:
                os.close(fd)
                _unlink_quietly(tmp, folder_fd)

    def link_from(self, source: str | os.PathLike, folder: str, name: str, sha256: str) -> Stored | None:
        """`folder/name` as the same bytes as the file `source` (another seed's output), if those
        still hash to `sha256`; None when they do not, or `source` is gone (the caller recomputes)."""
        source = os.fspath(source)
        try:
            fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode) or _hash_fd(fd) != sha256:
                return None
            with self._opened(folder) as (root_fd, folder_fd):
                tmp = temp_name(name)
                try:
                    try:
                        os.link(source, tmp, dst_dir_fd=folder_fd, follow_symlinks=False)
                    except OSError as exc:
                        if exc.errno not in _NO_LINK:
                            return None
                        return self._copy_from(folder, folder_fd, fd, name, sha256)
                    if not _same_file(os.stat(tmp, dir_fd=folder_fd, follow_symlinks=False), os.fstat(fd)):
                        return None  # replaced between the hash and the link
                    return self._publish(root_fd, folder, folder_fd, tmp, fd, name, sha256)
                finally:
                    _unlink_quietly(tmp, folder_fd)
        finally:
            os.close(fd)

    def _copy_from(self, folder: str, folder_fd: int, src_fd: int, name: str, sha256: str) -> Stored:
        tmp = temp_name(name)
        out = os.open(tmp, os.O_WRONLY | _CREATE_FLAGS, 0o666, dir_fd=folder_fd)
        try:
            size = os.fstat(src_fd).st_size
            offset = 0
            while offset < size and (sent := os.sendfile(out, src_fd, offset, size - offset)):
                offset += sent
            os.fsync(out)
            os.rename(tmp, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
        finally:
            os.close(out)
            _unlink_quietly(tmp, folder_fd)
        return Stored(self.path(folder, name), sha256, size, linked=False)

    def _objects(self, root_fd: int) -> int | None:
        """The `.objects` folder, or None where it cannot be made (outputs then stay copies)."""
        try:
            return open_subdir(root_fd, OBJECTS_DIR, self.path(OBJECTS_DIR, ""))
        except OSError as exc:
            if exc.errno not in _NO_LINK and exc.errno not in (errno.EACCES, errno.EROFS):
                raise
            return None

    def _publish(self, root_fd: int, folder: str, folder_fd: int, tmp: str, fd: int, name: str, sha256: str) -> Stored:
        """Make `tmp` (open as `fd`, bytes hashing to `sha256`) the file `name`, sharing its object."""
        size = os.fstat(fd).st_size
        objects_fd = self._objects(root_fd)
        if objects_fd is None:
            os.rename(tmp, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
            return Stored(self.path(folder, name), sha256, size, linked=False)
        try:
            is_linked = self._share(folder_fd, tmp, objects_fd, sha256, name)
            prune_objects(objects_fd)
            return Stored(self.path(folder, name), sha256, size, linked=is_linked)
        finally:
            os.close(objects_fd)

    @contextmanager
    def _opened_objects(self) -> Iterator[int | None]:
        """The `.objects` folder's fd (None: no objects here), closed after the block."""
        root_fd = self._open_root()
        try:
            objects_fd = self._objects(root_fd)
            try:
                yield objects_fd
            finally:
                if objects_fd is not None:
                    os.close(objects_fd)
        finally:
            os.close(root_fd)

    def share_in_place(self, folder: str | os.PathLike, name: str, sha256: str) -> bool:
        """Store the file `name` of `folder` (a folder being built inside the output directory, such
        as a dataset's temp folder) once across all names: it becomes the object for its bytes, or is
        replaced by a link to an identical object already stored. False: it stays a copy."""
        with self._opened_objects() as objects_fd:
            if objects_fd is None:
                return False
            folder_fd = os.open(folder, _DIR_FLAGS)
            try:
                return self._share(folder_fd, name, objects_fd, sha256, name)
            finally:
                os.close(folder_fd)

    def prune(self) -> int:
        """Remove the objects no output links to any more; returns how many."""
        with self._opened_objects() as objects_fd:
            return 0 if objects_fd is None else prune_objects(objects_fd)

    def _share(self, folder_fd: int, tmp: str, objects_fd: int, sha256: str, name: str) -> bool:
        """Make `tmp` in the folder (bytes hashing to `sha256`) the file `name`, one name of its
        object; whether it is (False: a copy)."""
        obj = sha256 + os.path.splitext(name)[1]
        linked = self._link_object(folder_fd, tmp, objects_fd, obj, sha256)
        os.rename(linked or tmp, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
        # Renaming onto another name of the same file is a no-op that keeps both names.
        for leftover in {linked or tmp, tmp} - {name}:
            _unlink_quietly(leftover, folder_fd)
        return os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_nlink > 1

    def _link_object(self, folder_fd: int, tmp: str, objects_fd: int, obj: str, sha256: str) -> str | None:
        """Give `tmp` its object: link it as the object (None: rename `tmp` itself), or return a new
        temp name in the folder linked to an identical object already stored (its bytes re-hashed)."""
        for _ in range(_RETRIES):
            try:
                os.link(tmp, obj, src_dir_fd=folder_fd, dst_dir_fd=objects_fd, follow_symlinks=False)
                return None
            except FileExistsError:
                pass
            except OSError as exc:
                if exc.errno in _NO_LINK:
                    return None  # stays a copy
                raise
            try:
                existing = os.open(obj, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=objects_fd)
            except FileNotFoundError:
                continue  # pruned meanwhile: link ours
            except OSError:  # a symlink or worse where an object belongs: replace it with ours
                self._replace_object(folder_fd, tmp, objects_fd, obj)
                return None
            try:
                ours = os.stat(tmp, dir_fd=folder_fd, follow_symlinks=False)
                if _same_file(os.fstat(existing), ours):  # reusing a seed's file: the bytes were just hashed
                    return None
                held = os.fstat(existing)
                if (
                    not stat.S_ISREG(held.st_mode)
                    or stat.S_IMODE(held.st_mode) != stat.S_IMODE(ours.st_mode)  # chmod'ed: ours follows the umask
                    or _hash_fd(existing) != sha256
                ):
                    self._replace_object(folder_fd, tmp, objects_fd, obj)
                    return None
                alias = temp_name(obj)
                try:
                    os.link(obj, alias, src_dir_fd=objects_fd, dst_dir_fd=folder_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno in _NO_LINK:
                        return None
                    raise
                if _same_file(os.stat(alias, dir_fd=folder_fd, follow_symlinks=False), os.fstat(existing)):
                    return alias
                _unlink_quietly(alias, folder_fd)  # pruned and re-created between hash and link: again
            finally:
                os.close(existing)
        return None  # keep our own bytes as a copy rather than loop

    @staticmethod
    def _replace_object(folder_fd: int, tmp: str, objects_fd: int, obj: str) -> None:
        """An object whose bytes no longer match its name (edited in place), or whose permissions are no
        longer what a write gives (chmod), is replaced, not reused."""
        staged = temp_name(obj)
        os.link(tmp, staged, src_dir_fd=folder_fd, dst_dir_fd=objects_fd, follow_symlinks=False)
        try:
            os.rename(staged, obj, src_dir_fd=objects_fd, dst_dir_fd=objects_fd)
        finally:
            _unlink_quietly(staged, objects_fd)


def _join(fd: int, name: bytes) -> bool:
    """Hold the lock file `fd` shared, if it is free (then it records `name` as its holder) or
    held by `name` already; False if another name holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not name or os.pread(fd, len(name) + 1, 0) != name:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # beside the other holders of its name
        except BlockingIOError:
            return False  # held exclusively (a waiter, for a moment): wait, then look again
        return True
    os.ftruncate(fd, 0)
    os.pwrite(fd, name, 0)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return True


def _leave(fd: int, turn: int) -> None:
    """The last holder to leave empties the lock file, so no run's name stays in the output folder
    (two runs' output folders are then the same bytes); the others just go."""
    fcntl.flock(turn, fcntl.LOCK_EX)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # granted only when no other holder is left
    except BlockingIOError:
        pass
    else:
        os.ftruncate(fd, 0)
    finally:
        fcntl.flock(turn, fcntl.LOCK_UN)


def prune_objects(objects_fd: int) -> int:
    """Remove objects no per-seed file links to any more (st_nlink == 1); returns how many."""
    removed = 0
    for name in os.listdir(objects_fd):
        if not OBJECT_NAME.fullmatch(name):
            continue
        try:
            info = os.stat(name, dir_fd=objects_fd, follow_symlinks=False)
            if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
                os.unlink(name, dir_fd=objects_fd)
                removed += 1
        except FileNotFoundError:
            pass
    return removed
