"""`Runtime`: one GGUF pair serving many requests at once. ``submit()`` is thread-safe and returns a `Job` at once;
the request's images become embeddings (cache first), and the scheduler thread runs every admitted sequence
together, one ``llama_decode`` per step (see scheduler.py).

Who encodes: with the vision encoder or the text model on a GPU, an encoder thread, so that encoding overlaps the
decode. With both on the CPU, the scheduler thread itself, between steps, when a slot is free for the request:
two ggml thread pools on the same cores slow each other down (their threads spin at every barrier while the
other pool holds the core), so on a CPU one computation at a time is the fastest order.

    with Runtime("m.gguf", "mmproj.gguf", n_parallel=4, n_ctx=4096) as rt:
        jobs = [rt.submit([Message("user", "Describe it.", [load_image(p)])], temperature=0) for p in paths]
        for job in jobs:
            print(job.result().text)
        for piece in rt.submit([Message("user", "Hi")]):   # streamed
            print(piece, end="")
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from llava_cli.errors import LlavaError, UsageError
from llava_cli.memory.buffers import N_BATCH
from llava_cli.preprocess import ImageFit
from llava_cli.runtime.llamacpp import GpuLayers
from llava_cli.runtime.messages import Answer, Message, Timings
from llava_cli.runtime.pair import ModelPair
from llava_cli.runtime.prompt import ImagePiece, build_pieces, n_positions, overflow
from llava_cli.runtime.scheduler import Request, Sampling, SchedulerStats

_END = object()


class Job:
    """A submitted request. Iterate for the text pieces as they are generated; ``result()`` for the `Answer`."""

    def __init__(self, runtime: Runtime, seq: Request) -> None:
        self._runtime = runtime
        self._seq = seq
        self._pieces: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._done = threading.Event()

    def _on_text(self, piece: str) -> None:
        self._pieces.put(piece)

    def _on_done(self, seq: Request) -> None:
        self._runtime._count(-1)
        self._done.set()
        self._pieces.put(_END)

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._pieces.get()
            if item is _END:
                break
            yield item  # type: ignore[misc]
        if self._seq.error is not None:
            raise self._seq.error

    def result(self, timeout: float | None = None) -> Answer:
        """The answer, once done; re-raises the job's error. TimeoutError if not done within `timeout` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError("the job is still running")
        if self._seq.error is not None:
            raise self._seq.error
        assert self._seq.answer is not None
        return self._seq.answer

    def cancel(self) -> None:
        """Stop generating; the sequence's slot and KV cells are freed at the next step (finish_reason
        "cancelled"). Nothing happens if the job is already done."""
        self._seq.cancelled = True
        self._runtime._wake()

    @property
    def done(self) -> bool:
        return self._done.is_set()


