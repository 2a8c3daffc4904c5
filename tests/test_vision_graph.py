"""The vision graph (llava_cli/runtime/vision.py) against transformers, and the preprocessing against its processor.

Figures measured on this machine (4 images, max |ours - HF| / max |HF| of the B x 576 x n_embd features):

  F32, our conversion:   tiny 1.3e-6, tiny256 1.6e-6, strong (vision_gain 2.5) 4.8e-5 — for strong, HF's own
                         float32 result is 4.1e-5 from its float64 one and ours 2.1e-5: as exact as float32 gets
  F32, legacy layout:    identical to our conversion (same weights, other names)
  F16 (ours / legacy):   ~9e-4 (cosine per token >= 0.999996)        Q8_0 matmuls: ~2.4e-2 (cosine >= 0.998)
  batch of 4:            bitwise equal to 4 single-image evaluations
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from PIL import Image

from llava_cli.errors import ModelFileError
from llava_cli.preprocess import preprocess
from llava_cli.runtime import ggml
from llava_cli.runtime.vision import VisionEncoder, inspect_mmproj
from quantize import convert
from quantize.synthetic import CLIP_MEAN, CLIP_STD, make_checkpoint
from tests.legacy_mmproj import quantize_matmuls, rewrite_mmproj, write_legacy_mmproj
from tests.model_fixtures import test_image

REL_TOL = 1e-4  # F32 files vs transformers
F16_REL, F16_COS = 2e-3, 0.9999  # measured ~9e-4 / 0.999996
Q8_REL, Q8_COS = 5e-2, 0.997  # measured ~2.4e-2 / 0.9983
STRONG_GAIN = 2.5  # beyond ~3 the tower is so ill-conditioned that HF's own f32 and f64 results differ by >1e-4


def _images(n: int) -> list[Image.Image]:
    return [Image.fromarray(test_image(336, seed=s)) for s in range(n)]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _cos_min(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min())


@functools.lru_cache(maxsize=4)
def _hf_model(ckpt: Path) -> Any:
    import torch
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()


def hf_features(ckpt: Path, pixels: np.ndarray, *, double: bool = False) -> np.ndarray:
    """transformers' ``get_image_features`` (vision_feature_layer / strategy from the config): B x 576 x n_embd."""
    import torch

    model = _hf_model(ckpt)
    x = torch.from_numpy(pixels)
    with torch.no_grad():
        if double:
            model.double()
            x = x.double()
        try:
            feats = model.model.get_image_features(pixel_values=x).pooler_output
        finally:
            model.float()
    stacked = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
    return stacked.double().numpy().reshape(pixels.shape[0], -1, stacked.shape[-1])


def _encode(mmproj: Path, pixels: np.ndarray, **kw: Any) -> np.ndarray:
    with VisionEncoder(mmproj, n_threads=2, **kw) as enc:
        return enc.encode(pixels)


@pytest.fixture(scope="module")
def strong_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("strong") / "strong-llava", vision_gain=STRONG_GAIN)


@pytest.fixture(scope="module")
def pixels4() -> np.ndarray:
    return np.stack([preprocess(im, fit="pad", size=336, mean=CLIP_MEAN, std=CLIP_STD) for im in _images(4)])


def _checkpoint(request: pytest.FixtureRequest, name: str) -> Path:
    fixture = {"tiny": "tiny_checkpoint", "tiny256": "tiny256_checkpoint", "strong": "strong_checkpoint"}[name]
    path: Path = request.getfixturevalue(fixture)
    return path


# ------------------------------------------------------------------------------------------ preprocessing


def _clip_processor() -> Any:
    from transformers import CLIPImageProcessorPil  # the processor llava-hf's preprocessor_config.json names

    return CLIPImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,
    )


