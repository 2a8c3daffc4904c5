"""Image encode time: our ggml vision graph (llava_cli/runtime/vision.py) vs mtmd's (``mtmd_encode_chunk``, the
path llava_cli/engine.py takes today), on the same F16 CLIP-L/336 mmproj, same process, interleaved.

The mmproj comes from a synthetic checkpoint with CLIP ViT-L/14-336's vision tower (24 layers × 1024, 16 heads,
FFN 4096; 23 blocks run) and a small text model (the projector maps to its width, which barely matters for time).
Each round times every configuration once, in turn, so machine drift hits all of them alike; the table shows the
median seconds per image and the ratio ours / mtmd at the same flash-attention setting. "batch 4" is one graph
evaluation of 4 images for ours, 4 sequential encodes for mtmd (its LLaVA graph has no batch support).

    nice -n 5 python bench/bench_vision.py --threads 2 --rounds 3 2>/dev/null
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

# Run from anywhere: the test image helper lives in tests/ (not an installed package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_model(folder: Path) -> tuple[Path, Path]:
    from quantize import convert
    from quantize.synthetic import make_checkpoint

    ckpt = make_checkpoint(
        folder / "clip-l-ckpt",
        preset="bench",
        dtype="f16",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    pair = convert(ckpt, folder / "gguf", outtype="f16")
    return pair.text_path, pair.mmproj_path


class Mtmd:
    """mtmd's CLIP encode of one 336×336 image chunk (tokenised once, encoded on every call)."""

    def __init__(self, text: Path, mmproj: Path, image: np.ndarray, *, threads: int, flash_attn: bool) -> None:
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        self.mtmd = mtmd
        self.llm = llama_cpp.Llama(model_path=str(text), n_ctx=1024, n_threads=threads, verbose=False)
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.n_threads = threads
        params.print_timings = False
        params.warmup = False
        params.flash_attn_type = 1 if flash_attn else 0  # LLAMA_FLASH_ATTN_TYPE_ENABLED / _DISABLED
        self.ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), self.llm.model, params)
        assert self.ctx, "mtmd could not load the mmproj"
        h, w, _ = image.shape
        buf = (ctypes.c_uint8 * image.size).from_buffer_copy(np.ascontiguousarray(image).tobytes())
        bitmap = mtmd.mtmd_bitmap_init(w, h, buf)
        text = mtmd.mtmd_default_marker()
        inp = mtmd.mtmd_input_text()
        inp.text, inp.text_len, inp.add_special, inp.parse_special = text, len(text), False, True
        self.chunks = mtmd.mtmd_input_chunks_init()
        rc = mtmd.mtmd_tokenize(self.ctx, self.chunks, ctypes.byref(inp), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
        mtmd.mtmd_bitmap_free(bitmap)
        assert rc == 0
        n = mtmd.mtmd_input_chunks_size(self.chunks)
        self.chunk = next(
            mtmd.mtmd_input_chunks_get(self.chunks, i)
            for i in range(n)
            if mtmd.mtmd_input_chunk_get_type(mtmd.mtmd_input_chunks_get(self.chunks, i))
            != mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT
        )

    def encode(self, n_images: int) -> None:
        for _ in range(n_images):
            assert self.mtmd.mtmd_encode_chunk(self.ctx, self.chunk) == 0

    def close(self) -> None:
        self.mtmd.mtmd_input_chunks_free(self.chunks)
        self.mtmd.mtmd_free(self.ctx)
        self.llm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,4", help="batch sizes to time, comma-separated (default: 1,4)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the synthetic model (default: a temp dir)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    from llava_cli.runtime.vision import VisionEncoder
    from tests.model_fixtures import test_image

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.work or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        text, mmproj = make_model(folder)
        print(f"model: {mmproj.name} {mmproj.stat().st_size / 1e6:.0f} MB, made in {time.perf_counter() - t0:.0f} s")
        rgb = test_image(336)
        runners: dict[str, Callable[[], None]] = {}
        closers: list[Callable[[], None]] = []
        for fa in (False, True):
            tag = "fa" if fa else "no-fa"
            m = Mtmd(text, mmproj, rgb, threads=args.threads, flash_attn=fa)
            enc = VisionEncoder(mmproj, n_threads=args.threads, flash_attn=fa)
            closers += [m.close, enc.close]
            px1 = enc.preprocess(Image.fromarray(rgb))[None]
            for b in batches:
                px = np.repeat(px1, b, axis=0)
                runners[f"mtmd {tag} b{b}"] = lambda m=m, b=b: m.encode(b)
                runners[f"ours {tag} b{b}"] = lambda enc=enc, px=px: enc.encode(px)  # type: ignore[misc]
        for run in runners.values():  # warm-up: graph allocation, first-touch of the weights
            run()
        times: dict[str, list[float]] = {k: [] for k in runners}
        for r in range(args.rounds):
            for name, run in runners.items():
                t = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t)
            print(f"round {r + 1}/{args.rounds} done", flush=True)
        for close in closers:
            close()

    per_image = {k: statistics.median(v) / int(k.rsplit("b", 1)[1]) for k, v in times.items()}
    print(f"\nimage encode, CLIP-L/336 F16, {args.threads} threads, median of {args.rounds} rounds (s per image)")
    print(f"{'attention':<12}{'batch':>6}{'mtmd':>10}{'ours':>10}{'ours/mtmd':>11}")
    for tag in ("no-fa", "fa"):
        for b in batches:
            m, o = per_image[f"mtmd {tag} b{b}"], per_image[f"ours {tag} b{b}"]
            print(f"{tag:<12}{b:>6}{m:>10.3f}{o:>10.3f}{o / m:>10.2f}x")


if __name__ == "__main__":
    main()
