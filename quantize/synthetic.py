"""Write random-weight LLaVA checkpoints in the exact llava-hf layout, without torch.

Used by the tests (tiny models that convert and run in a second), by the `tiny-random` catalog entry (proves an
installation works with no network) and by the benchmarks (CLIP ViT-L geometry, gigabytes of weights).

What is written is what transformers expects for ``LlavaForConditionalGeneration``: ``config.json`` (LlavaConfig
with a llama ``text_config`` and a ``clip_vision_model`` ``vision_config``), safetensors (one file or shards with
``model.safetensors.index.json``; F32, F16 or BF16, BF16 written by hand as raw uint16 because safetensors' numpy
API cannot), a SentencePiece ``tokenizer.model`` trained on a generated corpus (BPE with byte fallback, like
LLaMA's), the tokenizer/processor JSON files with the ``<image>`` and ``<pad>`` tokens, and the embedding rows
padded to a multiple of 64 exactly as llava-hf's conversion script did.

Three tensor-name layouts (see ``LAYOUTS``), because transformers has written all three:

* ``hub``: the llava-hf files on the Hub (transformers 4.x): ``language_model.model.*``,
  ``language_model.lm_head.weight``, ``vision_tower.vision_model.*``, ``multi_modal_projector.*``.
* ``saved5``: what transformers 5.x ``save_pretrained`` writes (checked with 5.23: it reverses its conversion
  mapping for the text model but the vision tower module is the bare CLIP transformer): ``language_model.model.*``,
  ``language_model.lm_head.weight``, ``vision_tower.*`` without ``vision_model.``, ``multi_modal_projector.*``.
* ``state_dict``: the module names of ``LlavaForConditionalGeneration().state_dict()`` in 5.x:
  ``model.language_model.*``, ``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``lm_head.weight``.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

LAYOUTS = ("hub", "saved5", "state_dict")
DTYPES = ("f32", "f16", "bf16")

# CLIP's normalisation constants, as in llava-hf's preprocessor_config.json.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_ST_DTYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
_ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes of a synthetic checkpoint. ``vocab_pieces`` is the SentencePiece vocabulary; the embedding has
    ``vocab_pieces + 2`` (``<image>``, ``<pad>``) rows rounded up to a multiple of 64."""

    hidden_size: int = 64
    intermediate_size: int = 160
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    vocab_pieces: int = 384
    text_model_type: str = "llama"
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_num_hidden_layers: int = 3
    vision_num_attention_heads: int = 2
    image_size: int = 336
    patch_size: int = 14
    tie_word_embeddings: bool = False
    # Multiplies the init scale of every vision-tower matmul (q/k/v/out, fc1/fc2): > 1 gives "strong" vision
    # layers (peaky attention, large residual updates), where small graph differences would show.
    vision_gain: float = 1.0


PRESETS: dict[str, SyntheticSpec] = {
    # Default: converts and runs in about a second; 336x336 images -> 576 image tokens like LLaVA-1.5.
    "tiny": SyntheticSpec(),
    # Every matmul row length a multiple of 256, so K-quants (Q4_K, Q6_K) apply without fallbacks.
    "tiny256": SyntheticSpec(
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=4,
        vision_hidden_size=256,
        vision_intermediate_size=512,
        vision_num_attention_heads=4,
        vision_num_hidden_layers=2,
    ),
    # Bench: CLIP ViT-L/14-336 vision tower and a 2048-wide text model, about 1.1 B parameters (2.2 GB in F16).
    "bench": SyntheticSpec(
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=15,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_pieces=512,
        vision_hidden_size=1024,
        vision_intermediate_size=4096,
        vision_num_hidden_layers=24,
        vision_num_attention_heads=16,
    ),
}


def padded_vocab(spec: SyntheticSpec) -> int:
    """Embedding rows: SentencePiece pieces + <image> + <pad>, padded to a multiple of 64 (llava-hf)."""
    return int(math.ceil((spec.vocab_pieces + 2) / 64) * 64)