def _llava_expand2square(pil_img: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    """Verbatim from the original LLaVA repository (llava/mm_utils.py), the reference for ``pad``."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


SIZES = [(500, 300), (301, 517), (336, 336), (120, 90), (1001, 999)]


@pytest.mark.parity
@pytest.mark.parametrize("size", SIZES)
def test_crop_equals_transformers_clip_processor(size: tuple[int, int]) -> None:
    w, h = size
    image = Image.fromarray(test_image(max(w, h))[:h, :w])
    ref = _clip_processor()(images=image, return_tensors="np")["pixel_values"][0]
    ours = preprocess(image, fit="crop", size=336, mean=CLIP_MEAN, std=CLIP_STD)
    assert ours.dtype == np.float32 and ours.shape == (3, 336, 336)
    assert np.array_equal(ours, ref)


@pytest.mark.parity
@pytest.mark.parametrize("size", SIZES)
def test_pad_equals_llava_expand2square_then_clip_processor(size: tuple[int, int]) -> None:
    w, h = size
    image = Image.fromarray(test_image(max(w, h))[:h, :w])
    colour = tuple(int(x * 255) for x in CLIP_MEAN)
    assert colour == (122, 116, 104)
    ref = _clip_processor()(images=_llava_expand2square(image, colour), return_tensors="np")["pixel_values"][0]
    ours = preprocess(image, fit="pad", size=336, mean=CLIP_MEAN, std=CLIP_STD)
    assert np.array_equal(ours, ref)
    if w != h:  # pad keeps the whole picture, crop cuts it: they differ on a non-square image
        assert not np.array_equal(ours, preprocess(image, fit="crop", size=336, mean=CLIP_MEAN, std=CLIP_STD))


# ------------------------------------------------------------------------------------------ parity (F32)


@pytest.mark.parity
@pytest.mark.parametrize("name", ["tiny", "tiny256", "strong"])
def test_f32_features_match_transformers(
    name: str, request: pytest.FixtureRequest, pixels4: np.ndarray, tmp_path: Path
) -> None:
    ckpt = _checkpoint(request, name)
    mmproj = convert(ckpt, tmp_path, outtype="f32").mmproj_path
    assert inspect_mmproj(mmproj)[0].layout == "standard"
    ours = _encode(mmproj, pixels4)
    ref = hf_features(ckpt, pixels4)
    assert ours.shape == ref.shape == (4, 576, ref.shape[-1])
    print(f"vision parity {name}: rel {_rel(ours, ref):.2e}")
    assert _rel(ours, ref) < REL_TOL
    if name == "strong":
        # As close to the float64 answer as transformers' own float32 result is.
        exact = hf_features(ckpt, pixels4, double=True)
        assert _rel(ours, exact) <= 1.5 * _rel(ref, exact)


@pytest.mark.parity
@pytest.mark.parametrize("flash_attn", [False, True])
def test_both_attention_kernels_are_exact(
    flash_attn: bool, tiny256_checkpoint: Path, pixels4: np.ndarray, tmp_path: Path
) -> None:
    mmproj = convert(tiny256_checkpoint, tmp_path, outtype="f32").mmproj_path
    ours = _encode(mmproj, pixels4[:2], flash_attn=flash_attn)
    assert _rel(ours, hf_features(tiny256_checkpoint, pixels4[:2])) < REL_TOL


@pytest.mark.parity
@pytest.mark.parametrize(("name", "key"), [("tiny", False), ("strong", True)])
def test_llama_cpp_legacy_layout_matches_transformers(
    name: str, key: bool, request: pytest.FixtureRequest, pixels4: np.ndarray, tmp_path: Path
) -> None:
    """A published-style mmproj (class_embd, 577-row table, block_count 23-style, fc1/fc2 swapped, mm.0/mm.2)."""
    ckpt = _checkpoint(request, name)
    mmproj = write_legacy_mmproj(
        ckpt, tmp_path / "mmproj-legacy.gguf", f16=False, patch_f32=True, feature_layer_key=key
    )
    spec = inspect_mmproj(mmproj)[0]
    assert spec.ffn_swapped and spec.has_cls and spec.n_blocks == 2
    ours = _encode(mmproj, pixels4)
    assert _rel(ours, hf_features(ckpt, pixels4)) < REL_TOL


@pytest.mark.parity
def test_rolled_file_is_rotated_back(tiny_checkpoint: Path, pixels4: np.ndarray, tmp_path: Path) -> None:
    """Files from our older opt-in "rolled" layout (table rotated for llama.cpp's CLS-last graph) are exact too."""
    std = convert(tiny_checkpoint, tmp_path, outtype="f32").mmproj_path

    def roll(name: str, data: np.ndarray, t: Any) -> tuple[str, np.ndarray, Any]:
        return name, (np.roll(data, -1, axis=0) if name == "v.position_embd.weight" else data), t

    desc = ("LLaVA vision tower + mlp projector, vision layout rolled", gguf.GGUFValueType.STRING)
    rolled = rewrite_mmproj(std, tmp_path / "rolled.gguf", edit=roll, keys={"general.description": desc})
    assert inspect_mmproj(rolled)[0].layout == "rolled"
    assert _rel(_encode(rolled, pixels4[:1]), hf_features(tiny_checkpoint, pixels4[:1])) < REL_TOL


@pytest.mark.parity
def test_no_cls_file_runs_as_what_it_is(tiny_checkpoint: Path, pixels4: np.ndarray, tmp_path: Path) -> None:
    """No class embedding: the 576 patches alone with their HF positions (simulated with HF's own modules)."""
    import torch

    mmproj = convert(tiny_checkpoint, tmp_path, outtype="f32", vision_layout="no_cls").mmproj_path
    assert inspect_mmproj(mmproj)[0].layout == "no_cls"
    ours = _encode(mmproj, pixels4[:2])
    model = _hf_model(tiny_checkpoint).model
    vm = getattr(model.vision_tower, "vision_model", model.vision_tower)  # 5.x: the bare CLIP transformer
    with torch.no_grad():
        x = vm.embeddings.patch_embedding(torch.from_numpy(pixels4[:2])).flatten(2).transpose(1, 2)
        x = vm.pre_layrnorm(x + vm.embeddings.position_embedding.weight[1:])
        for layer in vm.encoder.layers[:-1]:  # hidden_states[-2]
            x = layer(x, None)
        ref = model.multi_modal_projector(x).numpy()
    assert _rel(ours, ref) < REL_TOL
    assert _rel(ours, hf_features(tiny_checkpoint, pixels4[:2])) > 10 * REL_TOL  # and it is not HF's answer


# ------------------------------------------------------------------------------------------ quantized files


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["f16", "legacy-f16", "q8_0"])
def test_f16_and_q8_0_within_measured_tolerance(
    kind: str, tiny256_checkpoint: Path, pixels4: np.ndarray, tmp_path: Path
) -> None:
    ckpt = tiny256_checkpoint
    if kind == "f16":
        mmproj = convert(ckpt, tmp_path, outtype="f16").mmproj_path
    elif kind == "legacy-f16":  # F16 patch embedding and F16 position table, as the published files
        mmproj = write_legacy_mmproj(ckpt, tmp_path / "legacy16.gguf", f16=True)
    else:
        f32 = convert(ckpt, tmp_path, outtype="f32").mmproj_path
        mmproj = quantize_matmuls(f32, tmp_path / "q8.gguf", gguf.GGMLQuantizationType.Q8_0)
    ours, ref = _encode(mmproj, pixels4[:2]), hf_features(ckpt, pixels4[:2])
    rel_tol, cos_tol = (Q8_REL, Q8_COS) if kind == "q8_0" else (F16_REL, F16_COS)
    print(f"vision {kind}: rel {_rel(ours, ref):.2e} cos min {_cos_min(ours, ref):.6f}")
    assert _rel(ours, ref) < rel_tol and _cos_min(ours, ref) > cos_tol


@pytest.mark.parity
def test_f16_file_widened_on_the_cpu_is_closer_not_further(
    tiny256_checkpoint: Path, pixels4: np.ndarray, tmp_path: Path
) -> None:
    # The CPU default widens F16 matmul weights to F32 once at load (faster sgemm; runtime/vision.py): the values
    # are the file's, only the activations are no longer rounded to F16 on the way in, so it may only get closer.
    mmproj = convert(tiny256_checkpoint, tmp_path, outtype="f16").mmproj_path
    ref = hf_features(tiny256_checkpoint, pixels4[:2])
    with VisionEncoder(mmproj, n_threads=2) as enc:
        assert enc.f32_weights  # the CPU default
        widened = enc.encode(pixels4[:2])
    kept = _encode(mmproj, pixels4[:2], f32_weights=False)
    print(f"vision f16 file: widened rel {_rel(widened, ref):.2e}, kept F16 rel {_rel(kept, ref):.2e}")
    assert _rel(widened, ref) <= _rel(kept, ref) < F16_REL
    assert not np.array_equal(widened, kept)  # the switch really changes the arithmetic


# ------------------------------------------------------------------------------------------ batching, API


def test_batch_of_four_equals_four_singles(tiny_pair_f32: Any, pixels4: np.ndarray) -> None:
    with VisionEncoder(tiny_pair_f32.mmproj_path, n_threads=2) as enc:
        batch = enc.encode(pixels4)
        singles = np.concatenate([enc.encode(pixels4[i : i + 1]) for i in range(4)])
        assert batch.shape == (4, enc.n_image_tokens, enc.n_embd) == (4, 576, 64)
        assert np.array_equal(batch, singles)
        # More images than max_batch are split into several evaluations with the same result.
        with VisionEncoder(tiny_pair_f32.mmproj_path, n_threads=2, max_batch=3) as small:
            assert np.array_equal(small.encode(pixels4), batch)


def test_encoder_api(tiny_pair_f32: Any) -> None:
    from llava_cli.images import load_image

    with VisionEncoder(tiny_pair_f32.mmproj_path, n_threads=1) as enc:
        assert (enc.image_size, enc.n_image_tokens) == (336, 576)
        assert enc.image_mean == pytest.approx(CLIP_MEAN) and enc.image_std == pytest.approx(CLIP_STD)
        wide = Image.fromarray(test_image(400)[:200])
        assert np.array_equal(enc.preprocess(wide), enc.preprocess(wide, "pad"))
        loaded = load_image(_png(wide))
        (one,) = enc.encode_images([loaded])
        assert np.array_equal(one, enc.encode(enc.preprocess(wide))[0])
        (cropped,) = enc.encode_images([loaded], fit="crop")
        assert not np.array_equal(one, cropped)
        with pytest.raises(ValueError, match=r"\(B, 3, 336, 336\)"):
            enc.encode(np.zeros((1, 3, 224, 224), np.float32))
    with pytest.raises(RuntimeError, match="closed"):
        enc.encode(np.zeros((1, 3, 336, 336), np.float32))


def _png(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ devices


def test_device_selection() -> None:
    cpu = ggml.Device(0, "CPU", "x86", "cpu")
    blas = ggml.Device(1, "BLAS", "OpenBLAS", "accel")
    igpu = ggml.Device(2, "Vulkan1", "iGPU", "igpu")
    gpu = ggml.Device(3, "CUDA0", "RTX", "gpu")
    assert ggml.pick_device([cpu, blas, igpu, gpu], use_gpu=True) == gpu
    assert ggml.pick_device([cpu, igpu], use_gpu=True) == igpu
    assert ggml.pick_device([cpu, blas], use_gpu=True) is None  # CPU backend
    assert ggml.pick_device([cpu, blas, gpu], use_gpu=False) is None
    # This build's registry: a CPU device, so use_gpu falls back to the CPU backend.
    devices = ggml.list_devices()
    assert any(d.kind == "cpu" for d in devices)
    if not any(d.kind in ("gpu", "igpu") for d in devices):
        assert ggml.pick_device(devices, use_gpu=True) is None


# ------------------------------------------------------------------------------------------ bad files


def _drop_block(name: str, data: np.ndarray, t: Any) -> tuple[str, np.ndarray, Any] | None:
    return None if name == "v.blk.1.ffn_up.weight" else (name, data, t)


def _wrong_shape(name: str, data: np.ndarray, t: Any) -> tuple[str, np.ndarray, Any]:
    return name, (data[:, :-1].copy() if name == "v.blk.0.attn_k.weight" else data), t


def _drop_pre_ln(name: str, data: np.ndarray, t: Any) -> tuple[str, np.ndarray, Any] | None:
    return None if name == "v.pre_ln.bias" else (name, data, t)


BAD: dict[str, tuple[dict[str, Any], str]] = {
    "missing-block-tensor": ({"edit": _drop_block}, r"lacks tensor 'v\.blk\.1\.ffn_up\.weight'"),
    "wrong-shape": (
        {"edit": _wrong_shape},
        r"'v\.blk\.0\.attn_k\.weight' has shape \[31, 32\], the graph needs \[32, 32\]",
    ),
    "missing-pre-ln": ({"edit": _drop_pre_ln}, r"lacks tensor 'v\.pre_ln\.bias'"),
    "unknown-projector": (
        {"keys": {"clip.projector_type": ("ldp", gguf.GGUFValueType.STRING)}},
        r"projector type 'ldp'",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_mmproj_refused_before_any_graph(case: str, tiny_pair_f32: Any, tmp_path: Path) -> None:
    kwargs, message = BAD[case]
    bad = rewrite_mmproj(tiny_pair_f32.mmproj_path, tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(ModelFileError, match=message) as info:
        VisionEncoder(bad, n_threads=1)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def quantized_patch_mmproj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An mmproj whose patch embedding is Q8_0. With 14-px patches no quantized type fits (rows of 14 are not
    whole blocks, read_gguf refuses such a file as corrupt), so this tower has 16-px patches on 64-px images and
    the kernel is stored flattened to rows of 3·16·16 = 768, the only way to quantize it."""
    folder = tmp_path_factory.mktemp("q8patch")
    ckpt = make_checkpoint(folder / "ckpt", image_size=64, patch_size=16)
    f32 = convert(ckpt, folder, outtype="f32").mmproj_path
    q = gguf.GGMLQuantizationType.Q8_0

    def edit(name: str, data: np.ndarray, t: Any) -> tuple[str, np.ndarray, Any]:
        if name == "v.patch_embd.weight":
            return name, gguf.quants.quantize(data.reshape(data.shape[0], -1).astype(np.float32), q), q
        return name, data, t

    return rewrite_mmproj(f32, folder / "q8-patch.gguf", edit=edit)


def test_quantized_patch_embedding_refused(quantized_patch_mmproj: Path) -> None:
    with pytest.raises(ModelFileError, match=r"'v\.patch_embd\.weight' is Q8_0; the vision graph takes F16, F32"):
        VisionEncoder(quantized_patch_mmproj, n_threads=1)


def test_refusal_is_an_exception_not_a_ggml_abort(quantized_patch_mmproj: Path) -> None:
    """In a fresh process: a Python exception (exit 1), never ggml's SIGABRT (-6)."""
    import subprocess
    import sys

    path = str(quantized_patch_mmproj)
    code = f"from llava_cli.runtime.vision import VisionEncoder\nVisionEncoder({path!r}, n_threads=1)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1  # a Python exception, not SIGABRT
    assert "ModelFileError" in proc.stderr and "patch_embd" in proc.stderr
