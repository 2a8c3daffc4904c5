"""Loading a GGUF pair: validate both headers, place layers (CPU/GPU), load the text model with its context, the
image encoder and the embedding cache, and a scheduler over them. `Engine` and `Runtime` are two drivers of this."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from llava_cli.errors import UsageError
from llava_cli.gguf_info import GGUFInfo, check_pair, read_gguf
from llava_cli.memory.buffers import runtime_ubatch
from llava_cli.preprocess import ImageFit
from llava_cli.runtime.encoder import ImageCache, ImageEncoder
from llava_cli.runtime.llamacpp import (
    GpuLayers,
    TextModel,
    backend_init,
    default_threads,
    log,
    resolve_gpu_layers,
)
from llava_cli.runtime.scheduler import Scheduler
from llava_cli.runtime.vision import VisionEncoder


class ModelPair:
    """A text model + mmproj, loaded; ``n_seq`` sequence slots of ``n_ctx`` positions each."""

    def __init__(
        self,
        text_path: str | os.PathLike[str],
        mmproj_path: str | os.PathLike[str],
        *,
        n_seq: int,
        n_ctx: int,
        n_threads: int | None,
        n_threads_batch: int | None,
        n_gpu_layers: GpuLayers | str,
        mmproj_offload: bool,
        n_batch: int,
        n_ubatch: int | None,
        flash_attn: bool | None,
        image_fit: ImageFit,
        image_cache_mb: int,
        prefill_chunk: int,
        kv_unified: bool,
        verbose: bool,
        on_note: Callable[[str], None] | None,
    ) -> None:
        import llama_cpp

        self.text: TextModel | None = None
        self.encoder: VisionEncoder | None = None
        self._on_note = on_note or (lambda msg: print(f"note: {msg}", file=sys.stderr))
        self.notes: list[str] = []
        self.text_path = Path(text_path)
        self.mmproj_path = Path(mmproj_path)
        if n_ctx < 64:
            raise UsageError(f"--ctx {n_ctx} is too small", hint="use at least 1024; each image takes 576 tokens")
        if n_seq < 1:
            raise UsageError(f"--parallel {n_seq} must be at least 1")
        # Validate both headers first: llama.cpp aborts the process on some malformed files.
        self.text_info: GGUFInfo = read_gguf(self.text_path, expect="text")
        self.mmproj_info: GGUFInfo = read_gguf(self.mmproj_path, expect="mmproj")
        check_pair(self.text_info, self.mmproj_info)

        log.install(verbose)
        backend_init()
        self.n_seq = n_seq
        self.n_ctx = n_ctx
        self.n_threads = n_threads or default_threads()
        self.n_threads_batch = n_threads_batch or self.n_threads
        layers, mmproj_gpu_ok, self.offload_reason = resolve_gpu_layers(
            n_gpu_layers,
            text_path=self.text_path,
            mmproj_path=self.mmproj_path,
            text_info=self.text_info,
            n_ctx=n_ctx,
            n_parallel=n_seq,
            mmproj_offload=mmproj_offload,
            flash_attn=flash_attn,
            note=self.note,
        )
        if self.offload_reason:
            self.notes.append(f"--n-gpu-layers auto: {self.offload_reason}")  # recorded, not printed: normal case
        self.n_gpu_layers = layers
        # The vision encoder follows the text model: on the GPU only when layers are offloaded (and the planner
        # agrees).
        self.mmproj_offload = bool(
            mmproj_offload and mmproj_gpu_ok and layers > 0 and llama_cpp.llama_supports_gpu_offload()
        )
        self.n_batch = max(1, n_batch)
        ub = runtime_ubatch(layers) if n_ubatch is None else n_ubatch  # None: the measured default per device
        self.n_ubatch = max(1, min(ub, self.n_batch))
        try:
            self.text = TextModel(
                self.text_path,
                n_ctx=n_ctx,
                n_seq=n_seq,
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads_batch,
                n_gpu_layers=layers,
                n_batch=self.n_batch,
                n_ubatch=self.n_ubatch,
                flash_attn=flash_attn,
                kv_unified=kv_unified,
            )
            # Our own vision graph on ggml (runtime/vision.py): exactly what transformers computes for the image,
            # where mtmd's puts the class token last. It refuses an mmproj it cannot compute before any graph exists.
            self.encoder = VisionEncoder(
                self.mmproj_path,
                n_threads=self.n_threads_batch,
                use_gpu=self.mmproj_offload,
                flash_attn=flash_attn,
                image_fit=image_fit,
            )
        except BaseException:
            self.close()
            raise
        self.n_image_tokens = self.encoder.n_image_tokens
        self.image_fit: ImageFit = image_fit
        self.image_encoder: ImageEncoder = self.encoder
        self.cache = ImageCache(self.image_encoder, image_cache_mb * 1024 * 1024)
        self.tokenizer = self.text.tokenizer
        self.scheduler = Scheduler(
            self.text, n_seq=n_seq, n_ctx=n_ctx, n_batch=self.n_batch, prefill_chunk=prefill_chunk
        )

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        self._on_note(msg)

    @property
    def kv_bytes_per_slot(self) -> int:
        """KV cache bytes of one sequence slot (``n_ctx`` positions)."""
        assert self.text is not None
        return self.text.kv_bytes_per_cell() * self.n_ctx

    def close(self) -> None:
        if self.encoder is not None:
            self.encoder.close()
            self.encoder = None
        if self.text is not None:
            self.text.close()
            self.text = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: modules may be gone already
            self.close()
