"""Which images a batch captions: INPUT arguments (folders, globs, image files, list files) expanded into a sorted,
de-duplicated list of paths, and the stable split of that list into shards (``--shard K/N``)."""

from __future__ import annotations

import glob
import hashlib
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from llava_cli import reading
from llava_cli.errors import InputNotFoundError, LlavaError, UsageError

# Every extension some installed Pillow plugin can open (".jpg", ".webp", ".tif", ...).
IMAGE_EXTENSIONS = frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
_GLOB_MAGIC = re.compile(r"[*?[]")


def _natural_key(path: str) -> tuple[Any, ...]:
    """Sort "img2" before "img10", the way a file manager does; ties broken by the raw string for determinism."""
    parts = re.split(r"(\d+)", path.replace(os.sep, "/"))
    return (tuple((0, int(p), "") if p.isdigit() else (1, 0, p.casefold()) for p in parts), path)


def _sniff_image(path: Path) -> bool:
    """True if Pillow recognises the file's content as an image (header only; pixels are not decoded).

    Opened through `reading.open_regular`: a FIFO swapped in after discovery fails instead of blocking."""
    try:
        fd = reading.open_regular(path, what="an image file", error=UsageError)
    except LlavaError:
        return False
    try:
        with os.fdopen(fd, "rb") as fh, Image.open(fh):
            return True
    except Exception:  # any failure to identify means "not an image"
        return False


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


# Never sniffed in folders and globs: the captions and metadata that live next to images (saves ~0.1 ms a file).
_NOT_IMAGES = frozenset(
    [
        ".txt",
        ".caption",
        ".json",
        ".jsonl",
        ".csv",
        ".tsv",
        ".md",
        ".yaml",
        ".yml",
        ".toml",
        ".xml",
        ".html",
        ".py",
        ".sh",
        ".lock",
        ".partial",
        ".log",
    ]
)


def _looks_like_image(path: Path, regular: bool = True) -> bool:
    """In a folder or glob: an image by its name, or (regular files only) by its content.

    A FIFO or device with an image's name is taken, so that its error record says what it is; one without is
    skipped unopened (opening a FIFO with no writer would block the whole batch)."""
    if _is_image_name(path):
        return True
    return regular and path.suffix.lower() not in _NOT_IMAGES and _sniff_image(path)


