"""Batch captioning: find images, split them into shards, caption them with a model loaded once, and write one
record per image to a resumable JSONL/CSV log and/or ``.txt`` sidecars.

The output log is an append-only journal: every complete line is a final record, written with one ``write()`` and
flushed before the next image starts, so a killed process loses at most the image it was working on. On the next
run the log is read back, a torn last line (the process died mid-write, or the disk filled) is cut off, and images
with a success record are skipped. That is the journal's counterpart of `atomic_path`'s rename-on-success; sidecars,
being one small file per image, go through `atomic_path` itself.

The model is reached through the small `Captioner` protocol so the bookkeeping can be tested with any captioner;
`caption()` at the bottom plugs in the real `Engine`.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import io
import json
import os
import queue
import re
import signal
import string
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Protocol

from PIL import Image

from llava_cli.atomic import atomic_path, output_error
from llava_cli.errors import InputNotFoundError, LlavaError, OutputError, UsageError
from llava_cli.images import DEFAULT_MAX_PIXELS, LoadedImage, load_image

DEFAULT_PROMPT = "Describe this image in one sentence."
DEFAULT_OUT = "captions.jsonl"
DEFAULT_PREFETCH = 4

# Exit codes of `llava caption` (documented in docs/captioning.md and in --help).
EXIT_OK = 0
EXIT_SOME_FAILED = 3
EXIT_INTERRUPTED = 130

Format = Literal["jsonl", "csv", "txt"]
FORMATS: tuple[str, ...] = ("jsonl", "csv", "txt")
TEMPLATE_FIELDS = ("filename", "stem", "parent", "existing")
COLUMNS = ("path", "caption", "prompt", "model", "quantization", "seconds", "tokens", "error")

# Every extension some installed Pillow plugin can open (".jpg", ".webp", ".tif", ...).
IMAGE_EXTENSIONS = frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
_GLOB_MAGIC = re.compile(r"[*?[]")


class SomeImagesFailed(LlavaError):
    """The batch finished, but some images could not be captioned (their records carry the reason)."""

    exit_code = EXIT_SOME_FAILED


class BatchInterrupted(LlavaError):
    """Ctrl-C stopped the batch; what was done is recorded and the same command resumes it."""

    exit_code = EXIT_INTERRUPTED


# ---------------------------------------------------------------------------------------------------------------
# Records


@dataclass
class CaptionRecord:
    """One line of output: what was asked about which image, the answer, and what it cost (or why it failed)."""

    path: str
    caption: str | None
    prompt: str
    model: str
    quantization: str
    seconds: float
    tokens: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return not self.error

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaptionRecord:
        if not isinstance(data.get("path"), str):
            raise ValueError("no 'path' field")
        error = data.get("error") or None
        caption = data.get("caption")
        return cls(
            path=data["path"],
            caption=(caption or None) if error else str(caption or ""),
            prompt=str(data.get("prompt") or ""),
            model=str(data.get("model") or ""),
            quantization=str(data.get("quantization") or ""),
            seconds=float(data.get("seconds") or 0.0),
            tokens=int(data.get("tokens") or 0),
            error=error,
        )


# ---------------------------------------------------------------------------------------------------------------
# Discovery


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


def _key(path: str) -> str:
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


# ---------------------------------------------------------------------------------------------------------------
# Templating


@dataclass(frozen=True)
class Template:
    """A prompt (or prefix/suffix) with ``{filename}``, ``{stem}``, ``{parent}``, ``{existing}`` fields."""

    source: str
    parts: tuple[tuple[str, str | None], ...]

    @property
    def fields(self) -> set[str]:
        return {name for _, name in self.parts if name}

    def render(self, values: dict[str, str]) -> str:
        # Values are inserted verbatim: braces in a file name or an existing caption are never re-interpreted.
        return "".join(literal + (values[name] if name else "") for literal, name in self.parts)


def parse_template(text: str, *, what: str = "--prompt") -> Template:
    """Check `text` for unknown fields once, before the batch starts, so a typo fails fast."""
    known = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise UsageError(
            f"bad {what} template: {exc}", hint=f"fields are {known}; write {{{{ and }}}} for literal braces"
        ) from exc
    parts = []
    for literal, name, spec, conversion in parsed:
        if name is not None and (name not in TEMPLATE_FIELDS or spec or conversion):
            raise UsageError(
                f"unknown field {{{name}}} in {what}",
                hint=f"fields are {known}; write {{{{ and }}}} for literal braces",
            )
        parts.append((literal, name or None))
    return Template(text, tuple(parts))


def sidecar_path(image: str | Path) -> Path:
    """The ``.txt`` caption file that goes with an image: ``photos/cat.jpg`` → ``photos/cat.txt``."""
    return Path(image).with_suffix(".txt")


def read_existing(image: str | Path) -> str:
    """The text of the image's existing sidecar, or "" if there is none."""
    try:
        return sidecar_path(image).read_text(encoding="utf-8", errors="replace").strip()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return ""


