"""What the server needs from a runtime: ``submit(messages, ...) -> Job``, a Job to iterate, wait for and cancel.

This is the contract ``llava_cli.runtime.Runtime`` (the multi-sequence scheduler) satisfies. The server imports
nothing else from the runtime but its message types, so tests and other backends can stand in for it;
`llava_cli.server.host.load_runtime` is the one place that builds the real one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from llava_cli.runtime import Answer, Message


class Job(Protocol):
    def __iter__(self) -> Iterator[str]:
        """Text pieces as they are generated (blocking); ends when the job is done (finished, failed, cancelled)."""
        ...

    def result(self, timeout: float | None = None) -> Answer:
        """Block until done; the `Answer`, or the job's error (a `LlavaError`) raised again."""
        ...

    def cancel(self) -> None:
        """Stop at the next step and free the sequence; finish_reason "cancelled"."""
        ...

    @property
    def done(self) -> bool: ...


class Runtime(Protocol):
    n_parallel: int  # sequences decoded at once
    n_ctx: int  # context per sequence

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
    ) -> Job:
        """Queue a request (thread-safe). May raise ContextOverflowError / UsageError at once."""
        ...

    def close(self) -> None: ...
