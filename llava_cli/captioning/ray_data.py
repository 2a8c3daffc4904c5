"""Batch captioning on Ray Data, for datasets that outgrow one machine, with the local run's guarantees.

The driver (this process) discovers the images exactly as `caption_batch` does (inputs, ``--shard``, the resume
filter), under the same output lock. Ray tasks read and decode the images (`decode_batch`: bounded by
``max_pixels``; a corrupt image becomes an error record, never a failed job), a pool of N actors (`CaptionReplica`,
each loads the engine once through `load_captioner`, the local path's loader) captions them with the local path's
per-image logic (`_caption_one`), and the records stream back to the driver, which writes them through the local
path's writer (`commit_record`: one ``write()`` per record, sidecar first). Ray retries the batch of a dead actor
(at-least-once), so the driver writes the first record of each path and drops repeats; after a driver crash the
resume filter skips what the log already holds.

Two entry points: `caption_ray` (``llava caption --ray``) and `caption_dataset`, which maps any ``ray.data.Dataset``
of images (paths, encoded bytes, or decoded arrays) to a Dataset of records, for pipelines of one's own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from PIL import Image

from llava_cli.captioning.batch import (
    DEFAULT_PROMPT,
    Captioner,
    CaptionSummary,
    Prepared,
    _caption_one,
    _Interrupts,
    _sidecar_clashes,
    commit_record,
    complete_submitted,
    pending_images,
    plan_batch,
    submit_one,
)
from llava_cli.captioning.inputs import resume_key
from llava_cli.captioning.lock import output_lock
from llava_cli.captioning.model import load_captioner
from llava_cli.captioning.records import COLUMNS, CaptionRecord, RecordLog
from llava_cli.captioning.templates import parse_template, read_existing
from llava_cli.errors import LlavaError, UsageError
from llava_cli.images import DEFAULT_MAX_PIXELS, LoadedImage, load_image
from llava_cli.preprocess import parse_image_fit

INSTALL_HINT = 'pip install "llava-cli[ray]"'
# Images per call of a replica. Small, so records reach the log soon after they are made and a dead actor's retry
# redoes little; large enough that Ray's per-call cost (~ms) is small next to a caption (~0.1-1 s).
DEFAULT_BATCH_SIZE = 4
MAX_BLOCKS = 20_000
# A local cluster's shared-memory object store: decoded images in flight, not the dataset. Ray's default (30% of
# RAM) would take memory the models need.
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401  # the [data] part of the extra
    except ImportError as exc:
        raise UsageError(f"--ray needs Ray Data, which is not installed: {INSTALL_HINT}") from exc
    return ray


@dataclass(frozen=True)
class RayOptions:
    """How the job uses the cluster: N model replicas, each with these resources."""

    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    batch_size: int = DEFAULT_BATCH_SIZE

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise UsageError(f"--ray-workers must be at least 1, not {self.workers}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise UsageError("--ray-gpus-per-worker must be ≥ 0 and --ray-cpus-per-worker > 0")
        if self.batch_size < 1:
            raise UsageError(f"the Ray batch size must be at least 1, not {self.batch_size}")


# ---------------------------------------------------------------------------------------------------------------
# Inside the cluster: decoding tasks and captioning actors


def _value(v: Any) -> Any:
    """A cell of a numpy batch, with Arrow's nulls back to None (a column of nulls arrives as float NaN)."""
    if v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)):
        return None
    return v


def _column(batch: dict[str, Any], name: str, n: int) -> list[Any]:
    values = batch.get(name)
    return [None] * n if values is None else [_value(v) for v in values]


