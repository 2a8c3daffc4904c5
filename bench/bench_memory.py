"""Measured vs planned memory: peak RSS of a process that loads a synthetic LLaVA on the CPU and answers one
image question, against ``llava_cli.memory.cpu_peak_bytes`` (the planner's CPU estimate).

    python bench/bench_memory.py                 # all sizes (builds models under bench/out/, ~4 GB of disk)
    python bench/bench_memory.py --sizes s m     # a subset
    python bench/bench_memory.py --keep          # keep the GGUFs for the next run
    nice -n 10 python bench/bench_memory.py --llava7b   # the held-out LLaVA-1.5-7B geometry (~32 GB of disk)

Two kinds of rows. "fit": the sizes xs..l, on which CPU_RUNTIME and IMAGE_EMBD_COPIES
(``llava_cli/memory/buffers.py``) were fitted, so their error says how well the fit went, not how well the
planner predicts. "held-out": models the constants never saw (grouped-query attention, a real 32000-token
vocabulary, and with ``--llava7b`` the real LLaVA-1.5-7B geometry: 32 layers x 4096, 32064-token vocabulary,
CLIP ViT-L/14-336, synthetic weights), converted, quantized to Q4_K_M and answering one image question on 2
threads: peak RSS against the estimate, the converter's peak RSS and time, and decode tokens/s.

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
FITTED = ("xs", "s", "m", "l")  # the runs CPU_RUNTIME and IMAGE_EMBD_COPIES were fitted on
# Held out: never used for fitting. Grouped-query attention (as BakLLaVA's Mistral) and a 32000-piece vocabulary.
SIZES["gqa"] = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=12,
                    num_key_value_heads=3, vocab_pieces=32000, vision_hidden_size=1024, vision_intermediate_size=4096,
                    vision_num_hidden_layers=12, vision_num_attention_heads=16)  # fmt: skip
QUANTS["gqa"] = ["q4_k_m", "q6_k"]
# LLaVA-1.5-7B's real geometry (llava-hf/llava-1.5-7b-hf config.json), synthetic weights.
LLAVA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_pieces=32000, max_position_embeddings=4096, vision_hidden_size=1024,
                vision_intermediate_size=4096, vision_num_hidden_layers=24, vision_num_attention_heads=16)  # fmt: skip


def _rss_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def child(text: str, mmproj: str, n_ctx: int, flash_attn: str, max_tokens: int = 4) -> None:
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
    answer = eng.ask("Describe the image.", [path], max_tokens=max_tokens, seed=0)
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
                "n_decoded": answer.timings.n_decoded,
                "decode_s": answer.timings.decode,
                "encode_s": answer.timings.encode,
                "prefill_s": answer.timings.prefill,
                "prompt_tokens": answer.prompt_tokens,
            }
        )
    )
    eng.close()


def build(size: str, quant: str) -> tuple[Path, Path]:
    from quantize.converter import convert
    from quantize.quantizer import quantize
    from quantize.synthetic import make_checkpoint

    d = OUT / size
    f16 = d / f"bench-{size}.f16.gguf"
    mm = d / f"mmproj-bench-{size}.f16.gguf"
    if not f16.exists() or not mm.exists():
        if SIZES[size].get("vocab_pieces", 512) > 1000:
            use_large_vocab_corpus()
        spec = {"vocab_pieces": 512, "num_key_value_heads": SIZES[size]["num_attention_heads"], **SIZES[size]}
        ckpt = make_checkpoint(d / "ckpt", preset="bench", **spec)
        res = convert(ckpt, d, outtype="f16", name=f"bench-{size}")
        f16, mm = res.text_path, res.mmproj_path
    if quant == "f16":
        return f16, mm
    q = d / f"bench-{size}.{quant}.gguf"
    if not q.exists():
        r = quantize(f16, bits=quant, mmproj_bits="f16", out=d)
        q = r.text_path
    return q, mm


# Each child prints its own peak RSS (VmHWM, KiB) as its last line; ru_maxrss would carry the parent's peak.
_PEAK = "\nimport re\nprint(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"


def use_large_vocab_corpus() -> None:
    """quantize/synthetic.py trains its tokenizer on ~80 distinct words, enough for a few hundred pieces; a real
    32000-piece vocabulary needs a corpus with that many distinct words. Swap in one (random letter strings, same
    seed rule) before make_checkpoint; the weights do not depend on it."""
    import numpy as np

    from quantize import synthetic

    def corpus(seed: int):  # type: ignore[no-untyped-def]
        rng = np.random.default_rng([seed, 20_000])
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        words = ["".join(rng.choice(letters, int(rng.integers(2, 9)))) for _ in range(60_000)]
        for _ in range(60_000):
            yield " ".join(words[int(i)] for i in rng.integers(0, len(words), int(rng.integers(4, 14)))) + "."

    synthetic._corpus = corpus  # type: ignore[attr-defined]


def _timed_child(code: str, *args: str) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of a fresh Python child running ``code``."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code + _PEAK, *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return time.perf_counter() - t0, int(proc.stdout.split()[-1]) * 1024


def llava7b(ctx: int, keep: bool) -> None:
    """The held-out run at LLaVA-1.5-7B's real geometry: build, convert, quantize, answer, measure, delete."""
    import shutil

    from llava_cli import memory
    from llava_cli.gguf_info import read_gguf
    from quantize.synthetic import make_checkpoint

    d = OUT / "llava7b"
    free = shutil.disk_usage(OUT.parent if OUT.parent.exists() else ROOT).free
    print(f"free disk: {free / 1e9:.0f} GB (needs ~32 GB: checkpoint 14 + F16 GGUF 14 + Q4_K_M 4)", flush=True)
    reuse = (d / "llava7b.f16.gguf").exists() and (d / "mmproj-llava7b.f16.gguf").exists()
    if free < (6e9 if reuse else 40e9):
        raise SystemExit("not enough free disk for the 7B run")
    use_large_vocab_corpus()
    try:
        f16, mm = d / "llava7b.f16.gguf", d / "mmproj-llava7b.f16.gguf"
        conv_s = conv_peak = float("nan")
        if f16.exists() and mm.exists():
            # An interrupted run left its F16 pair: go on from there (the build and convert take ~25 minutes).
            print(f"reusing {f16.name} and {mm.name} (convert figures are from the run that made them)", flush=True)
        else:
            t0 = time.perf_counter()
            ckpt = make_checkpoint(d / "ckpt", preset="bench", dtype="f16", shards=3, **LLAVA_7B)
            print(f"synthetic checkpoint: {time.perf_counter() - t0:.0f} s", flush=True)
            conv_s, conv_peak = _timed_child(
                "import sys\nfrom quantize.converter import convert\n"
                "convert(sys.argv[1], sys.argv[2], outtype='f16', name='llava7b')",
                str(ckpt),
                str(d),
            )
            shutil.rmtree(ckpt)
            print(f"convert: {conv_s:.0f} s, peak RSS {conv_peak / MiB:.0f} MiB", flush=True)
        q_s, q_peak = _timed_child(
            "import sys\nfrom quantize.quantizer import quantize\n"
            "quantize(sys.argv[1], bits='q4_k_m', mmproj_bits='f16', out=sys.argv[2])",
            str(f16),
            str(d),
        )
        f16.unlink()
        text = d / "llava7b.q4_k_m.gguf"
        print(f"quantize to Q4_K_M: {q_s:.0f} s, peak RSS {q_peak / MiB:.0f} MiB", flush=True)
        ti, mi = read_gguf(text), read_gguf(mm)
        arch, sizes = memory.architecture_from_gguf(ti, mi), memory.sizes_from_gguf(ti, mi)
        est = memory.cpu_peak_bytes(sizes, arch, ctx, flash_attn=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(text), str(mm), str(ctx), "auto", "--max-tokens", "32"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        tok_s = m["n_decoded"] / m["decode_s"] if m["decode_s"] else float("nan")
        print()
        print("| LLaVA-1.5-7B geometry, synthetic weights (held out) | measured | planner | ratio |")
        print("|---|---:|---:|---:|")
        print(
            f"| peak RSS, Q4_K_M + F16 mmproj, ctx {ctx}, one image, 2 threads | {m['peak'] / MiB:,.0f} MiB | "
            f"{est / MiB:,.0f} MiB | {est / m['peak']:.3f} |"
        )
        print(
            f"| text GGUF bytes (header) vs tensor sum | {ti.file_size / 1e9:.3f} GB | {sizes.text / 1e9:.3f} GB | "
            f"{sizes.text / ti.file_size:.4f} |"
        )
        if conv_s == conv_s:  # not NaN: converted in this run
            print(f"| convert to F16: seconds, peak RSS | {conv_s:.0f} s, {conv_peak / MiB:,.0f} MiB | | |")
        print(
            f"| quantize to Q4_K_M: s, peak RSS (parent; llama.cpp in a child) | {q_s:.0f} s, "
            f"{q_peak / MiB:,.0f} MiB | | |"
        )
        print(
            f"| CLIP encode / prefill of {m['prompt_tokens']} tokens | {m['encode_s']:.1f} s / {m['prefill_s']:.1f} s"
            " | | |"
        )
        print(f"| decode, 2 threads | {tok_s:.2f} tok/s ({m['n_decoded']} tokens) | | |")
    finally:
        if not keep:
            shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=4, metavar=("TEXT", "MMPROJ", "CTX", "FA"))
    ap.add_argument("--max-tokens", type=int, default=4, help="answer length in --child runs")
    ap.add_argument("--llava7b", action="store_true", help="only the held-out LLaVA-1.5-7B geometry run (heavy)")
    ap.add_argument("--sizes", nargs="*", default=list(SIZES))
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--keep", action="store_true", help="keep the GGUFs under bench/out/memory")
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), args.child[3], args.max_tokens)
        return
    if args.llava7b:
        llava7b(args.ctx, args.keep)
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
            kind = "fit" if size in FITTED else "held-out"
            files = sizes.text + sizes.mmproj
            print(
                f"{kind:8} {size:3} {quant:7} files {files / MiB:8.0f} MiB  peak {m['peak'] / MiB:8.0f}  "
                f"est {est / MiB:8.0f}  "
                f"err {100 * (est / m['peak'] - 1):+6.1f}%  base {m['baseline'] / MiB:5.0f}  "
                f"load {m['after_load'] / MiB:6.0f}  anon {m['end_anon'] / MiB:6.0f}  file {m['end_file'] / MiB:6.0f}  "
                f"kv {memory.kv_cache_bytes(arch, args.ctx) / MiB:5.0f}  "
                f"compute {memory.compute_buffer_bytes(arch, args.ctx, flash_attn=fa) / MiB:5.0f}  "
                f"{m['seconds']:.1f}s",
                flush=True,
            )

    print()
    print(
        f"| rows | model | quant | weights+mmproj MiB | peak RSS MiB | planner MiB | planner/measured, ctx {args.ctx} |"
    )
    print("|---|---|---|---|---|---|---|")
    for size, quant, sizes, _arch, est, m in rows:
        files = (sizes.text + sizes.mmproj) / MiB
        kind = "fit" if size in FITTED else "held-out"
        print(
            f"| {kind} | {size} | {quant} | {files:.0f} | {m['peak'] / MiB:.0f} | {est / MiB:.0f} | "
            f"{est / m['peak']:.3f} |"
        )

    if not args.keep:
        for p in OUT.rglob("*.gguf"):
            p.unlink()


if __name__ == "__main__":
    main()