class Runtime:
    """One model pair, one llama context with ``n_parallel`` sequences, a scheduler thread. Thread-safe submit()."""

    def __init__(
        self,
        text_path: str | os.PathLike[str],
        mmproj_path: str | os.PathLike[str],
        *,
        n_parallel: int = 1,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        n_gpu_layers: GpuLayers | str = 0,
        mmproj_offload: bool = True,
        n_batch: int = N_BATCH,
        n_ubatch: int | None = None,
        flash_attn: bool | None = None,
        image_fit: ImageFit = "pad",
        image_cache_mb: int = 512,
        prefill_chunk: int = 256,
        kv_unified: bool = True,
        encode_thread: bool | None = None,
        verbose: bool = False,
        on_note: Callable[[str], None] | None = None,
    ) -> None:
        """``encode_thread``: encode images on their own thread (None: only when something runs on a GPU, see the
        module docstring)."""
        self._pair: ModelPair | None = ModelPair(
            text_path,
            mmproj_path,
            n_seq=n_parallel,
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads_batch,
            n_gpu_layers=n_gpu_layers,
            mmproj_offload=mmproj_offload,
            n_batch=n_batch,
            n_ubatch=n_ubatch,
            flash_attn=flash_attn,
            image_fit=image_fit,
            image_cache_mb=image_cache_mb,
            prefill_chunk=prefill_chunk,
            kv_unified=kv_unified,
            verbose=verbose,
            on_note=on_note,
        )
        p = self._pair
        self.n_parallel = n_parallel
        self.n_ctx = n_ctx
        self.text_path: Path = p.text_path
        self.mmproj_path: Path = p.mmproj_path
        self.text_info = p.text_info
        self.mmproj_info = p.mmproj_info
        self.n_image_tokens = p.n_image_tokens
        self.n_gpu_layers = p.n_gpu_layers
        self.notes = p.notes
        self.tokenizer = p.tokenizer
        self.kv_bytes_per_slot = p.kv_bytes_per_slot
        self._sched = p.scheduler
        self._lock = threading.Condition()
        self._ready: list[Request] = []  # encoded, waiting to enter the scheduler (moved under the lock)
        self._to_encode: queue.SimpleQueue[Request | None] = queue.SimpleQueue()  # for the encoder thread
        self._pending: deque[Request] = deque()  # without one: waiting to be encoded by the scheduler thread
        self._closing = False
        self._stopping = False
        self._in_flight = 0
        self._count_lock = threading.Lock()
        self._error: BaseException | None = None
        on_gpu = p.n_gpu_layers > 0 or p.mmproj_offload
        self.encode_thread = on_gpu if encode_thread is None else encode_thread
        self._encoder: threading.Thread | None = None
        if self.encode_thread:
            self._encoder = threading.Thread(target=self._encode_loop, name="llava-encode", daemon=True)
            self._encoder.start()
        self._worker = threading.Thread(target=self._run_loop, name="llava-scheduler", daemon=True)
        self._worker.start()

    # -- API

    def submit(
        self,
        messages: Sequence[Message],
        *,
        system: str | None = None,
        max_tokens: int = 512,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
    ) -> Job:
        """Queue a request: `messages` alternate user/assistant and end with the user message to answer.
        Raises ContextOverflowError (prompt longer than ``n_ctx``) or UsageError at once; errors found later (an
        image the encoder rejects, a failed decode) come out of ``Job.result()``."""
        t_start = time.perf_counter()
        if self._closing or self._pair is None:
            raise UsageError("this runtime is closed")
        if max_tokens < 1:
            raise UsageError(f"max_tokens must be at least 1, not {max_tokens}")
        pieces = build_pieces(self.tokenizer, messages, system=system, n_image_tokens=self.n_image_tokens)
        needed = n_positions(pieces) + 1  # +1: room for at least one generated token
        if needed > self.n_ctx:
            n_img = sum(1 for p in pieces if isinstance(p, ImagePiece))
            raise overflow(needed, self.n_ctx, n_images=n_img, n_image_tokens=self.n_image_tokens)
        sampling = Sampling(max_tokens, temperature, top_p, top_k, seed, tuple(s for s in stop if s), ignore_eos)
        seq = Request(pieces, {}, sampling, t_start=t_start, timings=Timings())
        for m in messages:
            for im in m.images:
                seq.notes.extend(im.notes)
        job = Job(self, seq)
        seq.on_text, seq.on_done = job._on_text, job._on_done
        self._count(+1)
        if self.encode_thread:
            self._to_encode.put(seq)
        else:
            with self._lock:  # the scheduler thread encodes it when a slot is free
                self._pending.append(seq)
                self._lock.notify_all()
        return job

    @property
    def in_flight(self) -> int:
        """Jobs submitted and not done yet (generating, prefilling, queued for a slot or for the encoder): what a
        server compares with its queue limit (more than ``n_parallel`` means some are waiting)."""
        return self._in_flight

    def _count(self, delta: int) -> None:
        with self._count_lock:
            self._in_flight += delta

    @property
    def stats(self) -> SchedulerStats:
        return self._sched.stats

    @property
    def images_encoded(self) -> int:
        return self._pair.cache.encoded if self._pair else 0

    def close(self) -> None:
        """Cancel what is left, stop the threads, free the model."""
        if self._pair is None:
            return
        self._closing = True  # submit() refuses, the encoder thread cancels what it still has
        if self._encoder is not None:
            self._to_encode.put(None)
            self._encoder.join()
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._worker.join()
        self._pair.close()
        self._pair = None

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- threads

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _encode_loop(self) -> None:
        """The encoder thread: images → embeddings, one request at a time, while the scheduler decodes the others."""
        while True:
            seq = self._to_encode.get()
            if seq is None:
                return
            self._encode(seq)

    def _encode(self, seq: Request) -> None:
        """One request's images → embeddings (cache first), then to the scheduler; a failure ends this job only."""
        assert self._pair is not None
        cache = self._pair.cache
        if self._closing or seq.cancelled:
            self._hand_over(seq, cancelled=True)
            return
        try:
            for piece in seq.pieces:
                if isinstance(piece, ImagePiece) and piece.image.sha256 not in seq.embeddings:
                    embd, encoded, secs = cache.embeddings(piece.image)
                    seq.embeddings[piece.image.sha256] = embd
                    seq.timings.encode += secs
                    seq.images_encoded += encoded
                    seq.images_cached += not encoded
        except Exception as exc:  # an image the encoder rejects fails this job only
            seq.error = exc if isinstance(exc, LlavaError) else LlavaError(f"image encoding failed: {exc}")
            if seq.on_done:
                seq.on_done(seq)
            return
        self._hand_over(seq)

    def _room_to_encode(self) -> bool:
        """Without an encoder thread: a pending request is encoded once a slot is free for it (called under the
        lock), so encoding never delays sequences that could run and embeddings never pile up."""
        return bool(self._pending) and self._sched.free_slots() > len(self._sched.waiting) + len(self._ready)

    def _hand_over(self, seq: Request, *, cancelled: bool = False) -> None:
        """To the scheduler thread (a cancelled request is finished there too, so every job ends one way)."""
        with self._lock:
            seq.cancelled = seq.cancelled or cancelled
            self._ready.append(seq)
            self._lock.notify_all()

    def _run_loop(self) -> None:
        sched = self._sched
        while True:
            with self._lock:
                while not self._stopping and not self._ready and not sched.has_work() and not self._room_to_encode():
                    if any(q.cancelled for q in self._pending):
                        break
                    self._lock.wait()
                for seq in [q for q in self._pending if q.cancelled or self._stopping]:
                    self._pending.remove(seq)  # cancelled before its turn: finished by the scheduler at once
                    seq.cancelled = True
                    self._ready.append(seq)
                encode = self._pending.popleft() if self._room_to_encode() else None
                for seq in self._ready:
                    sched.add(seq)
                self._ready.clear()
                stopping = self._stopping
            if stopping:
                sched.cancel_all()
                return
            if encode is not None:
                self._encode(encode)  # hands the request over to _ready for the next turn
                continue
            try:
                sched.step()
            except BaseException as exc:  # a bug, not a request's fault: fail everything in flight, keep serving
                for seq in list(sched.waiting) + sched.active:
                    sched.abort(seq, LlavaError(f"internal error in the scheduler: {exc!r}"))
