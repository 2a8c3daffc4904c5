"""End to end: `llava run --temperature 0` gives transformers' greedy answer to a question about an image.

The whole path is ours (image decode → pad/crop → our ggml vision graph → embeddings into llama.cpp's text model),
compared with ``LlavaForConditionalGeneration.generate`` on the same checkpoint, F32 files, for our conversion and
for an mmproj in llama.cpp's legacy-script layout (the published files' layout), on a tiny checkpoint and on one
whose vision layers are strong (large weights: the image tokens decide the answer). 16 tokens, EOS allowed.

The text model's KV cache is llama.cpp's default F16 one, as users run it; the measured effect on these models is
below the margin of every greedy choice (the test would show it as a diverging token).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from llava_cli.cli.app import main
from quantize import convert
from quantize.synthetic import make_checkpoint
from tests.legacy_mmproj import write_legacy_mmproj
from tests.model_fixtures import test_image

pytestmark = pytest.mark.parity

QUESTION = "What is in this picture?"
N_TOKENS = 16
CHECKPOINTS = {"tiny": {}, "strong-vision": {"vision_gain": 2.5}}


def hf_greedy(ckpt: Path, image: Image.Image, fit: str) -> list[int]:
    """transformers' greedy answer (token ids, up to N_TOKENS, cut at EOS). ``fit``: "crop" is the checkpoint's
    own CLIPImageProcessor; "pad" first expands the picture to a square in the mean colour (LLaVA-1.5's training
    path), which is the identity for the square pictures used with it here."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(ckpt)
    assert fit == "crop" or image.width == image.height
    inputs = processor(images=image, text=f"USER: <image>\n{QUESTION} ASSISTANT:", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=N_TOKENS, do_sample=False)
    ids = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[:i]
    return ids


def ours_answer(text: Path, mmproj: Path, picture: Path, fit: str) -> Any:
    """What `llava run` computes: the same Engine call the command makes (its token ids and text)."""
    from llava_cli.runtime import Engine

    with Engine(text, mmproj, n_ctx=2048, n_threads=2, image_fit=fit) as engine:  # type: ignore[arg-type]
        return engine.ask(QUESTION, [picture], temperature=0, max_tokens=N_TOKENS)


def ours_cli(text: Path, mmproj: Path, picture: Path, fit: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    argv = ["run", "--model", str(text), "--mmproj", str(mmproj), "--image", str(picture), "--image-fit", fit]
    argv += ["--temperature", "0", "--max-tokens", str(N_TOKENS), "--threads", "2", "--json", "--quiet", QUESTION]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.parametrize("mmproj_kind", ["ours", "legacy"])
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_run_gives_transformers_greedy_answer(name: str, mmproj_kind: str, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / name, **CHECKPOINTS[name])
    pair = convert(ckpt, tmp_path / "gguf", outtype="f32")
    mmproj = pair.mmproj_path
    if mmproj_kind == "legacy":
        mmproj = write_legacy_mmproj(ckpt, tmp_path / "mmproj-legacy.gguf", f16=False, patch_f32=True)
    picture = tmp_path / "square.png"
    Image.fromarray(test_image(336, seed=3)).save(picture)

    expected = hf_greedy(ckpt, Image.open(picture).convert("RGB"), "pad")
    assert ours_answer(pair.text_path, mmproj, picture, "pad").tokens == expected


@pytest.mark.slow
def test_crop_on_a_non_square_picture_gives_transformers_greedy_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--image-fit crop`` is transformers' own preprocessing: same answer on a 500x336 picture."""
    ckpt = make_checkpoint(tmp_path / "strong", vision_gain=2.5)
    pair = convert(ckpt, tmp_path / "gguf", outtype="f32")
    picture = tmp_path / "wide.png"
    Image.fromarray(np.concatenate([test_image(336, seed=4), test_image(336, seed=5)[:, :164]], axis=1)).save(picture)

    expected = hf_greedy(ckpt, Image.open(picture).convert("RGB"), "crop")
    answer = ours_answer(pair.text_path, pair.mmproj_path, picture, "crop")
    assert answer.tokens == expected
    # And through the command itself. (Text is compared with ours, not with transformers' decode: on random
    # weights the answer has stray byte tokens, which the two detokenizers replace differently.)
    got = ours_cli(pair.text_path, pair.mmproj_path, picture, "crop", capsys)
    assert got["answer"] == answer.text and got["tokens"]["completion"] == len(expected)
