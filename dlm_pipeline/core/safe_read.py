"""Reading a file that may have changed since the walk: never block, never read without bound."""

from __future__ import annotations

import os
import stat


class NotRegularFile(OSError):
    """The path is a FIFO, socket, device or directory: reading it could block or never end."""


class FileTooLarge(OSError):
    """The file holds more than the caller's limit."""


def read_regular_file(path: str, max_bytes: int, *, dir_fd: int | None = None, follow_symlinks: bool = True) -> bytes:
    """At most `max_bytes` bytes of a regular file; NotRegularFile / FileTooLarge / OSError otherwise.

    Opened non-blocking and checked with fstat, so a FIFO (even one swapped in after the walk)
    cannot hang the run. `follow_symlinks=False` refuses a symlink (ELOOP); `dir_fd` as in os.open.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(f"{path} is not a regular file")
        if info.st_size > max_bytes:
            raise FileTooLarge(f"{info.st_size} bytes > limit {max_bytes}")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise FileTooLarge(f"grew past the limit {max_bytes} while read")
    return data