def make_checkpoint(
    out_dir: str | os.PathLike[str],
    *,
    preset: str = "tiny",
    layout: str = "hub",
    dtype: str = "f32",
    shards: int = 1,
    seed: int = 0,
    **sizes: Any,
) -> Path:
    """Write a random-weight llava-hf checkpoint into `out_dir` (created) and return its path.

    ``preset`` is one of ``PRESETS``; any ``SyntheticSpec`` field given in ``sizes`` overrides it (e.g.
    ``num_key_value_heads=2`` for grouped-query attention, ``text_model_type="mistral"``). ``layout`` is one of
    ``LAYOUTS``, ``dtype`` one of ``DTYPES``, ``shards`` the number of safetensors files (> 1 writes an index).
    The same arguments always give the same bytes.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    spec = replace(PRESETS[preset], **sizes)
    if spec.num_attention_heads % spec.num_key_value_heads:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    _write_tokenizer(out, spec, seed)
    _write_configs(out, spec, layout, dtype)
    tensors = [(_file_name(name, layout), shape, init) for name, shape, init in canonical_tensors(spec)]
    _write_safetensors(out, tensors, dtype=dtype, shards=shards, seed=seed)
    return out


# --------------------------------------------------------------------------------------------------- tensors


def canonical_tensors(spec: SyntheticSpec) -> list[tuple[str, tuple[int, ...], tuple[str, float]]]:
    """Every tensor as (canonical name, shape, (init kind, scale)). Canonical names are the 4.x text names
    (``model.*``, ``lm_head.weight``), ``vision.*`` for the CLIP vision transformer and ``projector.*``."""
    h, f, v = spec.hidden_size, spec.intermediate_size, padded_vocab(spec)
    hd = h // spec.num_attention_heads
    kv = spec.num_key_value_heads * hd
    vh, vf = spec.vision_hidden_size, spec.vision_intermediate_size
    n_pos = (spec.image_size // spec.patch_size) ** 2 + 1
    out: list[tuple[str, tuple[int, ...], tuple[str, float]]] = []

    def lin(name: str, rows: int, cols: int, gain: float = 1.0) -> None:
        out.append((name, (rows, cols), ("normal", gain / math.sqrt(cols))))

    out.append(("model.embed_tokens.weight", (v, h), ("normal", 1.0)))
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        out.append((p + "input_layernorm.weight", (h,), ("norm", 0.1)))
        lin(p + "self_attn.q_proj.weight", h, h, 2.0)
        lin(p + "self_attn.k_proj.weight", kv, h, 2.0)
        lin(p + "self_attn.v_proj.weight", kv, h)
        lin(p + "self_attn.o_proj.weight", h, h)
        out.append((p + "post_attention_layernorm.weight", (h,), ("norm", 0.1)))
        lin(p + "mlp.gate_proj.weight", f, h)
        lin(p + "mlp.up_proj.weight", f, h)
        lin(p + "mlp.down_proj.weight", h, f)
    out.append(("model.norm.weight", (h,), ("norm", 0.1)))
    if not spec.tie_word_embeddings:
        # A wide logit spread keeps greedy decoding away from near-ties, so parity tests are meaningful.
        lin("lm_head.weight", v, h, 4.0)

    out.append(("vision.embeddings.class_embedding", (vh,), ("normal", 1.0)))
    out.append(
        (
            "vision.embeddings.patch_embedding.weight",
            (vh, 3, spec.patch_size, spec.patch_size),
            ("normal", 2.0 / math.sqrt(3 * spec.patch_size**2)),
        )
    )
    out.append(("vision.embeddings.position_embedding.weight", (n_pos, vh), ("normal", 1.0)))
    out.append(("vision.pre_layrnorm.weight", (vh,), ("norm", 0.1)))
    out.append(("vision.pre_layrnorm.bias", (vh,), ("normal", 0.05)))
    for i in range(spec.vision_num_hidden_layers):
        p = f"vision.encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            gain = (2.0 if proj in ("q_proj", "k_proj") else 1.0) * spec.vision_gain
            lin(p + f"self_attn.{proj}.weight", vh, vh, gain)
            out.append((p + f"self_attn.{proj}.bias", (vh,), ("normal", 0.05)))
        out.append((p + "layer_norm1.weight", (vh,), ("norm", 0.1)))
        out.append((p + "layer_norm1.bias", (vh,), ("normal", 0.05)))
        lin(p + "mlp.fc1.weight", vf, vh, spec.vision_gain)
        out.append((p + "mlp.fc1.bias", (vf,), ("normal", 0.05)))
        lin(p + "mlp.fc2.weight", vh, vf, spec.vision_gain)
        out.append((p + "mlp.fc2.bias", (vh,), ("normal", 0.05)))
        out.append((p + "layer_norm2.weight", (vh,), ("norm", 0.1)))
        out.append((p + "layer_norm2.bias", (vh,), ("normal", 0.05)))
    out.append(("vision.post_layernorm.weight", (vh,), ("norm", 0.1)))
    out.append(("vision.post_layernorm.bias", (vh,), ("normal", 0.05)))
    lin("projector.linear_1.weight", h, vh)
    out.append(("projector.linear_1.bias", (h,), ("normal", 0.05)))
    lin("projector.linear_2.weight", h, h)
    out.append(("projector.linear_2.bias", (h,), ("normal", 0.05)))
    return out


def _file_name(canonical: str, layout: str) -> str:
    """Canonical name -> the name written by `layout`."""
    if canonical == "lm_head.weight":
        return "lm_head.weight" if layout == "state_dict" else "language_model.lm_head.weight"
    if canonical.startswith("model."):
        rest = canonical[len("model.") :]
        return f"model.language_model.{rest}" if layout == "state_dict" else f"language_model.model.{rest}"
    if canonical.startswith("vision."):
        rest = canonical[len("vision.") :]
        return {
            "hub": f"vision_tower.vision_model.{rest}",
            "saved5": f"vision_tower.{rest}",
            "state_dict": f"model.vision_tower.{rest}",
        }[layout]
    if canonical.startswith("projector."):
        rest = canonical[len("projector.") :]
        return f"model.multi_modal_projector.{rest}" if layout == "state_dict" else f"multi_modal_projector.{rest}"
    raise AssertionError(canonical)


def _generate(rng: np.random.Generator, shape: tuple[int, ...], init: tuple[str, float]) -> np.ndarray:
    kind, scale = init
    data = rng.standard_normal(shape, dtype=np.float32)
    data *= np.float32(scale)
    if kind == "norm":
        data += np.float32(1.0)
    return data


def _encode(data: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "f32":
        return data
    if dtype == "f16":
        return data.astype(np.float16)
    # BF16 by hand (round to nearest even): numpy has no bfloat16 and safetensors' numpy API cannot write it.
    bits = data.view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def _write_safetensors(
    out: Path,
    tensors: list[tuple[str, tuple[int, ...], tuple[str, float]]],
    *,
    dtype: str,
    shards: int,
    seed: int,
) -> None:
    """Write the tensors one at a time (memory stays at one tensor, so bench checkpoints of many GB work)."""
    shards = max(1, min(shards, len(tensors)))
    per = math.ceil(len(tensors) / shards)
    groups = [tensors[i : i + per] for i in range(0, len(tensors), per)]
    names = (
        ["model.safetensors"]
        if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    # One generator per tensor, derived from (seed, index): the values do not depend on dtype or sharding.
    weight_map: dict[str, str] = {}
    total = 0
    index = 0
    for fname, group in zip(names, groups, strict=True):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, _ in group:
            nbytes = int(np.prod(shape)) * _ITEMSIZE[dtype]
            header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        total += offset
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with _atomic_file(out / fname) as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            for _name, shape, init in group:
                rng = np.random.default_rng([seed, index])
                index += 1
                _encode(_generate(rng, shape, init), dtype).tofile(fh)
    if len(groups) > 1:
        _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


class _atomic_file:
    """Open a temp sibling for writing and rename it on success (a killed run never leaves a torn file)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Any:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        self.tmp = Path(tmp)
        os.chmod(fd, 0o644)  # mkstemp creates 0600; checkpoints are ordinary shared files
        self.fh = os.fdopen(fd, "wb")
        return self.fh

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.fh.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------- configs