def decode_batch(
    batch: dict[str, Any],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = None,
    want_existing: bool = False,
) -> dict[str, Any]:
    """A Ray task: turn rows of images into RGB pixels (or the reason they cannot be used).

    Input columns: ``path``, and optionally ``bytes`` (the encoded file, as from ``read_binary_files``), ``image``
    (a decoded HxWxC array, as from ``read_images``) or ``error`` (the driver already knows the image fails). Without
    ``bytes`` or ``image`` the file is read from ``path``. Output: ``path``, ``rgb``, ``width``, ``height``,
    ``sha256``, ``error``, ``existing`` (the old sidecar text, for ``{existing}`` templates).
    """
    first = next(iter(batch.values()))
    n = len(first)
    paths, data, arrays, errors = (_column(batch, c, n) for c in ("path", "bytes", "image", "error"))
    out: dict[str, list[Any]] = {c: [] for c in ("path", "rgb", "width", "height", "sha256", "error", "existing")}
    for i in range(n):
        path, rgb, width, height, sha, error = paths[i], None, 0, 0, "", errors[i]
        try:
            if error:
                pass
            elif arrays[i] is not None:
                pixels = np.ascontiguousarray(arrays[i])
                image = Image.fromarray(pixels).convert("RGB")
                rgb, (width, height) = image.tobytes(), image.size
                sha = _sha256(pixels.tobytes())
            else:
                source = bytes(data[i]) if data[i] is not None else path
                loaded = load_image(source, max_pixels=max_pixels, max_bytes=max_bytes)
                rgb, width, height, sha = loaded.rgb_bytes(), loaded.width, loaded.height, loaded.sha256
        except LlavaError as exc:
            error = exc.message if path is None or str(path) in exc.message else f"{path}: {exc.message}"
        except Exception as exc:  # a decoder bug on one odd file must not end the job
            error = f"{path}: cannot decode ({type(exc).__name__}: {exc})"
        if path is None:  # bytes without a name: the content names the record
            path = f"sha256:{sha}" if sha else f"<row {i}>"
        out["path"].append(str(path))
        out["rgb"].append(rgb)
        out["width"].append(width)
        out["height"].append(height)
        out["sha256"].append(sha)
        out["error"].append(error or None)
        out["existing"].append(read_existing(str(path)) if want_existing and not error else "")
    return out


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


class CaptionReplica:
    """A Ray Data actor (a callable class in ``map_batches``): one model replica, loaded once in ``__init__``,
    captioning batches of decoded images into records (the columns of `CaptionRecord`)."""

    def __init__(
        self, load: dict[str, Any], prompt: str, prefix: str, suffix: str, captioner: Captioner | None = None
    ) -> None:
        self.templates = (
            parse_template(prompt, what="--prompt"),
            parse_template(prefix, what="--prefix"),
            parse_template(suffix, what="--suffix"),
        )
        self.error: LlavaError | None = None
        self.captioner: Captioner | None = captioner
        if captioner is None:
            try:
                self.captioner = load_captioner(**load)
            except LlavaError as exc:
                # Raised from the first call instead: a failing constructor makes Ray start replacement actors in
                # a loop, while a failing call ends the job at once with this message.
                self.error = exc

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        if self.error is not None or self.captioner is None:
            raise self.error or LlavaError("the model replica did not load")
        n = len(batch["path"])
        rgbs, errors, existing = (_column(batch, c, n) for c in ("rgb", "error", "existing"))
        records: dict[str, list[Any]] = {c: [] for c in COLUMNS}
        items: list[Prepared] = []
        for i in range(n):
            path, rgb, error = str(batch["path"][i]), rgbs[i], errors[i]
            image = None
            if rgb is not None and not error:
                size = (int(batch["width"][i]), int(batch["height"][i]))
                pixels = Image.frombytes("RGB", size, bytes(rgb))
                image = LoadedImage(image=pixels, sha256=str(batch["sha256"][i]), name=path)
            items.append(Prepared(path, image, error, str(existing[i] or "")))
        model = self.captioner
        if getattr(model, "parallel", 1) > 1 and hasattr(model, "submit"):
            # Every image of the batch in flight at once on the replica's sequence slots (--parallel).
            t0 = time.perf_counter()
            handles = [submit_one(model, item, *self.templates, {}) for item in items]  # type: ignore[arg-type]
            done = [
                complete_submitted(item, rec, h, t0, self.templates)
                for item, (rec, h) in zip(items, handles, strict=True)
            ]
        else:
            done = [_caption_one(model, item, *self.templates, {}) for item in items]
        for record in done:
            for f in fields(record):
                records[f.name].append(getattr(record, f.name))
        return records


