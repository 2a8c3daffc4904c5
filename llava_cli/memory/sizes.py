"""Weight sizes: the shapes that decide memory, and the bytes of each tensor, grouped the way llama.cpp places
them on devices.

Byte-exact where they can be: from a file, the real tensor sizes in its GGUF header; without a file, the tensors
llama.cpp's quantizer *would* write (its per-tensor type choice, ``llava_cli/quants.py``, the same rules the
quantizer uses; ``gguf.GGML_QUANT_SIZES`` block sizes), never params x nominal bpw.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import gguf

from llava_cli import quants
from llava_cli.errors import UsageError
from llava_cli.gguf_info import GGUFInfo

# The quantizations vram-check plans for, as labels (what people read): Q4_K_M, Q6_K, Q8_0, F16.
QUANTS: tuple[str, ...] = tuple(q.label for q in quants.TEXT_TYPES.values())
Quant = str

_T = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class Architecture:
    """The shapes that decide memory. Text: llama-style decoder. Vision: CLIP ViT + 2-layer MLP projector."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int = 4096
    v_n_layer: int = 23  # blocks stored in the mmproj (LLaVA-1.5 reads the 23rd of 24)
    v_n_embd: int = 1024
    v_n_ff: int = 4096
    v_n_head: int = 16
    image_size: int = 336
    patch_size: int = 14

    @property
    def n_embd_kv(self) -> int:
        return self.n_embd // self.n_head * self.n_head_kv

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def architecture_from_catalog(arch: Any) -> Architecture:
    """Adapt a catalog entry's ``architecture`` (``llava_cli/catalog.py``; models.toml names) to ours."""

    def get(name: str, default: Any = None) -> Any:
        value = arch.get(name, default) if isinstance(arch, Mapping) else getattr(arch, name, default)
        return default if value is None else value

    vision_layers = int(get("vision_layers", 24))
    return Architecture(
        n_layer=int(get("layers")),
        n_embd=int(get("hidden")),
        n_head=int(get("heads")),
        n_head_kv=int(get("kv_heads", get("heads"))),
        n_ff=int(get("ff")),
        n_vocab=int(get("vocab")),
        n_ctx_train=int(get("context", 4096)),
        # The converter stores only the blocks the projector reads: vision_feature_layer = -2 drops the last.
        v_n_layer=vision_layers - 1,
        v_n_embd=int(get("vision_hidden", 1024)),
        v_n_ff=int(get("vision_ff", 4 * int(get("vision_hidden", 1024)))),
        v_n_head=int(get("vision_heads", 16)),
        image_size=int(get("image_size", 336)),
        patch_size=int(get("patch_size", 14)),
    )


def architecture_from_checkpoint(cfg: Any) -> Architecture:
    """Architecture of a llava-hf checkpoint's config (``quantize.checkpoint.LlavaConfig``: ``text``, ``vision``,
    ``feature_depth``), so vram-check can plan a checkpoint directory before it is converted."""
    t, v = cfg.text, cfg.vision
    return Architecture(
        n_layer=t.num_hidden_layers,
        n_embd=t.hidden_size,
        n_head=t.num_attention_heads,
        n_head_kv=t.num_key_value_heads,
        n_ff=t.intermediate_size,
        n_vocab=t.vocab_size,
        n_ctx_train=t.max_position_embeddings,
        v_n_layer=cfg.feature_depth,
        v_n_embd=v.hidden_size,
        v_n_ff=v.intermediate_size,
        v_n_head=v.num_attention_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
    )


def architecture_from_gguf(text: GGUFInfo, mmproj: GGUFInfo | None = None) -> Architecture:
    base = Architecture(
        n_layer=text.n_layer,
        n_embd=text.n_embd,
        n_head=text.n_head,
        n_head_kv=text.n_head_kv or text.n_head,
        n_ff=text.n_ff,
        n_vocab=text.n_vocab,
        n_ctx_train=text.n_ctx_train or 4096,
    )
    if mmproj is None:
        return base
    meta = mmproj.metadata
    return replace(
        base,
        v_n_layer=mmproj.n_layer,
        v_n_embd=int(meta.get("clip.vision.embedding_length", base.v_n_embd)),
        v_n_ff=mmproj.n_ff or base.v_n_ff,
        v_n_head=mmproj.n_head or base.v_n_head,
        image_size=mmproj.image_size or base.image_size,
        patch_size=mmproj.patch_size or base.patch_size,
    )


