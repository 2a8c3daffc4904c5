"""The runtime: a GGUF text model + mmproj loaded with llama-cpp-python's low-level API, conversations that keep
their KV cache across turns, and an image-embedding cache keyed by the hash of the image bytes.

Why not ``Llama`` + ``Llava15ChatHandler``: the handler clears the KV cache and re-encodes every image on every
call, renders its template without newlines, and mtmd's own tokenizer inserts a SentencePiece space after each
image that transformers does not (GGUF_LLAVA.md §4.1). Here the prompt is built and tokenized by
`llava_cli.prompts`, text tokens go straight to ``llama_decode``, and images go through mtmd only for the CLIP
encode (``mtmd_encode_chunk``) and the decode of their embeddings (``mtmd_helper_decode_image_chunk``).

Python use::

    from llava_cli.engine import Engine

    with Engine("model.q4_k_m.gguf", "mmproj-model.f16.gguf", n_ctx=4096) as engine:
        print(engine.ask("What is in this picture?", images=["cat.jpg"], temperature=0).text)
        chat = engine.chat()
        chat.ask("Describe it.", images=["cat.jpg"], on_token=lambda s: print(s, end=""))
        chat.ask("What colour is it?")          # only the new tokens are evaluated
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import os
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llava_cli.errors import ContextOverflowError, LlavaError, ModelFileError, UsageError
from llava_cli.gguf_info import GGUFInfo, check_pair, read_gguf
from llava_cli.images import LoadedImage, load_image
from llava_cli.prompts import (
    ImageSlot,
    Segment,
    Tokenizer,
    answer_segments,
    merge_text,
    user_turn,
)

GPU_REINSTALL = 'CMAKE_ARGS="-DGGML_CUDA=on" pip install --no-cache-dir --force-reinstall llama-cpp-python==0.3.36'

ImageInput = str | os.PathLike[str] | bytes | LoadedImage
TokenCallback = Callable[[str], None]
GpuLayers = int | Literal["auto", "all"]


# ------------------------------------------------------------------------------------------------ llama.cpp log
# llama.cpp, ggml and clip print to stderr by default. We route all three through one callback that keeps the last
# lines (so a failed load can be reported in one line) and prints them only when verbose.


class _LogCapture:
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


_log = _LogCapture()
_backend_ready = False
_warned_gpu = False


def _backend_init() -> None:
    global _backend_ready
    if not _backend_ready:
        import llama_cpp

        llama_cpp.llama_backend_init()
        _backend_ready = True


def _default_threads() -> int:
    try:
        import psutil

        return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except Exception:  # psutil missing or unable to read the topology
        return max(1, os.cpu_count() or 1)


class VocabOnly:
    """Just the tokenizer of a text GGUF (llama.cpp ``vocab_only``: no weights loaded). For counting tokens and
    for tests; an `Engine` has its own ``tokenizer``."""

    def __init__(self, text_path: str | os.PathLike[str]) -> None:
        import llama_cpp

        read_gguf(text_path, expect="text")
        _log.install(False)
        _backend_init()
        self._lc = llama_cpp
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        mark = _log.mark()
        self._model = llama_cpp.llama_model_load_from_file(str(text_path).encode(), params)
        if not self._model:
            raise ModelFileError(f"llama.cpp could not read the vocabulary of {text_path}: {_log.reason(mark)}")
        self.vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.tokenizer = Tokenizer(self.tokenize_raw, llama_cpp.llama_vocab_eos(self.vocab))

    def tokenize_raw(self, text: str, add_special: bool) -> list[int]:
        return _tokenize(self._lc, self.vocab, text, add_special)

    def close(self) -> None:
        if self._model:
            self._lc.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> VocabOnly:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _tokenize(lc: Any, vocab: Any, text: str, add_special: bool) -> list[int]:
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


# ------------------------------------------------------------------------------------------------ results


@dataclass
class Timings:
    """Seconds spent in each phase of one turn. ``ttft`` = from the call to the first generated token."""

    load_images: float = 0.0
    encode: float = 0.0  # CLIP (mtmd) encode of images not already cached
    prefill: float = 0.0  # llama_decode of the new prompt tokens and image embeddings
    ttft: float = 0.0
    decode: float = 0.0  # generation after the first token
    total: float = 0.0

    n_decoded: int = 0  # tokens generated after the first one (what ``decode`` measures)

    @property
    def decode_tokens_per_s(self) -> float:
        return 0.0 if self.decode <= 0 else self.n_decoded / self.decode


@dataclass
class Answer:
    """One assistant turn."""

    text: str
    tokens: list[int]
    finish_reason: Literal["stop", "length", "context"]
    prompt_tokens: int  # tokens evaluated for this turn (text + image positions)
    cached_tokens: int  # tokens of the conversation reused from the KV cache
    completion_tokens: int
    images_encoded: int  # images that went through CLIP this turn
    images_cached: int  # images whose embeddings came from the cache
    timings: Timings
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        t: dict[str, Any] = asdict(self.timings)
        t["decode_tokens_per_s"] = round(self.timings.decode_tokens_per_s, 3)
        return {
            "answer": self.text,
            "finish_reason": self.finish_reason,
            "tokens": {
                "prompt": self.prompt_tokens,
                "cached": self.cached_tokens,
                "completion": self.completion_tokens,
            },
            "image_encodes": {"encoded": self.images_encoded, "cached": self.images_cached},
            "timings": {k: round(v, 4) if isinstance(v, float) else v for k, v in t.items()},
            "notes": list(self.notes),
        }


@dataclass
class Message:
    """A conversation message. Assistant messages keep the generated token ids, so a replay is exact."""

    role: Literal["user", "assistant"]
    text: str
    images: list[LoadedImage] = field(default_factory=list)
    tokens: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"role": self.role, "content": self.text}
        if self.images:
            d["images"] = [{"name": im.name, "sha256": im.sha256} for im in self.images]
        return d


@dataclass
class EngineStats:
    images_encoded: int = 0  # CLIP encodes run by this engine (the cache avoids repeats)
    image_cache_hits: int = 0
    tokens_evaluated: int = 0  # prompt tokens fed through llama_decode (text + image positions)
    kv_resets: int = 0


@dataclass
class _ImageEntry:
    chunk: int  # mtmd_input_chunk* owned by us (placeholder chunk used to decode the cached embeddings)
    n_tokens: int
    n_pos: int
    embd: np.ndarray


@dataclass(frozen=True)
class _ImagePiece:
    image: LoadedImage
    n_pos: int


_Piece = list[int] | _ImagePiece


# ------------------------------------------------------------------------------------------------ engine


class Engine:
    """A loaded GGUF pair. One KV cache (one active conversation at a time); images cached by content hash.

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
        n_batch: int = 1024,
        n_ubatch: int = 512,
        flash_attn: bool | None = None,
        image_cache_mb: int = 512,
        verbose: bool = False,
        on_note: Callable[[str], None] | None = None,
    ) -> None:
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        self._lc = llama_cpp
        self._mtmd = mtmd
        self._model: Any = None
        self._ctx: Any = None
        self._mctx: Any = None
        self._on_note = on_note or (lambda msg: print(f"note: {msg}", file=sys.stderr))
        self.notes: list[str] = []
        self.text_path = Path(text_path)
        self.mmproj_path = Path(mmproj_path)
        if n_ctx < 64:
            raise UsageError(f"--ctx {n_ctx} is too small", hint="use at least 1024; each image takes 576 tokens")

        # Validate both headers first: llama.cpp aborts the process on some malformed files.
        self.text_info: GGUFInfo = read_gguf(self.text_path, expect="text")
        self.mmproj_info: GGUFInfo = read_gguf(self.mmproj_path, expect="mmproj")
        check_pair(self.text_info, self.mmproj_info)

        _log.install(verbose)
        _backend_init()
        self.n_threads = n_threads or _default_threads()
        self.n_threads_batch = n_threads_batch or self.n_threads
        self.offload_reason = ""
        self._auto_mmproj_gpu = True
        self.n_gpu_layers = self._resolve_gpu_layers(n_gpu_layers, n_ctx, mmproj_offload, flash_attn)
        # CLIP follows the text model: on the GPU only when layers are offloaded (and the planner agrees).
        self.mmproj_offload = bool(
            mmproj_offload
            and self._auto_mmproj_gpu
            and self.n_gpu_layers > 0
            and llama_cpp.llama_supports_gpu_offload()
        )
        self.n_batch = max(1, n_batch)
        self.n_ubatch = max(1, min(n_ubatch, self.n_batch))
        self.stats = EngineStats()
        self._cache: OrderedDict[str, _ImageEntry] = OrderedDict()
        self._cache_limit = image_cache_mb * 1024 * 1024
        self._owner: Conversation | None = None

        try:
            self._load(n_ctx, flash_attn)
        except BaseException:
            self.close()
            raise

    # -- loading

    def _note(self, msg: str) -> None:
        self.notes.append(msg)
        self._on_note(msg)

    def _resolve_gpu_layers(
        self, value: GpuLayers | str, n_ctx: int, mmproj_offload: bool, flash_attn: bool | None
    ) -> int:
        global _warned_gpu
        n_layer = self.text_info.n_layer
        if isinstance(value, str):
            v = value.strip().lower()
            if v == "all":
                wanted = n_layer + 1  # +1: the output layer
            elif v == "auto":
                return self._auto_gpu_layers(n_ctx, mmproj_offload, flash_attn)
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
        if wanted > 0 and not self._lc.llama_supports_gpu_offload():
            if not _warned_gpu:
                _warned_gpu = True
                self._note(
                    "this llama-cpp-python was built without GPU support; running on the CPU. "
                    f"To use an NVIDIA GPU, reinstall it with: {GPU_REINSTALL}"
                )
            return 0
        return wanted

    def _auto_gpu_layers(self, n_ctx: int, mmproj_offload: bool, flash_attn: bool | None) -> int:
        """``--n-gpu-layers auto``: ask the memory planner how many layers fit in free VRAM."""
        from llava_cli.memory import plan_offload

        plan = plan_offload(
            self.text_path, self.mmproj_path, n_ctx=n_ctx, flash_attn=bool(flash_attn), mmproj_offload=mmproj_offload
        )
        self.offload_reason = plan.reason
        self.notes.append(f"--n-gpu-layers auto: {plan.reason}")  # recorded, not printed: it is the normal case
        self._auto_mmproj_gpu = plan.mmproj_on_gpu
        return self.text_info.n_layer + 1 if plan.n_gpu_layers < 0 else plan.n_gpu_layers

    def _load(self, n_ctx: int, flash_attn: bool | None) -> None:
        lc, mtmd = self._lc, self._mtmd
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = self.n_gpu_layers
        mark = _log.mark()
        self._model = lc.llama_model_load_from_file(str(self.text_path).encode(), mp)
        if not self._model:
            raise ModelFileError(
                f"llama.cpp could not load {self.text_path}: {_log.reason(mark)}",
                hint="convert or download the model again; LLAVA_DEBUG=1 and --verbose show the full log",
            )
        self.vocab = lc.llama_model_get_vocab(self._model)
        self.n_embd_inp = lc.llama_model_n_embd_inp(self._model)

        cp = lc.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = self.n_batch
        cp.n_ubatch = self.n_ubatch
        cp.n_seq_max = 1
        cp.n_threads = self.n_threads
        cp.n_threads_batch = self.n_threads_batch
        if flash_attn is not None:
            cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        mark = _log.mark()
        self._ctx = lc.llama_init_from_model(self._model, cp)
        if not self._ctx:
            raise ModelFileError(
                f"llama.cpp could not create a {n_ctx}-token context for {self.text_path.name}: {_log.reason(mark)}",
                hint="try a smaller --ctx",
            )
        self.n_ctx = lc.llama_n_ctx(self._ctx)

        mparams = mtmd.mtmd_context_params_default()
        mparams.use_gpu = self.mmproj_offload
        mparams.n_threads = self.n_threads_batch
        mparams.print_timings = False
        mparams.warmup = False  # a warm-up encode costs as much as a real one; the first image pays instead
        mparams.flash_attn_type = cp.flash_attn_type
        mark = _log.mark()
        self._mctx = mtmd.mtmd_init_from_file(str(self.mmproj_path).encode(), self._model, mparams)
        if not self._mctx:
            raise ModelFileError(
                f"llama.cpp could not load the vision projector {self.mmproj_path}: {_log.reason(mark)}",
                hint="convert or download the mmproj again",
            )
        if not mtmd.mtmd_support_vision(self._mctx):
            raise ModelFileError(f"{self.mmproj_path} has no vision encoder")

        self.eos_id = lc.llama_vocab_eos(self.vocab)
        self.tokenizer = Tokenizer(self._tokenize_raw, self.eos_id)
        self.n_image_tokens = self.mmproj_info.n_image_tokens

    def close(self) -> None:
        """Free the llama.cpp objects (also done on garbage collection)."""
        lc = getattr(self, "_lc", None)
        if lc is None:
            return
        for entry in getattr(self, "_cache", {}).values():
            self._mtmd.mtmd_input_chunk_free(entry.chunk)
        if getattr(self, "_cache", None) is not None:
            self._cache.clear()
        if self._mctx:
            self._mtmd.mtmd_free(self._mctx)
            self._mctx = None
        if self._ctx:
            lc.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            lc.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: modules may be gone already
            self.close()

    # -- public API

    def chat(self, *, system: str | None = None, history: Sequence[Message] = ()) -> Conversation:
        """A new conversation; ``history`` (e.g. from another conversation's ``messages``) is replayed lazily."""
        return Conversation(self, system=system, history=history)

    def ask(
        self,
        prompt: str,
        images: Iterable[ImageInput] = (),
        *,
        system: str | None = None,
        **generate: Any,
    ) -> Answer:
        """One question in a fresh conversation (the KV cache is cleared, the model and image cache are kept)."""
        return self.chat(system=system).ask(prompt, images, **generate)

    def clear_image_cache(self) -> None:
        for entry in self._cache.values():
            self._mtmd.mtmd_input_chunk_free(entry.chunk)
        self._cache.clear()

    # -- internals used by Conversation

    def _tokenize_raw(self, text: str, add_special: bool) -> list[int]:
        return _tokenize(self._lc, self.vocab, text, add_special)

    def token_bytes(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._lc.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lc.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    def _clear_kv(self) -> None:
        self._lc.llama_memory_clear(self._lc.llama_get_memory(self._ctx), True)
        self.stats.kv_resets += 1

    def _image_entry(self, image: LoadedImage) -> tuple[_ImageEntry, bool, float]:
        """The cached encoding of `image`, encoding it now if needed. Returns (entry, was_encoded, seconds)."""
        entry = self._cache.get(image.sha256)
        if entry is not None:
            self._cache.move_to_end(image.sha256)
            self.stats.image_cache_hits += 1
            return entry, False, 0.0
        mtmd = self._mtmd
        t0 = time.perf_counter()
        chunk = self._make_image_chunk(image)
        try:
            n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            n_pos = mtmd.mtmd_input_chunk_get_n_pos(chunk)
            mark = _log.mark()
            if mtmd.mtmd_encode_chunk(self._mctx, chunk) != 0:
                raise LlavaError(f"the vision encoder failed on {image.name}: {_log.reason(mark)}")
            ptr = mtmd.mtmd_get_output_embd(self._mctx)
            # The buffer is overwritten by the next encode: copy it out now.
            embd = np.ctypeslib.as_array(ptr, shape=(n_tokens * self.n_embd_inp,)).copy()
        except BaseException:
            mtmd.mtmd_input_chunk_free(chunk)
            raise
        # Keep only a placeholder of the chunk (its sizes and id, not the preprocessed pixels): that is all the
        # decode of cached embeddings needs.
        placeholder = mtmd.mtmd_input_chunk_get_placeholder(chunk)
        if placeholder:
            mtmd.mtmd_input_chunk_free(chunk)
            chunk = placeholder
        self.stats.images_encoded += 1
        entry = _ImageEntry(chunk=chunk, n_tokens=n_tokens, n_pos=n_pos, embd=embd)
        self._cache[image.sha256] = entry
        self._evict()
        return entry, True, time.perf_counter() - t0

    def _evict(self) -> None:
        total = sum(e.embd.nbytes for e in self._cache.values())
        while len(self._cache) > 1 and total > self._cache_limit:
            _, old = self._cache.popitem(last=False)
            total -= old.embd.nbytes
            self._mtmd.mtmd_input_chunk_free(old.chunk)

    def _make_image_chunk(self, image: LoadedImage) -> Any:
        """An owned mtmd image chunk for `image` (pixels handed over as RGB, never the file)."""
        mtmd = self._mtmd
        data = image.rgb_bytes()
        pixels = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        bitmap = mtmd.mtmd_bitmap_init(image.width, image.height, pixels)
        if not bitmap:
            raise LlavaError(f"mtmd could not take the pixels of {image.name}")
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            mtmd.mtmd_bitmap_set_id(bitmap, image.sha256.encode())
            marker = mtmd.mtmd_default_marker()
            text = mtmd.mtmd_input_text()
            text.text = marker
            text.text_len = len(marker)
            text.add_special = False
            text.parse_special = True
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            rc = mtmd.mtmd_tokenize(self._mctx, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                raise LlavaError(f"mtmd could not preprocess {image.name} (mtmd_tokenize returned {rc})")
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    return mtmd.mtmd_input_chunk_copy(chunk)
            raise LlavaError(f"mtmd produced no image chunk for {image.name}")
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)

    def _decode_text(self, ids: list[int], n_past: int) -> int:
        """Feed `ids` at positions n_past...; only the last token's logits are computed."""
        lc = self._lc
        for start in range(0, len(ids), self.n_batch):
            part = ids[start : start + self.n_batch]
            arr = (lc.llama_token * len(part))(*part)
            batch = lc.llama_batch_get_one(arr, len(part))
            rc = lc.llama_decode(self._ctx, batch)
            if rc != 0:
                raise LlavaError(f"llama_decode failed (code {rc}) at position {n_past}: {_log.reason()}")
            n_past += len(part)
        self.stats.tokens_evaluated += len(ids)
        return n_past

    def _decode_image(self, entry: _ImageEntry, n_past: int) -> int:
        mtmd = self._mtmd
        new_n_past = self._lc.llama_pos(n_past)
        embd_ptr = entry.embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        rc = mtmd.mtmd_helper_decode_image_chunk(
            self._mctx,
            self._ctx,
            entry.chunk,
            embd_ptr,
            n_past,
            0,
            self.n_batch,
            ctypes.byref(new_n_past),
            mtmd.mtmd_helper_post_decode_callback(),  # NULL: no post-decode hook
            None,
        )
        if rc != 0:
            raise LlavaError(f"decoding the image embeddings failed (code {rc}): {_log.reason()}")
        self.stats.tokens_evaluated += entry.n_tokens
        return int(new_n_past.value)

    def _sampler(self, temperature: float, top_p: float, top_k: int, seed: int | None) -> Any:
        lc = self._lc
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
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


class Conversation:
    """A chat with one engine. A turn evaluates only what is new; images already seen are not encoded again.

    Several conversations may exist; the engine's single KV cache belongs to the last one used, and a
    conversation that lost it replays its history (exactly: the assistant turns are stored as token ids).
    """

    def __init__(self, engine: Engine, *, system: str | None = None, history: Sequence[Message] = ()) -> None:
        self.engine = engine
        self.system = system.strip() if system and system.strip() else None
        self.messages: list[Message] = []
        self._fed: list[_Piece] = []  # what is (or would be) in the KV cache, in order
        self._pending: list[int] = []  # sampled but never decoded (the last token when max_tokens was hit)
        self.n_past = 0
        for m in history:
            self._append_history(m)

    # -- history

    def _append_history(self, m: Message) -> None:
        if m.role == "user":
            if self.messages and self.messages[-1].role == "user":
                raise UsageError("history has two user messages in a row")
            self._fed.extend(self._pieces(self._turn_segments(m.text, len(m.images)), m.images))
        else:
            if not self.messages or self.messages[-1].role != "user":
                raise UsageError("history has an assistant message that answers nothing")
            tokens = m.tokens
            if tokens is None:
                # Text only (e.g. a chat loaded from JSON): tokenize it as the template puts it, " " + answer.
                tokens = self.engine.tokenizer.text(" " + m.text.strip(), start=False)
            self._fed.append(list(tokens))
            m = Message("assistant", m.text, tokens=list(tokens))
        self.messages.append(m)

    def _turn_segments(self, prompt: str, n_images: int) -> list[Segment]:
        first = not self.messages
        segs: list[Segment] = []
        if not first and self.messages[-1].role == "assistant":
            # Close the previous answer: its never-decoded last token (if any), then </s>.
            segs.extend(answer_segments(tokens=self._pending))
        segs.extend(user_turn(prompt, n_images, first=first, system=self.system))
        return merge_text(segs)

    def _pieces(self, segments: Sequence[Segment], images: Sequence[LoadedImage]) -> list[_Piece]:
        out: list[_Piece] = []
        for item in self.engine.tokenizer.segments(segments):
            if isinstance(item, ImageSlot):
                out.append(_ImagePiece(images[item.index], self.engine.n_image_tokens))
            else:
                out.append(item)
        return out

    @property
    def n_tokens(self) -> int:
        """Positions the conversation occupies in the context (text tokens + image positions)."""
        return sum(p.n_pos if isinstance(p, _ImagePiece) else len(p) for p in self._fed)

    def clear(self) -> None:
        """Forget the conversation (the system prompt stays). The image cache is kept."""
        self.messages.clear()
        self._fed.clear()
        self._pending.clear()
        self.n_past = 0
        if self.engine._owner is self:
            self.engine._owner = None

    def to_dict(self) -> dict[str, Any]:
        return {"system": self.system, "messages": [m.to_dict() for m in self.messages]}

    # -- a turn

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
        on_token: TokenCallback | None = None,
    ) -> Answer:
        """Add a user turn (text + images), generate the answer, stream it through ``on_token``."""
        eng = self.engine
        if not eng._ctx:
            raise UsageError("this engine is closed", hint="create a new Engine")
        t_start = time.perf_counter()
        timings = Timings()
        notes: list[str] = []
        loaded: list[LoadedImage] = []
        for im in images:
            li = im if isinstance(im, LoadedImage) else load_image(im)
            notes.extend(li.notes)
            loaded.append(li)
        timings.load_images = time.perf_counter() - t_start

        new_pieces = self._pieces(self._turn_segments(prompt, len(loaded)), loaded)
        fresh = eng._owner is not self
        to_feed = (list(self._fed) if fresh else []) + new_pieces
        cached = 0 if fresh else self.n_past
        n_new = sum(p.n_pos if isinstance(p, _ImagePiece) else len(p) for p in to_feed)
        needed = cached + n_new + 1  # +1: room for at least one generated token
        if needed > eng.n_ctx:
            n_img = sum(1 for p in new_pieces if isinstance(p, _ImagePiece))
            detail = f" ({n_img} image(s) × {eng.n_image_tokens} tokens)" if n_img else ""
            history = self.n_tokens
            so_far = f", {history} of them from the conversation so far," if history else ""
            raise ContextOverflowError(
                f"the prompt needs {needed} tokens{detail}{so_far} but the context holds {eng.n_ctx}",
                hint="/clear the chat or raise --ctx"
                if history
                else f"raise --ctx; each image takes {eng.n_image_tokens} tokens",
            )

        base = list(self._fed)
        if fresh:
            eng._clear_kv()
            eng._owner = self
            self.n_past = 0
        images_encoded = images_cached = 0
        try:
            for piece in to_feed:
                if isinstance(piece, _ImagePiece):
                    entry, encoded, secs = eng._image_entry(piece.image)
                    timings.encode += secs
                    images_encoded += encoded
                    images_cached += not encoded
                    t0 = time.perf_counter()
                    self.n_past = eng._decode_image(entry, self.n_past)
                else:
                    t0 = time.perf_counter()
                    self.n_past = eng._decode_text(piece, self.n_past)
                timings.prefill += time.perf_counter() - t0
        except BaseException:
            # The KV cache is now partial: the next turn replays the history, which is intact.
            eng._owner = None
            raise
        self._fed = base + new_pieces
        user = Message("user", prompt.strip(), images=loaded)
        self.messages.append(user)
        self._pending = []

        answer = self._generate(max_tokens, temperature, top_p, top_k, seed, on_token, timings, t_start)
        answer.prompt_tokens = n_new
        answer.cached_tokens = cached
        answer.images_encoded = images_encoded
        answer.images_cached = images_cached
        answer.notes = notes
        return answer

    def _generate(
        self,
        max_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int | None,
        on_token: TokenCallback | None,
        timings: Timings,
        t_start: float,
    ) -> Answer:
        eng = self.engine
        lc = eng._lc
        sampler = eng._sampler(temperature, top_p, top_k, seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tokens: list[int] = []
        text_parts: list[str] = []
        started = False  # the first piece carries the space that follows "ASSISTANT:"
        finish: Literal["stop", "length", "context"] = "length"
        t_first = 0.0
        try:
            while len(tokens) < max_tokens:
                tok = lc.llama_sampler_sample(sampler, eng._ctx, -1)
                if not tokens:
                    t_first = time.perf_counter()
                    timings.ttft = t_first - t_start
                if lc.llama_vocab_is_eog(eng.vocab, tok):
                    finish = "stop"
                    break
                tokens.append(tok)
                piece = decoder.decode(eng.token_bytes(tok))
                if not started:
                    piece = piece.lstrip()
                    started = bool(piece)
                if piece:
                    text_parts.append(piece)
                    if on_token:
                        on_token(piece)
                if len(tokens) >= max_tokens:
                    break
                if self.n_past + 1 > eng.n_ctx:
                    finish = "context"
                    break
                self.n_past = eng._decode_text([tok], self.n_past)
                eng.stats.tokens_evaluated -= 1  # generated tokens are not prompt tokens
            tail = decoder.decode(b"", final=True)
            if tail:
                text_parts.append(tail)
                if on_token:
                    on_token(tail)
        except BaseException:
            eng._owner = None  # interrupted mid-step: replay from the recorded tokens next time
            raise
        finally:
            lc.llama_sampler_free(sampler)
            # Everything but a last token that was sampled and never decoded is in the KV cache.
            in_kv = tokens if finish == "stop" else tokens[:-1]
            self._pending = [] if finish == "stop" else tokens[-1:]
            self._fed.append(list(in_kv))
            self.messages.append(Message("assistant", "".join(text_parts).strip(), tokens=list(tokens)))
        t_end = time.perf_counter()
        if not tokens and not t_first:
            timings.ttft = t_end - t_start
        timings.decode = max(0.0, t_end - t_first) if t_first else 0.0
        timings.n_decoded = max(0, len(tokens) - 1)
        timings.total = t_end - t_start
        return Answer(
            text="".join(text_parts).strip(),
            tokens=tokens,
            finish_reason=finish,
            prompt_tokens=0,
            cached_tokens=0,
            completion_tokens=len(tokens),
            images_encoded=0,
            images_cached=0,
            timings=timings,
        )
