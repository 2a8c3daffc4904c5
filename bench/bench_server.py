"""`llava serve` vs llama-cpp-python's own OpenAI server (``python -m llama_cpp.server`` with ``chat_format
llava-1-5``, i.e. its Llava15ChatHandler, and ``clip_model_path``), same GGUF files, same threads, same requests,
one after the other in the same run. Prints Markdown tables with ratios; no asserts.

    python bench/bench_server.py                     # the ~170 M text model + CLIP ViT-L ("small", as bench_runtime)
    python bench/bench_server.py --size tiny         # seconds: checks that the script works
    python bench/bench_server.py --threads 2 --requests 8 --clients 4 --tokens 32

Measured per server, with the official `openai` client:
  * turn 1 TTFT: a question with an image (streamed; time to the first SSE chunk: both servers send their first
    chunk when the first token is generated);
  * turn 2 TTFT: a follow-up with the whole history re-sent, as every OpenAI client does (ours continues the
    conversation held in the KV cache; llama-cpp-python's handler re-encodes the image and re-evaluates all);
  * throughput: `--requests` requests from `--clients` concurrent clients, greedy, `--tokens` tokens each, once
    with a different image per request and once with one image and different questions; requests/min and
    generated tokens/s over the wall time.

llama_cpp.server needs sse-starlette, starlette-context and pydantic-settings, which llava-cli does not: they are
installed once with ``pip install --no-deps --target bench/out/llama_server_deps`` and put on the PYTHONPATH of that
server's process only.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
DEPS = ROOT / "bench" / "out" / "llama_server_deps"
PROMPT = "What is in this picture? Describe it in detail."
FOLLOW_UP = "What colour is the animal?"
N_CTX = 2048


def ensure_llama_server_deps() -> None:
    if (DEPS / "sse_starlette").exists():
        return
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(DEPS)]
    subprocess.run([*cmd, "sse-starlette", "starlette-context", "pydantic-settings", "python-dotenv"], check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png_variants(base: Path, n: int) -> list[bytes]:
    """`n` different PNGs of the same picture (mirrored/rotated/shifted): different bytes, so each is an encode."""
    from PIL import Image, ImageOps

    img = Image.open(base).convert("RGB")
    out = []
    for i in range(n):
        v = ImageOps.mirror(img) if i % 2 else img
        v = v.rotate(90 * ((i // 2) % 4))
        if i >= 8:
            v = ImageOps.expand(v, border=i, fill=(i * 7 % 255, 0, 0))
        buf = io.BytesIO()
        v.save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# ------------------------------------------------------------------------------------------------ servers


def start(kind: str, files: dict[str, Path], threads: int, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if kind == "ours":
        cmd = [sys.executable, "-m", "llava_cli", "serve", "--model", str(files["text"]), "--mmproj"]
        cmd += [str(files["mmproj"]), "--ctx", str(N_CTX), "--threads", str(threads), "--port", str(port), "--quiet"]
    else:
        env["PYTHONPATH"] = f"{DEPS}{os.pathsep}{ROOT}"
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(files["text"]), "--clip_model_path"]
        cmd += [str(files["mmproj"]), "--chat_format", "llava-1-5", "--n_ctx", str(N_CTX), "--n_threads", str(threads)]
        cmd += ["--n_threads_batch", str(threads), "--port", str(port), "--host", "127.0.0.1", "--verbose", "False"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 600) -> float:
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not come up")


# ------------------------------------------------------------------------------------------------ measurements


def ttft(client: Any, model: str, messages: list[dict[str, Any]], tokens: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    first = 0.0
    parts: list[str] = []
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=tokens, temperature=0, stream=True
    )
    for chunk in stream:
        if not first:
            first = time.perf_counter() - t0
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return first, "".join(parts)


def user(text: str, image: bytes | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": data_url(image)}})
    return {"role": "user", "content": content}


def throughput(
    client: Any, model: str, requests: list[list[dict[str, Any]]], clients: int, tokens: int
) -> dict[str, float]:
    todo = list(enumerate(requests))
    lock = threading.Lock()
    generated = [0]
    failures = [0]

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                _, msgs = todo.pop(0)
            try:
                r = client.chat.completions.create(model=model, messages=msgs, max_tokens=tokens, temperature=0)
                with lock:
                    generated[0] += r.usage.completion_tokens if r.usage else 0
            except Exception:
                with lock:
                    failures[0] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "wall": wall,
        "req_per_min": 60 * len(requests) / wall,
        "tok_s": generated[0] / wall,
        "failures": failures[0],
    }


def measure(kind: str, files: dict[str, Path], images: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    import openai

    port = free_port()
    proc = start(kind, files, args.threads, port)
    url = f"http://127.0.0.1:{port}"
    try:
        load = wait_ready(url, proc)
        client = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=3600)
        model = client.models.list().data[0].id
        # Warm-up with an image nobody asks about later: lazy imports and llama.cpp's one-time graph allocations
        # are paid here, so turn 1 below is a warm encode + prefill for both servers.
        client.chat.completions.create(model=model, messages=[user("Hi", images[-1])], max_tokens=2)
        first = [user(PROMPT, images[0])]
        t1, answer = ttft(client, model, first, args.tokens)
        t2, _ = ttft(client, model, [*first, {"role": "assistant", "content": answer}, user(FOLLOW_UP)], args.tokens)
        res: dict[str, Any] = {"load": load, "turn1_ttft": t1, "turn2_ttft": t2}
        if args.requests:
            distinct = [[user(f"{PROMPT} ({i})", images[1 + i % (len(images) - 2)])] for i in range(args.requests)]
            same = [[user(f"Question {i}: {PROMPT}", images[0])] for i in range(args.requests)]
            res["distinct"] = throughput(client, model, distinct, args.clients, args.tokens)
            res["same"] = throughput(client, model, same, args.clients, args.tokens)
        return res
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The best of each figure over the rounds (lowest time, highest rate; failures summed)."""
    out: dict[str, Any] = {k: min(r[k] for r in runs) for k in ("load", "turn1_ttft", "turn2_ttft")}
    for key in ("distinct", "same"):
        if key not in runs[0]:
            continue
        out[key] = {
            "wall": min(r[key]["wall"] for r in runs),
            "req_per_min": max(r[key]["req_per_min"] for r in runs),
            "tok_s": max(r[key]["tok_s"] for r in runs),
            "failures": sum(r[key]["failures"] for r in runs),
        }
    return out