def template_values(image: str, existing: str = "") -> dict[str, str]:
    p = Path(image)
    return {"filename": p.name, "stem": p.stem, "parent": p.parent.name, "existing": existing}


# ---------------------------------------------------------------------------------------------------------------
# The output log: reading back (resume, torn-line repair) and appending


@dataclass
class LogState:
    """What an existing output log says: its records (in order) and whether a torn tail was cut off."""

    records: list[CaptionRecord] = field(default_factory=list)
    repaired: bool = False

    @property
    def done(self) -> set[str]:
        return {r.path for r in self.records if r.ok}


def _corrupt(path: Path, line: int, why: str) -> OutputError:
    return OutputError(
        f"{path} line {line} is not a caption record ({why})",
        hint="this is not a file `llava caption` wrote: choose another --out, or --overwrite to replace it",
    )


def _read_jsonl(path: Path, data: bytes) -> tuple[list[CaptionRecord], int]:
    """Records and the byte length of the good prefix. A bad *last* line is torn; a bad line elsewhere is not ours."""
    records: list[CaptionRecord] = []
    good_end = pos = 0
    number = 0
    while pos < len(data):
        number += 1
        newline = data.find(b"\n", pos)
        line_end = len(data) if newline < 0 else newline + 1
        raw = data[pos:line_end]
        if raw.strip():
            try:
                records.append(CaptionRecord.from_dict(json.loads(raw)))
            except (ValueError, TypeError, AttributeError) as exc:
                if line_end == len(data):
                    break  # the last line, cut short by a killed process or a full disk: drop it, redo that image
                raise _corrupt(path, number, str(exc)) from exc
        good_end = pos = line_end
    return records, good_end


def _read_csv(path: Path, data: bytes) -> tuple[list[CaptionRecord], int]:
    """Like `_read_jsonl` for CSV, where a quoted caption may span lines: track the byte offset each record ends at."""
    lines = data.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    consumed = 0

    def feed() -> Iterator[str]:
        nonlocal consumed
        for line in lines:
            consumed += 1
            yield line.decode("utf-8", errors="replace")

    reader = csv.reader(feed(), strict=True)
    records: list[CaptionRecord] = []
    good_end = 0
    while True:
        first_line = consumed + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            if consumed == len(lines):
                break  # an unterminated quoted field at the end of the file: torn
            raise _corrupt(path, first_line, str(exc)) from exc
        end = offsets[consumed]
        # A record is complete only with its line terminator; without it, even 8 fields may hold a cut-off value.
        last_and_torn = end == len(data) and not data.endswith((b"\n", b"\r"))
        try:
            if last_and_torn:
                break
            if good_end == 0:
                if tuple(row) != COLUMNS:
                    raise ValueError(f"header is not {','.join(COLUMNS)}")
            elif len(row) != len(COLUMNS):
                raise ValueError(f"{len(row)} fields instead of {len(COLUMNS)}")
            else:
                records.append(CaptionRecord.from_dict(dict(zip(COLUMNS, row, strict=True))))
        except ValueError as exc:
            if end == len(data) and good_end > 0:
                break
            raise _corrupt(path, first_line, str(exc)) from exc
        good_end = end
    return records, good_end


