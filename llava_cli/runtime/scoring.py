"""Teacher-forced next-token logits through the runtime's own pieces, for the quality table (llava_cli/quality.py).

A `Scorer` loads a GGUF pair as `ModelPair` (one sequence slot, CPU, the engine's defaults otherwise), builds the
one-turn prompt exactly as `Engine.ask` does (``llava_cli/prompts.py`` segments, tokenized by our `Tokenizer`, the
image encoded by our ggml vision graph through the pair's image cache), and feeds it in the batches the scheduler
would make for a lone sequence: each step a token batch (text runs, up to ``n_batch`` rows) and then an embedding
batch (one image's rows, within what is left of the step's budget). The answer is then fed one token per decode,
as generation does, and the logits row of each answer position is read (``llama_get_logits_ith``).

It does not go through `Scheduler` itself because the scheduler samples and never hands out logits; the test
``tests/test_quantize.py::test_scorer_greedy_answer_is_the_engines`` holds the two paths to the same tokens.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Sequence

import numpy as np

from llava_cli.images import LoadedImage, load_image
from llava_cli.memory.buffers import N_BATCH
from llava_cli.preprocess import ImageFit
from llava_cli.runtime.llamacpp import Batch
from llava_cli.runtime.messages import Message
from llava_cli.runtime.pair import ModelPair
from llava_cli.runtime.prompt import ImagePiece, build_pieces, n_positions, overflow


class Scorer:
    """A GGUF pair loaded like the engine loads it, giving the next-token logits over an answer."""

    def __init__(
        self,
        text_path: str | os.PathLike[str],
        mmproj_path: str | os.PathLike[str],
        *,
        n_ctx: int = 1024,
        n_threads: int | None = None,
        n_batch: int = N_BATCH,
        n_ubatch: int | None = None,
        flash_attn: bool | None = None,
        image_fit: ImageFit = "pad",
        verbose: bool = False,
    ) -> None:
        # The engine's defaults (Engine.__init__), on the CPU: the table compares files, not placements.
        self.pair = ModelPair(
            text_path,
            mmproj_path,
            n_seq=1,
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=None,
            n_gpu_layers=0,
            mmproj_offload=False,
            n_batch=n_batch,
            n_ubatch=n_ubatch,
            flash_attn=flash_attn,
            image_fit=image_fit,
            image_cache_mb=64,
            prefill_chunk=n_batch,
            kv_unified=True,
            verbose=verbose,
            on_note=lambda msg: None,  # CPU only: no placement notes to show
        )
        assert self.pair.text is not None
        self.text = self.pair.text
        self.n_vocab = self.text.n_vocab
        self._tok = Batch(self.pair.n_batch)
        self._embd = Batch(self.pair.n_batch, self.text.n_embd_inp)

    def close(self) -> None:
        self.pair.close()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: modules may be gone already
            self.close()

    def answer_logits(
        self, image: bytes | LoadedImage, prompt: str, answer: Sequence[int] | None, n_answer: int
    ) -> tuple[list[int], np.ndarray]:
        """The answer's tokens and the logits predicting each of them, (n_answer, n_vocab) float32.

        With ``answer=None`` the answer is the greedy one (argmax, as ``--temperature 0``), `n_answer` tokens long
        whatever they are (end-of-sequence included: a fixed number of positions to compare)."""
        p = self.pair
        loaded = image if isinstance(image, LoadedImage) else load_image(image)
        user = Message("user", prompt.strip(), images=[loaded])
        pieces = build_pieces(p.tokenizer, [user], system=None, n_image_tokens=p.n_image_tokens)
        needed = n_positions(pieces) + n_answer
        if needed > p.n_ctx:
            raise overflow(needed, p.n_ctx, n_images=1, n_image_tokens=p.n_image_tokens)
        embd, _, _ = p.cache.embeddings(loaded)

        self.text.clear()
        row = self._prefill([np.asarray(pc, np.int32) if not isinstance(pc, ImagePiece) else embd for pc in pieces])
        n_past = n_positions(pieces)
        tokens: list[int] = []
        rows = []
        for k in range(n_answer):
            rows.append(row)
            tok = int(answer[k]) if answer is not None else int(np.argmax(row))
            tokens.append(tok)
            if k == n_answer - 1:
                break
            tb = self._tok
            tb.clear()
            idx = tb.add_tokens(0, [tok], n_past, True)
            self.text.decode(tb.view())
            n_past += 1
            row = self.text.logits(idx)
        return tokens, np.stack(rows)

    def _prefill(self, parts: list[np.ndarray]) -> np.ndarray:
        """Feed the prompt (1-D token ids or 2-D image rows) as the scheduler batches a lone sequence; return the
        logits of its last position."""
        segs = deque(parts)
        offset = pos = 0
        n_batch = self.pair.n_batch
        last_row: np.ndarray | None = None
        tb_last = -1  # batch index of the prompt's last text row, when it ends in text

        def take(budget: int) -> tuple[np.ndarray, bool]:
            nonlocal offset, pos
            seg = segs[0]
            k = min(budget, len(seg) - offset)
            part = seg[offset : offset + k]
            offset += k
            pos += k
            if offset == len(seg):
                segs.popleft()
                offset = 0
            return part, not segs

        while segs:
            budget = n_batch
            tb = self._tok
            tb.clear()
            while budget > 0 and segs and segs[0].ndim == 1:
                p0 = pos
                ids, last = take(budget)
                idx = tb.add_tokens(0, ids, p0, last)
                budget -= len(ids)
                if last:
                    tb_last = idx
            if tb.n:
                self.text.decode(tb.view())
                if not segs:
                    last_row = self.text.logits(tb_last)
            if budget > 0 and segs and segs[0].ndim == 2:
                eb = self._embd
                eb.clear()
                p0 = pos
                rows, last = take(budget)
                eb.add_embd(0, rows, p0)
                if last:
                    eb.logits[eb.n - 1] = 1
                self.text.decode(eb.view())
                if last:
                    last_row = self.text.logits(eb.n - 1)
        assert last_row is not None
        return last_row
