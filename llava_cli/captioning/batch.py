"""The batch loop: decode ahead in a background thread, caption each image with a `Captioner`, record the result,
handle Ctrl-C, and report a `CaptionSummary`. The model is reached through the small `Captioner` protocol so the
bookkeeping can be tested with any captioner; `llava_cli.captioning.model` plugs in the real engine."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from llava_cli.captioning.inputs import discover_images, parse_shard, resume_key, select_shard
from llava_cli.captioning.lock import output_lock
from llava_cli.captioning.records import (
    FORMATS,
    CaptionRecord,
    Format,
    RecordLog,
    read_log,
    rewrite_log,
    sidecar_path,
    write_sidecar,
)
from llava_cli.captioning.templates import Template, parse_template, read_existing, template_values
from llava_cli.errors import LlavaError, UsageError
from llava_cli.images import DEFAULT_MAX_PIXELS, LoadedImage, load_image

DEFAULT_PROMPT = "Describe this image in one sentence."
DEFAULT_OUT = "captions.jsonl"
DEFAULT_PREFETCH = 4

# Exit codes of `llava caption` (documented in docs/captioning.md and in --help).
EXIT_OK = 0
EXIT_SOME_FAILED = 3
EXIT_INTERRUPTED = 130


class SomeImagesFailed(LlavaError):
    """The batch finished, but some images could not be captioned (their records carry the reason)."""

    exit_code = EXIT_SOME_FAILED


class BatchInterrupted(LlavaError):
    """Ctrl-C stopped the batch; what was done is recorded and the same command resumes it."""

    exit_code = EXIT_INTERRUPTED


# ---------------------------------------------------------------------------------------------------------------
# The model side


class Captioner(Protocol):
    """What the batch loop needs from a model: a caption for one image and the number of tokens generated."""

    model_name: str
    quantization: str

    def caption(self, image: LoadedImage, prompt: str) -> tuple[str, int]: ...


class Pending(Protocol):
    def result(self) -> tuple[str, int]: ...

    def cancel(self) -> None: ...


class ParallelCaptioner(Captioner, Protocol):
    """A captioner that takes several images at once: ``submit`` returns at once, ``result()`` blocks."""

    parallel: int

    def submit(self, image: LoadedImage, prompt: str) -> Pending: ...


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
        self,
        paths: Sequence[str],
        *,
        ahead: int,
        want_existing: bool,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bytes: int | None = None,
    ) -> None:
        self._paths = paths
        self._queue: queue.Queue[Prepared | None] = queue.Queue(maxsize=max(1, ahead))
        self._stop = threading.Event()
        self._want_existing = want_existing
        self._max_pixels = max_pixels
        self._max_bytes = max_bytes
        self._thread = threading.Thread(target=self._work, name="llava-caption-prefetch", daemon=True)
        self._thread.start()

    def _prepare(self, path: str) -> Prepared:
        existing = ""
        try:
            existing = read_existing(path) if self._want_existing else ""
            image = load_image(path, max_pixels=self._max_pixels, max_bytes=self._max_bytes)
            return Prepared(path, image, None, existing)
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


def pending_images(
    paths: Sequence[str],
    log_path: Path | None,
    log_fmt: Format | None,
    *,
    overwrite: bool,
    summary: CaptionSummary,
    notice: Callable[[str], None],
) -> list[str]:
    """The resume filter (call it under the output lock): the images of `paths` that still need a caption.

    Done means a success record in the log or, with sidecars only, an existing sidecar. Old failure records of
    images tried again are dropped (one record per image), a torn last record is cut off; `summary` gets the
    skipped count and whether the log was repaired. Shared by the local loop and the Ray driver (ray_data.py).
    """
    done: set[str] = set()
    if log_path is not None and log_fmt is not None:
        if overwrite:
            rewrite_log(log_path, log_fmt, [])
        else:
            state = read_log(log_path, log_fmt)
            summary.repaired = state.repaired
            if state.repaired:
                notice(f"repaired {log_path}: cut off a torn last record from an interrupted run")
            done = {resume_key(p) for p in state.done}
            retry = {resume_key(r.fs_path) for r in state.records if not r.ok} & {resume_key(p) for p in paths}
            if retry:
                # One record per image: drop the old failure records of images this run tries again.
                rewrite_log(log_path, log_fmt, [r for r in state.records if resume_key(r.fs_path) not in retry])
    elif not overwrite:
        done = {resume_key(p) for p in paths if sidecar_path(p).exists()}
    todo = [p for p in paths if resume_key(p) not in done]
    summary.skipped = len(paths) - len(todo)
    return todo


def commit_record(record: CaptionRecord, log: RecordLog | None, write_sidecars: bool, summary: CaptionSummary) -> None:
    """Make one image's result durable and count it. Shared by the local loop and the Ray driver (ray_data.py)."""
    # Sidecar first, then the log record: if we die in between, the image is redone and the sidecar rewritten.
    if record.ok and write_sidecars:
        write_sidecar(record.fs_path, record.caption or "")
    if log is not None:
        log.write(record)
    if record.ok:
        summary.done += 1
        summary.tokens += record.tokens
    else:
        summary.failed += 1
        summary.failures.append(record)


