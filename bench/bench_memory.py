"""Measured vs planned memory: peak RSS of a process that loads a synthetic LLaVA on the CPU and answers one
image question, against ``llava_cli.memory.cpu_peak_bytes`` (the planner's CPU estimate).

    python bench/bench_memory.py                 # all sizes (builds models under bench/out/, ~4 GB of disk)
    python bench/bench_memory.py --sizes s m     # a subset
    python bench/bench_memory.py --keep          # keep the GGUFs for the next run

Each measurement runs in a fresh child process (``--child``), so the peak is that process's alone:
``resource.getrusage(RUSAGE_SELF).ru_maxrss``, plus /proc/self/status RssAnon/RssFile at the end to split
malloc'd buffers from mmap'd weights. Prints a table; no asserts. Figures go in docs/memory.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "out" / "memory"
MiB = 1024**2

# Synthetic sizes: text width/depth and how much of the CLIP ViT-L/14-336 tower to keep. All rows of K-quant
# tensors are multiples of 256 so Q4_K_M/Q6_K apply without fallbacks.
SIZES: dict[str, dict[str, int]] = {
    "xs": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
               vision_hidden_size=512, vision_intermediate_size=2048, vision_num_hidden_layers=4,
               vision_num_attention_heads=8),
    "s": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
              vision_hidden_size=1024, vision_intermediate_size=4096, vision_num_hidden_layers=6,
              vision_num_attention_heads=16),
    "m": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=12, num_attention_heads=16,
              vision_hidden_size=1024, vision_intermediate_size=4096, vision_num_hidden_layers=12,
              vision_num_attention_heads=16),
    "l": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=16, num_attention_heads=20,
              vision_hidden_size=1024, vision_intermediate_size=4096, vision_num_hidden_layers=24,
              vision_num_attention_heads=16),
}  # fmt: skip
QUANTS = {"xs": ["f16"], "s": ["f16", "q4_k_m"], "m": ["f16", "q8_0", "q4_k_m"], "l": ["f16", "q4_k_m"]}


def _rss_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def child(text: str, mmproj: str, n_ctx: int, flash_attn: str) -> None:
    """Load + one image answer; print one JSON line with the peak RSS and its parts."""
    import numpy as np
    from PIL import Image

    from llava_cli.runtime import Engine

    baseline = _rss_status()["VmRSS"]
    fa = None if flash_attn == "auto" else flash_attn == "on"
    t0 = time.perf_counter()
    eng = Engine(text, mmproj, n_ctx=n_ctx, n_threads=2, n_gpu_layers=0, flash_attn=fa, on_note=lambda m: None)
    after_load = _rss_status()
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8))
    path = OUT / "bench.png"
    img.save(path)
    answer = eng.ask("Describe the image.", [path], max_tokens=4, seed=0)
    end = _rss_status()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "baseline": baseline,
                "after_load": after_load["VmRSS"],
                "peak": peak,
                "end_anon": end.get("RssAnon", 0),
                "end_file": end.get("RssFile", 0),
                "seconds": time.perf_counter() - t0,
                "tokens": len(answer.text),
            }
        )
    )
    eng.close()


def build(size: str, quant: str) -> tuple[Path, Path]:
    from quantize import convert
    from quantize.quantizer import quantize
    from quantize.synthetic import make_checkpoint

    d = OUT / size
    f16 = d / f"bench-{size}.f16.gguf"
    mm = d / f"mmproj-bench-{size}.f16.gguf"
    if not f16.exists() or not mm.exists():
        spec = SIZES[size]
        heads = spec["num_attention_heads"]
        ckpt = make_checkpoint(d / "ckpt", preset="bench", vocab_pieces=512, num_key_value_heads=heads, **spec)
        res = convert(ckpt, d, outtype="f16", name=f"bench-{size}")
        f16, mm = res.text_path, res.mmproj_path
    if quant == "f16":
        return f16, mm
    q = d / f"bench-{size}.{quant}.gguf"
    if not q.exists():
        r = quantize(f16, bits=quant, mmproj_bits="f16", out=d)
        q = r.text_path
    return q, mm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=4, metavar=("TEXT", "MMPROJ", "CTX", "FA"))
    ap.add_argument("--sizes", nargs="*", default=list(SIZES))
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--keep", action="store_true", help="keep the GGUFs under bench/out/memory")
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), args.child[3])
        return

    from llava_cli import memory
    from llava_cli.gguf_info import read_gguf

    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        for quant in QUANTS[size]:
            text, mm = build(size, quant)
            ti, mi = read_gguf(text), read_gguf(mm)
            arch = memory.architecture_from_gguf(ti, mi)
            sizes = memory.sizes_from_gguf(ti, mi)
            fa = args.flash_attn != "off"  # llama.cpp's "auto" turns flash attention on for the CPU backend
            est = memory.cpu_peak_bytes(sizes, arch, args.ctx, flash_attn=fa)
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(text), str(mm), str(args.ctx), args.flash_attn],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                continue
            m = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append((size, quant, sizes, arch, est, m))
            files = sizes.text + sizes.mmproj
            print(
                f"{size:3} {quant:7} files {files / MiB:8.0f} MiB  peak {m['peak'] / MiB:8.0f}  est {est / MiB:8.0f}  "
                f"err {100 * (est / m['peak'] - 1):+6.1f}%  base {m['baseline'] / MiB:5.0f}  "
                f"load {m['after_load'] / MiB:6.0f}  anon {m['end_anon'] / MiB:6.0f}  file {m['end_file'] / MiB:6.0f}  "
                f"kv {memory.kv_cache_bytes(arch, args.ctx) / MiB:5.0f}  "
                f"compute {memory.compute_buffer_bytes(arch, args.ctx, flash_attn=fa) / MiB:5.0f}  "
                f"{m['seconds']:.1f}s",
                flush=True,
            )

    print()
    print(f"| model | quant | weights+mmproj MiB | peak RSS MiB | planner MiB | error | (ctx {args.ctx}) |")
    print("|---|---|---|---|---|---|---|")
    for size, quant, sizes, _arch, est, m in rows:
        files = (sizes.text + sizes.mmproj) / MiB
        err = 100 * (est / m["peak"] - 1)
        flag = "" if (sizes.text + sizes.mmproj) > 200e6 else " (under 200 MB)"
        print(f"| {size} | {quant} | {files:.0f} | {m['peak'] / MiB:.0f} | {est / MiB:.0f} | {err:+.1f}%{flag} | |")

    # The 13B weights column against the published table (no files needed: exact tensor maths).
    a13 = memory.Architecture(n_layer=40, n_embd=5120, n_head=40, n_head_kv=40, n_ff=13824, n_vocab=32000)
    pub = {"Q4_K_M": 7.9, "Q6_K": 11.1, "Q8_0": 13.6, "F16": 26.7}
    print()
    print("| LLaVA-1.5-13B | ours GB | published GB | difference |")
    print("|---|---|---|---|")
    for q in memory.QUANTS:
        gb = memory.sizes_from_architecture(a13, q).text / 1e9
        print(f"| {q} | {gb:.2f} | {pub[q]} | {100 * (gb / pub[q] - 1):+.1f}% |")

    if not args.keep:
        for p in OUT.rglob("*.gguf"):
            p.unlink()


if __name__ == "__main__":
    main()
