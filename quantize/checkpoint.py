"""Read a Hugging Face LLaVA checkpoint (llava-hf layout) without torch, one tensor at a time.

`open_checkpoint(dir)` reads ``config.json`` (filling in transformers' defaults, because llava-hf configs are
saved as diffs against them), indexes every safetensors file (single or sharded with
``model.safetensors.index.json``) by parsing the headers ourselves, normalises the three tensor-name layouts
transformers has written to one canonical naming, and checks that every tensor the config implies is present
with the right shape, before anything is converted. `Checkpoint.read(name)` then loads a single tensor as
float32 (F32, F16 or BF16 on disk; BF16 is decoded by hand, safetensors' numpy API cannot).

Canonical names: ``model.*`` and ``lm_head.weight`` for the text model (transformers 4.x names without the
``language_model.`` prefix), ``vision.*`` for the CLIP vision transformer (no ``vision_model.``), and
``projector.*`` for the multi-modal projector.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llava_cli import reading
from llava_cli.errors import CheckpointError, InputNotFoundError

SUPPORTED_ARCHITECTURES = ("LlavaForConditionalGeneration",)
SUPPORTED_TEXT_MODELS = ("llama", "mistral")
SUPPORTED_VISION_MODELS = ("clip_vision_model",)

# transformers' defaults for the keys a sparse llava-hf config may leave out (LlamaConfig / MistralConfig /
# CLIPVisionConfig / LlavaConfig __init__ defaults in transformers 5.23).
_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    },
    "mistral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    },
}
_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 32,
    "num_channels": 3,
    "layer_norm_eps": 1e-5,
    "hidden_act": "quick_gelu",
}
_LLAVA_DEFAULTS: dict[str, Any] = {
    "image_token_index": 32000,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "multimodal_projector_bias": True,
}

_ST_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
}


@dataclass(frozen=True)
class TextConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    layer_norm_eps: float

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class LlavaConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_index: int
    projector_hidden_act: str
    projector_bias: bool
    # How many CLIP encoder blocks LLaVA's image features come out of (vision_feature_layer -2 of 24 -> 23).
    feature_depth: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: file, header name, dtype string ("F32"/"F16"/"BF16"), shape, byte range."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


@dataclass
class Checkpoint:
    """An opened, validated checkpoint. `tensors` maps canonical names to where their data is."""

    path: Path
    config: LlavaConfig
    tensors: dict[str, TensorRef]
    layout: str
    raw_config: dict[str, Any] = field(repr=False, default_factory=dict)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str) -> np.ndarray:
        """One tensor as a float32 array (F16/BF16 widened), read straight from its file."""
        ref = self.tensors[name]
        dtype, _ = _ST_DTYPES[ref.dtype]
        count = ref.n_elements
        with open(ref.file, "rb") as fh:
            fh.seek(ref.start)
            data = np.fromfile(fh, dtype=dtype, count=count)
        if data.size != count:
            raise CheckpointError(
                f"{ref.file}: truncated while reading tensor {ref.name}",
                hint="the download is incomplete; fetch the file again",
            )
        if ref.dtype == "BF16":
            # bfloat16 is the top half of a float32.
            data = (data.astype(np.uint32) << np.uint32(16)).view(np.float32)
        elif ref.dtype == "F16":
            data = data.astype(np.float32)
        return data.reshape(ref.shape)


# --------------------------------------------------------------------------------------------------- config


def _require_int(d: dict[str, Any], key: str, where: str) -> int:
    val = d[key]
    if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
        raise CheckpointError(f"{where}: {key} must be a positive integer, got {val!r}")
    return val


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})", hint="the file is corrupt; fetch it again") from exc


def read_config(path: Path) -> tuple[LlavaConfig, dict[str, Any]]:
    """Parse ``config.json`` of a llava-hf checkpoint dir, with transformers' defaults for absent keys."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{path}: no config.json, so this is not a Hugging Face checkpoint directory",
            hint="point at the folder that holds config.json and the *.safetensors files",
        )
    raw = _read_json(cfg_path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and model_type != "llava":
        found = ", ".join(archs) if archs else f"model_type {model_type!r}"
        raise CheckpointError(
            f"{cfg_path}: unsupported architecture {found}; supported: {supported} (llava-hf LLaVA-1.5, BakLLaVA)",
            hint="convert a llava-hf checkpoint such as llava-hf/llava-1.5-7b-hf",
        )
    llava = {**_LLAVA_DEFAULTS, **raw}

    text_raw = dict(raw.get("text_config") or {})
    text_type = text_raw.get("model_type", "llama")
    if text_type not in SUPPORTED_TEXT_MODELS:
        raise CheckpointError(
            f"{cfg_path}: unsupported text model {text_type!r}; supported: {', '.join(SUPPORTED_TEXT_MODELS)}"
        )
    t = {**_TEXT_DEFAULTS[text_type], **{k: v for k, v in text_raw.items() if v is not None}}
    rope = t.get("rope_parameters") or t.get("rope_scaling")
    if isinstance(rope, dict):
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise CheckpointError(f"{cfg_path}: rope scaling {rope!r} is not supported")
        t["rope_theta"] = rope.get("rope_theta", t["rope_theta"])
    where = f"{cfg_path} text_config"
    n_head = _require_int(t, "num_attention_heads", where)
    t.setdefault("num_key_value_heads", n_head)
    n_head_kv = _require_int(t, "num_key_value_heads", where)
    hidden = _require_int(t, "hidden_size", where)
    if n_head % n_head_kv or hidden % n_head:
        raise CheckpointError(f"{where}: {n_head} heads do not split into {n_head_kv} KV heads of equal size")
    head_dim = t.get("head_dim") or hidden // n_head
    if head_dim * n_head != hidden:
        raise CheckpointError(f"{where}: head_dim {head_dim} x {n_head} heads != hidden_size {hidden}")
    text = TextConfig(
        model_type=text_type,
        vocab_size=_require_int(t, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=_require_int(t, "intermediate_size", where),
        num_hidden_layers=_require_int(t, "num_hidden_layers", where),
        num_attention_heads=n_head,
        num_key_value_heads=n_head_kv,
        head_dim=int(head_dim),
        max_position_embeddings=_require_int(t, "max_position_embeddings", where),
        rms_norm_eps=float(t["rms_norm_eps"]),
        rope_theta=float(t["rope_theta"]),
        tie_word_embeddings=bool(t.get("tie_word_embeddings", raw.get("tie_word_embeddings", False))),
    )

    vis_raw = dict(raw.get("vision_config") or {})
    vis_type = vis_raw.get("model_type", "clip_vision_model")
    if vis_type not in SUPPORTED_VISION_MODELS:
        raise CheckpointError(
            f"{cfg_path}: unsupported vision tower {vis_type!r}; supported: {', '.join(SUPPORTED_VISION_MODELS)}"
        )
    v = {**_VISION_DEFAULTS, **{k: val for k, val in vis_raw.items() if val is not None}}
    where = f"{cfg_path} vision_config"
    if v.get("hidden_act") != "quick_gelu":
        raise CheckpointError(f"{where}: hidden_act {v.get('hidden_act')!r} is not supported (CLIP uses quick_gelu)")
    vision = VisionConfig(
        hidden_size=_require_int(v, "hidden_size", where),
        intermediate_size=_require_int(v, "intermediate_size", where),
        num_hidden_layers=_require_int(v, "num_hidden_layers", where),
        num_attention_heads=_require_int(v, "num_attention_heads", where),
        image_size=_require_int(v, "image_size", where),
        patch_size=_require_int(v, "patch_size", where),
        num_channels=_require_int(v, "num_channels", where),
        layer_norm_eps=float(v["layer_norm_eps"]),
    )
    if vision.image_size % vision.patch_size:
        raise CheckpointError(f"{where}: image_size {vision.image_size} is not a multiple of {vision.patch_size}")

    layer = llava["vision_feature_layer"]
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise CheckpointError(f"{cfg_path}: vision_feature_layer {layer!r} is not supported (one layer index only)")
    # HF hidden_states has n_layers + 1 entries (the embeddings first): index k = output of k blocks.
    depth = layer + vision.num_hidden_layers + 1 if layer < 0 else layer
    if not 1 <= depth <= vision.num_hidden_layers:
        raise CheckpointError(f"{cfg_path}: vision_feature_layer {layer} is out of range")
    if llava["vision_feature_select_strategy"] != "default":
        raise CheckpointError(
            f"{cfg_path}: vision_feature_select_strategy {llava['vision_feature_select_strategy']!r} is not "
            "supported; LLaVA-1.5 uses 'default' (drop the CLS token)"
        )
    if llava["projector_hidden_act"] != "gelu":
        raise CheckpointError(f"{cfg_path}: projector_hidden_act {llava['projector_hidden_act']!r} is not supported")

    mean, std = _image_norm(path)
    config = LlavaConfig(
        text=text,
        vision=vision,
        image_token_index=int(llava["image_token_index"]),
        projector_hidden_act=llava["projector_hidden_act"],
        projector_bias=bool(llava["multimodal_projector_bias"]),
        feature_depth=depth,
        image_mean=mean,
        image_std=std,
    )
    return config, raw


def _image_norm(path: Path) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Image mean/std from preprocessor_config.json; CLIP's when the file is absent (as in CLIPImageProcessor)."""
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        data = _read_json(pre)
        mean = data.get("image_mean", mean)
        std = data.get("image_std", std)
    if len(mean) != 3 or len(std) != 3:
        raise CheckpointError(f"{pre}: image_mean and image_std must have 3 values")
    m = (float(mean[0]), float(mean[1]), float(mean[2]))
    s = (float(std[0]), float(std[1]), float(std[2]))
    return m, s


# --------------------------------------------------------------------------------------------------- tensors

# (pattern, replacement, layout) in order; the first match wins.
_NAME_RULES: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile(r"^language_model\.lm_head\."), "lm_head.", "hub"),
    (re.compile(r"^language_model\.model\."), "model.", "hub"),
    (re.compile(r"^model\.language_model\."), "model.", "state_dict"),
    (re.compile(r"^lm_head\."), "lm_head.", "state_dict"),
    (re.compile(r"^(?:model\.)?vision_tower\.vision_model\."), "vision.", "hub"),
    (re.compile(r"^model\.vision_tower\."), "vision.", "state_dict"),
    (re.compile(r"^vision_tower\."), "vision.", "saved5"),
    (re.compile(r"^model\.multi_modal_projector\."), "projector.", "state_dict"),
    (re.compile(r"^multi_modal_projector\."), "projector.", "hub"),
]