def read_log(path: Path, fmt: Format) -> LogState:
    """Read an existing output log, cutting off a torn last record (the file is truncated in place)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return LogState()
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc.strerror}") from exc
    records, good_end = (_read_csv if fmt == "csv" else _read_jsonl)(path, data)
    repaired = good_end < len(data)
    needs_newline = good_end > 0 and not data[:good_end].endswith((b"\n", b"\r"))
    if repaired or needs_newline:
        try:
            with open(path, "r+b") as fh:
                fh.truncate(good_end)
                if needs_newline:
                    fh.seek(good_end)
                    fh.write(b"\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise output_error(exc, path) from exc
    return LogState(records=records, repaired=repaired)


def _encode_csv_row(values: Sequence[Any]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue().encode("utf-8")


def _encode(record: CaptionRecord, fmt: Format) -> bytes:
    if fmt == "csv":
        values = [getattr(record, f.name) for f in fields(record)]
        return _encode_csv_row(["" if v is None else v for v in values])
    return (record.to_json() + "\n").encode("utf-8")


class RecordLog:
    """Append-only writer of the output log: one ``os.write`` per record, fsync'd at most once a second."""

    FSYNC_INTERVAL = 1.0

    def __init__(self, path: Path, fmt: Format) -> None:
        self.path = path
        self.fmt = fmt
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if fmt == "csv" and os.fstat(self.fd).st_size == 0:
                os.write(self.fd, _encode_csv_row(COLUMNS))
        except OSError as exc:
            raise output_error(exc, path) from exc
        self._last_sync = time.monotonic()

    def write(self, record: CaptionRecord) -> None:
        data = _encode(record, self.fmt)
        try:
            # One write() of the whole record: a process killed around it leaves all of the line or none of it.
            written = os.write(self.fd, data)
            while written < len(data):  # only short on a full disk or a signal; finish or fail loudly
                written += os.write(self.fd, data[written:])
            if time.monotonic() - self._last_sync >= self.FSYNC_INTERVAL:
                self.sync()
        except OSError as exc:
            raise output_error(exc, self.path) from exc

    def sync(self) -> None:
        os.fsync(self.fd)
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.sync()
            finally:
                os.close(self.fd)
                self.fd = -1


