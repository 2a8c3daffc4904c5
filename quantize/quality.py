"""The quality table's data: one `QualityRow` per quantization compared with F16, and its Markdown form.

The measurement itself runs the models through the runtime (``llava_cli/quality.py: measure_quality``), which
quantize/ may not import (llava_cli/resolve.py imports quantize/, so the edge goes one way: see
tests/test_architecture.py). `quantize()` therefore takes the measurement as an argument (`MeasureFn`): the
``llava quantize --report`` command and ``bench/bench_quality.py`` pass ``llava_cli.quality.measure_quality``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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


class MeasureFn(Protocol):
    """Scores candidate pairs against the F16 pair: ``candidates`` maps (bits, mmproj_bits) to (text, mmproj)."""

    def __call__(
        self,
        f16_text: Path,
        f16_mmproj: Path,
        candidates: dict[tuple[str, str], tuple[Path, Path]],
        *,
        on_progress: ProgressFn | None = None,
    ) -> list[QualityRow]: ...


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