def canonical_name(name: str) -> tuple[str, str] | None:
    """(canonical name, layout it came from) for a checkpoint tensor name, or None for tensors we skip."""
    if name.endswith("rotary_emb.inv_freq") or ".position_ids" in name:
        return None  # buffers some old checkpoints saved; llama.cpp recomputes them
    for pattern, repl, layout in _NAME_RULES:
        if pattern.match(name):
            return pattern.sub(repl, name, count=1), layout
    return None


def expected_tensors(cfg: LlavaConfig, *, has_lm_head: bool = True) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor the config implies, with its shape (the embedding rows come from the file)."""
    t, v = cfg.text, cfg.vision
    h, kv = t.hidden_size, t.num_key_value_heads * t.head_dim
    out: dict[str, tuple[int, ...]] = {"model.norm.weight": (h,)}
    for i in range(t.num_hidden_layers):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (t.num_attention_heads * t.head_dim, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, t.num_attention_heads * t.head_dim),
            p + "mlp.gate_proj.weight": (t.intermediate_size, h),
            p + "mlp.up_proj.weight": (t.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, t.intermediate_size),
        }
    vh, vf = v.hidden_size, v.intermediate_size
    out |= {
        "vision.embeddings.class_embedding": (vh,),
        "vision.embeddings.patch_embedding.weight": (vh, v.num_channels, v.patch_size, v.patch_size),
        "vision.embeddings.position_embedding.weight": (v.num_patches + 1, vh),
        "vision.pre_layrnorm.weight": (vh,),
        "vision.pre_layrnorm.bias": (vh,),
    }
    # Only the blocks LLaVA uses are required (the last one is unused with vision_feature_layer -2).
    for i in range(cfg.feature_depth):
        p = f"vision.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[p + f"self_attn.{proj}.weight"] = (vh, vh)
            out[p + f"self_attn.{proj}.bias"] = (vh,)
        for ln in ("layer_norm1", "layer_norm2"):
            out[p + f"{ln}.weight"] = (vh,)
            out[p + f"{ln}.bias"] = (vh,)
        out |= {
            p + "mlp.fc1.weight": (vf, vh),
            p + "mlp.fc1.bias": (vf,),
            p + "mlp.fc2.weight": (vh, vf),
            p + "mlp.fc2.bias": (vh,),
        }
    out |= {"projector.linear_1.weight": (h, vh), "projector.linear_2.weight": (h, h)}
    if cfg.projector_bias:
        out |= {"projector.linear_1.bias": (h,), "projector.linear_2.bias": (h,)}
    return out


def _read_header(file: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header; returns (header dict, offset where tensor data begins)."""
    # Bounded like every input (llava_cli/reading.py): a regular file only (a FIFO named *.safetensors would block
    # the open), and a header length within the header limit.
    cap = reading.HEADER.bytes()
    fd = reading.open_regular(file, what="a safetensors file", error=CheckpointError)
    try:
        with open(fd, "rb") as fh:
            size = os.fstat(fd).st_size
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{file}: truncated (no safetensors header)", hint="fetch the file again")
            (n,) = struct.unpack("<Q", raw_len)
            if n > size - 8:
                raise CheckpointError(f"{file}: corrupt or truncated safetensors header", hint="fetch the file again")
            if n > cap:
                raise reading.too_large(f"{file}: its header", n, cap, reading.HEADER, CheckpointError)
            blob = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read ({exc.strerror})") from exc
    try:
        header = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: corrupt safetensors header", hint="fetch the file again") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header", hint="fetch the file again")
    return header, 8 + n


