"""From a runtime `Job` (a blocking iterator, in the runtime's threads) to the event loop, and to Server-Sent Events.

`JobEvents` pumps a job's pieces and its final `Answer` (or error) from one thread into an asyncio queue, so that
request handlers never block the loop and a disconnected client can cancel the job. `TextTail` keeps the streamed
text identical to the non-streamed answer (which is stripped). `sse` formats one event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llava_cli.runtime import Answer
from llava_cli.server.protocol import Job


@dataclass(frozen=True)
class Finished:
    answer: Answer


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = str | Finished | Failed


class JobEvents:
    """The events of `job` as awaitables: text pieces, then one `Finished` or `Failed`.

    ``on_end`` runs (in the pump thread) once the job is over whatever happened to the client: that is where the
    server gives the slot back.
    """

    def __init__(self, job: Job, on_end: Callable[[], None] = lambda: None) -> None:
        self.job = job
        self.over = False
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._on_end = on_end
        threading.Thread(target=self._pump, name="llava-job-pump", daemon=True).start()

    def _put(self, item: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (server stopped): nobody is listening
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _pump(self) -> None:
        try:
            for piece in self.job:
                self._put(piece)
            try:
                self._put(Finished(self.job.result()))
            except BaseException as exc:  # handed to the request handler
                self._put(Failed(exc))
        finally:
            self._on_end()

    async def next(self, timeout: float | None = None) -> Event:
        """The next event; `TimeoutError` after `timeout` seconds without one."""
        item = await asyncio.wait_for(self._queue.get(), timeout)
        if not isinstance(item, str):
            self.over = True
        return item

    def cancel(self) -> None:
        if not self.over:
            self.job.cancel()


class TextTail:
    """Streamed pieces -> the same text as the stripped final answer: leading whitespace dropped, trailing
    whitespace held back until something follows it (so a stream that ends on a newline does not send it)."""

    def __init__(self) -> None:
        self._started = False
        self._held = ""

    def feed(self, piece: str) -> str:
        if not self._started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self._started = True
        text = self._held + piece
        body = text.rstrip()
        self._held = text[len(body) :]
        return body


def sse(data: dict[str, Any] | str) -> bytes:
    """One Server-Sent Event: ``data: <json>`` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