@dataclass
class BatchPlan:
    """What a batch will do, decided before any lock is taken or model loaded (shared with the Ray driver)."""

    templates: tuple[Template, Template, Template]  # prompt, prefix, suffix
    log_path: Path | None
    log_fmt: Format | None
    write_sidecars: bool
    uses_existing: bool  # some template reads the old sidecar ({existing})
    paths: list[str]  # this shard's images, in order


def plan_batch(
    inputs: Sequence[str | os.PathLike[str]],
    *,
    out: str | os.PathLike[str] | None,
    sidecar: bool,
    format: str | None,
    recursive: bool,
    prompt: str,
    prefix: str,
    suffix: str,
    shard: str | tuple[int, int] | None,
) -> BatchPlan:
    """Check the templates and outputs (a typo fails before any work) and find this shard's images."""
    templates = (
        parse_template(prompt, what="--prompt"),
        parse_template(prefix, what="--prefix"),
        parse_template(suffix, what="--suffix"),
    )
    log_path, log_fmt, write_sidecars = resolve_outputs(out, sidecar, format)
    uses_existing = any("existing" in t.fields for t in templates)
    if write_sidecars and log_path is None and uses_existing:
        raise UsageError(
            "{existing} with --sidecar needs --out LOG to remember which images are done "
            "(the sidecar is both the input and the output)",
            hint="add --out captions.jsonl",
        )
    paths = select_shard(discover_images(inputs, recursive=recursive), parse_shard(shard))
    return BatchPlan(templates, log_path, log_fmt, write_sidecars, uses_existing, paths)


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
    max_image_bytes: int | None = None,
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
    plan = plan_batch(
        inputs,
        out=out,
        sidecar=sidecar,
        format=format,
        recursive=recursive,
        prompt=prompt,
        prefix=prefix,
        suffix=suffix,
        shard=shard,
    )
    prompt_t, prefix_t, suffix_t = plan.templates
    log_path, log_fmt, write_sidecars, uses_existing, paths = (
        plan.log_path,
        plan.log_fmt,
        plan.write_sidecars,
        plan.uses_existing,
        plan.paths,
    )
    summary = CaptionSummary(total=len(paths), out=log_path)

    lock = output_lock(log_path) if log_path is not None else contextlib.nullcontext()
    with lock:
        todo = pending_images(paths, log_path, log_fmt, overwrite=overwrite, summary=summary, notice=notice)
        if not todo:
            summary.seconds = time.monotonic() - started
            return summary

        clashes = _sidecar_clashes(paths) if write_sidecars else {}
        # Start decoding before the model loads: the first images are ready when it is.
        prefetcher = Prefetcher(
            todo, ahead=prefetch, want_existing=uses_existing, max_pixels=max_pixels, max_bytes=max_image_bytes
        )
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
    completed = 0

    def finish(record: CaptionRecord) -> None:
        nonlocal completed
        commit_record(record, log, write_sidecars, summary)
        completed += 1
        if on_record:
            on_record(record)
        if on_progress:
            on_progress(completed, total)

    if getattr(model, "parallel", 1) > 1 and hasattr(model, "submit"):
        _pipelined(model, prefetcher, interrupts, finish, templates, clashes)  # type: ignore[arg-type]
    else:
        for item in prefetcher:
            if interrupts.requested:
                break
            finish(_caption_one(model, item, *templates, clashes))
    summary.interrupted = interrupts.requested


