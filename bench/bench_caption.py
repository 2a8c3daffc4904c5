"""Images per minute for batch captioning on a synthetic model, three ways, in one run:

  (a) ours: `llava_cli.captioning.caption` (model loaded once, decoding in a background thread, image cache),
      and the same as a `python -m llava_cli caption` subprocess (start-up included);
  (b) a Python loop over llama-cpp-python's `Llava15ChatHandler` with the `Llama` object kept loaded (images
      passed as data URIs, the documented way);
  (c) a shell-style loop starting `python -m llava_cli run` once per image (what `for f in *.jpg; do ...; done`
      over any one-shot CLI does).

Same model file, prompt, greedy decoding, --max-tokens and thread count for all. Prints a table; no asserts.

    python bench/bench_caption.py                       # tiny256 model, 24 photos of 1024x768
    python bench/bench_caption.py --preset tiny --images 48 --duplicates 0.25
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "Describe this image in one sentence."


def make_photos(folder: Path, n: int, duplicates: float, size: tuple[int, int]) -> list[Path]:
    """JPEG 'photos' (gradients + blocks + noise, so they compress like real ones); a share are byte-identical
    copies of earlier ones (a dataset with duplicates)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = size
    n_dup = int(round(n * duplicates))
    paths: list[Path] = []
    for i in range(n - n_dup):
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.stack([x / w * 255, y / h * 255, (i * 29 % 255) + 0 * x], axis=-1)
        img += 50 * np.sign(np.sin(x / (7 + i)) * np.cos(y / (11 + i)))[..., None]
        img += rng.normal(0, 12, img.shape)
        p = folder / f"photo{i:04d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(p)
    for j in range(n_dup):
        p = folder / f"photo{len(paths):04d}.jpg"
        p.write_bytes(paths[j % max(1, n - n_dup)].read_bytes())
        paths.append(p)
    return sorted(paths)


def build_model(work: Path, preset: str) -> tuple[Path, Path]:
    from quantize import convert
    from quantize.synthetic import make_checkpoint

    ckpt = make_checkpoint(work / f"ckpt-{preset}", preset=preset)
    result = convert(ckpt, work / "gguf", outtype="f16", name=f"bench-{preset}")
    return Path(result.text_path), Path(result.mmproj_path)


def run_ours(folder: Path, text: Path, mmproj: Path, out: Path, max_tokens: int, threads: int) -> dict:
    from llava_cli import captioning

    marks: dict[str, float] = {}

    def on_progress(done: int, total: int) -> None:
        marks.setdefault("first", time.perf_counter())  # called with 0 once the model is loaded
        marks["last"] = time.perf_counter()

    t0 = time.perf_counter()
    summary = captioning.caption(
        [folder],
        model=str(text),
        mmproj=mmproj,
        ctx=2048,
        threads=threads,
        max_tokens=max_tokens,
        temperature=0.0,
        out=out,
        overwrite=True,
        on_progress=on_progress,
        on_note=lambda m: None,
    )
    total = time.perf_counter() - t0
    n = summary.done + summary.failed
    return {"n": n, "wall": total, "loop": marks["last"] - marks["first"], "tokens": summary.tokens}


def run_ours_cli(folder: Path, text: Path, mmproj: Path, out: Path, max_tokens: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "llava_cli", "caption", str(folder), "--out", str(out), "--overwrite", "--quiet"]
    cmd += ["--model", str(text), "--mmproj", str(mmproj), "-n", str(max_tokens), "--temperature", "0"]
    cmd += ["--threads", str(threads), "--ctx", "2048"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=_env(), capture_output=True)
    wall = time.perf_counter() - t0
    n = len(out.read_text().splitlines())
    return {"n": n, "wall": wall, "loop": None, "tokens": None}


