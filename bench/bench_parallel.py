"""Decode throughput of the batched runtime, side by side with its anchors in the same run. Prints Markdown tables
with ratios; no asserts.

    nice -n 5 python bench/bench_parallel.py decode                 # (a) single sequence vs Llava15ChatHandler
    nice -n 5 python bench/bench_parallel.py parallel --size bench  # (b) aggregate tok/s at parallel 1/2/4/8
    nice -n 5 python bench/bench_parallel.py caption --size bench   # (c) caption --parallel vs sequential vs handler

(a) Forced-length decode: both runtimes generate exactly ``--tokens`` tokens (end-of-sequence banned: ours through
    llama.cpp's logit-bias sampler, the handler through ``logit_bias``), greedy, same text prompt, same files, same
    threads. Rate = (tokens - 1) / (time of the last token - time of the first). Each runtime runs in its own child
    process, alternating round by round (this VM drifts), best round kept.
(b) ``--parallel`` P requests submitted at once to a `Runtime` with P slots, each forced to ``--tokens`` tokens;
    aggregate = all generated tokens / wall time from submit to the last answer. Anchor: the same requests one at a
    time (P = 1).
(c) see `caption` below.

Models: the random-weight checkpoints of bench/bench_runtime.py (``small`` ~170 M, ``bench`` ~1 B text parameters,
CLIP ViT-L), built once under bench/out/runtime/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PROMPT = "Write a long story about a cat who lives in a lighthouse and the ships it watches."
PROMPTS = [
    PROMPT,
    "List every colour you can think of and say what each one reminds you of.",
    "Explain how a bicycle works, part by part.",
    "Describe a walk through a busy market on a rainy morning.",
    "What would you pack for a week in the mountains, and why?",
    "Tell me about the history of writing, from clay tablets to keyboards.",
    "Describe the view from the top of a very tall tower at night.",
    "Give instructions for making bread at home, step by step.",
]


# ------------------------------------------------------------------------------------------------ children

_KEEP: list[Any] = []


def child_ours_decode(a: dict[str, Any]) -> dict[str, Any]:
    from llava_cli.runtime import Engine

    eng = Engine(
        a["text"],
        a["mmproj"],
        n_ctx=1024,
        n_threads=a["threads"],
        flash_attn=a.get("flash_attn"),
        on_note=lambda m: None,
    )
    eng.ask("Hi", max_tokens=4, temperature=0)  # warm-up: graph allocation
    rates = []
    for _ in range(a["reps"]):
        eng.clear_kv()
        ans = eng.ask(PROMPT, max_tokens=a["tokens"], temperature=0, ignore_eos=True)
        assert ans.completion_tokens == a["tokens"], ans.completion_tokens
        rates.append(ans.timings.decode_tokens_per_s)
    eng.close()
    return {"rate": max(rates), "rates": rates}


def child_handler_decode(a: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp
    import numpy as np
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    handler = Llava15ChatHandler(clip_model_path=a["mmproj"], verbose=False)
    llm = llama_cpp.Llama(model_path=a["text"], chat_handler=handler, n_ctx=1024, n_threads=a["threads"], verbose=False)
    _KEEP.append(llm)  # freed by os._exit, not by its finalizer (which fails on a closed stdout in this version)
    eos = llm.token_eos()
    rates = []
    stamps: list[float] = []

    def stamp_and_ban_eos(_ids: Any, scores: Any) -> Any:
        # A logits processor runs right before each token is sampled: its call times are the token times. It also
        # bans end-of-sequence in place (llama-cpp-python 0.3.36 drops `logit_bias` when a logits_processor is
        # given: `logits_processor.extend(...)` returns None).
        stamps.append(time.perf_counter())
        scores[eos] = -np.inf
        return scores

    for i in range(a["reps"] + 1):
        stamps.clear()
        n = 4 if i == 0 else a["tokens"]  # the first round is the warm-up
        llm.create_chat_completion(
            messages=[{"role": "user", "content": PROMPT if i else "Hi"}],
            max_tokens=n,
            temperature=0.0,
            logits_processor=llama_cpp.LogitsProcessorList([stamp_and_ban_eos]),
        )
        if i:
            assert len(stamps) >= n, len(stamps)
            rates.append((n - 1) / (stamps[-1] - stamps[-n]))
    return {"rate": max(rates), "rates": rates}


def child_decode_paired(a: dict[str, Any]) -> dict[str, Any]:
    """Ours (flash attention auto and off) and the handler loaded in ONE process, answering in turn, round after
    round: each round's ratio compares runs a few seconds apart, so the machine's drift cancels out."""
    import llama_cpp
    import numpy as np
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    from llava_cli.runtime import Engine

    ours = {
        fa: Engine(a["text"], a["mmproj"], n_ctx=1024, n_threads=a["threads"], flash_attn=fa, on_note=lambda m: None)
        for fa in (None, False)
    }
    handler = Llava15ChatHandler(clip_model_path=a["mmproj"], verbose=False)
    llm = llama_cpp.Llama(model_path=a["text"], chat_handler=handler, n_ctx=1024, n_threads=a["threads"], verbose=False)
    _KEEP.extend([llm, *ours.values()])
    eos = llm.token_eos()
    stamps: list[float] = []

    def stamp_and_ban_eos(_ids: Any, scores: Any) -> Any:
        stamps.append(time.perf_counter())
        scores[eos] = -np.inf
        return scores

    def run_handler(n: int) -> float:
        stamps.clear()
        llm.create_chat_completion(
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=n,
            temperature=0.0,
            logits_processor=llama_cpp.LogitsProcessorList([stamp_and_ban_eos]),
        )
        # Sometimes a few more calls than tokens (seen with the F16 ~1B model: 67 for 64): time the last n steps.
        assert len(stamps) >= n, len(stamps)
        return (n - 1) / (stamps[-1] - stamps[-n])

    def run_ours(eng: Engine, n: int) -> float:
        eng.clear_kv()
        ans = eng.ask(PROMPT, max_tokens=n, temperature=0, ignore_eos=True)
        assert ans.completion_tokens == n
        return ans.timings.decode_tokens_per_s

    run_handler(4)
    for eng in ours.values():
        run_ours(eng, 4)
    runs: dict[str, Callable[[], float]] = {
        "ours": lambda: run_ours(ours[None], a["tokens"]),
        "handler": lambda: run_handler(a["tokens"]),
        "ours_fa_off": lambda: run_ours(ours[False], a["tokens"]),
    }
    names = list(runs)
    rounds: list[dict[str, float]] = []
    for i in range(a["reps"]):
        order = names[i % 3 :] + names[: i % 3]  # rotate: nobody always runs first
        rounds.append({k: runs[k]() for k in order})
    return {"rounds": rounds}


def child_parallel(a: dict[str, Any]) -> dict[str, Any]:
    from llava_cli.runtime import Message, Runtime

    p = a["parallel"]
    rt = Runtime(
        a["text"],
        a["mmproj"],
        n_parallel=p,
        n_ctx=a["ctx"],
        n_threads=a["threads"],
        flash_attn=a.get("flash_attn"),
        on_note=lambda m: None,
    )
    rt.submit([Message("user", "Hi")], max_tokens=4, temperature=0).result()  # warm-up
    n_req = a["requests"]
    t0 = time.perf_counter()
    jobs = [
        rt.submit([Message("user", PROMPTS[i % len(PROMPTS)])], max_tokens=a["tokens"], temperature=0, ignore_eos=True)
        for i in range(n_req)
    ]
    answers = [j.result() for j in jobs]
    wall = time.perf_counter() - t0
    out = {
        "wall": wall,
        "tokens": sum(x.completion_tokens for x in answers),
        "steps": rt.stats.steps,
        "kv_bytes_per_slot": rt.kv_bytes_per_slot,
    }
    rt.close()
    return out


def child_caption(a: dict[str, Any]) -> dict[str, Any]:
    """`llava_cli.captioning.caption` over the folder at --parallel a["parallel"] (1 = the sequential Engine path)."""
    from llava_cli import captioning

    marks: dict[str, float] = {}

    def on_progress(done: int, total: int) -> None:
        marks.setdefault("first", time.perf_counter())  # called with 0 once the model is loaded
        marks["last"] = time.perf_counter()

    summary = captioning.caption(
        [a["folder"]],
        model=a["text"],
        mmproj=a["mmproj"],
        ctx=1024,
        threads=a["threads"],
        parallel=a["parallel"],
        max_tokens=a["tokens"],
        temperature=0.0,
        out=a["out"],
        overwrite=True,
        on_progress=on_progress,
        on_note=lambda m: None,
    )
    return {"n": summary.done, "loop": marks["last"] - marks["first"], "tokens": summary.tokens}


def child_caption_handler(a: dict[str, Any]) -> dict[str, Any]:
    """A Python loop over llama-cpp-python's Llava15ChatHandler, the model loaded once (bench/bench_caption.py)."""
    from bench_caption import run_handler

    paths = sorted(Path(a["folder"]).iterdir())
    r = run_handler(paths, Path(a["text"]), Path(a["mmproj"]), a["tokens"], a["threads"])
    return {"n": r["n"], "loop": r["loop"], "tokens": r["tokens"]}