def caption_dataset(
    ds: Any,
    *,
    model: str | None = None,
    mmproj: str | os.PathLike[str] | None = None,
    bits: str | None = None,
    ctx: int = 2048,
    threads: int | None = None,
    n_gpu_layers: str | int = 0,
    mmproj_offload: bool = True,
    image_fit: str = "pad",
    max_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 0.95,
    seed: int | None = None,
    system: str | None = None,
    prompt: str = DEFAULT_PROMPT,
    prefix: str = "",
    suffix: str = "",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_image_bytes: int | None = None,
    parallel: int = 1,
    want_existing: bool = False,
    ray: RayOptions | None = None,
) -> Any:
    """Caption a ``ray.data.Dataset`` of images; return a lazy Dataset of records (the columns of `CaptionRecord`).

    Rows carry ``path`` and/or ``bytes`` (``ray.data.read_binary_files(..., include_paths=True)``) or ``image``
    (``ray.data.read_images(..., include_paths=True)``). Ray tasks decode, ``ray.workers`` actors each load the model
    once and caption. One record per input row, in no particular order; an unreadable image is a record with
    ``error`` set. Nothing runs until the result is consumed (``write_json``, ``iter_rows``...). Example::

        import ray.data
        from llava_cli.captioning.ray_data import RayOptions, caption_dataset

        ds = ray.data.read_binary_files("s3://bucket/photos/", include_paths=True)
        records = caption_dataset(ds, model="llava-1.5-7b", bits="q4_k_m", n_gpu_layers="all",
                                  ray=RayOptions(workers=8, gpus_per_worker=1))
        records.write_json("s3://bucket/captions/")
    """
    rayopts = ray or RayOptions()
    ray_mod = import_ray()
    for text, what in ((prompt, "--prompt"), (prefix, "--prefix"), (suffix, "--suffix")):
        parse_template(text, what=what)  # a bad template fails here, not in every actor
    parse_image_fit(image_fit)
    load = {
        "model": model,
        "mmproj": str(mmproj) if mmproj is not None else None,
        "bits": bits,
        "ctx": ctx,
        # llama.cpp's threads: the CPUs Ray gives the replica, not every core of its node.
        "threads": threads or max(1, int(rayopts.cpus_per_worker)),
        "n_gpu_layers": n_gpu_layers,
        "mmproj_offload": mmproj_offload,
        "image_fit": image_fit,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "system": system,
        "parallel": parallel,
    }
    decoded = ds.map_batches(
        decode_batch,
        fn_kwargs={"max_pixels": max_pixels, "max_bytes": max_image_bytes, "want_existing": want_existing},
        batch_size=rayopts.batch_size,
        batch_format="numpy",
        # Decoding is light next to a caption: a fraction of a CPU, so it runs beside replicas that hold every CPU.
        num_cpus=0.25,
    )
    return decoded.map_batches(
        CaptionReplica,
        fn_constructor_kwargs={"load": load, "prompt": prompt, "prefix": prefix, "suffix": suffix},
        batch_size=rayopts.batch_size,
        batch_format="numpy",
        compute=ray_mod.data.ActorPoolStrategy(size=rayopts.workers),
        num_cpus=rayopts.cpus_per_worker,
        num_gpus=rayopts.gpus_per_worker or None,
        # Fault tolerance is Ray Data's default for actor pools (Ray 2.60, actor_pool_map_operator.py): a dead actor
        # is restarted without limit and its calls are retried on the new one (max_restarts=-1,
        # max_task_retries=-1); passing them here is deprecated. Repeats are dropped by the driver.
    )


# ---------------------------------------------------------------------------------------------------------------
# The cluster


_REAPER = """
import os, signal, sys
import psutil
procs = []
for spec in sys.argv[1:]:
    pid, created = spec.split(":")
    try:
        p = psutil.Process(int(pid))
        if p.create_time() == float(created):
            procs.append(p)
    except psutil.Error:
        pass
sys.stdin.buffer.read()  # returns when the driver exits, however it exits (its end of the pipe closes)
alive = []
for p in procs:
    try:
        alive += [p, *p.children(recursive=True)]
    except psutil.Error:
        pass
for p in alive:
    try:
        p.kill()
    except psutil.Error:
        pass
psutil.wait_procs(alive, timeout=10)
"""


