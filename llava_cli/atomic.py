"""Write a file under a temporary name and rename it into place only when it is complete.

Used by every writer of a final output (GGUF files, caption files, saved chats) so that Ctrl-C, a crash or a
full disk never leaves a half-written file under the name a user expects to be good.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from llava_cli.errors import OutputError


def temp_name(final: Path) -> Path:
    """The temporary sibling used while `final` is being written (same directory, so rename is atomic)."""
    return final.with_name(f".{final.name}.{os.getpid()}.partial")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(final: Path) -> list[Path]:
    """Delete the temp files of earlier writers of `final` that died without cleaning up (SIGKILL, power loss).

    A temp name carries its writer's pid; one whose process is gone can never be finished or renamed, and for a
    7B model it is gigabytes. A live pid (a concurrent writer, or a recycled pid) is left alone.
    """
    removed = []
    for tmp in final.parent.glob(f".{glob.escape(final.name)}.*.partial"):
        pid = tmp.name[len(final.name) + 2 : -len(".partial")]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write to; on success rename it to `final`, on any error delete it.

    A full disk or an unwritable directory becomes an `OutputError` naming the file.
    """
    final = Path(final)
    tmp = temp_name(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output directory {final.parent}: {exc.strerror}") from exc
    if not os.access(final.parent, os.W_OK):
        raise OutputError(f"output directory {final.parent} is not writable", hint="choose another --out")
    remove_stale_temps(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as exc:
        raise output_error(exc, final) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def final_name(path: Path) -> Path:
    """The final name a `temp_name` stands for (or `path` itself if it is not one): what a user knows the file by."""
    m = re.fullmatch(r"\.(.+)\.\d+\.partial", path.name)
    return path.with_name(m.group(1)) if m else path


def _looks_full(path: Path) -> bool:
    """A short write that left less than 1 MiB free: numpy's tofile reports a full disk this way, without errno."""
    try:
        return shutil.disk_usage(path.parent).free < 1 << 20
    except OSError:
        return False


def output_error(exc: OSError, path: Path) -> OutputError:
    """Turn an OSError raised while writing `path` (or its temp file) into a one-line OutputError."""
    if isinstance(exc, OutputError):
        return exc
    path = final_name(Path(path))
    if exc.errno == errno.ENOSPC or (exc.errno is None and _looks_full(path)):
        return OutputError(f"disk full while writing {path}", hint="free some space or choose another --out")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write {path}: {exc.strerror}", hint="choose another --out")
    return OutputError(f"cannot write {path}: {exc.strerror or exc}")
