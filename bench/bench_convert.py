"""Converter throughput and peak memory on a synthetic checkpoint of >= 2 GB (CLIP ViT-L geometry).

Each measurement runs in a fresh child process; its peak RSS is the child's ru_maxrss. Anchors in the same run:
a plain copy of the checkpoint's bytes (the disk's read+write speed, an upper bound for MB/s) and a child that
only imports the converter (the interpreter + numpy + gguf baseline RSS).

    python bench/bench_convert.py [--dir /tmp/llava-bench] [--keep] [--vocab-pieces 32000]

The vocabulary defaults to LLaVA-1.5's real one (32000 pieces, 32064 embedding rows): the embedding and output
matrices are then the largest tensors, and the converter's peak RSS follows the largest tensor.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Each child prints its own peak RSS in KiB as its last line. VmHWM (Linux) is the peak of the child's own
# address space; ru_maxrss would be floored at the parent's RSS at fork time (Linux keeps it across exec).
PEAK = """
import re, resource
try:
    with open("/proc/self/status") as fh:
        print(re.search(r"VmHWM:\\s+(\\d+)", fh.read()).group(1))
except OSError:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
CHILD_CONVERT = (
    """
import sys
from quantize.converter import convert
r = convert(sys.argv[1], sys.argv[2], outtype=sys.argv[3], name="bench")
"""
    + PEAK
)
CHILD_IMPORT = "import quantize, gguf, numpy" + PEAK
CHILD_COPY = (
    """
import shutil, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    shutil.copyfile(f, Path(sys.argv[2]) / f.name)
"""
    + PEAK
)


def run_child(code: str, *args: str) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of a fresh Python child running `code`."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code, *args], check=True, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    return seconds, int(proc.stdout.split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    parser.add_argument("--vocab-pieces", type=int, default=32000, help="tokenizer size (512 = the old runs)")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="llava-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from quantize.checkpoint import open_checkpoint
    from quantize.synthetic import make_checkpoint

    ckpt = work / "ckpt"
    if not (ckpt / "config.json").exists():
        t = time.perf_counter()
        if args.vocab_pieces > 1000:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from bench_memory import use_large_vocab_corpus

            use_large_vocab_corpus()
        make_checkpoint(ckpt, preset="bench", dtype="f16", shards=3, vocab_pieces=args.vocab_pieces)
        print(f"wrote synthetic checkpoint in {time.perf_counter() - t:.0f} s")
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    opened = open_checkpoint(ckpt)
    largest = max(ref.n_elements for ref in opened.tensors.values())
    print(
        f"checkpoint: {size / 1e9:.2f} GB F16 in 3 shards, {len(opened.tensors)} tensors, "
        f"largest {largest / 1e6:.1f} M elements ({largest * 4 / 1e6:.0f} MB as float32)"
    )

    rows = []
    sec, rss = run_child(CHILD_IMPORT)
    rows.append(("anchor: import only", "-", sec, rss, None))
    copy_dir = work / "copy"
    copy_dir.mkdir(exist_ok=True)
    sec, rss = run_child(CHILD_COPY, str(ckpt), str(copy_dir))
    rows.append(("anchor: copy the bytes", f"{size / 1e9:.2f}", sec, rss, size / sec / 1e6))
    shutil.rmtree(copy_dir)
    for outtype in ("f16", "f32"):
        out = work / f"out-{outtype}"
        sec, rss = run_child(CHILD_CONVERT, str(ckpt), str(out), outtype)
        written = sum(f.stat().st_size for f in out.glob("*.gguf"))
        rows.append((f"convert --outtype {outtype}", f"{written / 1e9:.2f}", sec, rss, size / sec / 1e6))
        if not args.keep:
            shutil.rmtree(out)

    print(f"\n{'run':<26} {'out GB':>7} {'seconds':>8} {'peak RSS MB':>12} {'MB/s (input)':>13}")
    for name, gb, sec, rss, mbs in rows:
        rss_s = f"{rss:.0f}" if rss is not None else "-"
        mbs_s = f"{mbs:.0f}" if mbs is not None else "-"
        print(f"{name:<26} {gb:>7} {sec:>8.1f} {rss_s:>12} {mbs_s:>13}")
    print("\npeak RSS: each child's own VmHWM; MB/s: checkpoint bytes / wall time of the child")
    if not args.keep and args.dir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
