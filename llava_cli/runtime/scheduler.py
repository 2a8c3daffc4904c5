"""The sequence scheduler: ``n_seq`` slots on one llama context, advanced together.

Each `step()`:

1. drops cancelled sequences (their KV cells are freed with ``llama_memory_seq_rm``) and admits waiting requests
   into free slots, reusing the longest prefix of their prompt found in the KV cache (see `_admit`);
2. builds ONE token batch: the next token of every generating sequence (logits for those rows only), plus chunks
   of text prompt from sequences still prefilling, up to a per-step budget (``prefill_chunk`` rows while others
   are generating, so a long prompt never stalls them for more than one chunk); one ``llama_decode``;
3. samples each row that asked for logits with that sequence's own sampler chain (``llama_sampler_sample`` with the
   row's batch index), and applies its stops (end of generation, ``max_tokens``, context end, stop strings);
4. prefills image embeddings the same way, as an embedding batch (llama.cpp takes either token ids or embeddings in
   one batch, never both), within what is left of the budget.

A finished sequence leaves its KV in its slot: the next request whose prompt starts the same way (a chat's next
turn, a client re-sending its history) reuses it. A cancelled or failed one is removed at once. The scheduler is
single-threaded; `Runtime` runs it on its own thread, `Engine` drives it synchronously.
"""

from __future__ import annotations

import codecs
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llava_cli.errors import LlavaError
from llava_cli.runtime.llamacpp import Batch, TextModel
from llava_cli.runtime.messages import Answer, FinishReason, Timings
from llava_cli.runtime.prompt import ImagePiece, Piece, common_prefix, keys_of


@dataclass
class Sampling:
    max_tokens: int = 512
    temperature: float = 0.2
    top_p: float = 0.95
    top_k: int = 40
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # forced-length generation (benchmarks): end-of-generation tokens are never sampled


@dataclass
class _Segment:
    """A run of prompt rows to prefill: token ids, or one image's embeddings."""

    tokens: np.ndarray | None = None
    embd: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tokens) if self.tokens is not None else len(self.embd)  # type: ignore[arg-type]


class Request:
    """One request in flight: its prompt, sampler, generated tokens and text, and where it stands."""

    _ids = itertools.count()

    def __init__(
        self,
        pieces: Sequence[Piece],
        embeddings: dict[str, np.ndarray],
        sampling: Sampling,
        *,
        t_start: float,
        timings: Timings | None = None,
        on_text: Callable[[str], None] | None = None,
        on_done: Callable[[Request], None] | None = None,
    ) -> None:
        self.id = next(self._ids)
        self.pieces = list(pieces)
        self.keys = keys_of(pieces)
        self.embeddings = embeddings
        self.sampling = sampling
        self.t_start = t_start
        self.timings = timings or Timings()
        self.on_text = on_text
        self.on_done = on_done
        self.cancelled = False
        self.images_encoded = 0
        self.images_cached = 0
        self.notes: list[str] = []
        # state, set by the scheduler
        self.slot: _Slot | None = None
        self.n_past = 0
        self.cached = 0
        self.segments: deque[_Segment] = deque()
        self.offset = 0  # rows of segments[0] already fed
        self.pending: int | None = None  # sampled, to be decoded at the next step
        self.sampler: Any = None
        self.tokens: list[int] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""
        self._emitted = 0
        self._started = False
        self._stopped = False  # a stop string ended the text
        self.finish: FinishReason | None = None
        self.error: BaseException | None = None
        self.answer: Answer | None = None
        self.t_ready = t_start
        self.t_first = 0.0

    @property
    def n_prompt(self) -> int:
        return len(self.keys)

    @property
    def prefilling(self) -> bool:
        return bool(self.segments)

    @property
    def done(self) -> bool:
        return self.finish is not None or self.error is not None

    # -- text and stops

    def _hold_back(self) -> int:
        """Characters at the end of the text that could be the start of a stop string (not shown yet)."""
        best = 0
        for s in self.sampling.stop:
            for k in range(min(len(s) - 1, len(self._text)), best, -1):
                if self._text.endswith(s[:k]):
                    best = k
                    break
        return best

    def add_text(self, piece: str) -> bool:
        """Append generated text; True when a stop string appeared (the text is cut before it)."""
        if not self._started:
            piece = piece.lstrip()  # the first piece carries the space that follows "ASSISTANT:"
            self._started = bool(piece)
        self._text += piece
        stop_at = -1
        for s in self.sampling.stop:
            i = self._text.find(s, max(0, self._emitted - len(s)))
            if i >= 0 and (stop_at < 0 or i < stop_at):
                stop_at = i
        if stop_at >= 0:
            self._text = self._text[:stop_at]
            self._stopped = True
            self._emit(len(self._text))
            return True
        self._emit(len(self._text) - self._hold_back())
        return False

    def _emit(self, upto: int) -> None:
        if upto > self._emitted:
            chunk = self._text[self._emitted : upto]
            self._emitted = upto
            if self.on_text:
                self.on_text(chunk)

    def flush_text(self) -> None:
        if not self._stopped:
            tail = self._decoder.decode(b"", final=True)
            if tail and self.add_text(tail):
                return
        self._emit(len(self._text))

    @property
    def text(self) -> str:
        return self._text.strip()