# ------------------------------------------------------------------------------------------------ report


def ratio(ours: float, theirs: float, higher_is_better: bool) -> str:
    if not ours or not theirs:
        return "–"
    r = ours / theirs if higher_is_better else theirs / ours
    return f"{r:.2f}×"


def report(res: dict[str, dict[str, Any]], args: argparse.Namespace, sizes: str) -> str:
    o, t = res["ours"], res["llama-cpp-python"]
    rows: list[tuple[str, float, float, bool, Callable[[float], str]]] = [
        ("turn 1 TTFT (image + question)", o["turn1_ttft"], t["turn1_ttft"], False, lambda v: f"{v:.2f} s"),
        ("turn 2 TTFT (history re-sent)", o["turn2_ttft"], t["turn2_ttft"], False, lambda v: f"{v:.2f} s"),
    ]
    for key, label in (("distinct", "a different image each"), ("same", "one image, different questions")):
        if key not in o:
            continue
        rows.append(
            (f"throughput, {label}: requests/min", o[key]["req_per_min"], t[key]["req_per_min"], True, "{:.1f}".format)
        )
        rows.append((f"throughput, {label}: generated tok/s", o[key]["tok_s"], t[key]["tok_s"], True, "{:.1f}".format))
    lines = [
        f"### llava serve vs llama_cpp.server ({sizes}; {args.threads} threads, {args.requests} requests from "
        f"{args.clients} clients, {args.tokens} tokens, greedy; best of {args.rounds} interleaved rounds)",
        "",
        "| | llava serve | llama_cpp.server | ours vs theirs |",
        "|---|---:|---:|---:|",
    ]
    for label, ov, tv, hib, f in rows:
        lines.append(f"| {label} | {f(ov)} | {f(tv)} | {ratio(ov, tv, hib)} |")
    failures = tuple(sum(r[k]["failures"] for k in ("distinct", "same") if k in r) for r in (o, t))
    lines += [
        "",
        f"Ratios: > 1× means llava serve is better (faster, or more per minute). Failed requests: ours "
        f"{failures[0]}, theirs {failures[1]}. Server start-up: ours {o['load']:.1f} s, theirs {t['load']:.1f} s.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=["tiny", "small", "bench"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=8, help="requests per throughput scenario; 0 = TTFT only")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each figure is kept")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    args = ap.parse_args()

    import bench_runtime

    ensure_llama_server_deps()
    built = bench_runtime.prepare(args.size)
    files = {"text": built["text_f16"], "mmproj": built["mmproj_f16"]}
    text_m, vision_m = bench_runtime.n_params(built)
    sizes = f"{args.size}: {text_m:.0f} M text + {vision_m:.0f} M vision parameters, F16"
    images = png_variants(bench_runtime.images()[0], max(args.requests, 1) + 2)
    # Interleaved rounds, best of each figure: this shared VM's speed drifts by 2× over minutes.
    rounds: dict[str, list[dict[str, Any]]] = {"ours": [], "llama-cpp-python": []}
    for r in range(args.rounds):
        for kind in rounds:
            print(f"[round {r + 1}/{args.rounds}] {kind}...", file=sys.stderr, flush=True)
            rounds[kind].append(measure(kind, files, images, args))
            # Each measurement as it comes: a run cut short still leaves its figures.
            print(json.dumps({"round": r + 1, "server": kind, **rounds[kind][-1]}), file=sys.stderr, flush=True)
    res = {kind: best(runs) for kind, runs in rounds.items()}
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    print(report(res, args, sizes))


if __name__ == "__main__":
    main()
