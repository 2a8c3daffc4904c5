"""The vision half of a LLaVA checkpoint as a llama.cpp ``clip`` mmproj GGUF: CLIP ViT + 2-layer MLP projector.

What the vendored llama.cpp (llama-cpp-python 0.3.36) needs from an mmproj (each point was checked by loading files
written this way and broken on purpose with that llama.cpp; tests/test_convert.py keeps the good ones loading):

* ``clip.projector_type = "mlp"``, projector tensors ``mm.0`` / ``mm.2`` (gguf's name map says ``mm.1``, which
  segfaults the graph, so the projector names are formatted from ``MODEL_TENSOR.V_MMPROJ`` by hand).
* Penultimate-layer features: LLaVA takes ``hidden_states[-2]``, the output of ``n_layers - 1`` blocks. We store
  exactly that many blocks, ``block_count`` = that depth and ``clip.vision.feature_layer = [depth]``; without the
  key the graph would run one block fewer (llama.cpp issue #25817). No ``v.post_ln`` (LLaVA skips it).
* ``v.class_embd`` F32 (an F16 one aborts in ggml_concat), all 1-D tensors F32, position table F32.

Vision layouts (``VISION_LAYOUTS``), recorded in ``general.description`` ("... vision layout <name>"):

* ``standard`` (default): HF's embeddings as they are — ``v.class_embd`` (F32) and the full N+1-row position
  table, CLS at row 0. llava-cli's own vision graph (llava_cli/runtime/vision.py) computes transformers' image
  features exactly from it; llama.cpp and Ollama load it too (their graph puts CLS after the patches, llama.cpp
  issue #25814, so there one patch is dropped and the others get their neighbour's position).
* ``no_cls``: no class embedding, the position table cut to the N patch rows. In llama.cpp's graph every patch
  then keeps its slot and its HF position, only the CLS token is missing from attention: the closer
  approximation *for people who run our files in llama.cpp/Ollama* (docs/vision.md). llava-cli runs it as what it
  is (patches only), which is not exact.
"""

from __future__ import annotations

import gguf
import numpy as np

from quantize.checkpoint import Checkpoint, TensorPlan

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ]  # "clip"

# clip.cpp's PROJECTOR_TYPE_MLP name (tools/mtmd/clip-impl.h); the gguf wheel has no constant for it.
PROJECTOR_TYPE = "mlp"
# The wheel lacks Keys.ClipVision.FEATURE_LAYER (newer gguf-py has it): derive it from the clip.vision prefix.
FEATURE_LAYER_KEY = gguf.Keys.ClipVision.BLOCK_COUNT.rsplit(".", 1)[0] + ".feature_layer"

# How the class token and the position table are written (module docstring). Older files may also say "legacy"
# (= standard) or "rolled" (position table rotated for llama.cpp's graph); llava-cli still reads both exactly.
VISION_LAYOUTS = ("standard", "no_cls")
# Exact in llava-cli's graph (tests/test_vision_graph.py) and what llama.cpp's own conversions write.
DEFAULT_VISION_LAYOUT = "standard"


def add_mmproj_metadata(
    writer: gguf.GGUFWriter, ckpt: Checkpoint, *, name: str, ftype: int, vision_layout: str
) -> None:
    cfg = ckpt.config
    v = cfg.vision
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_description(f"LLaVA vision tower + mlp projector, vision layout {vision_layout}")
    writer.add_file_type(ftype)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(PROJECTOR_TYPE)
    writer.add_vision_embedding_length(v.hidden_size)
    writer.add_vision_feed_forward_length(v.intermediate_size)
    writer.add_vision_block_count(cfg.feature_depth)
    writer.add_vision_head_count(v.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(v.layer_norm_eps)
    writer.add_vision_image_size(v.image_size)
    writer.add_vision_patch_size(v.patch_size)
    writer.add_vision_projection_dim(cfg.text.hidden_size)
    writer.add_vision_image_mean([float(x) for x in cfg.image_mean])
    writer.add_vision_image_std([float(x) for x in cfg.image_std])
    # CLIP's encoder uses quick-GELU, which clip.cpp picks when neither use_gelu nor use_silu is set.
    writer.add_vision_use_gelu(False)
    # int32 array (clip.cpp checks the element type): run exactly `feature_depth` blocks.
    writer.add_array(FEATURE_LAYER_KEY, [int(cfg.feature_depth)])


def mmproj_tensors(ckpt: Checkpoint, *, outtype: str, vision_layout: str) -> list[TensorPlan]:
    if vision_layout not in VISION_LAYOUTS:
        raise ValueError(f"unknown vision layout {vision_layout!r}; choose from {', '.join(VISION_LAYOUTS)}")
    cfg = ckpt.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, cfg.feature_depth)
    wide = gguf.GGMLQuantizationType.F16 if outtype == "f16" else gguf.GGMLQuantizationType.F32
    f32 = gguf.GGMLQuantizationType.F32
    plans: list[TensorPlan] = []

    def add(src: str, *, gname: str | None = None, keep_f32: bool = False, transform=None, shape=None) -> None:
        ref = ckpt.tensors[src]
        if gname is None:
            # gguf's map knows CLIP names under the Hub prefix only.
            gname = name_map.get_name(
                "vision_tower.vision_model." + src[len("vision.") :], try_suffixes=(".weight", ".bias")
            )
            assert gname is not None, src
        qtype = f32 if keep_f32 or len(ref.shape) == 1 else wide

        def load() -> np.ndarray:
            data = ckpt.read(src)
            return transform(data) if transform else data

        plans.append(TensorPlan(gname, tuple(shape or ref.shape), qtype, load))

    n_pos, vh = ckpt.tensors["vision.embeddings.position_embedding.weight"].shape
    add("vision.embeddings.patch_embedding.weight")
    if vision_layout == "standard":
        add("vision.embeddings.class_embedding", keep_f32=True)
        add("vision.embeddings.position_embedding.weight", keep_f32=True)
    else:
        add(
            "vision.embeddings.position_embedding.weight",
            keep_f32=True,
            transform=lambda p: np.ascontiguousarray(p[1:]),
            shape=(n_pos - 1, vh),
        )
    add("vision.pre_layrnorm.weight")
    add("vision.pre_layrnorm.bias")
    for i in range(cfg.feature_depth):
        p = f"vision.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            add(p + f"self_attn.{proj}.weight")
            add(p + f"self_attn.{proj}.bias")
        add(p + "layer_norm1.weight")
        add(p + "layer_norm1.bias")
        add(p + "mlp.fc1.weight")
        add(p + "mlp.fc1.bias")
        add(p + "mlp.fc2.weight")
        add(p + "mlp.fc2.bias")
        add(p + "layer_norm2.weight")
        add(p + "layer_norm2.bias")
    mm = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ]
    for src_idx, dst_idx in ((1, 0), (2, 2)):
        for suffix in ("weight", "bias"):
            src = f"projector.linear_{src_idx}.{suffix}"
            if ckpt.has(src):
                add(src, gname=f"{mm.format(bid=dst_idx)}.{suffix}")
    return plans
