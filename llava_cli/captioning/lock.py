"""One process per output file: an OS file lock beside the log, refused at once when another process holds it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from llava_cli.atomic import output_error
from llava_cli.errors import OutputError


def _lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out` (via a hidden ``.<name>.lock`` sibling) or refuse at once.

    The lock is an OS file lock: it goes away with the process, even after SIGKILL, so there is no stale lock to
    clean up. The lock file itself is left in place on purpose (deleting it would race with a starting process).
    """
    lock = _lock_path(out)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise output_error(exc, lock) from exc
    try:
        if not _try_lock(fd):
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise OutputError(
                f"{out} is being written by another `llava caption` process (pid {other})",
                hint="wait for it to finish, or give this one another --out (with --shard, one --out per shard)",
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