def _pipelined(
    model: ParallelCaptioner,
    prefetcher: Prefetcher,
    interrupts: _Interrupts,
    finish: Callable[[CaptionRecord], None],
    templates: tuple[Template, Template, Template],
    clashes: dict[str, str],
) -> None:
    """Keep ``2 × parallel`` images submitted (the runtime encodes the next ones while it decodes), and record them
    in input order as they complete. The first Ctrl-C stops submitting and lets the ones in flight finish (they are
    recorded); a second one cancels them (not recorded: they are redone on resume)."""
    window: deque[tuple[Prepared, CaptionRecord, Pending | None, float]] = deque()
    items = iter(prefetcher)
    try:
        while True:
            while len(window) < 2 * model.parallel and not interrupts.requested:
                item = next(items, None)
                if item is None:
                    break
                record, handle = submit_one(model, item, *templates, clashes)
                window.append((item, record, handle, time.perf_counter()))
            if not window:
                return
            item, record, handle, t0 = window.popleft()
            finish(complete_submitted(item, record, handle, t0, templates))
    finally:
        for _, _, handle, _ in window:
            if handle is not None:
                handle.cancel()


def complete_submitted(
    item: Prepared,
    record: CaptionRecord,
    handle: Pending | None,
    t0: float,
    templates: tuple[Template, Template, Template],
) -> CaptionRecord:
    """Wait for a submitted image (`submit_one`) and fill in its record. Shared with the Ray replicas."""
    if handle is not None:
        try:
            text, n_tokens = handle.result()
            record.tokens = n_tokens
            values = template_values(item.path, item.existing)
            record.caption = templates[1].render(values) + text.strip() + templates[2].render(values)
        except LlavaError as exc:
            record.error = f"{item.path}: {exc.message}"
        # Wall time since submission: with several in flight, it overlaps the others'.
        record.seconds = round(time.perf_counter() - t0, 3)
    return record


def _start_record(
    model: Captioner, item: Prepared, prompt_t: Template, clashes: dict[str, str]
) -> tuple[CaptionRecord, str | None]:
    """The record of `item` and the prompt to ask, or the record already failed (clash, unreadable) and None."""
    prompt = prompt_t.render(template_values(item.path, item.existing))
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
    elif item.image is None:
        record.error = item.error
    return record, None if record.error else prompt


def submit_one(
    model: ParallelCaptioner,
    item: Prepared,
    prompt_t: Template,
    prefix_t: Template,
    suffix_t: Template,
    clashes: dict[str, str],
) -> tuple[CaptionRecord, Pending | None]:
    """The record of `item` and the model's handle, or a finished (error) record and None."""
    record, prompt = _start_record(model, item, prompt_t, clashes)
    if prompt is None or item.image is None:
        return record, None
    return record, model.submit(item.image, prompt)


def _caption_one(
    model: Captioner,
    item: Prepared,
    prompt_t: Template,
    prefix_t: Template,
    suffix_t: Template,
    clashes: dict[str, str],
) -> CaptionRecord:
    """`submit_one` + `complete_submitted` for a captioner that answers at once (the sequential path)."""
    record, prompt = _start_record(model, item, prompt_t, clashes)
    if prompt is None or item.image is None:
        return record
    call = _Call(model, item.image, prompt)
    return complete_submitted(item, record, call, time.perf_counter(), (prompt_t, prefix_t, suffix_t))


@dataclass
class _Call:
    """A `Pending` whose result is computed when asked: the model captions in the caller's thread."""

    model: Captioner
    image: LoadedImage
    prompt: str

    def result(self) -> tuple[str, int]:
        return self.model.caption(self.image, self.prompt)

    def cancel(self) -> None:
        pass