def _write_json(path: Path, data: Any) -> None:
    with _atomic_file(path) as fh:
        fh.write((json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def _write_configs(out: Path, spec: SyntheticSpec, layout: str, dtype: str) -> None:
    vocab = padded_vocab(spec)
    image_id, pad_id = spec.vocab_pieces, spec.vocab_pieces + 1
    text: dict[str, Any] = {
        "model_type": spec.text_model_type,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps,
        "vocab_size": vocab,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "torch_dtype": {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype],
    }
    if layout == "hub":
        text["rope_theta"] = spec.rope_theta  # transformers 4.x spelling
    else:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": spec.rope_theta}  # 5.x spelling
    if spec.text_model_type == "mistral":
        text["sliding_window"] = None
    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "ignore_index": -100,
        "image_token_index": image_id,
        "pad_token_id": pad_id,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_seq_length": (spec.image_size // spec.patch_size) ** 2,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "text_config": text,
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": spec.vision_hidden_size,
            "intermediate_size": spec.vision_intermediate_size,
            "num_hidden_layers": spec.vision_num_hidden_layers,
            "num_attention_heads": spec.vision_num_attention_heads,
            "image_size": spec.image_size,
            "patch_size": spec.patch_size,
            "projection_dim": spec.hidden_size,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
        "synthetic": asdict(spec),
    }
    _write_json(out / "config.json", config)
    _write_json(
        out / "preprocessor_config.json",
        {
            "crop_size": {"height": spec.image_size, "width": spec.image_size},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": CLIP_MEAN,
            "image_processor_type": "CLIPImageProcessor",
            "image_std": CLIP_STD,
            "processor_class": "LlavaProcessor",
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"shortest_edge": spec.image_size},
        },
    )
    _write_json(
        out / "processor_config.json",
        {
            "image_token": "<image>",
            "num_additional_image_tokens": 1,
            "patch_size": spec.patch_size,
            "processor_class": "LlavaProcessor",
            "vision_feature_select_strategy": "default",
        },
    )
    added = {"<image>": image_id, "<pad>": pad_id}
    _write_json(out / "added_tokens.json", added)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    _write_json(out / "special_tokens_map.json", special)

    def entry(content: str) -> dict[str, Any]:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    _write_json(
        out / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": {
                "0": entry("<unk>"),
                "1": entry("<s>"),
                "2": entry("</s>"),
                str(image_id): entry("<image>"),
                str(pad_id): entry("<pad>"),
            },
            **special,
            "clean_up_tokenization_spaces": False,
            "legacy": False,
            "model_max_length": spec.max_position_embeddings,
            "padding_side": "left",
            "processor_class": "LlavaProcessor",
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
        },
    )