# ---------------------------------------------------------------------------------------------------------------
# The tensors our converter writes, with ggml shapes and source types


Tensor = tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]


def text_tensors(arch: Architecture) -> list[Tensor]:
    """Every tensor of a llama text GGUF as the converter writes it at F16: matrices F16, norms F32."""
    e, kv, ff = arch.n_embd, arch.n_embd_kv, arch.n_ff
    out: list[Tensor] = [("token_embd.weight", (e, arch.n_vocab), _T.F16)]
    for i in range(arch.n_layer):
        p = f"blk.{i}."
        out += [
            (p + "attn_norm.weight", (e,), _T.F32),
            (p + "attn_q.weight", (e, e), _T.F16),
            (p + "attn_k.weight", (e, kv), _T.F16),
            (p + "attn_v.weight", (e, kv), _T.F16),
            (p + "attn_output.weight", (e, e), _T.F16),
            (p + "ffn_norm.weight", (e,), _T.F32),
            (p + "ffn_gate.weight", (e, ff), _T.F16),
            (p + "ffn_down.weight", (ff, e), _T.F16),
            (p + "ffn_up.weight", (e, ff), _T.F16),
        ]
    out += [("output_norm.weight", (e,), _T.F32), ("output.weight", (e, arch.n_vocab), _T.F16)]
    return out


def mmproj_tensors(arch: Architecture) -> list[Tensor]:
    """The mmproj our converter writes (and the published mmproj-model-f16.gguf): matmul weights and the patch
    embedding F16, everything else F32."""
    e, ff, d = arch.v_n_embd, arch.v_n_ff, arch.n_embd
    t: list[Tensor] = [
        ("v.patch_embd.weight", (arch.patch_size, arch.patch_size, 3, e), _T.F16),
        ("v.class_embd", (e,), _T.F32),
        ("v.position_embd.weight", (e, arch.n_patches + 1), _T.F32),
        ("v.pre_ln.weight", (e,), _T.F32),
        ("v.pre_ln.bias", (e,), _T.F32),
    ]
    for i in range(arch.v_n_layer):
        p = f"v.blk.{i}."
        for w in ("attn_q", "attn_k", "attn_v", "attn_out"):
            t += [(p + w + ".weight", (e, e), _T.F16), (p + w + ".bias", (e,), _T.F32)]
        for ln in ("ln1", "ln2"):
            t += [(p + ln + ".weight", (e,), _T.F32), (p + ln + ".bias", (e,), _T.F32)]
        t += [
            (p + "ffn_up.weight", (e, ff), _T.F16),
            (p + "ffn_up.bias", (ff,), _T.F32),
            (p + "ffn_down.weight", (ff, e), _T.F16),
            (p + "ffn_down.bias", (e,), _T.F32),
        ]
    t += [
        ("mm.0.weight", (e, d), _T.F16),
        ("mm.0.bias", (d,), _T.F32),
        ("mm.2.weight", (d, d), _T.F16),
        ("mm.2.bias", (d,), _T.F32),
    ]
    return t


# ---------------------------------------------------------------------------------------------------------------
# Grouped sizes


@dataclass(frozen=True)
class WeightSizes:
    """Weights of one text GGUF + its mmproj, grouped the way llama.cpp places them on devices."""

    quant: Quant
    source: str  # "gguf header" or "architecture"
    blocks: tuple[int, ...]  # bytes of blk.i.*
    output: int  # output.weight + output_norm.weight (the layer offloaded first)
    token_embd: int  # never on the GPU
    other: int  # anything else in the text file
    n_params: int  # text-model elements
    mmproj: int
    repacked: int = 0  # blk.* bytes the CPU backend copies into its repacked (interleaved) layout
    mmproj_f16: int = 0  # F16 bytes in the mmproj: the CPU vision encoder holds them widened to F32 (runtime/vision.py)

    @property
    def mmproj_cpu(self) -> int:
        """What the vision weights take in RAM when the encoder runs on the CPU (F16 tensors twice their size)."""
        return self.mmproj + self.mmproj_f16

    @property
    def text(self) -> int:
        return sum(self.blocks) + self.output + self.token_embd + self.other

    @property
    def bpw(self) -> float:
        return self.text * 8 / self.n_params if self.n_params else 0.0


