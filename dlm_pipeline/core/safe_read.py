"""Reading a file that may have changed since the walk: never block, never read without bound."""

from __future__ import annotations

import os
import stat


class NotRegularFile(OSError):
    """The path is a FIFO, socket, device or directory: reading it could block or never end."""


class FileTooLarge(OSError):
    """The file holds more than the caller's limit."""


class FileReplaced(OSError):
    """Another file than the one expected is at the path now (swapped after the walk)."""


def open_regular(
    path: str, *, dir_fd: int | None = None, follow_symlinks: bool = True, identity: tuple[int, int] | None = None
) -> tuple[int, os.stat_result]:
    """(an fd of the regular file at `path`, its fstat); the caller closes the fd. NotRegularFile /
    FileReplaced / OSError otherwise (ELOOP: a symlink, when not `follow_symlinks`).

    Opened non-blocking and checked with fstat, so a FIFO (even one swapped in after the walk)
    cannot hang the run. `dir_fd` as in os.open. `identity` (inode, device) is the file the walk
    checked: whatever else the path leads to now (a file or folder swapped for a symlink out of the
    root) is FileReplaced, never read.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if identity is not None and (info.st_ino, info.st_dev) != identity:
            raise FileReplaced(f"{path} was replaced after the walk")
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(f"{path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def read_regular_file(
    path: str,
    max_bytes: int,
    *,
    dir_fd: int | None = None,
    follow_symlinks: bool = True,
    identity: tuple[int, int] | None = None,
) -> bytes:
    """At most `max_bytes` bytes of a regular file (`open_regular`); FileTooLarge past them."""
    fd, info = open_regular(path, dir_fd=dir_fd, follow_symlinks=follow_symlinks, identity=identity)
    try:
        if info.st_size > max_bytes:
            raise FileTooLarge(f"{info.st_size} bytes > limit {max_bytes}")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            # Sized by the file, not the limit: read(n) allocates n bytes up front, so a large
            # limit (DLM_MAX_FILE_BYTES=1e15) made every small file a MemoryError.
            data = fh.read(min(max_bytes, info.st_size) + 1)
            while len(data) <= max_bytes:  # it grew since fstat: read on, in bounded steps
                more = fh.read(min(max_bytes + 1 - len(data), 1 << 20))
                if not more:
                    break
                data += more
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise FileTooLarge(f"grew past the limit {max_bytes} while read")
    return data