def paired_per_image(paths: list[Path], text: Path, mmproj: Path, max_tokens: int, threads: int, rounds: int) -> dict:
    """Steady-state seconds per image, (a)'s engine path vs (b), alternating image by image in one process so that
    load from other processes on a shared machine hits both alike. (a) here is what the batch loop does per image
    once the prefetch thread has decoded it: `EngineCaptioner.caption`; the memo is off, so duplicates are redone
    by the model (only their CLIP encode is cached)."""
    import contextlib

    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    from llava_cli.captioning import EngineCaptioner
    from llava_cli.images import load_image
    from llava_cli.runtime import Engine

    engine = Engine(text, mmproj, n_ctx=2048, n_threads=threads, on_note=lambda m: None)
    ours = EngineCaptioner(engine, model_name="bench", quantization="f16", max_tokens=max_tokens, temperature=0.0)
    ours.deterministic = False  # measure the model path, not the duplicate memo
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        handler = Llava15ChatHandler(clip_model_path=str(mmproj), verbose=False)
        llm = Llama(
            model_path=str(text), chat_handler=handler, n_ctx=2048, n_threads=threads, n_gpu_layers=0, verbose=False
        )
    ratios, t_a, t_b = [], 0.0, 0.0
    for r in range(rounds):
        engine.clear_image_cache()
        for i, p in enumerate(paths):
            order = ("a", "b") if (i + r) % 2 == 0 else ("b", "a")
            took = {}
            for who in order:
                t0 = time.perf_counter()
                if who == "a":
                    ours.caption(load_image(p), PROMPT)  # decode included here, though the batch does it ahead
                else:
                    uri = "data:image/jpeg;base64," + base64.b64encode(p.read_bytes()).decode()
                    content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": PROMPT}]
                    llm.create_chat_completion(
                        messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0.0
                    )
                took[who] = time.perf_counter() - t0
            ratios.append(took["b"] / took["a"])
            t_a += took["a"]
            t_b += took["b"]
    engine.close()
    n = len(paths) * rounds
    return {"a": t_a / n, "b": t_b / n, "median_ratio": sorted(ratios)[len(ratios) // 2], "pairs": n}


def run_handler(paths: list[Path], text: Path, mmproj: Path, max_tokens: int, threads: int) -> dict:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    t0 = time.perf_counter()
    handler = Llava15ChatHandler(clip_model_path=str(mmproj), verbose=False)
    llm = Llama(
        model_path=str(text), chat_handler=handler, n_ctx=2048, n_threads=threads, n_gpu_layers=0, verbose=False
    )
    t_loaded = time.perf_counter()
    tokens = 0
    for p in paths:
        uri = "data:image/jpeg;base64," + base64.b64encode(p.read_bytes()).decode()
        result = llm.create_chat_completion(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": PROMPT}],
                }
            ],
            max_tokens=max_tokens,
            temperature=0.0,
        )
        tokens += result["usage"]["completion_tokens"]
    t_end = time.perf_counter()
    del llm, handler
    return {"n": len(paths), "wall": t_end - t0, "loop": t_end - t_loaded, "tokens": tokens}


def run_process_per_image(paths: list[Path], text: Path, mmproj: Path, max_tokens: int, threads: int) -> dict:
    t0 = time.perf_counter()
    for p in paths:
        cmd = [sys.executable, "-m", "llava_cli", "run", "--model", str(text), "--mmproj", str(mmproj)]
        cmd += ["--image", str(p), "-n", str(max_tokens), "--temperature", "0", "--threads", str(threads)]
        cmd += ["--ctx", "2048", PROMPT]
        subprocess.run(cmd, check=True, cwd=ROOT, env=_env(), capture_output=True)
    return {"n": len(paths), "wall": time.perf_counter() - t0, "loop": None, "tokens": None}


def _env() -> dict[str, str]:
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath}


def _child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def in_child(method: str, args: argparse.Namespace, work: Path, text: Path, mmproj: Path) -> dict:
    """Run (a) or (b) in a fresh Python process, so neither inherits the other's allocations, threads or caches."""
    cmd = [sys.executable, __file__, "--child", method, "--work", str(work), "--max-tokens", str(args.max_tokens)]
    cmd += ["--threads", str(args.threads), "--text", str(text), "--mmproj", str(mmproj)]
    cpu0 = _child_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=True, cwd=ROOT, env=_env(), capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall"] = time.perf_counter() - t0
    result["cpu"] = _child_cpu() - cpu0
    return result


def timed(fn, *a) -> dict:  # type: ignore[no-untyped-def]
    cpu0 = _child_cpu()
    result = fn(*a)
    result["cpu"] = _child_cpu() - cpu0
    result["process_wall"] = result["wall"]
    return result


