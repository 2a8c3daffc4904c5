"""What the portable llama.cpp build flags cost against a native (-march=native) build.

The README installs llama-cpp-python with GGML_NATIVE=OFF because a native build on VMs whose CPU advertises AMX
(without the VM enabling it) dies with SIGILL in quantized matmuls. This bench measures decode tokens/s of the
same F16 and Q4_K_M text models under both builds, each in its own child process:

    python bench/bench_build_flags.py --site native=/tmp/native/site --site avx2=/tmp/avx2/site

where each --site is an unpacked wheel (`pip wheel --no-cache-dir --no-deps llama-cpp-python==0.3.36` with the
CMAKE_ARGS to compare, then unzip), compared against the installed build.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "build_flags"

CHILD = r"""
import json, sys, time, llama_cpp
path, threads = sys.argv[1], int(sys.argv[2])
llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=threads, n_batch=512, verbose=False)
prompt = llm.tokenize(b"The quick brown fox jumps over the lazy dog and keeps running", add_bos=True)
t0 = time.perf_counter(); llm.eval(prompt); prefill = time.perf_counter() - t0
n = 64
t0 = time.perf_counter()
for _ in range(n):
    tok = llm.sample(temp=0.0)
    llm.eval([tok])
decode = time.perf_counter() - t0
info = llama_cpp.llama_print_system_info().decode()
print(json.dumps({"prefill_tok_s": len(prompt) / prefill, "decode_tok_s": n / decode, "system_info": info}))
"""


def build_models(size: str) -> dict[str, Path]:
    from quantize import convert, quantize
    from quantize.synthetic import make_checkpoint

    OUT.mkdir(parents=True, exist_ok=True)
    sizes = {
        # ~1.1B parameters in TinyLlama's shape; the vision tower is kept tiny, only the text model is timed.
        "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32),
        "170m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16),
    }[size]
    ckpt = OUT / f"ckpt-{size}"
    f16 = OUT / f"flags-{size}.f16.gguf"
    if not f16.exists():
        if not (ckpt / "config.json").exists():
            make_checkpoint(ckpt, dtype="f16", **sizes)
        convert(ckpt, OUT, outtype="f16", name=f"flags-{size}")
    q4 = OUT / f"flags-{size}.q4_k_m.gguf"
    if not q4.exists():
        quantize(f16, bits="q4_k_m", out=OUT)
    return {"F16": f16, "Q4_K_M": q4}


def run_child(model: Path, threads: int, site: str | None) -> dict:
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(model), str(threads)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        sig = -proc.returncode
        name = signal.Signals(sig).name if proc.returncode < 0 and sig in signal.Signals._value2member_map_ else ""
        return {"error": f"exit {proc.returncode} {name}".strip()}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--site",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="another build to compare: an unpacked llama-cpp-python wheel (repeatable)",
    )
    ap.add_argument("--size", default="1b", choices=["1b", "170m"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    builds: list[tuple[str, str | None]] = [("installed", None)]
    builds += [tuple(spec.split("=", 1)) for spec in args.site]  # type: ignore[misc]
    models = build_models(args.size)
    print(f"model {args.size}, {args.threads} threads, best of {args.repeat} interleaved rounds")
    print(f"{'quant':8} {'build':10} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode vs installed':>20}")
    for quant, path in models.items():
        # Interleave the builds round by round: this VM's speed drifts by 2x over minutes.
        runs: dict[str, list[dict]] = {name: [] for name, _ in builds}
        for _ in range(args.repeat):
            for name, site in builds:
                runs[name].append(run_child(path, args.threads, site))
        base = None
        for name, _ in builds:
            ok = [r for r in runs[name] if "error" not in r]
            if not ok:
                print(f"{quant:8} {name:10} {'':>14} {runs[name][0]['error']:>13}")
                continue
            best = max(ok, key=lambda r: r["decode_tok_s"])
            base = base or best
            ratio = best["decode_tok_s"] / base["decode_tok_s"]
            print(f"{quant:8} {name:10} {best['prefill_tok_s']:14.1f} {best['decode_tok_s']:13.2f} {ratio:20.2f}")


if __name__ == "__main__":
    main()
