"""Images → embeddings for the text model: the `ImageEncoder` interface, its implementation on mtmd's CLIP encode,
and the embedding cache shared by every sequence (keyed by the SHA-256 of the image bytes).

The scheduler only needs ``encode_images`` and the two sizes, so the ggml vision graph (``runtime/vision.py``) can
replace mtmd here without touching it. The embeddings reach ``llama_decode`` as embedding batches (scheduler.py);
mtmd's own decode helpers are not used.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from llava_cli.errors import LlavaError, ModelFileError
from llava_cli.images import LoadedImage
from llava_cli.runtime.llamacpp import log


class ImageEncoder(Protocol):
    n_image_tokens: int
    n_embd: int

    def encode_images(self, images: Sequence[LoadedImage]) -> list[np.ndarray]:
        """Each image's embeddings, (n_image_tokens, n_embd) float32."""
        ...


class MtmdEncoder:
    """CLIP + projector through mtmd (``mtmd_encode_chunk``). One encode at a time (mtmd's context is not
    thread-safe); pixels are handed over as RGB, never the file."""

    def __init__(
        self,
        mmproj_path: Path,
        text_model: Any,
        *,
        n_threads: int,
        use_gpu: bool,
        flash_attn_type: int,
        n_embd: int,
    ) -> None:
        import llama_cpp.mtmd_cpp as mtmd

        self._mtmd = mtmd
        self._lock = threading.Lock()
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads
        params.print_timings = False
        params.warmup = False  # a warm-up encode costs as much as a real one; the first image pays instead
        params.flash_attn_type = flash_attn_type
        mark = log.mark()
        self._ctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), text_model, params)
        if not self._ctx:
            raise ModelFileError(
                f"llama.cpp could not load the vision projector {mmproj_path}: {log.reason(mark)}",
                hint="convert or download the mmproj again",
            )
        if not mtmd.mtmd_support_vision(self._ctx):
            self.close()
            raise ModelFileError(f"{mmproj_path} has no vision encoder")
        self.n_embd = n_embd
        self.n_image_tokens = 0  # known after the first encode; the caller sets it from the mmproj header

    def encode_images(self, images: Sequence[LoadedImage]) -> list[np.ndarray]:
        return [self._encode(im) for im in images]

    def _encode(self, image: LoadedImage) -> np.ndarray:
        mtmd = self._mtmd
        with self._lock:
            if not self._ctx:
                raise LlavaError("the vision encoder is closed")
            chunk = self._image_chunk(image)
            try:
                n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                mark = log.mark()
                if mtmd.mtmd_encode_chunk(self._ctx, chunk) != 0:
                    raise LlavaError(f"the vision encoder failed on {image.name}: {log.reason(mark)}")
                ptr = mtmd.mtmd_get_output_embd(self._ctx)
                # The buffer is overwritten by the next encode: copy it out now.
                out = np.ctypeslib.as_array(ptr, shape=(n_tokens * self.n_embd,)).copy()
            finally:
                mtmd.mtmd_input_chunk_free(chunk)
        return out.reshape(n_tokens, self.n_embd)

    def _image_chunk(self, image: LoadedImage) -> Any:
        """An owned mtmd image chunk for `image` (mtmd preprocesses the pixels: resize, pad, normalise)."""
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
            rc = mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), bitmaps, 1)
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

    def close(self) -> None:
        with self._lock:
            if self._ctx:
                self._mtmd.mtmd_free(self._ctx)
                self._ctx = None


class ImageCache:
    """Embeddings by image content hash, least recently used dropped first beyond ``limit_bytes`` (the newest entry
    always stays). Thread-safe; one per loaded model, shared by every sequence and conversation."""

    def __init__(self, encoder: ImageEncoder, limit_bytes: int) -> None:
        self.encoder = encoder
        self.limit_bytes = limit_bytes
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._encoding: dict[str, threading.Event] = {}
        self.encoded = 0  # CLIP encodes run (the cache avoids repeats)
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, sha256: str) -> np.ndarray | None:
        with self._lock:
            entry = self._entries.get(sha256)
            if entry is not None:
                self._entries.move_to_end(sha256)
            return entry

    def embeddings(self, image: LoadedImage) -> tuple[np.ndarray, bool, float]:
        """The embeddings of `image`, encoding it now if needed. Returns (embeddings, was_encoded, seconds).
        Two threads asking for the same new image encode it once."""
        while True:
            with self._lock:
                entry = self._entries.get(image.sha256)
                if entry is not None:
                    self._entries.move_to_end(image.sha256)
                    self.hits += 1
                    return entry, False, 0.0
                waiting = self._encoding.get(image.sha256)
                if waiting is None:
                    mine = self._encoding[image.sha256] = threading.Event()
                    break
            waiting.wait()
        try:
            t0 = time.perf_counter()
            (embd,) = self.encoder.encode_images([image])
            secs = time.perf_counter() - t0
            with self._lock:
                self.encoded += 1
                self._entries[image.sha256] = embd
                self._evict()
            return embd, True, secs
        finally:
            with self._lock:
                del self._encoding[image.sha256]
            mine.set()

    def _evict(self) -> None:
        total = sum(e.nbytes for e in self._entries.values())
        while len(self._entries) > 1 and total > self.limit_bytes:
            _, old = self._entries.popitem(last=False)
            total -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
