"""One bounded way to read any input: images, list files, prompt files, sidecars, model headers, stdin.

Two rules, for every file a user hands us:

* **Only regular files** (or ``-``, stdin). A device (``/dev/zero``), a FIFO, a socket or a directory is refused by
  its type, found with ``os.stat`` *before* anything is opened: opening a FIFO with no writer blocks forever, and
  reading ``/dev/zero`` never ends. The open itself uses ``O_NONBLOCK`` and the type is checked again on the open
  descriptor, so a file swapped for a FIFO between the two calls cannot block us either.
* **A stated limit** on every read (`Limit`): a file larger than it is refused from its size before a byte is read;
  a stream (stdin, or a file still growing) is read up to the limit plus one byte and refused there. The message
  names the limit and the flag or environment variable that raises it.

Text from people (prompts, chat lines, list files' entries are *names*, not text) follows one policy,
`repair_text`: bytes that are not UTF-8 are replaced by U+FFFD and the caller says so in a ``note:`` line. File
names are never repaired: they are bytes, kept exactly (Python's surrogate escapes), and shown with `display_name`.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, TextIO

from llava_cli.errors import InputNotFoundError, LlavaError, UsageError

STDIN = "-"
MiB = 1 << 20
_CHUNK = MiB


@dataclass(frozen=True)
class Limit:
    """The most bytes one kind of input may have, and how a user raises it."""

    what: str  # "image", "list file", ... as the message names it
    env: str  # environment variable holding the limit in MiB
    default_mib: float
    flag: str | None = None  # the command-line flag that also sets it, if any

    def bytes(self, mib: float | None = None) -> int:
        """The limit in bytes: `mib` if given (the flag's value), else the environment variable, else the default."""
        if mib is None:
            raw = os.environ.get(self.env, "").strip()
            if raw:
                try:
                    mib = float(raw)
                except ValueError:
                    raise UsageError(f"{self.env}={raw!r} is not a number of MiB", hint=f"e.g. {self.env}=64") from None
            else:
                mib = self.default_mib
        if not mib > 0:
            where = self.flag or self.env
            raise UsageError(f"the {self.what} limit must be more than 0 MiB (got {mib:g})", hint=f"e.g. {where} 64")
        return int(mib * MiB)

    def how_to_raise(self, size: int | None = None) -> str:
        want = max(1, -(-size // MiB) + 1) if size is not None else int(self.default_mib * 4)
        ways = ([f"{self.flag} {want}"] if self.flag else []) + [f"{self.env}={want}"]
        return "raise it with " + " or ".join(ways)


# The limits (MiB). Images: the 100-MP pixel guard (images.DEFAULT_MAX_PIXELS) decodes to ~300 MB; a file of more than
# 100 MiB is not a photo anyone captions. Lists: ~4 million paths of 60 bytes. Prompts and sidecars: a prompt longer
# than 1 MiB does not fit any LLaVA context. Headers: the safetensors library's own cap is 100 MB; a GGUF header
# (KV + tensor table) of a 128k-token vocabulary is ~3 MB.
IMAGE = Limit("image", "LLAVA_MAX_IMAGE_MB", 100, flag="--max-image-mb")
LIST = Limit("list file", "LLAVA_MAX_LIST_MB", 256)
TEXT = Limit("prompt", "LLAVA_MAX_PROMPT_MB", 1)
HEADER = Limit("model header", "LLAVA_MAX_HEADER_MB", 100)


def display_name(name: str | os.PathLike[str] | bytes) -> str:
    """A file name as people read it: valid UTF-8 as is, any other byte as ``\\xNN`` (lossy; see docs/captioning.md).

    ``os.scandir`` and ``sys.argv`` give undecodable bytes as lone surrogates ("surrogate escapes"), which no UTF-8
    writer accepts: this is the form for messages, prompts and the ``path`` field of records.
    """
    raw = os.fsencode(name) if not isinstance(name, bytes) else name
    return raw.decode("utf-8", "backslashreplace")


def name_bytes(name: str | os.PathLike[str]) -> bytes:
    """The bytes the OS knows the name by (the inverse of Python's surrogate-escape decoding)."""
    try:
        return os.fsencode(name)
    except UnicodeEncodeError:  # a surrogate that no OS name decodes to (e.g. from JSON): keep it as UTF-16 would
        return os.fspath(name).encode("utf-8", "surrogatepass")


def is_utf8_name(name: str | os.PathLike[str]) -> bool:
    try:
        name_bytes(name).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def repair_text(text: str) -> tuple[str, int]:
    """The text policy: every byte that is not UTF-8 becomes U+FFFD. Returns (text, bytes replaced).

    `text` comes from argv, a pipe or a file read with ``errors="surrogateescape"``, so undecodable bytes are lone
    surrogates; anything else passes unchanged.
    """
    if text.isascii():
        return text, 0
    raw = name_bytes(text)
    fixed = raw.decode("utf-8", "replace")
    if fixed == text:
        return text, 0
    return fixed, sum(1 for c in text if "\udc80" <= c <= "\udcff") or 1


def decode_text(data: bytes) -> tuple[str, int]:
    """Bytes read from a file or stdin, decoded with the text policy (`repair_text`)."""
    return repair_text(data.decode("utf-8", "surrogateescape"))


def kind(mode: int) -> str:
    """What a non-regular file is, for messages: "a directory", "a FIFO (named pipe)", "a character device"..."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def require_regular(
    path: str | os.PathLike[str],
    *,
    what: str,
    error: Callable[..., LlavaError],
    missing: str | None = None,
    hint: str | None = None,
) -> os.stat_result:
    """``os.stat(path)`` if it is a regular file (symlinks followed); otherwise one-line errors saying what it is.

    `what` completes "X is a FIFO (named pipe), not {what}"; `missing` is the message for a path that does not exist.
    """
    name = display_name(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputNotFoundError(missing or f"{name}: no such file", hint="check the path") from None
    except OSError as exc:
        raise error(f"cannot read {name}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{name} is {kind(st.st_mode)}, not {what}", hint=hint or "give the path of a regular file")
    return st


def too_large(name: str, size: int | None, limit: int, lim: Limit, error: Callable[..., LlavaError]) -> LlavaError:
    amount = f"is {size / MiB:,.1f} MiB," if size is not None else "holds"
    return error(
        f"{name} {amount} more than the {round(limit / MiB, 3):g} MiB {lim.what} limit", hint=lim.how_to_raise(size)
    )


def read_stream(stream: BinaryIO, limit: int, inspect: Callable[[bytes, int], None] | None = None) -> bytes | None:
    """Up to `limit` bytes of `stream` (to its end); None if it holds more. Memory stays within `limit` + 1 MiB.

    ``inspect(chunk, offset)`` sees each chunk as it arrives and may raise (binary data where text is expected is
    refused at its first chunk, not after the whole limit). The server reads request bodies through this too.
    """
    chunks: list[bytes] = []
    total = 0
    while total <= limit:
        chunk = stream.read(min(_CHUNK, limit + 1 - total))
        if not chunk:
            break
        if inspect is not None:
            inspect(chunk, total)
        chunks.append(chunk)
        total += len(chunk)
    if total > limit:
        return None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _read_fd(fd: int, limit: int, size: int) -> bytes | None:
    """Read a regular file's descriptor: its size in one call (no copy), more only if it grew; None past `limit`."""
    chunks: list[bytes] = []
    total = 0
    want = min(limit + 1, size + 1)
    while total <= limit:
        chunk = os.read(fd, max(1, min(want, limit + 1 - total)))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        want = _CHUNK
    if total > limit:
        return None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def open_regular(
    path: str | os.PathLike[str],
    *,
    what: str,
    error: Callable[..., LlavaError],
    missing: str | None = None,
    hint: str | None = None,
) -> int:
    """Open a regular file read-only, never blocking on a FIFO swapped in after the type check; return the fd."""
    require_regular(path, what=what, error=error, missing=missing, hint=hint)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise InputNotFoundError(f"{display_name(path)}: no such file", hint="check the path") from None
        raise error(f"cannot read {display_name(path)}: {exc.strerror or exc}") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{display_name(path)} is {kind(mode)}, not {what}")
    return fd


def read_file(
    source: str | os.PathLike[str],
    lim: Limit,
    *,
    what: str,
    error: Callable[..., LlavaError],
    limit: int | None = None,
    missing: str | None = None,
    hint: str | None = None,
    inspect: Callable[[bytes, int], None] | None = None,
) -> bytes:
    """All bytes of a regular file, or of stdin for ``-``, within `lim` (or `limit` bytes when given).

    A path that is not a regular file, or holds more than the limit, is a one-line `error` naming it.
    """
    cap = limit if limit is not None else lim.bytes()
    if os.fspath(source) == STDIN:
        data = read_stream(sys.stdin.buffer, cap, inspect)
        if data is None:
            raise too_large("stdin", None, cap, lim, error)
        return data
    name = display_name(source)
    fd = open_regular(source, what=what, error=error, missing=missing, hint=hint)
    try:
        size = os.fstat(fd).st_size
        if size > cap:
            raise too_large(name, size, cap, lim, error)
        try:
            data = _read_fd(fd, cap, size)
        except OSError as exc:
            raise error(f"cannot read {name}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if data is None:
        raise too_large(name, None, cap, lim, error)
    return data


# Bytes text never holds: C0 controls other than tab, LF, VT, FF, CR (NUL first of all), and DEL. Their presence
# means binary data (an image piped by mistake, /dev/urandom), which is refused rather than fed to the model.
_NOT_TEXT = bytes(1 if (i < 0x20 and i not in (9, 10, 11, 12, 13)) or i == 0x7F else 0 for i in range(256))


def _refuse_binary(name: str, data: bytes | str, offset: int = 0) -> None:
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogateescape")
    at = raw.translate(_NOT_TEXT).find(1)
    if at >= 0:
        raise UsageError(f"{name} is not text (byte 0x{raw[at]:02x} at offset {offset + at:,})", hint="give UTF-8 text")


def read_text(source: str | os.PathLike[str], *, what: str) -> str:
    """A prompt from a file or stdin (``-``), within the prompt limit. Undecodable bytes come back as surrogate
    escapes: the caller applies the text policy with `repair_with_note`, which says so.

    Binary data (a NUL or another control byte) is refused rather than fed to the model as a prompt."""
    name = "stdin" if os.fspath(source) == STDIN else display_name(source)
    data = read_file(
        source,
        TEXT,
        what=f"a {what}",
        error=UsageError,
        missing=f"{what} not found: {display_name(source)}",
        inspect=lambda chunk, offset: _refuse_binary(name, chunk, offset),
    )
    _refuse_binary(name, data)
    return data.decode("utf-8", "surrogateescape")


def text_lines(stream: TextIO) -> Iterator[str]:
    """Lines of a stream (chat messages from a pipe), each within the prompt limit, without their line end.

    Undecodable bytes come back as surrogate escapes (a ``/image`` name keeps its bytes); messages go through
    `repair_text`. A line longer than the limit, or holding a control byte (binary data such as
    ``/dev/urandom``), ends the stream with a one-line error: memory stays within the limit whatever the stream is."""
    limit = TEXT.bytes()
    binary: BinaryIO | None = getattr(stream, "buffer", None)
    number = 0
    while True:
        if binary is not None and hasattr(binary, "peek"):
            # Binary data is refused from what is already buffered, before a whole limit's worth is read.
            ahead = binary.peek(1)[:65536]
            _refuse_binary(f"stdin line {number + 1}", ahead.split(b"\n", 1)[0])
        raw: bytes | str = binary.readline(limit + 1) if binary is not None else stream.readline(limit + 1)
        if not raw:
            return
        number += 1
        name = f"stdin line {number}"
        ends = raw.endswith(b"\n") if isinstance(raw, bytes) else raw.endswith("\n")
        if len(raw) > limit and not ends:
            raise too_large(name, None, limit, TEXT, UsageError)
        _refuse_binary(name, raw)
        text = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
        yield text.rstrip("\r\n")


def repair_with_note(text: str, what: str, note: Callable[[str], None]) -> str:
    """`repair_text`, saying so in a note when a byte was replaced."""
    fixed, replaced = repair_text(text)
    if replaced:
        note(f"{what} is not valid UTF-8: {replaced} byte{'s' if replaced > 1 else ''} replaced by U+FFFD")
    return fixed


__all__ = [
    "HEADER",
    "IMAGE",
    "LIST",
    "STDIN",
    "TEXT",
    "Limit",
    "decode_text",
    "display_name",
    "is_utf8_name",
    "kind",
    "name_bytes",
    "open_regular",
    "read_file",
    "read_stream",
    "read_text",
    "repair_text",
    "repair_with_note",
    "text_lines",
    "require_regular",
]