def _index_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map", hint="the file is corrupt; fetch it again")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(
                f"{path}: shard {missing[0]} listed in model.safetensors.index.json is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                hint="the download is incomplete; fetch the missing files",
            )
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = sorted(path.glob("*.bin"))
        hint = "convert the .bin files to safetensors first" if bins else "download the *.safetensors files"
        raise CheckpointError(f"{path}: no *.safetensors files", hint=hint)
    return files


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open and validate a llava-hf checkpoint directory. Reads headers only; no tensor data is loaded."""
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"checkpoint directory {path} does not exist", hint="check the path")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory", hint="give the checkpoint folder, not a file in it")
    cfg, raw = read_config(path)

    tensors: dict[str, TensorRef] = {}
    layouts: set[str] = set()
    for file in _index_files(path):
        header, data_start = _read_header(file)
        size = file.stat().st_size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = info.get("dtype")
            if dtype not in _ST_DTYPES:
                raise CheckpointError(
                    f"{file}: tensor {name} has dtype {dtype}; supported: F32, F16, BF16",
                )
            start, end = (data_start + int(o) for o in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            if end > size:
                raise CheckpointError(
                    f"{file}: truncated ({size} bytes, tensor {name} ends at byte {end})",
                    hint="the download is incomplete; fetch the file again",
                )
            if end - start != int(np.prod(shape)) * _ST_DTYPES[dtype][1]:
                raise CheckpointError(f"{file}: tensor {name} has an inconsistent byte range", hint="fetch it again")
            canon = canonical_name(name)
            if canon is None:
                continue
            tensors[canon[0]] = TensorRef(file, name, dtype, shape, start, end)
            layouts.add(canon[1])

    _check_tensors(path, cfg, tensors)
    # "saved5" is recognised by its vision names alone; the text names are the hub's.
    layout = "state_dict" if "state_dict" in layouts else ("saved5" if "saved5" in layouts else "hub")
    return Checkpoint(path=path, config=cfg, tensors=tensors, layout=layout, raw_config=raw)


def _check_tensors(path: Path, cfg: LlavaConfig, tensors: dict[str, TensorRef]) -> None:
    emb = tensors.get("model.embed_tokens.weight")
    if emb is None:
        raise CheckpointError(
            f"{path}: tensor model.embed_tokens.weight (language_model.model.embed_tokens.weight) is missing",
            hint="the checkpoint is incomplete or not a llava-hf checkpoint",
        )
    n_rows = emb.shape[0]
    expected = expected_tensors(cfg) | {"model.embed_tokens.weight": (n_rows, cfg.text.hidden_size)}
    if "lm_head.weight" in tensors or not cfg.text.tie_word_embeddings:
        expected["lm_head.weight"] = (n_rows, cfg.text.hidden_size)
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{path}: tensor {missing[0]}{more} missing from the checkpoint",
            hint="the checkpoint is incomplete, or config.json does not belong to these weights",
        )
    for name, shape in expected.items():
        ref = tensors[name]
        if ref.shape != shape:
            raise CheckpointError(
                f"{ref.file}: tensor {ref.name} has shape {list(ref.shape)} but config.json implies {list(shape)}",
                hint="config.json does not belong to these weights",
            )
    if n_rows < cfg.text.vocab_size:
        raise CheckpointError(
            f"{path}: embed_tokens has {n_rows} rows but config.json says vocab_size {cfg.text.vocab_size}",
            hint="config.json does not belong to these weights",
        )


@dataclass(frozen=True)
class TensorPlan:
    """One tensor to write into a GGUF: its GGUF name, numpy shape, GGML type and how to produce its data.

    ``load`` returns float32 data in ``shape``; the converter casts it to ``qtype`` just before writing, so only
    one tensor is ever in memory."""

    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType (F32 or F16)
    load: Any  # Callable[[], np.ndarray]

    @property
    def np_dtype(self) -> np.dtype:
        import gguf

        return np.dtype(np.float16) if self.qtype == gguf.GGMLQuantizationType.F16 else np.dtype(np.float32)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.np_dtype.itemsize
