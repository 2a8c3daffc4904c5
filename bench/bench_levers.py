"""What the runtime's own levers buy for time to first token, against transformers fp32 (torch CPU) in the same run.

    python bench/bench_levers.py                  # small bench model (~170 M text + CLIP ViT-L), 3 rounds
    python bench/bench_levers.py --size tiny      # seconds: checks that the script works
    python bench/bench_levers.py --rounds 5 --tokens 610

TTFT of one image question = image encode + prefill of the prompt (576 image tokens + the text) to the first
token. The two halves are measured apart, each in its own child process (torch and llama.cpp each bring a thread
pool; one process per measurement keeps them from distorting each other):

  * encode: our ggml vision graph (llava_cli/runtime/vision.py VisionEncoder) with the F16 or the F32 mmproj,
    against transformers' ``get_image_features`` on the same checkpoint;
  * prefill: llama.cpp evaluating ``--tokens`` prompt tokens in one call (F16 / BF16 / Q8_0 / Q4_K_M text weights,
    n_batch/n_ubatch, flash attention on/off, 1 or 2 threads), against transformers' language model forward over
    the same number of positions.

Every configuration runs once per round and the rounds are interleaved (this VM's speed drifts by up to 2x over
minutes); each figure is the best of its rounds (other work on a shared machine only ever slows a run down).
Each child times a second call after a warm-up call, so one-time graph allocation is not counted on either side.
Models: bench/bench_runtime.py's `prepare` (random-weight llava-hf checkpoints, quantize.convert), plus BF16 and
Q8_0 text files written from the F16 one with llama.cpp's own quantizer (llama_model_quantize).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


# ------------------------------------------------------------------------------------------------ children


def child_prefill(a: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp as lc

    llm = lc.Llama(
        model_path=a["text"],
        n_ctx=2048,
        n_batch=a["n_batch"],
        n_ubatch=a["n_ubatch"],
        n_threads=a["threads"],
        n_threads_batch=a["threads"],
        flash_attn=a["flash_attn"],
        verbose=False,
    )
    n_vocab = llm.n_vocab()
    # Deterministic, varied ids (not one repeated token): the cost is the same for any ids, the check is not.
    ids = [1 + (i * 7919) % (n_vocab - 1) for i in range(a["tokens"])]
    mem = lc.llama_get_memory(llm.ctx)

    def once() -> float:
        lc.llama_memory_clear(mem, True)
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        return time.perf_counter() - t

    once()  # warm-up: first-use allocations and page faults of the weights
    return {"prefill": once()}


def child_encode(a: dict[str, Any]) -> dict[str, Any]:
    from PIL import Image

    from llava_cli.runtime.vision import VisionEncoder

    enc = VisionEncoder(a["mmproj"], n_threads=a["threads"])
    pixels = [enc.preprocess(Image.open(p).convert("RGB")) for p in a["images"]]
    enc.encode(pixels[0])  # warm-up: graph build + allocation
    t = time.perf_counter()
    enc.encode(pixels[1])
    return {"encode": time.perf_counter() - t, "flash_attn": enc.flash_attn}


def child_hf(a: dict[str, Any]) -> dict[str, Any]:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(a["threads"])
    model = LlavaForConditionalGeneration.from_pretrained(a["ckpt"], dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(a["ckpt"])
    pix = [proc.image_processor(Image.open(p).convert("RGB"), return_tensors="pt")["pixel_values"] for p in a["images"]]
    lm = model.model.language_model
    hidden = model.config.text_config.hidden_size
    embeds = torch.randn(1, a["tokens"], hidden, generator=torch.Generator().manual_seed(0)) * 0.02

    def encode(p: Any) -> float:
        t = time.perf_counter()
        model.get_image_features(pixel_values=p, vision_feature_layer=-2, vision_feature_select_strategy="default")
        return time.perf_counter() - t

    def prefill() -> float:
        # The language model over all prompt positions, then the head on the last one: what generate() does
        # before its first token (logits_to_keep=1).
        t = time.perf_counter()
        out = lm(inputs_embeds=embeds, use_cache=True)
        model.lm_head(out.last_hidden_state[:, -1:])
        return time.perf_counter() - t

    with torch.inference_mode():
        encode(pix[0])
        enc = encode(pix[1])
        prefill()
        pre = prefill()
    return {"encode": enc, "prefill": pre}


CHILDREN = {"prefill": child_prefill, "encode": child_encode, "hf": child_hf}


SITE: str | None = None  # --site: an unpacked llama-cpp-python wheel to run instead of the installed one


def spawn(kind: str, args: dict[str, Any]) -> dict[str, Any] | None:
    from bench_runtime import child_env

    env = child_env(args["threads"], SITE if kind != "hf" else None)  # torch never runs on the other build
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, json.dumps(args)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        print(f"  {kind} failed: {tail}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ models


def text_variants(files: dict[str, Path]) -> dict[str, Path]:
    """F16 (converted), BF16 and Q8_0 (llama.cpp's quantizer from the F16 file), Q4_K_M (quantize.quantize)."""
    import llama_cpp as lc

    f16 = files["text_f16"]
    out = {"F16": f16, "Q4_K_M": files["text_q4"]}
    for label, ftype in (("BF16", lc.LLAMA_FTYPE_MOSTLY_BF16), ("Q8_0", lc.LLAMA_FTYPE_MOSTLY_Q8_0)):
        dst = f16.with_name(f16.name.replace(".f16.", f".{label.lower()}."))
        if not dst.exists():
            params = lc.llama_model_quantize_default_params()
            params.ftype = ftype
            params.nthread = 2
            tmp = dst.with_suffix(".part")
            if lc.llama_model_quantize(str(f16).encode(), str(tmp).encode(), params) != 0:
                raise SystemExit(f"llama_model_quantize to {label} failed")
            tmp.rename(dst)
        out[label] = dst
    return out


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=["small", "tiny"])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each figure is its best round")
    ap.add_argument("--tokens", type=int, default=600, help="prompt tokens to prefill (576 image + text)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument(
        "--only", default="", help="comma-separated substrings: run only the configurations whose label has one"
    )
    ap.add_argument(
        "--site",
        help="an unpacked llama-cpp-python wheel (bench/bench_build_flags.py) to measure instead of the installed one",
    )
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    global SITE
    SITE = a.site
    if a.child:
        kind, payload = a.child
        print(json.dumps(CHILDREN[kind](json.loads(payload))))
        return

    from bench_runtime import images, prepare

    files = prepare(a.size)
    texts = text_variants(files)
    pics = [str(p) for p in images()]
    t, n = a.threads, a.tokens
    base = {"tokens": n, "flash_attn": False, "threads": t}

    def pre(label: str, quant: str, **kw: Any) -> tuple[str, str, dict[str, Any]]:
        cfg = {**base, "text": str(texts[quant]), "n_batch": 1024, "n_ubatch": 512, **kw}
        return label, "prefill", cfg

    configs: list[tuple[str, str, dict[str, Any]]] = [
        pre("F16 512/512 fa off", "F16", n_batch=512, n_ubatch=512),
        pre("F16 1024/512 fa off", "F16"),
        pre("F16 2048/2048 fa off", "F16", n_batch=2048, n_ubatch=2048),
        pre("F16 1024/512 fa on", "F16", flash_attn=True),
        pre("F16 2048/2048 fa on", "F16", n_batch=2048, n_ubatch=2048, flash_attn=True),
        pre("F16 1024/1024 fa on", "F16", n_batch=1024, n_ubatch=1024, flash_attn=True),
        pre("F16 2048/2048 fa on, 1 thread", "F16", n_batch=2048, n_ubatch=2048, flash_attn=True, threads=1),
        pre("F16 1024/512 fa off, 1 thread", "F16", threads=1),
        pre("F16 1024/1024 fa off", "F16", n_batch=1024, n_ubatch=1024),
        pre("BF16 1024/512 fa off", "BF16"),
        pre("BF16 1024/1024 fa on", "BF16", n_batch=1024, n_ubatch=1024, flash_attn=True),
        pre("Q8_0 1024/512 fa off", "Q8_0"),
        pre("Q8_0 1024/1024 fa on", "Q8_0", n_batch=1024, n_ubatch=1024, flash_attn=True),
        pre("Q4_K_M 1024/512 fa off", "Q4_K_M"),
        pre("Q4_K_M 1024/1024 fa on", "Q4_K_M", n_batch=1024, n_ubatch=1024, flash_attn=True),
        ("mmproj F16", "encode", {"mmproj": str(files["mmproj_f16"]), "images": pics, "threads": t}),
        ("mmproj F32", "encode", {"mmproj": str(files["mmproj_f32"]), "images": pics, "threads": t}),
        ("mmproj F32, 1 thread", "encode", {"mmproj": str(files["mmproj_f32"]), "images": pics, "threads": 1}),
        ("transformers fp32", "hf", {"ckpt": str(files["ckpt"]), "images": pics, "tokens": n, "threads": t}),
    ]
    if a.only:
        keys = [k.strip() for k in a.only.split(",") if k.strip()]
        configs = [c for c in configs if any(k in c[0] for k in keys)]
    best: dict[str, dict[str, float]] = {}
    for r in range(a.rounds):
        for label, kind, cfg in configs:
            print(f"round {r + 1}/{a.rounds}: {label}", file=sys.stderr, flush=True)
            res = spawn(kind, cfg)
            if res is None:
                continue
            slot = best.setdefault(label, {})
            for k, v in res.items():
                if isinstance(v, float):
                    slot[k] = min(slot.get(k, v), v)

    hf = best.get("transformers fp32", {})
    hf_pre, hf_enc = hf.get("prefill"), hf.get("encode")
    lines = [
        f"size {a.size}, {t} threads, {n} prompt tokens, best of {a.rounds} interleaved rounds",
        "",
        "| prefill (text) | s | tok/s | vs transformers fp32 |",
        "|---|---|---|---|",
    ]
    for label, kind, _ in configs:
        if kind in ("prefill", "hf") and label in best and "prefill" in best[label]:
            s = best[label]["prefill"]
            vs = f"{s / hf_pre:.2f}×" if hf_pre else "–"
            lines.append(f"| {label} | {s:.3f} | {n / s:.0f} | {vs} |")
    lines += ["", "| image encode | s | vs transformers fp32 |", "|---|---|---|"]
    for label, kind, _ in configs:
        if kind in ("encode", "hf") and label in best and "encode" in best[label]:
            s = best[label]["encode"]
            vs = f"{s / hf_enc:.2f}×" if hf_enc else "–"
            lines.append(f"| {label} | {s:.3f} | {vs} |")
    lines += ["", "| TTFT = encode + prefill | s | vs transformers fp32 |", "|---|---|---|"]
    hf_ttft = (hf_enc + hf_pre) if hf_enc and hf_pre else None
    for enc_label in ("mmproj F16", "mmproj F32"):
        for pre_label in (
            "F16 1024/512 fa off",
            "F16 1024/1024 fa on",
            "BF16 1024/1024 fa on",
            "Q8_0 1024/1024 fa on",
            "Q4_K_M 1024/512 fa off",
            "Q4_K_M 1024/1024 fa on",
        ):
            if enc_label in best and pre_label in best:
                s = best[enc_label]["encode"] + best[pre_label]["prefill"]
                vs = f"{s / hf_ttft:.2f}×" if hf_ttft else "–"
                lines.append(f"| {enc_label} + {pre_label} | {s:.3f} | {vs} |")
    if hf_ttft:
        lines.append(f"| transformers fp32 | {hf_ttft:.3f} | 1.00× |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