CHILDREN = {
    "decode_paired": child_decode_paired,
    "ours_decode": child_ours_decode,
    "handler_decode": child_handler_decode,
    "parallel": child_parallel,
    "caption": child_caption,
    "caption_handler": child_caption_handler,
}


SITE: str | None = None  # --site: an unpacked llama-cpp-python wheel to run instead of the installed one


def spawn(kind: str, args: dict[str, Any]) -> dict[str, Any] | None:
    from bench_runtime import child_env

    env = child_env(args["threads"], SITE)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=7200,
    )
    lines = proc.stdout.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        # A result line counts even if the child then failed: llama-cpp-python's handler sometimes raises from a
        # finalizer (mtmd_free on a closed stdout) after the work is done.
        return json.loads(lines[-1])
    print(f"  {kind} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-3:]}", file=sys.stderr)
    return None


# ------------------------------------------------------------------------------------------------ benches


def files_for(size: str) -> dict[str, Path]:
    import bench_runtime

    return bench_runtime.prepare(size)


def bench_decode(a: argparse.Namespace) -> str:
    import statistics

    files = files_for(a.size)
    rows = []
    for label, key in (("F16", "text_f16"), ("Q4_K_M", "text_q4")):
        common = {
            "text": str(files[key]),
            "mmproj": str(files["mmproj_f16"]),
            "threads": a.threads,
            "tokens": a.tokens,
            "reps": a.reps,
        }
        res = spawn("decode_paired", common)
        if res is None:
            rows.append(f"| {label} | failed | | | | |")
            continue
        rounds = res["rounds"]
        for r in rounds:
            print(f"  [{label}] " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()), file=sys.stderr, flush=True)
        ratio = statistics.median(r["ours"] / r["handler"] for r in rounds)
        ratio_off = statistics.median(r["ours_fa_off"] / r["handler"] for r in rounds)
        best = {k: max(r[k] for r in rounds) for k in rounds[0]}
        rows.append(
            f"| {label} | {best['ours']:.1f} | {best['ours_fa_off']:.1f} | {best['handler']:.1f} | **{ratio:.2f}×** "
            f"| {ratio_off:.2f}× |"
        )
    return (
        f"\n### (a) single-sequence decode, {a.size} model, {a.threads} thread(s), {a.tokens} forced tokens, "
        f"{a.reps} paired rounds in one process\n\n"
        "| text model | ours tok/s (fa auto) | ours tok/s (fa off) | Llava15ChatHandler tok/s | ours / handler "
        "(median of rounds) | ours fa off / handler |\n|---|---|---|---|---|---|\n" + "\n".join(rows)
    )


