"""`SerialRuntime`: the server's `Runtime` interface over today's single-conversation `Engine`, one request at a
time, in a worker thread that owns the engine, with a FIFO queue in front of it.

It stands in until ``llava_cli.runtime.Runtime`` (many sequences in one batch) lands, and gives the same
observable behaviour for one sequence: pieces streamed as generated, ``stop`` strings (cut before the stop string,
which is never returned), ``cancel()`` (the answer stops at the next token), and prefix reuse when a request
continues the conversation the engine holds (same system prompt, same turns, same image bytes, same answers: the
OpenAI client re-sends the whole history each turn). Any other history is replayed from the start.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from llava_cli.engine import Answer, Conversation, Engine, Message, Timings
from llava_cli.errors import ContextOverflowError, UsageError

_END = object()


class SerialJob:
    def __init__(self, request: _Request) -> None:
        self.request = request
        self._pieces: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._finished = threading.Event()
        self._cancelled = threading.Event()
        self._answer: Answer | None = None
        self._error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._pieces.get()
            if item is _END:
                self._pieces.put(_END)  # a second iteration ends at once too
                return
            yield item

    def result(self, timeout: float | None = None) -> Answer:
        if not self._finished.wait(timeout):
            raise TimeoutError("the job is still running")
        if self._error is not None:
            raise self._error
        assert self._answer is not None
        return self._answer

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # -- worker side

    def _emit(self, text: str) -> None:
        if text:
            self._pieces.put(text)

    def _finish(self, answer: Answer | None, error: BaseException | None = None) -> None:
        self._answer, self._error = answer, error
        self._finished.set()
        self._pieces.put(_END)


@dataclass
class _Request:
    messages: list[Message]
    system: str | None
    generate: dict[str, Any]
    stop: list[str] = field(default_factory=list)


class StopMatcher:
    """Cut generated text before the first stop string, holding back a tail that may be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hit = False
        self._held = ""

    def feed(self, piece: str) -> str:
        """The text that is safe to emit now."""
        if not self.stops:
            return piece
        text = self._held + piece
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.hit = True
            self._held = ""
            return text[: min(cuts)]
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:k]):
                    keep = k
                    break
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out


class _Abort(Exception):
    """Raised from the token callback to end generation early (a stop string, or a cancel)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _same_turns(held: Sequence[Message], wanted: Sequence[Message]) -> bool:
    if len(held) != len(wanted):
        return False
    for a, b in zip(held, wanted, strict=True):
        if a.role != b.role or a.text.strip() != b.text.strip():
            return False
        if [im.sha256 for im in a.images] != [im.sha256 for im in b.images]:
            return False
    return True


class SerialRuntime:
    """One `Engine`, one request at a time. Owns the engine (closes it)."""

    n_parallel = 1

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.n_ctx: int = engine.n_ctx
        self.text_path = engine.text_path
        self.mmproj_path = engine.mmproj_path
        self._queue: queue.Queue[SerialJob | None] = queue.Queue()
        self._current: SerialJob | None = None
        self._closed = False
        self._lock = threading.Lock()
        # The conversation whose tokens are in the engine's KV cache (None when unknown, e.g. after an abort).
        self._held: Conversation | None = None
        self._worker = threading.Thread(target=self._run, name="llava-serial-runtime", daemon=True)
        self._worker.start()

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
    ) -> SerialJob:
        if not messages or messages[-1].role != "user":
            raise UsageError("the last message must be a user message")
        generate = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed}
        job = SerialJob(_Request(list(messages), system, generate, list(stop)))
        with self._lock:
            if self._closed:
                raise UsageError("the runtime is closed")
            self._queue.put(job)
        return job

    def close(self) -> None:
        """Cancel what is queued or running, stop the worker, free the engine."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job._finish(_cancelled_answer())
        if self._current is not None:
            self._current.cancel()
        self._queue.put(None)
        self._worker.join()
        self.engine.close()

    def __enter__(self) -> SerialRuntime:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- worker

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled:
                job._finish(_cancelled_answer())
                continue
            self._current = job
            try:
                job._finish(self._answer(job))
            except BaseException as exc:  # handed to the caller through result()
                job._finish(None, exc)
            finally:
                self._current = None

    def _conversation(self, req: _Request) -> tuple[Conversation, bool]:
        """The held conversation when `req` continues it (its KV prefix is reused), else a fresh one."""
        system = req.system.strip() if req.system and req.system.strip() else None
        history = req.messages[:-1]
        held = self._held
        if held is not None and held.system == system and _same_turns(held.messages, history):
            return held, True
        return self.engine.chat(system=system, history=history), False

    def _answer(self, job: SerialJob) -> Answer:
        req = job.request
        conv, reused = self._conversation(req)
        cached_before = conv.n_past if reused else 0
        last = req.messages[-1]
        stopper = StopMatcher(req.stop)
        emitted: list[str] = []

        def on_token(piece: str) -> None:
            if job.cancelled:
                raise _Abort("cancelled")
            safe = stopper.feed(piece)
            emitted.append(safe)
            job._emit(safe)
            if stopper.hit:
                raise _Abort("stop")

        try:
            answer = conv.ask(last.text, last.images, on_token=on_token, **req.generate)
        except _Abort as abort:
            self._held = None  # the engine dropped its KV ownership on the exception: next time, replay
            return _aborted_answer(conv, abort.reason, cached_before, "".join(emitted))
        except ContextOverflowError:
            raise  # raised before anything was evaluated: the KV cache still holds what it held
        except BaseException:
            self._held = None
            raise
        job._emit(stopper.flush())
        self._held = conv
        return answer


def _cancelled_answer() -> Answer:
    return Answer(
        text="",
        tokens=[],
        finish_reason=cast(Any, "cancelled"),
        prompt_tokens=0,
        cached_tokens=0,
        completion_tokens=0,
        images_encoded=0,
        images_cached=0,
        timings=Timings(),
    )


def _aborted_answer(conv: Conversation, reason: str, cached: int, text: str) -> Answer:
    """The Answer of a turn ended from the token callback (`text`: what was emitted, never a stop string). The
    last sampled token was never decoded, so the conversation's positions are the prompt plus all but one
    generated token."""
    tokens = list(conv.messages[-1].tokens or [])
    prompt_total = conv.n_tokens - max(0, len(tokens) - 1)
    return Answer(
        text=text.strip(),
        tokens=tokens,
        finish_reason=cast(Any, reason),
        prompt_tokens=prompt_total - cached,
        cached_tokens=cached,
        completion_tokens=len(tokens),
        images_encoded=0,
        images_cached=0,
        timings=Timings(),
    )