@dataclass
class _Slot:
    id: int
    content: list[int] = field(default_factory=list)  # position keys of what the KV cache holds for this sequence
    seq: Request | None = None
    last_used: int = 0

    def keys(self) -> np.ndarray:
        return np.asarray(self.content, np.int64)


@dataclass
class SchedulerStats:
    steps: int = 0  # scheduler steps that decoded something
    decode_calls: int = 0  # llama_decode calls (token and embedding batches)
    tokens_evaluated: int = 0  # prompt positions fed (text + image rows)
    tokens_generated: int = 0
    reused_positions: int = 0  # prompt positions taken from the KV cache instead
    kv_resets: int = 0  # admissions that reused nothing
    prefix_copies: int = 0  # prefixes copied from a busy slot (llama_memory_seq_cp)
    max_batch_rows: int = 0
    step_log: list[tuple[int, int, int]] = field(default_factory=list)  # (generating rows, prefill rows, embd rows)
    keep_step_log: bool = False


class Scheduler:
    def __init__(
        self,
        model: TextModel,
        *,
        n_seq: int,
        n_ctx: int,
        n_batch: int,
        prefill_chunk: int = 256,
    ) -> None:
        self.model = model
        self.n_ctx = n_ctx  # positions per sequence
        self.n_batch = n_batch
        self.prefill_chunk = max(1, min(prefill_chunk, n_batch))
        self.slots = [_Slot(i) for i in range(n_seq)]
        self.waiting: deque[Request] = deque()
        self.stats = SchedulerStats()
        self._tok = Batch(n_batch)
        self._embd: Batch | None = None  # allocated with the first image
        self._clock = itertools.count(1)

    # -- queue

    def add(self, seq: Request) -> None:
        seq.t_ready = time.perf_counter()
        self.waiting.append(seq)

    @property
    def active(self) -> list[Request]:
        return [s.seq for s in self.slots if s.seq is not None]

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s.seq is not None for s in self.slots)

    def free_slots(self) -> int:
        return sum(1 for s in self.slots if s.seq is None)

    # -- one step

    def step(self) -> bool:
        """Advance every sequence by one step. False when there was nothing to do."""
        self._reap()
        self._admit()
        active = [s.seq for s in self.slots if s.seq is not None]
        if not active:
            return False
        t0 = time.perf_counter()
        gen = [s for s in active if s.pending is not None]
        pre = sorted((s for s in active if s.prefilling), key=lambda s: s.t_ready)
        budget = self.prefill_chunk if gen else self.n_batch
        budget = min(budget, self.n_batch - len(gen))

        tb = self._tok
        tb.clear()
        rows: list[tuple[Request, int]] = []
        for s in gen:
            assert s.slot is not None and s.pending is not None
            idx = tb.add_tokens(s.slot.id, [s.pending], s.n_past, True)
            rows.append((s, idx))
            s.slot.content.append(s.pending)
            s.n_past += 1
            s.pending = None
        n_gen = len(rows)
        prefilled: list[Request] = []
        n_text = 0
        for s in pre:
            while budget > 0 and s.segments and s.segments[0].tokens is not None:
                take, last = self._take(s, budget)
                ids = s.segments[0].tokens[s.offset : s.offset + take]
                idx = tb.add_tokens(s.slot.id, ids, s.n_past, last)  # type: ignore[union-attr]
                if last:
                    rows.append((s, idx))
                self._advance(s, take)
                budget -= take
                n_text += take
                if s not in prefilled:
                    prefilled.append(s)
        if tb.n:
            self._decode(tb, [s for s, _ in rows] + prefilled)
            self._sample(rows)

        n_embd = 0
        embd_rows: list[tuple[Request, int]] = []
        if budget > 0 and any(s.segments and s.segments[0].embd is not None for s in pre):
            eb = self._embd_batch()
            eb.clear()
            for s in pre:
                if budget <= 0:
                    break
                if s.done or not (s.segments and s.segments[0].embd is not None):
                    continue
                take, last = self._take(s, budget)
                seg = s.segments[0]
                assert seg.embd is not None and s.slot is not None
                eb.add_embd(s.slot.id, seg.embd[s.offset : s.offset + take], s.n_past)
                if last:
                    eb.logits[eb.n - 1] = 1
                    embd_rows.append((s, eb.n - 1))
                self._advance(s, take)
                budget -= take
                n_embd += take
                if s not in prefilled:
                    prefilled.append(s)
            if eb.n:
                self._decode(eb, prefilled)
                self._sample(embd_rows)

        dt = time.perf_counter() - t0
        for s in prefilled:
            s.timings.prefill += dt
        st = self.stats
        st.steps += 1
        st.tokens_evaluated += n_text + n_embd
        st.max_batch_rows = max(st.max_batch_rows, n_gen + n_text, n_embd)
        if st.keep_step_log:
            st.step_log.append((n_gen, n_text, n_embd))
        return True

    def _take(self, s: Request, budget: int) -> tuple[int, bool]:
        seg = s.segments[0]
        take = min(budget, len(seg) - s.offset)
        last = len(s.segments) == 1 and s.offset + take == len(seg)
        return take, last

    def _advance(self, s: Request, take: int) -> None:
        assert s.slot is not None
        s.slot.content.extend(s.keys[s.n_past : s.n_past + take].tolist())
        s.n_past += take
        s.offset += take
        if s.offset == len(s.segments[0]):
            s.segments.popleft()
            s.offset = 0

    def _embd_batch(self) -> Batch:
        if self._embd is None:
            self._embd = Batch(self.n_batch, self.model.n_embd_inp)
        return self._embd

    def _decode(self, batch: Batch, involved: list[Request]) -> None:
        self.stats.decode_calls += 1
        try:
            self.model.decode(batch.view())
        except LlavaError as exc:
            # The cache of every sequence in this batch is now uncertain: fail them, free their cells.
            for s in set(involved):
                if not s.done:
                    self._fail(s, exc)

    def _sample(self, rows: list[tuple[Request, int]]) -> None:
        for s, idx in rows:
            if s.done:
                continue
            tok = self.model.sample(s.sampler, idx)
            if not s.t_first:
                s.t_first = time.perf_counter()
                s.timings.ttft = s.t_first - s.t_start
            self._on_token(s, tok)

    def _on_token(self, s: Request, tok: int) -> None:
        sp = s.sampling
        if self.model.is_eog(tok) and not sp.ignore_eos:
            self._finish(s, "stop")
            return
        s.tokens.append(tok)
        self.stats.tokens_generated += 1
        if s.add_text(s._decoder.decode(self.model.token_bytes(tok))):
            self._finish(s, "stop")
        elif len(s.tokens) >= sp.max_tokens:
            self._finish(s, "length")
        elif s.n_past + 1 > self.n_ctx:
            self._finish(s, "context")
        else:
            s.pending = tok

    # -- admission and prefix reuse

    def _admit(self) -> None:
        while self.waiting:
            free = [s for s in self.slots if s.seq is None]
            if not free:
                return
            seq = self.waiting.popleft()
            if seq.cancelled:
                self._finish(seq, "cancelled")
                continue
            self._place(seq, free)

    def _place(self, seq: Request, free: list[_Slot]) -> None:
        """Put `seq` in a free slot, reusing the longest prefix of its prompt that some slot holds in its KV.

        A free slot's cells are taken as they are (only the part after the common prefix is removed). A prefix held
        by a busy slot is copied into the chosen free slot with ``llama_memory_seq_cp`` (with the unified KV cache
        the cells are shared, not duplicated). At least the last prompt token is always evaluated: its logits give
        the first answer token.
        """
        limit = seq.n_prompt - 1
        best_free, p_free = None, -1
        for slot in sorted(free, key=lambda s: s.last_used):  # ties: the least recently used slot
            p = min(common_prefix(slot.keys(), seq.keys), limit)
            if p > p_free:
                best_free, p_free = slot, p
        assert best_free is not None
        src, p_busy = None, 0
        for slot in self.slots:
            if slot.seq is not None:
                p = min(common_prefix(slot.keys(), seq.keys), limit)
                if p > p_busy:
                    src, p_busy = slot, p
        slot = best_free
        model = self.model
        if src is not None and p_busy > p_free:
            model.seq_rm(slot.id)
            model.seq_cp(src.id, slot.id, 0, p_busy)
            slot.content = src.content[:p_busy]
            prefix = p_busy
            self.stats.prefix_copies += 1
        else:
            prefix = max(p_free, 0)
            model.seq_rm(slot.id, prefix, -1)
            del slot.content[prefix:]
        if prefix == 0:
            self.stats.kv_resets += 1
        self.stats.reused_positions += prefix
        slot.seq = seq
        slot.last_used = next(self._clock)
        seq.slot = slot
        seq.n_past = seq.cached = prefix
        seq.timings.queued = time.perf_counter() - seq.t_ready
        seq.segments = deque(self._segments_from(seq, prefix))
        seq.offset = 0
        sp = seq.sampling
        ban = tuple(t for t in (model.eos_id,) if sp.ignore_eos)
        seq.sampler = model.sampler(sp.temperature, sp.top_p, sp.top_k, sp.seed, ban)

    def _segments_from(self, seq: Request, start: int) -> list[_Segment]:
        out: list[_Segment] = []
        pos = 0
        for p in seq.pieces:
            n = p.n_pos if isinstance(p, ImagePiece) else len(p)
            if pos + n > start:
                skip = max(0, start - pos)
                if isinstance(p, ImagePiece):
                    out.append(_Segment(embd=seq.embeddings[p.image.sha256][skip:]))
                else:
                    out.append(_Segment(tokens=np.asarray(p[skip:], np.int32)))
            pos += n
        return out

    # -- ending

    def _reap(self) -> None:
        for slot in self.slots:
            if slot.seq is not None and slot.seq.cancelled:
                self._finish(slot.seq, "cancelled")
        for seq in [s for s in self.waiting if s.cancelled]:  # not admitted yet: done at once, not when a slot frees
            self._finish(seq, "cancelled")

    def _release(self, s: Request, keep_kv: bool) -> None:
        if s.sampler is not None:
            self.model.free_sampler(s.sampler)
            s.sampler = None
        slot = s.slot
        if slot is not None:
            if not keep_kv:
                self.model.seq_rm(slot.id)
                slot.content.clear()
            slot.seq = None
            s.slot = None
        if s in self.waiting:
            self.waiting.remove(s)

    def _finish(self, s: Request, reason: FinishReason) -> None:
        s.finish = reason
        s.pending = None
        self._release(s, keep_kv=reason != "cancelled")
        s.flush_text()
        t_end = time.perf_counter()
        tm = s.timings
        if not s.t_first:
            tm.ttft = t_end - s.t_start
        tm.decode = max(0.0, t_end - s.t_first) if s.t_first else 0.0
        tm.n_decoded = max(0, len(s.tokens) - 1)
        tm.total = t_end - s.t_start
        s.answer = Answer(
            text=s.text,
            tokens=list(s.tokens),
            finish_reason=reason,
            prompt_tokens=s.n_prompt - s.cached,
            cached_tokens=s.cached,
            completion_tokens=len(s.tokens),
            images_encoded=s.images_encoded,
            images_cached=s.images_cached,
            timings=tm,
            notes=list(s.notes),
        )
        if s.on_done:
            s.on_done(s)

    def _fail(self, s: Request, exc: BaseException) -> None:
        s.error = exc
        s.pending = None
        self._release(s, keep_kv=False)
        if s.on_done:
            s.on_done(s)

    def abort(self, s: Request, exc: BaseException) -> None:
        """End `s` from outside a step (an interrupt in the caller): its KV cells are freed."""
        if not s.done:
            self._fail(s, exc)

    def clear_kv(self) -> None:
        """Forget every idle slot's cached prefix (the next requests evaluate their whole prompt)."""
        for slot in self.slots:
            if slot.seq is None:
                self.model.seq_rm(slot.id)
                slot.content.clear()

    def cancel_all(self) -> None:
        for s in list(self.waiting) + self.active:
            s.cancelled = True
        self._reap()
        while self.waiting:
            self._finish(self.waiting.popleft(), "cancelled")
