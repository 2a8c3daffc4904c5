"""llama.cpp through llama-cpp-python's low-level API: the log capture, backend init, tokenization, and the text
model with its one context (``n_seq_max`` sequences sharing a unified KV cache).

Why a unified KV cache (``kv_unified=True``) for several sequences: with one buffer per sequence, llama.cpp 0.3.36
splits a batch into "equal" micro-batches that only take consecutive sequence ids and the same number of tokens from
each, so a decode step with slots {0, 2} busy, or one that also carries a prefill chunk, becomes several graph
computations; and ``llama_memory_seq_cp`` between per-sequence buffers only copies whole buffers. With one unified
buffer any mix of sequences goes in one micro-batch, and copying a prefix to another sequence only tags the cells
(shared, not duplicated). The cost: attention spans the cells of all sequences, masked; the CPU flash-attention
kernel skips masked cells. The buffer holds ``n_ctx × n_seq`` cells, and the scheduler keeps each sequence within
``n_ctx`` positions, so it never runs out.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llava_cli.cpu_kernels import GPU_REINSTALL
from llava_cli.errors import LlavaError, ModelFileError, UsageError
from llava_cli.gguf_info import GGUFInfo, read_gguf
from llava_cli.prompts import Tokenizer

GpuLayers = int | Literal["auto", "all"]


# ------------------------------------------------------------------------------------------------ llama.cpp log
# llama.cpp, ggml and clip print to stderr by default. We route all three through one callback that keeps the last
# lines (so a failed load can be reported in one line) and prints them only when verbose.


class LogCapture:
    def __init__(self) -> None:
        self.lines: deque[str] = deque(maxlen=300)
        self.total = 0  # lines ever kept: a mark must stay valid after the deque starts dropping old lines
        self.verbose = False
        self._partial = ""
        self._lock = threading.Lock()
        self._installed = False
        self._callback: Any = None

    def install(self, verbose: bool) -> None:
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        self.verbose = verbose
        if self._installed:
            return

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: Any) -> None:
            s = text.decode("utf-8", "replace") if text else ""
            if self.verbose:
                sys.stderr.write(s)
            with self._lock:
                s = self._partial + s
                *done, self._partial = s.split("\n")
                kept = [line for line in done if line.strip()]
                self.lines.extend(kept)
                self.total += len(kept)

        self._callback = callback  # keep a reference: ctypes does not
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        mtmd.mtmd_log_set(callback, ctypes.c_void_p(0))
        mtmd.mtmd_helper_log_set(callback, ctypes.c_void_p(0))
        self._installed = True

    def mark(self) -> int:
        return self.total

    def reason(self, since: int = 0) -> str:
        """The most telling log line since `since`: the first error-looking one, else the last one."""
        new = self.total - since
        lines = list(self.lines)[-new:] if new > 0 else []
        if self._partial.strip():
            lines.append(self._partial)
        # The first error line is the specific one ("error loading model: <why>"); later ones are generic
        # ("failed to load model").
        for line in lines:
            low = line.lower()
            if any(w in low for w in ("error", "failed", "invalid", "wrong", "cannot", "unable", "not supported")):
                return line.strip()
        return lines[-1].strip() if lines else "no message from llama.cpp"


log = LogCapture()
_backend_ready = False
_warned_gpu = False


def backend_init() -> None:
    global _backend_ready
    if not _backend_ready:
        import llama_cpp

        llama_cpp.llama_backend_init()
        _backend_ready = True


def default_threads() -> int:
    try:
        import psutil

        return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except Exception:  # psutil missing or unable to read the topology
        return max(1, os.cpu_count() or 1)


def tokenize(lc: Any, vocab: Any, text: str, add_special: bool) -> list[int]:
    """llama_tokenize with parse_special=False: user text never turns into control tokens."""
    data = text.encode("utf-8")
    n_max = len(data) + 8
    buf = (lc.llama_token * n_max)()
    n = lc.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, False)
    if n < 0:
        n_max = -n
        buf = (lc.llama_token * n_max)()
        n = lc.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, False)
    return list(buf[:n])


class VocabOnly:
    """Just the tokenizer of a text GGUF (llama.cpp ``vocab_only``: no weights loaded). For counting tokens and
    for tests; an `Engine` has its own ``tokenizer``."""

    def __init__(self, text_path: str | os.PathLike[str]) -> None:
        import llama_cpp

        read_gguf(text_path, expect="text")
        log.install(False)
        backend_init()
        self._lc = llama_cpp
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        mark = log.mark()
        self._model = llama_cpp.llama_model_load_from_file(str(text_path).encode(), params)
        if not self._model:
            raise ModelFileError(f"llama.cpp could not read the vocabulary of {text_path}: {log.reason(mark)}")
        self.vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.tokenizer = Tokenizer(self.tokenize_raw, llama_cpp.llama_vocab_eos(self.vocab))

    def tokenize_raw(self, text: str, add_special: bool) -> list[int]:
        return tokenize(self._lc, self.vocab, text, add_special)

    def close(self) -> None:
        if self._model:
            self._lc.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> VocabOnly:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------ GPU layers


def resolve_gpu_layers(
    value: GpuLayers | str,
    *,
    text_path: Path,
    mmproj_path: Path,
    text_info: GGUFInfo,
    n_ctx: int,
    n_parallel: int,
    mmproj_offload: bool,
    flash_attn: bool | None,
    note: Callable[[str], None],
) -> tuple[int, bool, str]:
    """``--n-gpu-layers`` as a layer count. Returns (layers, mmproj may go on the GPU, the planner's reason)."""
    import llama_cpp

    global _warned_gpu
    n_layer = text_info.n_layer
    if isinstance(value, str):
        v = value.strip().lower()
        if v == "all":
            wanted = n_layer + 1  # +1: the output layer
        elif v == "auto":
            return _auto_gpu_layers(text_path, mmproj_path, text_info, n_ctx, n_parallel, mmproj_offload, flash_attn)
        else:
            try:
                wanted = int(v)
            except ValueError:
                raise UsageError(
                    f"--n-gpu-layers {value!r} is not a number, 'auto' or 'all'", hint="e.g. --n-gpu-layers 20"
                ) from None
    else:
        wanted = int(value)
    if wanted < 0:
        wanted = n_layer + 1  # llama.cpp's convention: -1 means all
    if wanted > 0 and not llama_cpp.llama_supports_gpu_offload():
        if not _warned_gpu:
            _warned_gpu = True
            note(
                "this llama-cpp-python was built without GPU support; running on the CPU. "
                f"To use an NVIDIA GPU, reinstall it with: {GPU_REINSTALL}"
            )
        return 0, True, ""
    return wanted, True, ""


def _auto_gpu_layers(
    text_path: Path,
    mmproj_path: Path,
    text_info: GGUFInfo,
    n_ctx: int,
    n_parallel: int,
    mmproj_offload: bool,
    flash_attn: bool | None,
) -> tuple[int, bool, str]:
    """``--n-gpu-layers auto``: ask the memory planner how many layers fit in free VRAM. ``flash_attn`` goes through
    as given: None is llama.cpp's "auto", which is not "off"."""
    from llava_cli.memory import plan_offload

    plan = plan_offload(
        text_path,
        mmproj_path,
        n_ctx=n_ctx,
        parallel=n_parallel,  # one KV slot of n_ctx cells per sequence
        flash_attn=flash_attn,  # None = llama.cpp auto, not "off" (#14)
        mmproj_offload=mmproj_offload,
    )
    layers = text_info.n_layer + 1 if plan.n_gpu_layers < 0 else plan.n_gpu_layers
    return layers, plan.mmproj_on_gpu, plan.reason


# ------------------------------------------------------------------------------------------------ text model


class TextModel:
    """The text GGUF and one llama context: ``n_seq`` sequences of up to ``n_ctx`` positions each (unified KV)."""

    def __init__(
        self,
        text_path: Path,
        *,
        n_ctx: int,
        n_seq: int,
        n_threads: int,
        n_threads_batch: int,
        n_gpu_layers: int,
        n_batch: int,
        n_ubatch: int,
        flash_attn: bool | None,
        kv_unified: bool = True,
    ) -> None:
        import llama_cpp as lc

        self._lc = lc
        self.text_path = text_path
        self._model: Any = None
        self.ctx: Any = None
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        mark = log.mark()
        self._model = lc.llama_model_load_from_file(str(text_path).encode(), mp)
        if not self._model:
            raise ModelFileError(
                f"llama.cpp could not load {text_path}: {log.reason(mark)}",
                hint="convert or download the model again; LLAVA_DEBUG=1 and --verbose show the full log",
            )
        self.model = self._model
        self.vocab = lc.llama_model_get_vocab(self._model)
        self.n_embd_inp = lc.llama_model_n_embd_inp(self._model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)

        cp = lc.llama_context_default_params()
        cp.n_ctx = n_ctx * n_seq
        cp.n_batch = n_batch
        cp.n_ubatch = n_ubatch
        cp.n_seq_max = n_seq
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads_batch
        cp.kv_unified = kv_unified
        if flash_attn is not None:
            cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.flash_attn_type = cp.flash_attn_type
        mark = log.mark()
        self.ctx = lc.llama_init_from_model(self._model, cp)
        if not self.ctx:
            what = f"{n_ctx}-token context" + (f" × {n_seq} sequences" if n_seq > 1 else "")
            raise ModelFileError(
                f"llama.cpp could not create a {what} for {text_path.name}: {log.reason(mark)}",
                hint="try a smaller --ctx" + (" or --parallel" if n_seq > 1 else ""),
            )
        self.n_ctx_cells = lc.llama_n_ctx(self.ctx)  # llama.cpp pads to a multiple of 256
        self.memory = lc.llama_get_memory(self.ctx)
        self.eos_id = lc.llama_vocab_eos(self.vocab)
        self.tokenizer = Tokenizer(self.tokenize_raw, self.eos_id)
        self._piece_buf = ctypes.create_string_buffer(256)

    def tokenize_raw(self, text: str, add_special: bool) -> list[int]:
        return tokenize(self._lc, self.vocab, text, add_special)

    def token_bytes(self, token: int) -> bytes:
        n = self._lc.llama_token_to_piece(self.vocab, token, self._piece_buf, 256, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lc.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
            return buf.raw[:n]
        return self._piece_buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self.vocab, token))

    # -- KV memory of one sequence

    def seq_rm(self, seq: int, p0: int = 0, p1: int = -1) -> None:
        self._lc.llama_memory_seq_rm(self.memory, seq, p0, p1)

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self._lc.llama_memory_seq_cp(self.memory, src, dst, p0, p1)

    def clear(self) -> None:
        self._lc.llama_memory_clear(self.memory, True)

    def kv_bytes_per_cell(self) -> int:
        """KV cache bytes one position of one sequence takes: the context's state size is not it (that includes
        logits), so ask the model: n_layer × (K + V width) × 2 bytes (F16 cache)."""
        lc = self._lc
        n_layer = lc.llama_model_n_layer(self._model)
        n_head = lc.llama_model_n_head(self._model)
        n_head_kv = lc.llama_model_n_head_kv(self._model)
        n_embd = lc.llama_model_n_embd(self._model)
        kv_width = n_embd // n_head * n_head_kv
        return int(n_layer * 2 * kv_width * 2)

    # -- decoding

    def decode(self, batch: Any) -> None:
        rc = self._lc.llama_decode(self.ctx, batch)
        if rc != 0:
            raise LlavaError(f"llama_decode failed (code {rc}): {log.reason()}")

    def sampler(self, temperature: float, top_p: float, top_k: int, seed: int | None, ban: tuple[int, ...] = ()) -> Any:
        """llama.cpp's sampler chain: greedy at temperature 0, else top-k → top-p → temperature → seeded draw.
        ``ban``: tokens that may never be sampled (a forced-length decode bans end-of-generation)."""
        lc = self._lc
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if ban:
            biases = (lc.llama_logit_bias * len(ban))(*[lc.llama_logit_bias(t, float("-inf")) for t in ban])
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_logit_bias(self.n_vocab, len(ban), biases))
        if temperature <= 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
            return chain
        if top_k > 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(top_k))
        if 0 < top_p < 1:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(top_p, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(temperature))
        lc.llama_sampler_chain_add(
            chain, lc.llama_sampler_init_dist(lc.LLAMA_DEFAULT_SEED if seed is None else seed & 0xFFFFFFFF)
        )
        return chain

    def logits(self, index: int) -> np.ndarray:
        """A copy of the next-token logits of batch row `index` of the last decode (-1: the last row that asked
        for logits), float32 over the vocabulary. The quality table reads them (runtime/scoring.py)."""
        ptr = self._lc.llama_get_logits_ith(self.ctx, index)
        if not ptr:
            raise LlavaError(f"llama.cpp has no logits for batch row {index}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def sample(self, sampler: Any, index: int) -> int:
        return int(self._lc.llama_sampler_sample(sampler, self.ctx, index))

    def free_sampler(self, sampler: Any) -> None:
        self._lc.llama_sampler_free(sampler)

    def close(self) -> None:
        lc = self._lc
        if self.ctx:
            lc.llama_free(self.ctx)
            self.ctx = None
        if self._model:
            lc.llama_model_free(self._model)
            self._model = None


class Batch:
    """A llama_batch whose arrays are numpy buffers we own, filled with vectorised writes (no per-row ctypes calls).
    Either token ids (``n_embd`` = 0) or embeddings; every row belongs to one sequence."""

    def __init__(self, capacity: int, n_embd: int = 0) -> None:
        import llama_cpp as lc

        self.capacity = capacity
        self.n_embd = n_embd
        self.token = np.zeros(capacity, np.int32)
        self.embd = np.zeros((capacity, n_embd), np.float32) if n_embd else None
        self.pos = np.zeros(capacity, np.int32)
        self.n_seq_id = np.ones(capacity, np.int32)
        self.seq = np.zeros(capacity, np.int32)
        self.logits = np.zeros(capacity, np.int8)
        # seq_id is an array of pointers, one per row, each to that row's (single) sequence id in `self.seq`.
        base = self.seq.ctypes.data
        self._seq_ptrs = (ctypes.POINTER(ctypes.c_int32) * capacity)(
            *[ctypes.cast(base + 4 * i, ctypes.POINTER(ctypes.c_int32)) for i in range(capacity)]
        )
        b: Any = lc.llama_batch()
        b.token = self.token.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)) if not n_embd else None
        b.embd = self.embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) if self.embd is not None else None
        b.pos = self.pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.seq_id = ctypes.cast(self._seq_ptrs, ctypes.POINTER(ctypes.POINTER(ctypes.c_int32)))
        b.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.struct = b
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    @property
    def room(self) -> int:
        return self.capacity - self.n

    def add_tokens(self, seq: int, ids: list[int] | np.ndarray, pos0: int, logits_last: bool) -> int:
        """Rows for `ids` at positions pos0...; returns the batch index of the last row."""
        k, n = len(ids), self.n
        self.token[n : n + k] = ids
        self._rows(seq, k, pos0, logits_last)
        return n + k - 1

    def add_embd(self, seq: int, rows: np.ndarray, pos0: int) -> None:
        k, n = rows.shape[0], self.n
        assert self.embd is not None
        self.embd[n : n + k] = rows
        self._rows(seq, k, pos0, False)

    def _rows(self, seq: int, k: int, pos0: int, logits_last: bool) -> None:
        n = self.n
        self.pos[n : n + k] = np.arange(pos0, pos0 + k, dtype=np.int32)
        self.seq[n : n + k] = seq
        self.logits[n : n + k] = 0
        if logits_last:
            self.logits[n + k - 1] = 1
        self.n += k

    def view(self) -> Any:
        self.struct.n_tokens = self.n
        return self.struct