def child_main(args: argparse.Namespace) -> None:
    work, text, mmproj = Path(args.work), Path(args.text), Path(args.mmproj)
    photos = sorted((work / "photos").glob("*.jpg"))
    if args.child == "a":
        r = run_ours(work / "photos", text, mmproj, work / "a.jsonl", args.max_tokens, args.threads)
    else:
        r = run_handler(photos, text, mmproj, args.max_tokens, args.threads)
    print(json.dumps(r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny256", help="quantize.synthetic preset (tiny, tiny256, bench)")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--duplicates", type=float, default=0.0, help="share of byte-identical copies, e.g. 0.25")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--per-process-images", type=int, default=6, help="images for (c), which is slow")
    ap.add_argument("--size", default="1024x768", help="photo size WxH")
    ap.add_argument("--repeat", type=int, default=3, help="runs of (a) and (b), interleaved; the median is shown")
    ap.add_argument("--paired-rounds", type=int, default=2, help="rounds of the paired per-image comparison")
    ap.add_argument("--child", choices=["a", "b"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--text", help=argparse.SUPPRESS)
    ap.add_argument("--mmproj", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return
    w, h = (int(v) for v in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory(prefix="bench-caption-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("LLAVA_HOME", str(work / "home"))
        text, mmproj = build_model(work, args.preset)
        photos = make_photos(work / "photos", args.images, args.duplicates, (w, h))
        print(
            f"model: synthetic {args.preset} f16 ({text.stat().st_size / 1e6:.1f} MB text + "
            f"{mmproj.stat().st_size / 1e6:.1f} MB mmproj); {len(photos)} JPEG {w}x{h} images "
            f"({args.duplicates:.0%} duplicates); max_tokens {args.max_tokens}, greedy, {args.threads} threads; "
            f"{os.cpu_count()} CPUs; os.getloadavg() at start {os.getloadavg()[0]:.1f}"
        )
        folder = photos[0].parent
        runs = {
            "(a) llava caption (CLI process)": lambda: timed(
                run_ours_cli, folder, text, mmproj, work / "a2.jsonl", args.max_tokens, args.threads
            ),
            "(a) captioning.caption() (fresh process)": lambda: in_child("a", args, work, text, mmproj),
            "(b) Llava15ChatHandler loop (fresh process)": lambda: in_child("b", args, work, text, mmproj),
        }
        in_child("b", args, work, text, mmproj)  # warm-up: page cache, CPU backend init
        results: dict[str, list[dict]] = {name: [] for name in runs}
        for _ in range(max(1, args.repeat)):  # interleaved, so load from other processes hits all alike
            for name, fn in runs.items():
                results[name].append(fn())
        rows = [(name, sorted(rs, key=lambda r: r["process_wall"])[len(rs) // 2]) for name, rs in results.items()]
        sub = photos[: args.per_process_images]
        rows.append(
            (
                f"(c) process per image ({len(sub)} images)",
                timed(run_process_per_image, sub, text, mmproj, args.max_tokens, args.threads),
            )
        )

        anchor = rows[2][1]["n"] * 60 / rows[2][1]["process_wall"]
        print()
        header = ("method", "images", "wall s", "img/min", "loop img/min", "CPU s/img", "tok/img", "vs (b)")
        print(
            f"{header[0]:44} {header[1]:>6} {header[2]:>7} {header[3]:>8} {header[4]:>12} {header[5]:>9} "
            f"{header[6]:>7} {header[7]:>7}"
        )
        for name, r in rows:
            ipm = r["n"] * 60 / r["process_wall"]
            loop = f"{r['n'] * 60 / r['loop']:.1f}" if r["loop"] else "-"
            tpi = f"{r['tokens'] / r['n']:.1f}" if r["tokens"] is not None else "-"
            print(
                f"{name:44} {r['n']:>6} {r['process_wall']:>7.2f} {ipm:>8.1f} {loop:>12} {r['cpu'] / r['n']:>9.2f} "
                f"{tpi:>7} {ipm / anchor:>6.2f}x"
            )
        print(f"\nmedian of {args.repeat} interleaved runs for (a) and (b); one run for (c).")
        paired = paired_per_image(photos, text, mmproj, args.max_tokens, args.threads, args.paired_rounds)
        print(
            f"paired, per image, same process, alternating ({paired['pairs']} pairs): (a) {paired['a']:.3f} s, "
            f"(b) {paired['b']:.3f} s; median (b)/(a) = {paired['median_ratio']:.2f}x"
        )
        print("wall / img/min: the whole process, start-up and model load included. loop img/min: after the model")
        print("is loaded. CPU s/img: user+sys CPU time of the process per image. tok/img: generated tokens per image.")


if __name__ == "__main__":
    main()
