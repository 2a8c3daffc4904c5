"""Quality and size of each quantization against F16, on a synthetic LLaVA model, measured end to end.

    python bench/bench_quality.py                    # the 'mid' model (1024-wide text, ~0.1 B parameters)
    python bench/bench_quality.py --preset tiny256   # seconds; the model the tests use
    python bench/bench_quality.py --preset bench     # CLIP ViT-L + 2048-wide text, ~1 B parameters (slow)

Builds a random-weight checkpoint (quantize.synthetic), converts it to F16 (quantize.convert), quantizes the text
model to Q8_0 / Q6_K / Q4_K_M (and once with a Q8_0 mmproj) with `quantize.quantize`, then scores every pair
against the F16 pair with `llava_cli.quality.measure_quality`, through the engine path users run (our prompt
template and tokenizer, our ggml vision graph; llava_cli/runtime/scoring.py): the F16 pair answers 4 fixed image +
prompt inputs greedily, the quantized pairs are teacher-forced on the same answers, and the next-token distributions are
compared position by position (mean KL(F16 || quant) in nats, top-1 agreement). Prints Markdown tables; no asserts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llava_cli.quality import measure_quality  # noqa: E402
from quantize import convert, quantize  # noqa: E402
from quantize.quality import format_quality_table  # noqa: E402
from quantize.synthetic import make_checkpoint  # noqa: E402

# A text model as wide as a small real one (rows multiples of 256: no K-quant fallbacks), a small vision tower
# so that the cost goes into the part being quantized.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny256": {"preset": "tiny256"},
    "mid": {
        "preset": "tiny256",
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
    },
    "bench": {"preset": "bench"},
}


def scale_residual_branches(ckpt: Path, gain: float) -> None:
    """Multiply the text model's attention-output and FFN-down weights by `gain`, in place.

    Trained transformers are close to "identity + small updates": each block adds a small change to the residual
    stream. A random-weight model with unit-gain branches rewrites the stream in every block, so rounding noise
    compounds through the depth much faster than in a real model. Scaling the branches that write to the residual
    stream gives the synthetic model that structure.
    """
    from safetensors.numpy import load_file, save_file

    for f in sorted(ckpt.glob("*.safetensors")):
        tensors = load_file(f)
        for name, value in tensors.items():
            if "language_model" in name and name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
                tensors[name] = (value * gain).astype(value.dtype)
        save_file(tensors, f, metadata={"format": "pt"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default="mid")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--answer", type=int, default=16, help="answer tokens scored per input")
    ap.add_argument(
        "--residual-gain",
        type=float,
        default=1.0,
        help="scale the text model's o_proj/down_proj weights (e.g. 0.25: closer to a trained model)",
    )
    ap.add_argument("--work", type=Path, default=None, help="keep the files here (default: a temporary dir)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        t0 = time.perf_counter()
        ckpt = make_checkpoint(work / f"synthetic-{args.preset}", seed=args.seed, dtype="f32", **PRESETS[args.preset])
        if args.residual_gain != 1.0:
            scale_residual_branches(ckpt, args.residual_gain)
        f16 = convert(ckpt, work / "f16", outtype="f16")
        built = time.perf_counter() - t0
        print(
            f"model: synthetic {args.preset} (seed {args.seed}, residual gain {args.residual_gain}), "
            f"F16 pair built in {built:.1f} s\n"
        )

        timings = []
        candidates = {}
        for bits, mbits in (("q8_0", "f16"), ("q6_k", "f16"), ("q4_k_m", "f16"), ("q4_k_m", "q8_0")):
            out = work / f"{bits}-{mbits}"
            t = time.perf_counter()
            r = quantize(f16.text_path, bits=bits, mmproj_bits=mbits, out=out)
            timings.append((bits, mbits, time.perf_counter() - t, r.text_size, r.predicted_size, r.tensor_types))
            candidates[(bits, mbits)] = (r.text_path, r.mmproj_path)

        print("| text | mmproj | quantize time | text size | predicted | tensor types |")
        print("|---|---|---:|---:|---:|---|")
        for bits, mbits, secs, size, predicted, types in timings:
            mix = ", ".join(f"{n} {t}" for t, n in sorted(types.items(), key=lambda kv: -kv[1]))
            print(
                f"| {bits.upper()} | {mbits.upper()} | {secs:.1f} s | {size / 2**20:,.2f} MiB | "
                f"{predicted / 2**20:,.2f} MiB | {mix} |"
            )
        print()

        t = time.perf_counter()
        rows = measure_quality(f16.text_path, f16.mmproj_path, candidates, n_answer=args.answer)
        print(format_quality_table(rows))
        print(
            f"\n{rows[0].positions} answer positions; F16 next-token entropy {rows[0].reference_entropy:.2f} nats "
            f"on average; scored in {time.perf_counter() - t:.1f} s"
        )


if __name__ == "__main__":
    main()