def bench_parallel(a: argparse.Namespace) -> str:
    files = files_for(a.size)
    key = "text_q4" if a.quant == "q4_k_m" else "text_f16"
    common = {
        "text": str(files[key]),
        "mmproj": str(files["mmproj_f16"]),
        "threads": a.threads,
        "tokens": a.tokens,
        "ctx": 512,
    }
    levels = [int(x) for x in a.levels.split(",")]
    n_req = max(levels)
    results: dict[int, dict[str, Any]] = {}
    for r in range(a.rounds):
        for p in levels:
            res = spawn("parallel", {**common, "parallel": p, "requests": n_req})
            if res is None:
                continue
            rate = res["tokens"] / res["wall"]
            print(f"  [round {r + 1}] parallel {p}: {rate:.1f} tok/s", file=sys.stderr, flush=True)
            if p not in results or rate > results[p]["rate"]:
                results[p] = {**res, "rate": rate}
    base = results.get(1, {}).get("rate")
    lines = []
    for p in levels:
        if p not in results:
            lines.append(f"| {p} | failed | | | |")
            continue
        res = results[p]
        ratio = f"**{res['rate'] / base:.2f}×**" if base else "–"
        lines.append(f"| {p} | {res['rate']:.1f} | {ratio} | {res['wall']:.1f} | {res['steps']} |")
    kv = next(iter(results.values()))["kv_bytes_per_slot"] if results else 0
    return (
        f"\n### (b) aggregate decode, {a.size} model {a.quant.upper()}, {a.threads} threads, {n_req} requests × "
        f"{a.tokens} forced tokens, best of {a.rounds}\n\n| parallel | tok/s | vs one at a time | wall s | steps |\n"
        "|---|---|---|---|---|\n" + "\n".join(lines) + f"\n\nKV cache per slot (ctx {common['ctx']}): "
        f"{kv / 2**20:.1f} MiB ({kv // common['ctx']} bytes per position)"
    )


