"""Images → embeddings for the text model: the `ImageEncoder` interface (implemented by our ggml vision graph,
``runtime/vision.py``) and the embedding cache shared by every sequence (keyed by the SHA-256 of the image bytes;
the image fit is fixed per loaded model, so the hash alone is a complete key).

The embeddings reach ``llama_decode`` as embedding batches (scheduler.py); nothing of mtmd is used.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from llava_cli.images import LoadedImage


class ImageEncoder(Protocol):
    n_image_tokens: int
    n_embd: int

    def encode_images(self, images: Sequence[LoadedImage]) -> list[np.ndarray]:
        """Each image's embeddings, (n_image_tokens, n_embd) float32."""
        ...


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
