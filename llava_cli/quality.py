"""Measured quality of quantized pairs against the F16 pair, scored through the engine path users run.

Each pair is loaded as the engine loads it and the prompts are built, tokenized and fed as `Engine.ask` does it
(``llava_cli/runtime/scoring.py``): our prompt template and tokenizer, our ggml vision graph for the image. On fixed
image + prompt inputs the F16 pair answers greedily; every candidate is teacher-forced on the same answer, and the
next-token distributions are compared position by position (mean KL divergence, top-1 agreement).

This lives in llava_cli (it needs the runtime), not in quantize/ (which may only use llava_cli's foundation):
`llava quantize --report` hands `measure_quality` to `quantize.quantize(measure=...)`, and
``bench/bench_quality.py`` calls it directly. The row type and the Markdown table stay in ``quantize/quality.py``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llava_cli.gguf_info import read_gguf
from llava_cli.runtime.scoring import Scorer
from quantize.quality import ProgressFn, QualityRow

QUALITY_PROMPTS = (
    "Describe this image in detail.",
    "What colors do you see?",
    "How many shapes are there, and where are they?",
    "Write a one-sentence caption.",
)


def quality_images(size: int = 336) -> list[bytes]:
    """Four fixed PNG images (gradients, a checkerboard, shapes, seeded noise): the same bytes on every run."""
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


def _log_softmax(x: np.ndarray) -> np.ndarray:
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
    if inputs is None:
        inputs = list(zip(quality_images(), QUALITY_PROMPTS, strict=True))
    total = len(inputs) * (len(candidates) + 1)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_progress:
            on_progress(done, total)

    def score(text: Path, mmproj: Path, answers: list[list[int]] | None) -> list[tuple[list[int], np.ndarray]]:
        out = []
        with Scorer(text, mmproj) as scorer:
            for k, (image, prompt) in enumerate(inputs):
                given = answers[k] if answers is not None else None
                tokens, logits = scorer.answer_logits(image, prompt, given, n_answer)
                out.append((tokens, logits.astype(np.float64)))
                tick()
        return out

    f16_text, f16_mmproj = Path(f16_text), Path(f16_mmproj)
    reference = score(f16_text, f16_mmproj, None)
    answers = [tokens for tokens, _ in reference]
    entropy = sum(float(-(np.exp(lp) * lp).sum()) for lp in (_log_softmax(r) for _, r in reference))
    entropy /= max(1, sum(len(t) for t in answers))

    def row_for(bits: str, mbits: str, text: Path, mmproj: Path, logits: list[Any]) -> QualityRow:
        kls, agree, n = 0.0, 0, 0
        for (tokens, ref), got in zip(reference, logits, strict=True):
            lp, lq = _log_softmax(ref), _log_softmax(got)
            kls += float((np.exp(lp) * (lp - lq)).sum())
            agree += int((ref.argmax(axis=-1) == got.argmax(axis=-1)).sum())
            n += len(tokens)
        return QualityRow(
            bits=bits,
            mmproj_bits=mbits,
            file_size=text.stat().st_size + mmproj.stat().st_size,
            text_size=text.stat().st_size,
            bits_per_weight=read_gguf(text).bits_per_weight,
            mean_kl=kls / max(1, n),
            top1_agreement=agree / max(1, n),
            positions=n,
            reference_entropy=entropy,
        )

    rows = [
        row_for(
            (read_gguf(f16_text).file_type or "f16").lower(),
            (read_gguf(f16_mmproj).file_type or "f16").lower(),
            f16_text,
            f16_mmproj,
            [r for _, r in reference],
        )
    ]
    for (bits, mbits), (text, mmproj) in candidates.items():
        scored = score(Path(text), Path(mmproj), answers)
        rows.append(row_for(bits, mbits, Path(text), Path(mmproj), [r for _, r in scored]))
    return rows
