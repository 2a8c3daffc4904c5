"""The output of a batch: one `CaptionRecord` per image, appended to a JSONL/CSV journal, and ``.txt`` sidecars.

The log is an append-only journal: every complete line is a final record, written with one ``write()`` and
flushed before the next image starts, so a killed process loses at most the image it was working on. On the next
run the log is read back, a torn last line (the process died mid-write, or the disk filled) is cut off, and images
with a success record are skipped. That is the journal's counterpart of `atomic_path`'s rename-on-success; sidecars,
being one small file per image, go through `atomic_path` itself.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from llava_cli.atomic import atomic_path, output_error
from llava_cli.errors import OutputError

Format = Literal["jsonl", "csv", "txt"]
FORMATS: tuple[str, ...] = ("jsonl", "csv", "txt")
COLUMNS = ("path", "caption", "prompt", "model", "quantization", "seconds", "tokens", "error")


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


def sidecar_path(image: str | Path) -> Path:
    """The ``.txt`` caption file that goes with an image: ``photos/cat.jpg`` → ``photos/cat.txt``."""
    return Path(image).with_suffix(".txt")


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