def _start_reaper(pids: Sequence[Any]) -> subprocess.Popen[bytes]:
    """A watchdog that kills the local cluster's processes when this process exits, even by SIGKILL.

    ``ray.shutdown()`` stops them on a normal exit; after SIGKILL nothing runs in the driver, and Ray's dashboard
    and runtime-env agents outlive it (measured with Ray 2.60). The watchdog holds the read end of a pipe whose
    write end only this process has: end of file means we are gone. Its own session keeps Ctrl-C away from it.
    """
    specs = [f"{p.pid}:{p.create_time()}" for p in pids]
    return subprocess.Popen(
        [sys.executable, "-c", _REAPER, *specs],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def _quiet_ray_logs() -> None:
    """Ray Data narrates every execution on stderr (plan, progress bars, deprecations); the CLI has its own bar."""
    for name in ("ray", "ray.data", "ray._private", "ray.util"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def ray_session(
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_memory: int | None = LOCAL_OBJECT_STORE_BYTES,
) -> Iterator[bool]:
    """Connect to Ray the way ``ray.init()`` does: an already-initialised Ray is used as is; else ``address`` or
    ``RAY_ADDRESS`` names a running cluster (we connect, and disconnect at the end); else a local cluster is started
    here and shut down at the end, also on Ctrl-C, an exception or SIGKILL (`_start_reaper`). Yields whether a local
    cluster was started."""
    ray = import_ray()
    _quiet_ray_logs()
    if ray.is_initialized():
        yield False
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    common: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    reaper = None
    if address:
        ray.init(address=address, **common)
    else:
        import psutil

        # The C++ core logs an error-level line on every actor pool start (constructor arguments in the object store
        # with max_restarts > 0: Ray Data's own default); Python exceptions still carry every real failure.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        # Workers inherit this environment, so they import this llava_cli (also a source checkout on PYTHONPATH).
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, object_store_memory=object_store_memory, **common)
        reaper = _start_reaper(psutil.Process().children(recursive=True))
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = False
    try:
        yield reaper is not None
    finally:
        ray.shutdown()
        if reaper is not None and reaper.stdin is not None:
            reaper.stdin.close()  # the watchdog sweeps up whatever shutdown left, then exits
            with contextlib.suppress(subprocess.TimeoutExpired):
                reaper.wait(timeout=15)


def _llava_error_in(exc: BaseException) -> LlavaError | None:
    """The LlavaError a replica raised, from inside Ray's wrappers (RayTaskError, UserCodeException)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, LlavaError):
            return e
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


# ---------------------------------------------------------------------------------------------------------------
# The driver


def caption_ray(
    inputs: Sequence[str | os.PathLike[str]],
    *,
    ray: RayOptions | None = None,
    address: str | None = None,
    model: str | None = None,
    mmproj: str | os.PathLike[str] | None = None,
    bits: str | None = None,
    ctx: int = 2048,
    threads: int | None = None,
    n_gpu_layers: str | int = 0,
    mmproj_offload: bool = True,
    image_fit: str = "pad",
    max_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 0.95,
    seed: int | None = None,
    system: str | None = None,
    verbose: bool = False,
    on_note: Callable[[str], None] | None = None,
    out: str | os.PathLike[str] | None = None,
    sidecar: bool = False,
    format: str | None = None,
    recursive: bool = False,
    overwrite: bool = False,
    prompt: str = DEFAULT_PROMPT,
    prefix: str = "",
    suffix: str = "",
    shard: str | tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_progress: Callable[[int, int], None] | None = None,
    on_record: Callable[[CaptionRecord], None] | None = None,
    max_image_bytes: int | None = None,
    parallel: int | None = None,
    on_parallel: Callable[[int], None] | None = None,
    handle_sigint: bool = True,
) -> CaptionSummary:
    """`captioning.caption` on a Ray cluster (``llava caption --ray``): same arguments, same outputs, same summary.
    ``parallel`` is per replica (sequence slots of each replica's runtime; default 1, since replicas are the unit of
    scale here); ``on_parallel`` is told that level.

    Example::

        from llava_cli.captioning.ray_data import RayOptions, caption_ray
        summary = caption_ray(["photos/"], model="llava-1.5-7b", out="captions.jsonl", ray=RayOptions(workers=2))
    """
    rayopts = ray or RayOptions()
    import_ray()  # before any work: without Ray, one line saying what to install
    if on_parallel is not None:
        on_parallel(parallel or 1)
    started = time.monotonic()
    notice = on_note or (lambda message: print(f"note: {message}", file=sys.stderr))
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
        log = RecordLog(log_path, log_fmt) if log_path is not None and log_fmt is not None else None
        interrupts = _Interrupts(
            lambda: notice("Ctrl-C: writing the records already made, then stopping (press it again to stop now)")
        )
        try:
            with interrupts if handle_sigint else contextlib.nullcontext(interrupts):
                try:
                    _drive(
                        todo,
                        clashes,
                        log,
                        write_sidecars,
                        summary,
                        interrupts,
                        rayopts,
                        address,
                        dict(
                            model=model,
                            mmproj=mmproj,
                            bits=bits,
                            ctx=ctx,
                            threads=threads,
                            n_gpu_layers=n_gpu_layers,
                            mmproj_offload=mmproj_offload,
                            image_fit=image_fit,
                            max_tokens=max_tokens,
                            temperature=temperature,
                            top_p=top_p,
                            seed=seed,
                            system=system,
                            prompt=prompt,
                            prefix=prefix,
                            suffix=suffix,
                            max_pixels=max_pixels,
                            max_image_bytes=max_image_bytes,
                            parallel=parallel or 1,
                            want_existing=uses_existing,
                        ),
                        on_progress=on_progress,
                        on_record=on_record,
                    )
                except KeyboardInterrupt:
                    summary.interrupted = True
        finally:
            if log is not None:
                log.close()
    summary.seconds = time.monotonic() - started
    return summary


def absorb(
    batches: Iterable[Any],
    wanted: set[str],
    log: RecordLog | None,
    write_sidecars: bool,
    summary: CaptionSummary,
    *,
    stop: Callable[[], bool] = lambda: False,
    on_record: Callable[[CaptionRecord], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> set[str]:
    """The driver's side of the stream: write each record of `batches` (Arrow tables of records) once per image.

    Ray runs a dead actor's batch again (at-least-once), so an image may come back twice: the first record is the
    one kept. Records of images not in `wanted` (resume keys) are dropped too. Returns the keys written.
    """
    written: set[str] = set()
    for batch in batches:
        for row in batch.to_pylist():
            record = CaptionRecord(**{c: row[c] for c in COLUMNS})
            key = resume_key(record.path)
            if key in written or key not in wanted:
                continue
            written.add(key)
            commit_record(record, log, write_sidecars, summary)
            if on_record:
                on_record(record)
            if on_progress:
                on_progress(len(written), len(wanted))
        if stop():
            break
    return written


def _drive(
    todo: list[str],
    clashes: dict[str, str],
    log: RecordLog | None,
    write_sidecars: bool,
    summary: CaptionSummary,
    interrupts: _Interrupts,
    rayopts: RayOptions,
    address: str | None,
    options: dict[str, Any],
    *,
    on_progress: Callable[[int, int], None] | None,
    on_record: Callable[[CaptionRecord], None] | None,
) -> None:
    """Run the job and write each record as it arrives, once per image."""
    if on_progress:
        on_progress(0, len(todo))
    wanted = {resume_key(p) for p in todo}
    # A local cluster gets enough logical CPUs for the replicas plus the decoding tasks beside them.
    cpus = max(os.cpu_count() or 1, int(rayopts.workers * rayopts.cpus_per_worker + 0.999) + 1)
    gpus = int(rayopts.workers * rayopts.gpus_per_worker + 0.999) or None
    with ray_session(address=address, num_cpus=cpus, num_gpus=gpus):
        ray = import_ray()
        rows = [{"path": p, "error": clashes.get(p)} for p in todo]
        # One block per batch: a block is one task, and its records come back when the task ends, so small blocks
        # stream records to the log as they are made. Capped: past ~20k blocks Ray's per-block cost adds up, and a
        # block of 50 images is still seconds of work for a replica.
        blocks = min(-(-len(rows) // rayopts.batch_size), MAX_BLOCKS)
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        records = caption_dataset(ds, ray=rayopts, **options)
        try:
            absorb(
                records.iter_batches(batch_size=None, batch_format="pyarrow"),
                wanted,
                log,
                write_sidecars,
                summary,
                stop=lambda: interrupts.requested,
                on_record=on_record,
                on_progress=on_progress,
            )
        except (KeyboardInterrupt, LlavaError):
            raise
        except Exception as exc:
            cause = _llava_error_in(exc)
            if cause is not None:
                raise cause from None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LlavaError(
                f"the Ray job failed: {first}",
                hint="records made so far are in the log; run the same command again to resume",
            ) from exc
    summary.interrupted = interrupts.requested


__all__ = [
    "INSTALL_HINT",
    "absorb",
    "CaptionReplica",
    "RayOptions",
    "caption_dataset",
    "caption_ray",
    "decode_batch",
    "import_ray",
    "ray_session",
]
