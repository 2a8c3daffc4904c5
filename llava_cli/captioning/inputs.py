"""Which images a batch captions: INPUT arguments (folders, globs, image files, list files) expanded into a sorted,
de-duplicated list of paths, and the stable split of that list into shards (``--shard K/N``)."""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from llava_cli.errors import InputNotFoundError, UsageError

# Every extension some installed Pillow plugin can open (".jpg", ".webp", ".tif", ...).
IMAGE_EXTENSIONS = frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
_GLOB_MAGIC = re.compile(r"[*?[]")


def _natural_key(path: str) -> tuple[Any, ...]:
    """Sort "img2" before "img10", the way a file manager does; ties broken by the raw string for determinism."""
    parts = re.split(r"(\d+)", path.replace(os.sep, "/"))
    return (tuple((0, int(p), "") if p.isdigit() else (1, 0, p.casefold()) for p in parts), path)


def _sniff_image(path: Path) -> bool:
    """True if Pillow recognises the file's content as an image (header only; pixels are not decoded)."""
    try:
        with Image.open(path):
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


def _looks_like_image(path: Path) -> bool:
    if _is_image_name(path):
        return True
    return path.suffix.lower() not in _NOT_IMAGES and _sniff_image(path)


def _is_text_file(path: Path) -> bool:
    """A path-list file: UTF-8 text without NUL bytes (checked on the first 64 KiB)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(65536)
    except OSError:
        return False
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start > len(head) - 4  # a multi-byte character cut by the 64 KiB window
    return True


def _walk(root: Path, recursive: bool) -> Iterator[Path]:
    """Image files in `root` (hidden files and folders skipped: ``.git``, our own ``.partial`` temp files)."""
    if not recursive:
        for entry in os.scandir(root):
            if not entry.name.startswith(".") and entry.is_file():
                yield Path(entry.path)
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name


def _norm(path: str | Path) -> str:
    return os.path.normpath(os.path.expanduser(str(path)))


def resume_key(path: str) -> str:
    """What resume matches on: ``photos/a.jpg``, ``./photos/a.jpg`` and its absolute path are one image."""
    return os.path.abspath(os.path.expanduser(path))


def read_path_list(list_file: Path) -> list[str]:
    """Image paths listed in a text file, one per line (blank lines and ``#`` comments skipped).

    Relative entries are relative to the list file's folder, so a list travels with its dataset.
    """
    base = list_file.parent
    paths = []
    with open(list_file, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            entry = line.strip()
            if entry and not entry.startswith("#"):
                p = Path(entry).expanduser()
                paths.append(_norm(p if p.is_absolute() else base / p))
    return paths


def discover_images(inputs: Sequence[str | os.PathLike[str]], *, recursive: bool = False) -> list[str]:
    """Expand INPUT arguments into a sorted, de-duplicated list of image paths.

    Each input is a folder (its images; subfolders with `recursive`), a glob pattern (quoted, so the shell leaves
    it to us; ``**`` recurses), an image file, or a text file listing image paths. In folders and globs a file is
    an image if its extension is one Pillow reads or, failing that, if Pillow recognises its content; an image
    named explicitly (on the command line or in a list) is always taken, so a broken one gets an error record.
    Order is natural sort of the path (``img2`` before ``img10``), whatever the order of the inputs.
    """
    if not inputs:
        raise UsageError("no INPUT given", hint="name a folder, a glob such as 'photos/*.jpg', or a list file")
    found: set[str] = set()
    for raw in inputs:
        text = str(raw)
        path = Path(text).expanduser()
        if path.is_dir():
            found.update(_norm(p) for p in _walk(path, recursive) if _looks_like_image(p))
        elif path.is_file():
            if not _is_image_name(path) and not _sniff_image(path) and _is_text_file(path):
                found.update(read_path_list(path))
            else:
                found.add(_norm(path))
        elif _GLOB_MAGIC.search(text):
            matches = glob.glob(os.path.expanduser(text), recursive=True)
            if not matches:
                raise InputNotFoundError(f"no file matches {text}", hint="check the pattern")
            for match in matches:
                m = Path(match)
                if m.is_dir():
                    found.update(_norm(p) for p in _walk(m, recursive) if _looks_like_image(p))
                elif m.is_file() and _looks_like_image(m):
                    found.add(_norm(m))
        else:
            raise InputNotFoundError(f"input not found: {text}", hint="give a folder, an image, a glob or a list file")
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
