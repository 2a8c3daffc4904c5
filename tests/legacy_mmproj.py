"""Write an mmproj the way llama.cpp's legacy script does (the layout of the published LLaVA-1.5 mmproj files).

The published files come from ``tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py`` run on a CLIP
directory plus the projector saved by ``llava_surgery``. What that script writes, reproduced here from a
synthetic llava-hf checkpoint (layout reproduced by running that script on synthetic checkpoints):

* keys: ``clip.has_text_encoder`` false, ``clip.has_vision_encoder`` / ``clip.has_llava_projector`` true,
  description "image encoder for LLaVA", projector type ``mlp``, ``projection_dim`` 768 (CLIP's own projection,
  unused), ``use_gelu`` false; ``block_count`` = layers - 1 and no ``clip.vision.feature_layer`` key when the CLIP
  config has no ``vision_feature_layer`` (the surgery flow), otherwise ``block_count`` = max(feature layers) and
  the key;
* tensors: the projector first (``multi_modal_projector.linear_1/2`` -> ``mm.0/mm.2``; 2-D F16, 1-D F32), then
  the CLIP vision state dict renamed by its string replacements — notably ``mlp.fc1`` -> ``ffn_down`` and
  ``mlp.fc2`` -> ``ffn_up`` (swapped against gguf's names); the last encoder block and ``post_layernorm``
  dropped; 4-D tensors always F16, 2-D ``.weight`` F16 in an F16 file (so the position table is F16), the rest
  F32.

``patch_f32=True`` keeps the patch embedding F32 (the script would write F16 even with ``--use-f32``): the same
layout with exact weights, so an F32 parity test measures the graph and not the rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from quantize.checkpoint import open_checkpoint


def legacy_tensor_name(name: str) -> str:
    """The script's get_tensor_name for CLIP vision and projector names."""
    if name.startswith("multi_modal_projector"):
        return name.replace("multi_modal_projector", "mm").replace("linear_1", "0").replace("linear_2", "2")
    return (
        name.replace("vision_model", "v")
        .replace("encoder.layers", "blk")
        .replace("embeddings.", "")
        .replace("_proj", "")
        .replace("self_attn.", "attn_")
        .replace("layer_norm", "ln")
        .replace("layernorm", "ln")
        .replace("mlp.fc1", "ffn_down")
        .replace("mlp.fc2", "ffn_up")
        .replace("embedding", "embd")
        .replace("final", "post")
        .replace("layrnorm", "ln")
    )


def write_legacy_mmproj(
    checkpoint: Path, out: Path, *, f16: bool = True, feature_layer_key: bool = False, patch_f32: bool = False
) -> Path:
    """Write `checkpoint`'s vision tower + projector to `out` in the legacy script's layout; return `out`."""
    ckpt = open_checkpoint(checkpoint)
    cfg = ckpt.config
    v = cfg.vision
    depth = cfg.feature_depth  # vision_feature_layer -2 -> layers - 1
    w = gguf.GGUFWriter(str(out), "clip")
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_file_type(1 if f16 else 0)
    w.add_name(checkpoint.name)
    w.add_description("image encoder for LLaVA")
    w.add_string("clip.projector_type", "mlp")
    w.add_uint32("clip.vision.image_size", v.image_size)
    w.add_uint32("clip.vision.patch_size", v.patch_size)
    w.add_uint32("clip.vision.embedding_length", v.hidden_size)
    w.add_uint32("clip.vision.feed_forward_length", v.intermediate_size)
    w.add_uint32("clip.vision.projection_dim", 768)
    w.add_uint32("clip.vision.attention.head_count", v.num_attention_heads)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", v.layer_norm_eps)
    w.add_uint32("clip.vision.block_count", depth)
    if feature_layer_key:
        w.add_array("clip.vision.feature_layer", [depth])
    w.add_array("clip.vision.image_mean", [float(x) for x in cfg.image_mean])
    w.add_array("clip.vision.image_std", [float(x) for x in cfg.image_std])
    w.add_bool("clip.use_gelu", False)

    def add(hf_name: str, data: np.ndarray) -> None:
        data = data.squeeze()
        conv = data.ndim == 4 and not patch_f32
        if conv or (f16 and data.ndim == 2 and hf_name.endswith(".weight")):
            data = data.astype(np.float16)
        else:
            data = data.astype(np.float32)
        w.add_tensor(legacy_tensor_name(hf_name), data)

    for i in (1, 2):
        for suffix in ("weight", "bias"):
            add(f"multi_modal_projector.linear_{i}.{suffix}", ckpt.read(f"projector.linear_{i}.{suffix}"))
    for canonical in ckpt.tensors:
        if not canonical.startswith("vision.") or "post_layernorm" in canonical:
            continue
        rest = canonical[len("vision.") :]
        if rest.startswith("encoder.layers.") and int(rest.split(".")[2]) >= depth:
            continue  # the script pops the last block
        add("vision_model." + rest, ckpt.read(canonical))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


TensorEdit = Callable[[str, np.ndarray, gguf.GGMLQuantizationType], "tuple[str, np.ndarray, Any] | None"]


def rewrite_mmproj(
    src: Path,
    dst: Path,
    *,
    edit: TensorEdit | None = None,
    keys: dict[str, tuple[Any, gguf.GGUFValueType]] | None = None,
) -> Path:
    """Copy an mmproj through gguf's writer; `edit(name, data, type)` returns the tensor to write (or None to
    drop it), `keys` replaces or adds key values. What another converter, or a broken one, writes."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), "clip")
    keys = dict(keys or {})
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name in keys:
            value, vtype = keys.pop(name)
            writer.add_key_value(name, value, vtype)
        elif f.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, f.contents(), f.types[0], sub_type=f.types[-1])
        else:
            writer.add_key_value(name, f.contents(), f.types[0])
    for name, (value, vtype) in keys.items():
        writer.add_key_value(name, value, vtype)
    for t in reader.tensors:
        item = (t.name, np.array(t.data), t.tensor_type)
        out = edit(*item) if edit else item
        if out is not None:
            writer.add_tensor(out[0], out[1], raw_dtype=out[2])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def quantize_matmuls(src: Path, dst: Path, qtype: gguf.GGMLQuantizationType) -> Path:
    """`src` with every 2-D matmul weight (attention, FFN, projector) quantized by gguf's numpy quantizer (bit-exact
    with ggml for Q8_0); the patch and position embeddings stay as they are, as llama-quantize leaves them."""

    def edit(name: str, data: np.ndarray, t: gguf.GGMLQuantizationType) -> tuple[str, np.ndarray, Any]:
        if data.ndim == 2 and name.endswith(".weight") and ("blk." in name or name.startswith("mm.")):
            return name, gguf.quants.quantize(data.astype(np.float32), qtype), qtype
        return name, data, t

    return rewrite_mmproj(src, dst, edit=edit)