_BLK = re.compile(r"^blk\.(\d+)\.")

# ggml's CPU backend (AVX2/NEON builds) re-lays these out for faster matmuls (CPU_REPACK buffer): the copy is
# anonymous memory while the mmap'd original stays mapped, so both count in RSS. token_embd and the output
# cannot be repacked (get_rows / not supported), nor can Q6_K, Q8_0 or F16 in the vendored ggml (measured by
# bench/bench_memory.py: RssAnon grows by the Q4_K blocks' size only).
REPACK_TYPES = frozenset({"Q4_0", "Q4_K", "IQ4_NL"})


def _group(
    quant: Quant,
    source: str,
    n_layer: int,
    tensors: Iterable[tuple[str, int, int, str]],
    mmproj: int,
    mmproj_f16: int = 0,
) -> WeightSizes:
    """tensors: (name, n_elements, n_bytes, ggml type name)."""
    blocks = [0] * n_layer
    output = token_embd = other = n_params = repacked = 0
    for name, n_el, n_bytes, type_name in tensors:
        n_params += n_el
        m = _BLK.match(name)
        if m and int(m.group(1)) < n_layer:
            blocks[int(m.group(1))] += n_bytes
            if type_name in REPACK_TYPES and name.endswith(".weight"):
                repacked += n_bytes
        elif name.startswith("output"):
            output += n_bytes
        elif name.startswith("token_embd"):
            token_embd += n_bytes
        else:
            other += n_bytes
    return WeightSizes(quant, source, tuple(blocks), output, token_embd, other, n_params, mmproj, repacked, mmproj_f16)


def _n_elements(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def quant_label(bits: str) -> Quant:
    """``q4_k_m`` / ``Q4-K-M`` / ``q4_k`` -> ``Q4_K_M`` (the one parser, ``llava_cli/quants.py``)."""
    return quants.parse_bits(bits, quants.TEXT_TYPES).label


def sizes_from_architecture(arch: Architecture, quant: Quant, *, mmproj_bits: str = "f16") -> WeightSizes:
    """What llama.cpp's quantizer would write for this architecture (no file needed)."""
    qtype = quants.parse_bits(quant, quants.TEXT_TYPES)
    mtype = quants.parse_bits(mmproj_bits, quants.MMPROJ_TYPES, "--mmproj-bits")
    text = text_tensors(arch)
    types = quants.predict_types(
        text, qtype, n_layer=arch.n_layer, is_70b=quants.is_70b(arch.n_layer, arch.n_head, arch.n_head_kv)
    )
    mm = mmproj_tensors(arch)
    mm_types = quants.predict_types(mm, mtype, n_layer=0)
    mm_bytes = sum(quants.tensor_bytes(mm_types[n], s) for n, s, _ in mm)
    mm_f16 = sum(quants.tensor_bytes(mm_types[n], s) for n, s, _ in mm if mm_types[n].name == "F16")
    rows = ((n, _n_elements(s), quants.tensor_bytes(types[n], s), types[n].name) for n, s, _ in text)
    return _group(qtype.label, "architecture", arch.n_layer, rows, mm_bytes, mm_f16)


def sizes_from_gguf(text: GGUFInfo, mmproj: GGUFInfo | None) -> WeightSizes:
    """The real tensor sizes in the headers (no weights read)."""
    try:
        quant = quant_label(text.file_type or "")
    except UsageError:  # a file type we do not offer (Q5_K_M, ...): label it as the header says
        quant = (text.file_type or "?").upper()
    mm = sum(t.n_bytes for t in mmproj.tensors) if mmproj is not None else 0
    mm_f16 = sum(t.n_bytes for t in mmproj.tensors if t.type_name == "F16") if mmproj is not None else 0
    rows = ((t.name, t.n_elements, t.n_bytes, t.type_name) for t in text.tensors)
    return _group(quant, "gguf header", text.n_layer, rows, mm, mm_f16)
