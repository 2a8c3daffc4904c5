"""The build matrix: time to first token of an image question under each llama.cpp build, against transformers fp32.

    python bench/bench_build_flags.py --site chosen=/tmp/b/chosen/site --site native=/tmp/b/native/site

Each --site is an unpacked llama-cpp-python 0.3.36 wheel built with the CMAKE_ARGS to compare:

    pip wheel --no-cache-dir --no-deps -w WHEELDIR llama-cpp-python==0.3.36   # with CMAKE_ARGS=... set
    mkdir SITE && cd SITE && unzip WHEELDIR/*.whl

and is compared with the installed build ("installed") in the same run. Every measurement is one child process of
bench/bench_runtime.py's `ours` (our Engine: load, then image questions with temperature 0; the figure is the warm
turn, a second image after the first one paid for graph allocation) with that site first on PYTHONPATH, so the
same llava_cli code runs on each build's libllama/libggml. transformers fp32 (torch CPU) runs the same question in
the same rounds. Builds and runtimes are interleaved round by round (this VM's speed drifts over minutes) and each
figure is the best of its rounds (other work only ever slows a run down).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_runtime import child_env  # noqa: E402


def spawn(kind: str, args: dict[str, Any], site: str | None) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_runtime.py"), "--child", kind, json.dumps(args)],
        env=child_env(args["threads"], site),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0:
        sig = -proc.returncode
        name = signal.Signals(sig).name if proc.returncode < 0 and sig in signal.Signals._value2member_map_ else ""
        tail = (proc.stderr.strip().splitlines() or [""])[-1]
        return {"error": f"exit {proc.returncode} {name} {tail}".strip()}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def kernels(site: str | None) -> str:
    """The instruction sets the build's CPU backend was compiled with (what `llava doctor` prints)."""
    code = (
        "from llava_cli.runtime import ggml; from llava_cli import cpu_kernels as ck; "
        "print(','.join(f for f in ck.feature_names(ggml.cpu_backend_features()) if f in ck.SCORE_WEIGHTS))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=child_env(site=site), capture_output=True, text=True, timeout=120
    )
    return proc.stdout.strip() or f"? ({(proc.stderr.strip().splitlines() or [''])[-1]})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--site", action="append", default=[], metavar="NAME=PATH", help="another build (repeatable)")
    ap.add_argument("--size", default="small", choices=["small", "bench", "tiny"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=16, help="answer tokens per question (decode tok/s)")
    ap.add_argument("--quants", default="f16,q4", help="text weights to run: f16, q4 (comma-separated)")
    ap.add_argument("--n-ubatch", type=int, default=None, help="engine n_ubatch (default: the engine's)")
    ap.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    a = ap.parse_args()

    from bench_runtime import images, prepare

    files = prepare(a.size)
    pics = [str(p) for p in images()]
    builds: list[tuple[str, str | None]] = [("installed", None)]
    builds += [(n, p) for n, p in (spec.split("=", 1) for spec in a.site)]
    from llava_cli.runtime.engine import Engine

    defaults = Engine.__init__.__kwdefaults__ or {}
    n_ubatch = a.n_ubatch  # None: the engine's default for the device (runtime_ubatch)
    fa = {"auto": defaults["flash_attn"], "on": True, "off": False}[a.flash_attn]
    common = {"threads": a.threads, "tokens": a.tokens, "images": pics, "n_ubatch": n_ubatch, "flash_attn": fa}
    common["n_batch"] = max(defaults["n_batch"], n_ubatch or 0)
    runs: list[tuple[str, str, str | None, dict[str, Any]]] = []
    for quant in a.quants.split(","):
        text = str(files["text_f16" if quant == "f16" else "text_q4"])
        for name, site in builds:
            cfg = {**common, "text": text, "mmproj": str(files["mmproj_f16"])}
            runs.append((f"{quant.upper()} {name}", "ours", site, cfg))
    if not a.no_hf:
        runs.append(("transformers fp32", "hf", None, {**common, "ckpt": str(files["ckpt"])}))

    for name, site in builds:
        print(f"{name}: {kernels(site)}", file=sys.stderr, flush=True)
    best: dict[str, dict[str, float]] = {}
    errors: dict[str, str] = {}
    for r in range(a.rounds):
        for label, kind, site, cfg in runs:
            res = spawn(kind, cfg, site)
            if "error" in res:
                errors[label] = res["error"]
                print(f"round {r + 1} {label}: {res['error']}", file=sys.stderr, flush=True)
                continue
            w = res["warm"]
            print(f"round {r + 1} {label}: ttft {w['ttft']:.3f} s", file=sys.stderr, flush=True)
            slot = best.setdefault(label, {})
            for k in ("ttft", "encode", "prefill"):
                slot[k] = min(slot.get(k, w[k]), w[k])
            slot["decode_tok_s"] = max(slot.get("decode_tok_s", 0.0), w["decode_tok_s"])

    hf = best.get("transformers fp32", {}).get("ttft")
    print(
        f"size {a.size}, {a.threads} threads, one image question (warm turn), n_ubatch {n_ubatch or 'default'}, "
        f"flash_attn {fa}, best of {a.rounds} interleaved rounds\n"
    )
    print("| text weights, build | TTFT s | encode s | prefill s | decode tok/s | TTFT vs installed | vs torch |")
    print("|---|---|---|---|---|---|---|")
    for label, _, _, _ in runs:
        if label not in best:
            print(f"| {label} | {errors.get(label, 'failed')} | | | | | |")
            continue
        b = best[label]
        base = best.get(label.split(" ")[0] + " installed", {}).get("ttft")
        vs_base = f"{b['ttft'] / base:.2f}×" if base and label != "transformers fp32" else "–"
        vs_hf = f"{b['ttft'] / hf:.2f}×" if hf else "–"
        print(
            f"| {label} | {b['ttft']:.3f} | {b['encode']:.3f} | {b['prefill']:.3f} | {b['decode_tok_s']:.1f} | "
            f"{vs_base} | {vs_hf} |"
        )


if __name__ == "__main__":
    main()