# Bytes a list of paths never holds: C0 controls other than tab, LF, CR (and NUL, the separator of `find -print0`).
_NOT_LIST_BYTES = re.compile(rb"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _is_text_file(path: Path) -> bool:
    """A path-list file: no control bytes but tab/LF/CR (or NUL separators), checked on the first 64 KiB.

    Not required to be UTF-8: a list names files, and file names are bytes (an old archive's Latin-1 names)."""
    try:
        fd = reading.open_regular(path, what="a list file", error=UsageError)
    except LlavaError:
        return False
    try:
        head = os.read(fd, 65536)
    except OSError:
        return False
    finally:
        os.close(fd)
    if _NOT_LIST_BYTES.search(head):
        return False
    return b"\0" not in head or bool(head.strip(b"\0"))


def _stat_kind(path: str | os.PathLike[str]) -> str | None:
    """ "dir", "file" (regular), "other" (FIFO, device, socket) or None (does not exist), symlinks followed."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def _walk(root: Path, recursive: bool) -> Iterator[Path]:
    """Images in `root` (hidden files and folders skipped: ``.git``, our own ``.partial`` temp files).

    Names come from ``os.scandir`` as str with undecodable bytes surrogate-escaped: they reach the OS unchanged."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            if folder == root:
                raise
            continue  # an unreadable subfolder: os.walk's behaviour, skip it
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    if recursive:
                        stack.append(Path(entry.path))
                    continue
                regular = entry.is_file()
            except OSError:
                continue
            if regular or not entry.is_dir():
                path = Path(entry.path)
                if _looks_like_image(path, regular):
                    yield path


def _norm(path: str | Path) -> str:
    return os.path.normpath(os.path.expanduser(str(path)))


def resume_key(path: str) -> str:
    """What resume matches on: ``photos/a.jpg``, ``./photos/a.jpg`` and its absolute path are one image."""
    return os.path.abspath(os.path.expanduser(path))


MAX_ENTRY = 65536  # bytes: 16 times Linux's PATH_MAX; a longer "entry" means the input is not a list
# 1 for the bytes `_NOT_LIST_BYTES` matches: bytes.translate + find scans a MiB in ~3 ms (the regex takes ~17 ms).
_NOT_LIST_TABLE = bytes(1 if _NOT_LIST_BYTES.match(bytes([i])) else 0 for i in range(256))


def _split_entries(stream: Iterator[bytes], name: str) -> Iterator[bytes]:
    """Entries of a list, one per line, or NUL-separated when it holds a NUL (``find -print0``), chunk by chunk.

    A run of nothing but separators (``/dev/zero`` on stdin) is skipped in C, without a Python loop per entry."""
    sep: bytes | None = None
    rest = b""
    offset = 0
    for chunk in stream:
        bad = chunk.translate(_NOT_LIST_TABLE).find(1)
        if bad >= 0:
            raise UsageError(
                f"{name} is not a list of paths (byte 0x{chunk[bad]:02x} at offset {offset + bad:,})",
                hint="give one image path per line",
            )
        offset += len(chunk)
        if sep is None:
            sep = b"\0" if b"\0" in chunk else b"\n"
        data = rest + chunk
        last = data.rfind(sep)
        body, rest = (data[:last], data[last + 1 :]) if last >= 0 else (b"", data)
        if len(rest) > MAX_ENTRY:
            raise UsageError(
                f"{name} is not a list of paths (an entry longer than {MAX_ENTRY:,} bytes)",
                hint="give one image path per line",
            )
        if body.translate(None, sep + b" \t\r\n"):
            yield from _entries(body.split(sep), sep)
    yield from _entries([rest], sep or b"\n")


def _entries(parts: list[bytes], sep: bytes) -> Iterator[bytes]:
    for raw in parts:
        # A line loses its surrounding blanks and may be a # comment; a NUL-separated entry is a name, exactly.
        entry = raw.strip(b" \t\r\n") if sep == b"\n" else raw
        if entry and not (sep == b"\n" and entry.startswith(b"#")):
            yield entry


def _chunks(fd_read: Callable[[int], bytes], limit: int, name: str) -> Iterator[bytes]:
    total = 0
    while True:
        chunk = fd_read(1 << 20)
        if not chunk:
            return
        total += len(chunk)
        if total > limit:
            raise reading.too_large(name, None, limit, reading.LIST, UsageError)
        yield chunk


def read_path_list(list_file: Path | str) -> list[str]:
    """Image paths listed in a file, or on stdin for ``-``: one per line (blank lines and ``#`` comments skipped),
    or NUL-separated (``find -print0``). Read in 1 MiB chunks within the list limit (``LLAVA_MAX_LIST_MB``).

    Entries are file names, not text: their bytes are kept exactly (decoded as the OS does, with surrogate
    escapes), so a Latin-1 name in a list finds its file. Relative entries are relative to the list file's folder
    (the current folder for stdin), so a list travels with its dataset.
    """
    limit = reading.LIST.bytes()
    if os.fspath(list_file) == reading.STDIN:
        name, base = "stdin", Path(".")
        entries = _split_entries(_chunks(sys.stdin.buffer.read, limit, name), name)
        return _list_paths(entries, base)
    name = reading.display_name(list_file)
    base = Path(list_file).parent
    fd = reading.open_regular(list_file, what="a list file", error=UsageError)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise reading.too_large(name, size, limit, reading.LIST, UsageError)
        return _list_paths(_split_entries(_chunks(lambda n: os.read(fd, n), limit, name), name), base)
    finally:
        os.close(fd)


def _list_paths(entries: Iterator[bytes], base: Path) -> list[str]:
    found: dict[str, None] = {}  # insertion-ordered set: a list repeating one path costs nothing
    seen: set[bytes] = set()
    for entry in entries:
        if entry in seen:
            continue
        seen.add(entry)
        p = Path(os.fsdecode(entry)).expanduser()
        found[_norm(p if p.is_absolute() else base / p)] = None
    return list(found)


def discover_images(inputs: Sequence[str | os.PathLike[str]], *, recursive: bool = False) -> list[str]:
    """Expand INPUT arguments into a sorted, de-duplicated list of image paths.

    Each input is a folder (its images; subfolders with `recursive`), a glob pattern (quoted, so the shell leaves
    it to us; ``**`` recurses), an image file, a text file listing image paths, or ``-``: such a list on stdin. In
    folders and globs a file is an image if its extension is one Pillow reads or, failing that, if Pillow
    recognises its content; an image named explicitly (on the command line or in a list) is always taken, so a
    broken one gets an error record. A FIFO, device or socket is never opened here: with an image's name it is
    taken (its record says what it is), without one it is skipped, or refused when named as an INPUT.
    Order is natural sort of the path (``img2`` before ``img10``), whatever the order of the inputs.
    """
    if not inputs:
        raise UsageError("no INPUT given", hint="name a folder, a glob such as 'photos/*.jpg', or a list file")
    if sum(1 for raw in inputs if os.fspath(raw) == reading.STDIN) > 1:
        raise UsageError("- (the list of paths on stdin) can be given only once")
    found: set[str] = set()
    for raw in inputs:
        text = os.fspath(raw)
        if text == reading.STDIN:
            found.update(read_path_list(reading.STDIN))
            continue
        path = Path(text).expanduser()
        what = _stat_kind(path)
        if what == "dir":
            found.update(_norm(p) for p in _walk(path, recursive))
        elif what == "file":
            if not _is_image_name(path) and not _sniff_image(path) and _is_text_file(path):
                found.update(read_path_list(path))
            else:
                found.add(_norm(path))
        elif what == "other":
            if _is_image_name(path):
                found.add(_norm(path))  # named as an image: its record will say what it is
                continue
            mode = os.stat(path).st_mode
            raise UsageError(
                f"{reading.display_name(text)} is {reading.kind(mode)}, not a folder, an image or a list file",
                hint="to read a list of paths from a pipe, give - and pipe it to stdin",
            )
        elif _GLOB_MAGIC.search(text):
            matches = glob.glob(os.path.expanduser(text), recursive=True)
            if not matches:
                raise InputNotFoundError(f"no file matches {reading.display_name(text)}", hint="check the pattern")
            for match in matches:
                kind = _stat_kind(match)
                if kind == "dir":
                    found.update(_norm(p) for p in _walk(Path(match), recursive))
                elif kind is not None and _looks_like_image(Path(match), kind == "file"):
                    found.add(_norm(match))
        else:
            raise InputNotFoundError(
                f"input not found: {reading.display_name(text)}",
                hint="give a folder, an image, a glob or a list file",
            )
    return sorted(found, key=_natural_key)


# ---------------------------------------------------------------------------------------------------------------
# Sharding


def parse_shard(spec: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """Parse ``"K/N"`` (1 ≤ K ≤ N) into ``(K, N)``."""
    if spec is None or isinstance(spec, tuple):
        if spec is not None and not (1 <= spec[0] <= spec[1]):
            raise UsageError(f"bad shard {spec[0]}/{spec[1]}", hint="shards are numbered 1..N, e.g. --shard 1/4")
        return spec
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not match:
        raise UsageError(f"bad --shard {spec!r}: expected K/N", hint="for example --shard 2/8 (shard 2 of 8)")
    k, n = int(match.group(1)), int(match.group(2))
    if n < 1 or not 1 <= k <= n:
        raise UsageError(f"bad --shard {spec}: K must be between 1 and N", hint="shards are numbered 1..N")
    return k, n


def shard_index(path: str, n: int) -> int:
    """The 0-based shard of `path` among `n`: a SHA-256 of the path, stable across runs, machines and Pythons
    (unlike ``hash()``, which is salted per process)."""
    key = path.replace(os.sep, "/").encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % n


def select_shard(paths: Iterable[str], shard: tuple[int, int] | None) -> list[str]:
    """The paths belonging to shard ``(K, N)`` (all of them when `shard` is None). Order is kept."""
    if shard is None:
        return list(paths)
    k, n = shard
    return [p for p in paths if shard_index(p, n) == k - 1]
