"""`Conversation`: a chat on an `Engine`. Each turn sends the whole history to the engine's one sequence slot; the
slot's KV cache still holds the previous turns, so only the new tokens are evaluated (prefix reuse), and a
conversation that lost the cache to another one is re-evaluated exactly (answers are kept as token ids)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from llava_cli.images import LoadedImage, load_image
from llava_cli.runtime.messages import Answer, Message, Timings
from llava_cli.runtime.prompt import (
    Piece,
    check_roles,
    message_segments,
    n_positions,
    overflow,
    pieces_of,
)
from llava_cli.runtime.scheduler import Sampling

if TYPE_CHECKING:
    from llava_cli.runtime.engine import Engine, ImageInput, TokenCallback


class Conversation:
    """A chat with one engine. A turn evaluates only what is new; images already seen are not encoded again."""

    def __init__(self, engine: Engine, *, system: str | None = None, history: Sequence[Message] = ()) -> None:
        self.engine = engine
        self.system = system.strip() if system and system.strip() else None
        self.messages: list[Message] = []
        self._pieces: list[list[Piece]] = []  # per message, tokenized once
        check_roles(history, ends_with_user=False)
        for m in history:
            if m.role == "assistant" and m.tokens is None:
                # Text only (e.g. a chat loaded from JSON): tokenize it as the template puts it, " " + answer.
                tokens = engine.tokenizer.text(" " + m.text.strip(), start=False)
                m = Message("assistant", m.text, tokens=list(tokens))
            self._append(m)

    def _append(self, m: Message) -> None:
        self.messages.append(m)
        segs = message_segments(self.messages, len(self.messages) - 1, self.system)
        self._pieces.append(pieces_of(self.engine.tokenizer, segs, m.images, self.engine.n_image_tokens))

    @property
    def n_tokens(self) -> int:
        """Positions the conversation occupies in the context (text tokens + image positions)."""
        return sum(n_positions(p) for p in self._pieces)

    def clear(self) -> None:
        """Forget the conversation (the system prompt stays). The image cache is kept."""
        self.messages.clear()
        self._pieces.clear()

    def to_dict(self) -> dict[str, Any]:
        return {"system": self.system, "messages": [m.to_dict() for m in self.messages]}

    def ask(
        self,
        prompt: str,
        images: Iterable[ImageInput] = (),
        *,
        max_tokens: int = 512,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        on_token: TokenCallback | None = None,
    ) -> Answer:
        """Add a user turn (text + images), generate the answer, stream it through ``on_token``. ``stop``: strings
        that end the answer (not included); ``ignore_eos``: never sample end-of-generation (exactly ``max_tokens``
        tokens, for benchmarks)."""
        eng = self.engine
        eng._live()
        t_start = time.perf_counter()
        timings = Timings()
        notes: list[str] = []
        loaded: list[LoadedImage] = []
        for im in images:
            li = im if isinstance(im, LoadedImage) else load_image(im)
            notes.extend(li.notes)
            loaded.append(li)
        timings.load_images = time.perf_counter() - t_start

        if self.messages and self.messages[-1].role == "user":
            # The previous turn never got its answer (interrupted before the first token): replace it.
            self.messages.pop()
            self._pieces.pop()
        user = Message("user", prompt.strip(), images=loaded)
        history = self.n_tokens
        self._append(user)
        pieces = [p for ps in self._pieces for p in ps]
        needed = n_positions(pieces) + 1  # +1: room for at least one generated token
        if needed > eng.n_ctx:
            self.messages.pop()
            self._pieces.pop()
            raise overflow(needed, eng.n_ctx, n_images=len(loaded), n_image_tokens=eng.n_image_tokens, history=history)
        sampling = Sampling(max_tokens, temperature, top_p, top_k, seed, tuple(s for s in stop if s), ignore_eos)
        answer = eng._run(
            pieces,
            sampling,
            t_start=t_start,
            timings=timings,
            notes=notes,
            on_token=on_token,
            on_abort=self._keep_partial,
        )
        self._append(Message("assistant", answer.text, tokens=list(answer.tokens)))
        return answer

    def _keep_partial(self, tokens: list[int]) -> None:
        """An interrupted answer stays in the history as far as it got (what the chat showed)."""
        if tokens:
            text = b"".join(self.engine.token_bytes(t) for t in tokens).decode("utf-8", "replace").strip()
            self._append(Message("assistant", text, tokens=tokens))
