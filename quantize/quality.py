"""Measured quality: quantized pairs compared with the F16 pair on fixed image + prompt inputs (mean KL
divergence of the next-token distributions over an answer, top-1 agreement). ``llava quantize --report`` and
``bench/bench_quality.py`` both use it.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_cli.errors import ModelFileError
from llava_cli.gguf_info import GGUFInfo, read_gguf
from quantize.llama_worker import cpu_count

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class QualityRow:
    """One line of the quality table: a quantization compared with F16 on the same inputs."""

    bits: str
    mmproj_bits: str
    file_size: int  # text model + mmproj, bytes
    text_size: int
    bits_per_weight: float  # text model tensors
    mean_kl: float  # mean KL(F16 || quant) of the next-token distribution, nats
    top1_agreement: float  # fraction of positions where the argmax token agrees with F16
    positions: int
    reference_entropy: float = 0.0  # mean entropy of the F16 distributions (nats): how peaked the model is


QUALITY_PROMPTS = (
    "Describe this image in detail.",
    "What colors do you see?",
    "How many shapes are there, and where are they?",
    "Write a one-sentence caption.",
)


def quality_images(size: int = 336) -> list[bytes]:
    """Four fixed PNG images (gradients, a checkerboard, shapes, seeded noise): the same bytes on every run."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    grad = np.stack([xx, yy, 1 - xx], axis=-1)
    checker = (((np.arange(size)[:, None] // 42) + (np.arange(size)[None, :] // 42)) % 2).astype(np.float32)
    checker = np.stack([checker, 0.2 + 0.6 * checker, 1 - checker], axis=-1)
    shapes = Image.new("RGB", (size, size), (240, 240, 230))
    draw = ImageDraw.Draw(shapes)
    draw.ellipse((30, 40, 150, 160), fill=(200, 30, 30))
    draw.rectangle((180, 60, 300, 200), fill=(30, 60, 200))
    draw.polygon([(60, 300), (160, 190), (260, 310)], fill=(40, 170, 60))
    noise = np.random.default_rng(1234).random((size // 16, size // 16, 3), dtype=np.float32)
    noise = np.kron(noise, np.ones((16, 16, 1), dtype=np.float32))[:size, :size]
    noise = np.pad(noise, ((0, size - noise.shape[0]), (0, size - noise.shape[1]), (0, 0)), mode="edge")
    images = [
        Image.fromarray((grad * 255).astype(np.uint8)),
        Image.fromarray((checker * 255).astype(np.uint8)),
        shapes,
        Image.fromarray((noise * 255).astype(np.uint8)),
    ]
    out = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


_QUIET_LOG: Any = None  # the ctypes callback must outlive every call into mtmd: keep a reference here


def _quiet_mtmd_logs() -> None:
    """mtmd and clip log every image they encode to stderr; keep the CLI's output clean unless debugging."""
    global _QUIET_LOG
    if os.environ.get("LLAVA_DEBUG") == "1":
        return
    import llama_cpp
    from llama_cpp import mtmd_cpp

    if _QUIET_LOG is None:
        _QUIET_LOG = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    mtmd_cpp.mtmd_log_set(_QUIET_LOG, None)
    mtmd_cpp.mtmd_helper_log_set(_QUIET_LOG, None)


class _Scorer:
    """A GGUF pair loaded with llama-cpp-python + mtmd, giving the next-token logits over an answer."""

    def __init__(self, text_path: Path, mmproj_path: Path, *, n_ctx: int = 1024) -> None:
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self._lc, self._mt = llama_cpp, mtmd_cpp
        _quiet_mtmd_logs()
        self.llm = llama_cpp.Llama(
            model_path=str(text_path), n_ctx=n_ctx, n_batch=512, n_threads=cpu_count(), n_gpu_layers=0, verbose=False
        )
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = cpu_count()
        params.warmup = False
        self.mtmd = mtmd_cpp.mtmd_init_from_file(str(mmproj_path).encode(), self.llm.model, params)
        if not self.mtmd:
            self.llm.close()
            raise ModelFileError(f"llama.cpp could not load the vision projector {mmproj_path}")
        self.n_vocab = self.llm.n_vocab()

    def close(self) -> None:
        if self.mtmd:
            self._mt.mtmd_free(self.mtmd)
            self.mtmd = None
        self.llm.close()

    def _row(self) -> Any:
        import numpy as np

        ptr = self._lc.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)

    def answer_logits(
        self, image: bytes, prompt: str, answer: Sequence[int] | None, n_answer: int
    ) -> tuple[list[int], Any]:
        """Logits predicting each answer token. With ``answer=None`` the answer is decoded greedily."""
        import numpy as np

        lc, mt = self._lc, self._mt
        ctx = self.llm.ctx
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        marker = mt.mtmd_default_marker().decode()
        text = f"USER: {marker}\n{prompt} ASSISTANT:".encode()
        data = (ctypes.c_uint8 * len(image)).from_buffer(bytearray(image))
        bitmap = mt.mtmd_helper_bitmap_init_from_buf(self.mtmd, data, len(image), False)
        chunks = mt.mtmd_input_chunks_init()
        try:
            inp = mt.mtmd_input_text()
            inp.text, inp.text_len, inp.add_special, inp.parse_special = text, len(text), True, True
            bitmaps = (mt.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mt.mtmd_tokenize(self.mtmd, chunks, ctypes.byref(inp), bitmaps, 1) != 0:
                raise ModelFileError("mtmd could not tokenize the quality prompt")
            n_past = lc.llama_pos(0)
            if mt.mtmd_helper_eval_chunks(self.mtmd, ctx, chunks, 0, 0, 512, True, ctypes.byref(n_past)) != 0:
                raise ModelFileError("llama.cpp failed to evaluate the quality prompt")
        finally:
            mt.mtmd_input_chunks_free(chunks)
            mt.mtmd_bitmap_free(bitmap)
        tokens: list[int] = []
        rows = []
        row = self._row()
        for k in range(n_answer):
            rows.append(row)
            tok = int(answer[k]) if answer is not None else int(np.argmax(row))
            tokens.append(tok)
            if k == n_answer - 1:
                break
            arr = (lc.llama_token * 1)(tok)
            if lc.llama_decode(ctx, lc.llama_batch_get_one(arr, 1)) != 0:
                raise ModelFileError("llama.cpp failed to decode an answer token")
            row = self._row()
        return tokens, np.stack(rows)


def _log_softmax(x: Any) -> Any:
    import numpy as np

    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def measure_quality(
    f16_text: str | os.PathLike[str],
    f16_mmproj: str | os.PathLike[str],
    candidates: dict[tuple[str, str], tuple[Path, Path]],
    *,
    n_answer: int = 16,
    inputs: Sequence[tuple[bytes, str]] | None = None,
    on_progress: ProgressFn | None = None,
) -> list[QualityRow]:
    """Compare each candidate pair with the F16 pair on fixed image + prompt inputs.

    The F16 pair answers each input greedily (`n_answer` tokens); every candidate is then fed the same answer
    (teacher forcing), so the next-token distributions are compared position by position: mean KL(F16 || quant)
    in nats and the fraction of positions whose top-1 token agrees. `candidates` maps (bits, mmproj_bits) to a
    (text, mmproj) pair. The F16 pair itself is the first row (KL 0, agreement 1).
    """
    import numpy as np

    if inputs is None:
        inputs = list(zip(quality_images(), QUALITY_PROMPTS, strict=True))
    total = len(inputs) * (len(candidates) + 1)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_progress:
            on_progress(done, total)

    f16_text, f16_mmproj = Path(f16_text), Path(f16_mmproj)
    scorer = _Scorer(f16_text, f16_mmproj)
    reference: list[tuple[list[int], Any]] = []
    try:
        for image, prompt in inputs:
            reference.append(scorer.answer_logits(image, prompt, None, n_answer))
            tick()
    finally:
        scorer.close()

    entropy = sum(float(-(np.exp(lp) * lp).sum()) for lp in (_log_softmax(r) for _, r in reference))
    entropy /= max(1, sum(len(t) for t, _ in reference))

    def row_for(bits: str, mbits: str, text: Path, mmproj: Path, logits: list[Any]) -> QualityRow:
        kls, agree, n = 0.0, 0, 0
        for (tokens, ref), got in zip(reference, logits, strict=True):
            lp, lq = _log_softmax(ref), _log_softmax(got)
            kls += float((np.exp(lp) * (lp - lq)).sum())
            agree += int((ref.argmax(axis=-1) == got.argmax(axis=-1)).sum())
            n += len(tokens)
        info = read_gguf(text)
        return QualityRow(
            bits=bits,
            mmproj_bits=mbits,
            file_size=text.stat().st_size + mmproj.stat().st_size,
            text_size=text.stat().st_size,
            bits_per_weight=info.bits_per_weight,
            mean_kl=kls / max(1, n),
            top1_agreement=agree / max(1, n),
            positions=n,
            reference_entropy=entropy,
        )

    mm_info = read_gguf(f16_mmproj)
    rows = [
        row_for(
            (read_gguf(f16_text).file_type or "f16").lower(),
            _mm_label(mm_info),
            f16_text,
            f16_mmproj,
            [r for _, r in reference],
        )
    ]
    for (bits, mbits), (text, mmproj) in candidates.items():
        scorer = _Scorer(Path(text), Path(mmproj))
        logits = []
        try:
            for (image, prompt), (tokens, _) in zip(inputs, reference, strict=True):
                logits.append(scorer.answer_logits(image, prompt, tokens, n_answer)[1])
                tick()
        finally:
            scorer.close()
        rows.append(row_for(bits, mbits, Path(text), Path(mmproj), logits))
    return rows


def _mm_label(info: GGUFInfo) -> str:
    return (info.file_type or "f16").lower()


def format_quality_table(rows: Sequence[QualityRow]) -> str:
    """A Markdown table of `rows` (what docs/quantization.md shows)."""
    lines = [
        "| text | mmproj | text size | pair size | bits/weight | mean KL vs F16 (nats) | top-1 agreement |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.bits.upper()} | {r.mmproj_bits.upper()} | {r.text_size / 2**20:,.2f} MiB | "
            f"{r.file_size / 2**20:,.2f} MiB | {r.bits_per_weight:.2f} | {r.mean_kl:.5f} | "
            f"{100 * r.top1_agreement:.1f}% |"
        )
    return "\n".join(lines)
