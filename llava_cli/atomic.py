"""Write a file under a temporary name and rename it into place only when it is complete.

Used by every writer of a final output (GGUF files, caption files, saved chats) so that Ctrl-C, a crash or a
full disk never leaves a half-written file under the name a user expects to be good.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from llava_cli.errors import OutputError


def temp_name(final: Path) -> Path:
    """The temporary sibling used while `final` is being written (same directory, so rename is atomic)."""
    return final.with_name(f".{final.name}.{os.getpid()}.partial")


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
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as exc:
        raise output_error(exc, final) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def output_error(exc: OSError, path: Path) -> OutputError:
    """Turn an OSError raised while writing `path` into a one-line OutputError."""
    if isinstance(exc, OutputError):
        return exc
    if exc.errno == errno.ENOSPC:
        return OutputError(f"disk full while writing {path}", hint="free some space or choose another --out")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write {path}: {exc.strerror}", hint="choose another --out")
    return OutputError(f"cannot write {path}: {exc.strerror or exc}")
