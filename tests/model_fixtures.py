"""Session-scoped fixtures: synthetic llava-hf checkpoints and the GGUF pairs converted from them.

Also the llama.cpp helpers the parity and fidelity tests share (image embeddings through the mtmd bindings,
last-position logits of a prompt with an image), so other suites can compare against the same numbers.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from quantize import ConvertResult, convert
from quantize.synthetic import make_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny llava-hf checkpoint (Hub 4.x layout, F32, one file): 576 image tokens, ~1 MB."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava")


@pytest.fixture(scope="session")
def tiny_pair_f16(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> ConvertResult:
    return convert(tiny_checkpoint, tmp_path_factory.mktemp("gguf_f16"), outtype="f16")


@pytest.fixture(scope="session")
def tiny_pair_f32(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> ConvertResult:
    return convert(tiny_checkpoint, tmp_path_factory.mktemp("gguf_f32"), outtype="f32")


@pytest.fixture(scope="session")
def tiny256_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every matmul row length a multiple of 256 (hidden 256, FFN 512; vision 256/512), for K-quant tests."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt256") / "tiny256-llava", preset="tiny256")


# ------------------------------------------------------------------------------------------ llama.cpp helpers


def test_image(size: int = 336, seed: int = 0) -> np.ndarray:
    """A deterministic RGB image (uint8, size x size x 3) with structure at every scale: smooth gradients plus
    blocks plus noise, so position embeddings and attention both matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([255 * x, 255 * y, 255 * (1 - x) * y], axis=-1)
    img += 60 * np.sign(np.sin(12 * x)[..., None] * np.cos(9 * y)[..., None])
    img += rng.normal(0, 25, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


test_image.__test__ = False  # type: ignore[attr-defined]  # not a test, despite the name


class MtmdSession:
    """A text model + mmproj loaded through llama-cpp-python's low-level llama and mtmd bindings."""

    def __init__(self, text_path: Path, mmproj_path: Path, *, n_ctx: int = 2048) -> None:
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        self.llama_cpp, self.mtmd = llama_cpp, mtmd
        # F32 KV cache so that comparisons against transformers measure the model, not the cache type.
        self.llm = llama_cpp.Llama(
            model_path=str(text_path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            n_threads=2,
            type_k=llama_cpp.GGML_TYPE_F32,
            type_v=llama_cpp.GGML_TYPE_F32,
            verbose=False,
        )
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.n_threads = 2
        params.print_timings = False
        params.warmup = False
        self.ctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), self.llm.model, params)
        if not self.ctx:
            raise RuntimeError(f"mtmd could not load {mmproj_path}")
        self.n_embd = llama_cpp.llama_model_n_embd(self.llm.model)

    def close(self) -> None:
        if self.ctx:
            self.mtmd.mtmd_free(self.ctx)
            self.ctx = None
        self.llm.close()

    def __enter__(self) -> MtmdSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tokenize(self, prompt: str, image: np.ndarray) -> tuple[object, list[list[int] | None]]:
        """Chunks for `prompt` (with one media marker) + `image`; also each chunk's tokens (None = image)."""
        mtmd = self.mtmd
        h, w, _ = image.shape
        buf = (ctypes.c_uint8 * image.size).from_buffer_copy(np.ascontiguousarray(image).tobytes())
        bitmap = mtmd.mtmd_bitmap_init(w, h, buf)
        text = prompt.replace("<image>", mtmd.mtmd_default_marker().decode()).encode()
        inp = mtmd.mtmd_input_text()
        inp.text, inp.text_len, inp.add_special, inp.parse_special = text, len(text), True, True
        chunks = mtmd.mtmd_input_chunks_init()
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        rc = mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(inp), bitmaps, 1)
        mtmd.mtmd_bitmap_free(bitmap)
        assert rc == 0, f"mtmd_tokenize returned {rc}"
        parts: list[list[int] | None] = []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                parts.append([ptr[j] for j in range(n.value)])
            else:
                parts.append(None)
        return chunks, parts

    def image_embeddings(self, image: np.ndarray) -> np.ndarray:
        """The mmproj's output for `image`: (n_image_tokens, n_embd) float32."""
        mtmd = self.mtmd
        chunks, parts = self.tokenize("<image>", image)
        try:
            idx = parts.index(None)
            chunk = mtmd.mtmd_input_chunks_get(chunks, idx)
            n_tok = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            assert mtmd.mtmd_encode_chunk(self.ctx, chunk) == 0
            out = mtmd.mtmd_get_output_embd(self.ctx)
            return np.ctypeslib.as_array(out, shape=(n_tok * self.n_embd,)).reshape(n_tok, self.n_embd).copy()
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def prompt_logits(self, prompt: str, image: np.ndarray) -> tuple[np.ndarray, list[list[int] | None]]:
        """Evaluate `prompt` with `image` at its ``<image>`` from an empty KV cache; last-position logits."""
        mtmd, lc = self.mtmd, self.llama_cpp
        chunks, parts = self.tokenize(prompt, image)
        try:
            lc.llama_memory_clear(lc.llama_get_memory(self.llm.ctx), True)
            new_n_past = lc.llama_pos(0)
            rc = mtmd.mtmd_helper_eval_chunks(
                self.ctx, self.llm.ctx, chunks, 0, 0, self.llm.n_batch, True, ctypes.byref(new_n_past)
            )
            assert rc == 0, f"mtmd_helper_eval_chunks returned {rc}"
            n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.llm.model))
            ptr = lc.llama_get_logits_ith(self.llm.ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy(), parts
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