def bench_caption(a: argparse.Namespace) -> str:
    from bench_caption import make_photos

    files = files_for(a.size)
    work = ROOT / "bench" / "out" / "parallel"
    folder = work / f"photos{a.images}"
    if not folder.exists():
        make_photos(folder, a.images, 0.0, (640, 480))
    common = {
        "text": str(files["text_f16"]),
        "mmproj": str(files["mmproj_f16"]),
        "threads": a.threads,
        "tokens": a.tokens,
        "folder": str(folder),
        "out": str(work / "captions.jsonl"),
    }
    levels = [int(x) for x in a.levels.split(",")]
    runs = [(f"ours --parallel {p}", "caption", {"parallel": p}) for p in levels]
    runs.append(("Llava15ChatHandler loop", "caption_handler", {}))
    best: dict[str, dict[str, Any]] = {}
    for r in range(a.rounds):
        for name, kind, extra in runs:
            res = spawn(kind, {**common, **extra})
            if res is None:
                continue
            res["per_min"] = 60 * res["n"] / res["loop"]
            print(f"  [round {r + 1}] {name}: {res['per_min']:.2f} images/min", file=sys.stderr, flush=True)
            if name not in best or res["per_min"] > best[name]["per_min"]:
                best[name] = res
    seq = best.get("ours --parallel 1", {}).get("per_min")
    hnd = best.get("Llava15ChatHandler loop", {}).get("per_min")
    lines = []
    for name, _, _ in runs:
        if name not in best:
            lines.append(f"| {name} | failed | | | |")
            continue
        r = best[name]
        vs_seq = f"**{r['per_min'] / seq:.2f}×**" if seq else "–"
        vs_h = f"{r['per_min'] / hnd:.2f}×" if hnd else "–"
        lines.append(f"| {name} | {r['per_min']:.2f} | {vs_seq} | {vs_h} | {r['tokens'] / r['n']:.1f} |")
    return (
        f"\n### (c) captioning, {a.size} model F16, {a.threads} threads, {a.images} photos 640×480, --max-tokens "
        f"{a.tokens}, greedy, best of {a.rounds}\n\n| runtime | images/min | vs sequential | vs handler loop "
        "| tokens/caption |\n|---|---|---|---|---|\n" + "\n".join(lines)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", choices=["decode", "parallel", "caption"], default="decode")
    ap.add_argument("--size", default="small", help="small (~170 M) or bench (~1 B)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128, help="forced tokens per answer")
    ap.add_argument("--reps", type=int, default=3, help="answers per child process (decode)")
    ap.add_argument("--rounds", type=int, default=2, help="child processes per runtime, alternating")
    ap.add_argument("--levels", default="1,2,4,8", help="parallel levels (parallel)")
    ap.add_argument("--quant", default="f16", choices=["f16", "q4_k_m"])
    ap.add_argument("--images", type=int, default=12, help="photos to caption (caption)")
    ap.add_argument("--site", help="an unpacked llama-cpp-python wheel (bench/bench_build_flags.py) to measure")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    global SITE
    SITE = a.site
    if a.child:
        kind, args = a.child
        print(json.dumps(CHILDREN[kind](json.loads(args))), flush=True)
        sys.stderr.flush()
        os._exit(0)  # skip interpreter teardown: llama-cpp-python's finalizers fail once stdout is closed
    if a.what == "decode":
        print(bench_decode(a))
    elif a.what == "parallel":
        print(bench_parallel(a))
    else:
        print(bench_caption(a))


if __name__ == "__main__":
    main()