# --------------------------------------------------------------------------------------------------- tokenizer

_SENTENCE = (
    "the a cat dog sits on mat image photo of picture shows red green blue small large house tree car road "
    "sky cloud sun water river boat person man woman child holds looks at with and in near under over "
    "what is this describe question answer assistant user please tell me about colour shape left right "
    "top bottom front behind two three many one bird flower table chair window door light dark bright"
)
_WORDS = _SENTENCE.split()


def _corpus(seed: int) -> Iterator[str]:
    rng = np.random.default_rng([seed, 10_000])
    for _ in range(3000):
        n = int(rng.integers(4, 14))
        words = [_WORDS[int(i)] for i in rng.integers(0, len(_WORDS), n)]
        if rng.random() < 0.2:
            words.append(str(int(rng.integers(0, 1000))))
        yield " ".join(words).capitalize() + rng.choice([".", "?", "!", ","])


def _write_tokenizer(out: Path, spec: SyntheticSpec, seed: int) -> None:
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    # BPE with byte fallback and LLaMA's special ids (unk 0, bos 1, eos 2); one thread for determinism.
    spm.SentencePieceTrainer.train(
        sentence_iterator=_corpus(seed),
        model_writer=model,
        vocab_size=spec.vocab_pieces,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    with _atomic_file(out / "tokenizer.model") as fh:
        fh.write(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    _write_json(out / "tokenizer.json", _tokenizer_json(sp, spec))


def _tokenizer_json(sp: Any, spec: SyntheticSpec) -> dict[str, Any]:
    """The `tokenizers` file llava-hf ships next to tokenizer.model (a BPE with byte fallback, like LLaMA's).

    Written by hand so transformers can load the tokenizer without converting the SentencePiece model (which
    needs protobuf). Merges are rebuilt the way transformers' SentencePieceExtractor does: every split of a
    piece into two pieces, ranked by the merged piece's id (BPE pieces are ordered by merge priority)."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges: list[tuple[int, int, int, str, str]] = []
    for piece, pid in vocab.items():
        if sp.is_control(pid) or sp.is_unknown(pid) or sp.is_byte(pid) or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((pid, vocab[left], vocab[right], left, right))
    merges.sort()

    def added(i: int, content: str) -> dict[str, Any]:
        return {
            "id": i,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }

    image_id = spec.vocab_pieces
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            added(0, "<unk>"),
            added(1, "<s>"),
            added(2, "</s>"),
            added(image_id, "<image>"),
            added(image_id + 1, "<pad>"),
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<s>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {**vocab, "<image>": image_id, "<pad>": image_id + 1},
            "merges": [[left, right] for *_, left, right in merges],
        },
    }
