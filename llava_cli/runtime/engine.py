"""`Engine`: one GGUF pair for one caller at a time — `llava run`, `llava chat`, the sequential caption path and
Python scripts. It drives the sequence scheduler synchronously with a single slot, so a chat's next turn reuses the
KV cache of the previous one (only the new tokens are evaluated) and images are encoded once per process.

Python use::

    from llava_cli.runtime import Engine

    with Engine("model.q4_k_m.gguf", "mmproj-model.f16.gguf", n_ctx=4096) as engine:
        print(engine.ask("What is in this picture?", images=["cat.jpg"], temperature=0).text)
        chat = engine.chat()
        chat.ask("Describe it.", images=["cat.jpg"], on_token=lambda s: print(s, end=""))
        chat.ask("What colour is it?")          # only the new tokens are evaluated

For many requests at once (a server, parallel captioning) use `llava_cli.runtime.Runtime`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from llava_cli.errors import UsageError
from llava_cli.images import LoadedImage
from llava_cli.memory.buffers import N_BATCH
from llava_cli.preprocess import ImageFit
from llava_cli.runtime.conversation import Conversation
from llava_cli.runtime.llamacpp import GpuLayers
from llava_cli.runtime.messages import Answer, EngineStats, Message, Timings
from llava_cli.runtime.pair import ModelPair
from llava_cli.runtime.prompt import ImagePiece, Piece
from llava_cli.runtime.scheduler import Request, Sampling

ImageInput = str | os.PathLike[str] | bytes | LoadedImage
TokenCallback = Callable[[str], None]


class Engine:
    """A loaded GGUF pair with one sequence slot; images cached by content hash.

    Args mirror the CLI flags: ``n_ctx`` (--ctx), ``n_threads`` (--threads), ``n_gpu_layers`` (--n-gpu-layers:
    an int, "auto" or "all"), ``mmproj_offload`` (not --no-mmproj-offload). ``n_batch``/``n_ubatch``/``flash_attn``
    are llama.cpp's prefill knobs (see docs/runtime.md for measured effects).
    """

    def __init__(
        self,
        text_path: str | os.PathLike[str],
        mmproj_path: str | os.PathLike[str],
        *,
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
        verbose: bool = False,
        on_note: Callable[[str], None] | None = None,
    ) -> None:
        self._pair: ModelPair | None = None
        self._pair = ModelPair(
            text_path,
            mmproj_path,
            n_seq=1,
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
            prefill_chunk=n_batch,  # one sequence: nobody to interleave with
            kv_unified=True,
            verbose=verbose,
            on_note=on_note,
        )
        p = self._pair
        self.text_path: Path = p.text_path
        self.mmproj_path: Path = p.mmproj_path
        self.text_info = p.text_info
        self.mmproj_info = p.mmproj_info
        self.n_ctx = n_ctx
        self.n_threads = p.n_threads
        self.n_threads_batch = p.n_threads_batch
        self.n_gpu_layers = p.n_gpu_layers
        self.mmproj_offload = p.mmproj_offload
        self.offload_reason = p.offload_reason
        self.notes = p.notes
        self.n_image_tokens = p.n_image_tokens
        self.tokenizer = p.tokenizer
        self.n_batch = p.n_batch
        self.n_ubatch = p.n_ubatch
        self._stats = EngineStats()

    # -- lifetime

    def close(self) -> None:
        """Free the llama.cpp objects (also done on garbage collection)."""
        if self._pair is not None:
            self._pair.close()
            self._pair = None

    @property
    def closed(self) -> bool:
        return self._pair is None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: modules may be gone already
            self.close()

    # -- public API

    def chat(self, *, system: str | None = None, history: Sequence[Message] = ()) -> Conversation:
        """A new conversation; ``history`` (e.g. from another conversation's ``messages``) is evaluated with the next
        turn (what the KV cache already holds of it is reused)."""
        return Conversation(self, system=system, history=history)

    def ask(
        self,
        prompt: str,
        images: Iterable[ImageInput] = (),
        *,
        system: str | None = None,
        **generate: Any,
    ) -> Answer:
        """One question in a fresh conversation. The model, the image cache and whatever prefix of the prompt the
        KV cache holds (e.g. the same image asked about again) are reused."""
        return self.chat(system=system).ask(prompt, images, **generate)

    @property
    def stats(self) -> EngineStats:
        p = self._live()
        st = p.scheduler.stats
        self._stats.images_encoded = p.cache.encoded
        self._stats.image_cache_hits = p.cache.hits
        self._stats.tokens_evaluated = st.tokens_evaluated
        self._stats.kv_resets = st.kv_resets
        return self._stats

    @property
    def image_cache_size(self) -> int:
        """Images whose embeddings are cached."""
        return len(self._live().cache)

    def clear_kv(self) -> None:
        """Drop the KV cache: the next question evaluates its whole prompt (images stay cached)."""
        self._live().scheduler.clear_kv()

    def clear_image_cache(self) -> None:
        self._live().cache.clear()

    @property
    def kv_bytes_per_slot(self) -> int:
        return self._live().kv_bytes_per_slot

    def token_bytes(self, token: int) -> bytes:
        text = self._live().text
        assert text is not None
        return text.token_bytes(token)

    # -- used by Conversation

    def _live(self) -> ModelPair:
        if self._pair is None:
            raise UsageError("this engine is closed", hint="create a new Engine")
        return self._pair

    def _run(
        self,
        pieces: list[Piece],
        sampling: Sampling,
        *,
        t_start: float,
        timings: Timings,
        notes: list[str],
        on_token: TokenCallback | None,
        on_abort: Callable[[list[int]], None] | None = None,
    ) -> Answer:
        """Encode the images of `pieces` (cache first), then run the sequence to its end on the scheduler."""
        p = self._live()
        embeddings = {}
        encoded = cached = 0
        for piece in pieces:
            if isinstance(piece, ImagePiece) and piece.image.sha256 not in embeddings:
                embd, was_encoded, secs = p.cache.embeddings(piece.image)
                embeddings[piece.image.sha256] = embd
                timings.encode += secs
                encoded += was_encoded
                cached += not was_encoded
        seq = Request(pieces, embeddings, sampling, t_start=t_start, timings=timings, on_text=on_token)
        seq.images_encoded, seq.images_cached, seq.notes = encoded, cached, notes
        sched = p.scheduler
        sched.add(seq)
        try:
            while not seq.done:
                if not sched.step():
                    raise RuntimeError("the scheduler stopped with a sequence unfinished")
        except BaseException as exc:
            # Interrupted mid-step (Ctrl-C) or failed: the slot's cache is uncertain, so it is dropped; the next
            # turn re-evaluates the history, which is intact.
            sched.abort(seq, exc)
            if on_abort:
                on_abort(list(seq.tokens))
            raise
        if seq.error is not None:
            raise seq.error
        assert seq.answer is not None
        return seq.answer