def rewrite_log(path: Path, fmt: Format, records: Sequence[CaptionRecord]) -> None:
    """Replace the log with `records` (atomically): used to drop failure records of images about to be retried."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        if fmt == "csv":
            fh.write(_encode_csv_row(COLUMNS))
        for record in records:
            fh.write(_encode(record, fmt))
        fh.flush()
        os.fsync(fh.fileno())


def write_sidecar(image: str, text: str) -> Path:
    """Write the caption next to the image, all or nothing."""
    target = sidecar_path(image)
    with atomic_path(target) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return target


# ---------------------------------------------------------------------------------------------------------------
# One process per output file


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


# ---------------------------------------------------------------------------------------------------------------
# The model side


class Captioner(Protocol):
    """What the batch loop needs from a model: a caption for one image and the number of tokens generated."""

    model_name: str
    quantization: str

    def caption(self, image: LoadedImage, prompt: str) -> tuple[str, int]: ...


CaptionerSource = Captioner | Callable[[], Captioner]


# ---------------------------------------------------------------------------------------------------------------
# Background decoding


@dataclass
class Prepared:
    """An image read and decoded ahead of the model (or the error that stopped it), plus its old sidecar text."""

    path: str
    image: LoadedImage | None
    error: str | None
    existing: str


class Prefetcher:
    """Decode the next few images in a background thread while the model works on the current one.

    Pillow and llama.cpp both release the GIL in their C code, so on two or more cores decoding is off the
    critical path. Order is preserved (one worker, one FIFO).
    """

    def __init__(
        self, paths: Sequence[str], *, ahead: int, want_existing: bool, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        self._paths = paths
        self._queue: queue.Queue[Prepared | None] = queue.Queue(maxsize=max(1, ahead))
        self._stop = threading.Event()
        self._want_existing = want_existing
        self._max_pixels = max_pixels
        self._thread = threading.Thread(target=self._work, name="llava-caption-prefetch", daemon=True)
        self._thread.start()

    def _prepare(self, path: str) -> Prepared:
        existing = read_existing(path) if self._want_existing else ""
        try:
            return Prepared(path, load_image(path, max_pixels=self._max_pixels), None, existing)
        except LlavaError as exc:
            return Prepared(path, None, exc.message, existing)
        except Exception as exc:  # a decoder bug on one odd file must not end the batch
            return Prepared(path, None, f"{path}: cannot decode ({type(exc).__name__}: {exc})", existing)

    def _put(self, item: Prepared | None) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        # Decode in the cycles llama.cpp leaves idle: when its threads take every core, a decoder competing at equal
        # priority stalls them all at their next barrier. (Linux: a thread's nice value is its own.)
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        for path in self._paths:
            if self._stop.is_set() or not self._put(self._prepare(path)):
                return
        self._put(None)

    def __iter__(self) -> Iterator[Prepared]:
        while True:
            item = self._queue.get()
            if item is None:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C


class _Interrupts:
    """First Ctrl-C: finish the current image, then stop. Second: drop it now (KeyboardInterrupt)."""

    def __init__(self, on_first: Callable[[], None] | None) -> None:
        self.requested = False
        self._on_first = on_first
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self._on_first:
            self._on_first()

    def __enter__(self) -> _Interrupts:
        # Signal handlers can only be set from the main thread; elsewhere Ctrl-C keeps its default behaviour.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


# ---------------------------------------------------------------------------------------------------------------
# The batch


@dataclass
class CaptionSummary:
    """How a batch went. ``exit_code`` is what `llava caption` exits with."""

    total: int = 0  # images in this shard of the input
    done: int = 0  # captioned in this run
    skipped: int = 0  # already had a success record
    failed: int = 0  # error records written in this run
    interrupted: bool = False
    repaired: bool = False  # a torn last record was cut off the log
    seconds: float = 0.0
    tokens: int = 0
    out: Path | None = None
    failures: list[CaptionRecord] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_SOME_FAILED if self.failed else EXIT_OK

    @property
    def images_per_minute(self) -> float:
        return 60.0 * (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0


def resolve_outputs(
    out: str | os.PathLike[str] | None, sidecar: bool, fmt: str | None
) -> tuple[Path | None, Format | None, bool]:
    """Turn --out/--sidecar/--format into (log path, log format, write sidecars)."""
    if fmt is not None:
        fmt = fmt.lower()
        if fmt not in FORMATS:
            raise UsageError(f"unknown --format {fmt!r}", hint="use jsonl, csv or txt")
    if fmt == "txt":
        if out is not None:
            raise UsageError(
                "--format txt writes a .txt sidecar next to each image, not --out",
                hint="use --sidecar --out log.jsonl to get both",
            )
        return None, None, True
    if out is None:
        if sidecar and fmt is None:
            return None, None, True
        log_fmt: Format = "csv" if fmt == "csv" else "jsonl"
        return Path(DEFAULT_OUT).with_suffix("." + log_fmt), log_fmt, sidecar
    path = Path(out).expanduser()
    if fmt is None:
        fmt = "csv" if path.suffix.lower() == ".csv" else "jsonl"
    return path, fmt, sidecar  # type: ignore[return-value]


def _sidecar_clashes(paths: Sequence[str]) -> dict[str, str]:
    """Images whose sidecar another image already claims (cat.jpg and cat.png both → cat.txt): path → message."""
    owner: dict[Path, str] = {}
    clashes = {}
    for p in paths:
        target = sidecar_path(p)
        if target in owner:
            clashes[p] = f"{p}: its sidecar {target} is already the caption of {owner[target]}; rename one of them"
        else:
            owner[target] = p
    return clashes


def caption_batch(
    inputs: Sequence[str | os.PathLike[str]],
    *,
    captioner: CaptionerSource,
    out: str | os.PathLike[str] | None = None,
    sidecar: bool = False,
    format: str | None = None,
    recursive: bool = False,
    overwrite: bool = False,
    prompt: str = DEFAULT_PROMPT,
    prefix: str = "",
    suffix: str = "",
    shard: str | tuple[int, int] | None = None,
    prefetch: int = DEFAULT_PREFETCH,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_progress: Callable[[int, int], None] | None = None,
    on_record: Callable[[CaptionRecord], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
    handle_sigint: bool = True,
) -> CaptionSummary:
    """Caption every image of `inputs` (this `shard` of them) and record the results; see the module docstring.

    `captioner` is a `Captioner`, or a function returning one: it is only called when there is work to do, so a
    finished batch resumes without loading the model. Keyword arguments mirror `llava caption`'s flags.
    """
    started = time.monotonic()
    notice = on_notice or (lambda message: None)
    prompt_t = parse_template(prompt, what="--prompt")
    prefix_t = parse_template(prefix, what="--prefix")
    suffix_t = parse_template(suffix, what="--suffix")
    log_path, log_fmt, write_sidecars = resolve_outputs(out, sidecar, format)
    uses_existing = "existing" in (prompt_t.fields | prefix_t.fields | suffix_t.fields)
    if write_sidecars and log_path is None and uses_existing:
        raise UsageError(
            "{existing} with --sidecar needs --out LOG to remember which images are done "
            "(the sidecar is both the input and the output)",
            hint="add --out captions.jsonl",
        )
    shard_t = parse_shard(shard)
    paths = select_shard(discover_images(inputs, recursive=recursive), shard_t)
    summary = CaptionSummary(total=len(paths), out=log_path)

    lock = output_lock(log_path) if log_path is not None else contextlib.nullcontext()
    with lock:
        # Which images are done: the log's success records, or (sidecars only) the sidecars that exist.
        done: set[str] = set()
        if log_path is not None and log_fmt is not None:
            if overwrite:
                rewrite_log(log_path, log_fmt, [])
            else:
                state = read_log(log_path, log_fmt)
                summary.repaired = state.repaired
                if state.repaired:
                    notice(f"repaired {log_path}: cut off a torn last record from an interrupted run")
                done = {_key(p) for p in state.done}
                retry = {_key(r.path) for r in state.records if not r.ok} & {_key(p) for p in paths}
                if retry:
                    # One record per image: drop the old failure records of images this run tries again.
                    rewrite_log(log_path, log_fmt, [r for r in state.records if _key(r.path) not in retry])
        elif not overwrite:
            done = {_key(p) for p in paths if sidecar_path(p).exists()}
        todo = [p for p in paths if _key(p) not in done]
        summary.skipped = len(paths) - len(todo)
        if not todo:
            summary.seconds = time.monotonic() - started
            return summary

        clashes = _sidecar_clashes(paths) if write_sidecars else {}
        # Start decoding before the model loads: the first images are ready when it is.
        prefetcher = Prefetcher(todo, ahead=prefetch, want_existing=uses_existing, max_pixels=max_pixels)
        log = None
        interrupts = _Interrupts(
            lambda: notice("Ctrl-C: finishing the current image, then stopping (press it again to stop now)")
        )
        try:
            with interrupts if handle_sigint else contextlib.nullcontext(interrupts):
                try:
                    model: Captioner = captioner() if callable(captioner) else captioner
                    if log_path is not None and log_fmt is not None:
                        log = RecordLog(log_path, log_fmt)
                    _run_loop(
                        model,
                        prefetcher,
                        log,
                        write_sidecars,
                        summary,
                        interrupts,
                        len(todo),
                        templates=(prompt_t, prefix_t, suffix_t),
                        clashes=clashes,
                        on_progress=on_progress,
                        on_record=on_record,
                    )
                except KeyboardInterrupt:
                    # Second Ctrl-C (or one during the model load): the current image is dropped, not recorded.
                    summary.interrupted = True
        finally:
            prefetcher.close()
            if log is not None:
                log.close()
    summary.seconds = time.monotonic() - started
    return summary


def _run_loop(
    model: Captioner,
    prefetcher: Prefetcher,
    log: RecordLog | None,
    write_sidecars: bool,
    summary: CaptionSummary,
    interrupts: _Interrupts,
    total: int,
    *,
    templates: tuple[Template, Template, Template],
    clashes: dict[str, str],
    on_progress: Callable[[int, int], None] | None,
    on_record: Callable[[CaptionRecord], None] | None,
) -> None:
    if on_progress:
        on_progress(0, total)
    for completed, item in enumerate(prefetcher, start=1):
        if interrupts.requested:
            break
        record = _caption_one(model, item, *templates, clashes)
        # Sidecar first, then the log record: if we die in between, the image is redone and the sidecar rewritten.
        if record.ok and write_sidecars:
            write_sidecar(item.path, record.caption or "")
        if log is not None:
            log.write(record)
        if record.ok:
            summary.done += 1
            summary.tokens += record.tokens
        else:
            summary.failed += 1
            summary.failures.append(record)
        if on_record:
            on_record(record)
        if on_progress:
            on_progress(completed, total)
    summary.interrupted = interrupts.requested


def _caption_one(
    model: Captioner,
    item: Prepared,
    prompt_t: Template,
    prefix_t: Template,
    suffix_t: Template,
    clashes: dict[str, str],
) -> CaptionRecord:
    values = template_values(item.path, item.existing)
    prompt = prompt_t.render(values)
    record = CaptionRecord(
        path=item.path,
        caption=None,
        prompt=prompt,
        model=model.model_name,
        quantization=model.quantization,
        seconds=0.0,
        tokens=0,
    )
    if item.path in clashes:
        record.error = clashes[item.path]
        return record
    if item.image is None:
        record.error = item.error
        return record
    t0 = time.perf_counter()
    try:
        text, n_tokens = model.caption(item.image, prompt)
    except LlavaError as exc:  # e.g. a prompt too long for the context: this image fails, the batch goes on
        record.error = f"{item.path}: {exc.message}"
        record.seconds = round(time.perf_counter() - t0, 3)
        return record
    record.seconds = round(time.perf_counter() - t0, 3)
    record.tokens = n_tokens
    record.caption = prefix_t.render(values) + text.strip() + suffix_t.render(values)
    return record


# ---------------------------------------------------------------------------------------------------------------
# The real model


class EngineCaptioner:
    """A `Captioner` over a loaded `Engine`: each image is a fresh one-turn conversation; the engine (model,
    vision encoder, image-embedding cache keyed by the image bytes' SHA-256) stays loaded for the whole batch.

    When decoding is deterministic (greedy, or a fixed seed), an image whose bytes and prompt were already captioned
    gets the same caption again without running the model: duplicates in a dataset cost nothing.
    """

    MEMO_ENTRIES = 100_000  # (sha256, prompt) -> caption; ~30 MB at most

    def __init__(
        self,
        engine: Any,
        *,
        model_name: str,
        quantization: str,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 0.95,
        seed: int | None = None,
        system: str | None = None,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.quantization = quantization
        self.options = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
        self.system = system
        self.deterministic = temperature == 0 or seed is not None
        self._memo: OrderedDict[tuple[str, str], tuple[str, int]] = OrderedDict()
        self.memo_hits = 0

    def caption(self, image: LoadedImage, prompt: str) -> tuple[str, int]:
        key = (image.sha256, prompt)
        if self.deterministic and key in self._memo:
            self._memo.move_to_end(key)
            self.memo_hits += 1
            return self._memo[key]
        answer = self.engine.ask(prompt, [image], system=self.system, **self.options)
        result = (answer.text, answer.completion_tokens)
        if self.deterministic:
            self._memo[key] = result
            if len(self._memo) > self.MEMO_ENTRIES:
                self._memo.popitem(last=False)
        return result


def caption(
    inputs: Sequence[str | os.PathLike[str]],
    *,
    model: str | None = None,
    mmproj: str | os.PathLike[str] | None = None,
    bits: str | None = None,
    ctx: int = 2048,
    threads: int | None = None,
    n_gpu_layers: str | int = 0,
    mmproj_offload: bool = True,
    max_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 0.95,
    seed: int | None = None,
    system: str | None = None,
    verbose: bool = False,
    on_note: Callable[[str], None] | None = None,
    **batch: Any,
) -> CaptionSummary:
    """`caption_batch` with the real model: resolve ``model`` (catalog id, checkpoint dir or .gguf + ``mmproj``) and
    load it once, only if some image still needs a caption. Keyword arguments are `llava caption`'s flags.

    Example::

        from llava_cli.captioning import caption
        summary = caption(["photos/"], model="llava-1.5-7b", recursive=True, out="captions.jsonl")
    """
    from llava_cli.resolve import resolve_model
    from llava_cli.runtime import Engine

    note = on_note or (lambda message: print(f"note: {message}", file=sys.stderr))
    engines: list[Any] = []

    def load() -> EngineCaptioner:
        resolved = resolve_model(model, mmproj=Path(mmproj) if mmproj is not None else None, bits=bits)
        if resolved.noise:
            note(f"{resolved.name} has random weights: its captions are noise")
        engine = Engine(
            resolved.text_path,
            resolved.mmproj_path,
            n_ctx=ctx,
            n_threads=threads,
            n_gpu_layers=n_gpu_layers,
            mmproj_offload=mmproj_offload,
            verbose=verbose,
            on_note=note,
        )
        engines.append(engine)
        return EngineCaptioner(
            engine,
            model_name=resolved.name,
            quantization=resolved.quantization,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            system=system,
        )

    batch.setdefault("on_notice", note)
    try:
        return caption_batch(inputs, captioner=load, **batch)
    finally:
        for engine in engines:
            engine.close()
