"""The quantizations we offer, the one ``--bits`` parser, and llama.cpp's per-tensor type rules.

Both the memory planner (``llava_cli/memory/sizes.py``: what a quantization *would* weigh, with no file) and the
quantizer (``quantize/quantizer.py``: free-space check, F16 pins, the size it promises) use this module, so the
prediction and the file llama.cpp writes cannot drift apart. ``tests/test_quantize.py`` checks the prediction
against llama.cpp's real output, tensor by tensor.

The rules are a port of ``llama_tensor_get_type`` / ``tensor_type_fallback`` / ``tensor_allows_quantization`` in
the vendored llama.cpp's ``src/llama-quant.cpp`` (llama-cpp-python 0.3.36), for the architectures we write
(``llama`` text models, ``clip`` projectors) and the four file types we offer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import gguf

from llava_cli.errors import UsageError

GGMLType = gguf.GGMLQuantizationType
_T = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class QuantType:
    """One ``--bits`` choice: the llama.cpp file type (``llama_ftype``) and its default tensor type."""

    name: str  # as written in file names and --bits: q4_k_m
    label: str  # as shown to people and recorded in GGUF headers: Q4_K_M
    ftype: int  # llama_ftype (gguf.LlamaFileType has the same numbers)
    default_type: gguf.GGMLQuantizationType

    @property
    def is_float(self) -> bool:
        """F16/F32: a plain conversion, no llama.cpp quantization pass and no per-tensor mix."""
        return self.default_type in (_T.F16, _T.F32, _T.BF16)


_ALL = (
    QuantType("q4_k_m", "Q4_K_M", gguf.LlamaFileType.MOSTLY_Q4_K_M, _T.Q4_K),
    QuantType("q6_k", "Q6_K", gguf.LlamaFileType.MOSTLY_Q6_K, _T.Q6_K),
    QuantType("q8_0", "Q8_0", gguf.LlamaFileType.MOSTLY_Q8_0, _T.Q8_0),
    QuantType("f16", "F16", gguf.LlamaFileType.MOSTLY_F16, _T.F16),
    QuantType("f32", "F32", gguf.LlamaFileType.ALL_F32, _T.F32),
)
# Every quantization a model can be downloaded or built at (`llava run/pull --bits`, the catalog).
ALL_TYPES: dict[str, QuantType] = {q.name: q for q in _ALL}
# What `llava quantize --bits` writes and `vram-check` plans for (F32 is only a conversion output: twice F16's
# size for no quality gain at inference).
TEXT_TYPES: dict[str, QuantType] = {k: ALL_TYPES[k] for k in ("q4_k_m", "q6_k", "q8_0", "f16")}
# The vendored clip loader runs any ggml type in its matmuls, but quality drops fast below 8 bits for the
# vision tower (llama.cpp's tools/quantize/README.md), so only these two are offered for the mmproj.
MMPROJ_TYPES: dict[str, QuantType] = {k: ALL_TYPES[k] for k in ("f16", "q8_0")}
# Plain conversions: `llava_cli.resolve` converts instead of quantizing for these.
UNQUANTIZED: tuple[str, ...] = ("f16", "f32")

# Other spellings people use for the same file types: llama.cpp's file names say q4_k for Q4_K_M
# (mys/ggml_llava-v1.5-7b: ggml-model-q4_k.gguf), PyTorch says fp16.
ALIASES = {"q4_k": "q4_k_m", "fp16": "f16", "fp32": "f32", "float16": "f16", "float32": "f32"}


def parse_bits(value: str, choices: Mapping[str, QuantType] = ALL_TYPES, flag: str = "--bits") -> QuantType:
    """The one ``--bits`` parser: any case, ``-`` or ``_``, and the `ALIASES` (``Q4-K-M``, ``fp16``, ``q4_k``).

    Anything else, or a type this command does not offer (``choices``), is a `UsageError` listing the choices."""
    key = str(value).strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key in choices:
        return choices[key]
    raise UsageError(
        f"unknown quantization {str(value)!r} for {flag}: choose one of {', '.join(choices)}",
        hint=f"for example {flag} {next(iter(choices))} (any case; fp16 means f16, q4_k means q4_k_m)",
    )


def normalize_bits(value: str, choices: Mapping[str, QuantType] = ALL_TYPES, flag: str = "--bits") -> str:
    """``parse_bits(...).name``: ``"Q4_K_M"`` -> ``"q4_k_m"``."""
    return parse_bits(value, choices, flag).name


# ------------------------------------------------------------------------------------------ per-tensor types


def tensor_bytes(qtype: gguf.GGMLQuantizationType, shape: Sequence[int]) -> int:
    """Bytes of one tensor stored as ``qtype``; ``shape`` is ggml's (ne0 = row length first)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = 1
    for d in shape[1:]:
        rows *= int(d)
    return rows * (int(shape[0]) // block) * size


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """``tensor_allows_quantization`` for the tensor names a LLaVA pair contains: 1-D tensors, norms and the
    vision tower's embeddings keep their source type."""
    if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return False
    excluded = ("ffn_gate_inp.weight", "attn_rel_b.weight", ".position_embd", ".patch_embd", "ssm_conv1d")
    return not any(part in name for part in excluded) and name not in ("position_embd.weight", "token_types.weight")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """Q4_K_M's Q6_K layers: the first and last eighth, and every third one in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def fallback(ncols: int, qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """``tensor_type_fallback``: a row length the block size does not divide gets a smaller-block type."""
    if ncols % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    alt = {_T.Q4_K: _T.Q5_0, _T.Q5_K: _T.Q5_1, _T.Q6_K: _T.Q8_0}.get(qtype, _T.F16)
    return alt if ncols % gguf.GGML_QUANT_SIZES[alt][0] == 0 else _T.F16


def needs_f16_pin(ncols: int, qtype: gguf.GGMLQuantizationType) -> bool:
    """Row lengths llama.cpp has no fallback for: Q8_0 with ``ncols % 32 != 0`` makes llama_model_quantize
    throw, so the quantizer pins those tensors to F16 through ``tt_overrides`` (and we predict F16)."""
    return qtype == _T.Q8_0 and ncols % 32 != 0


_BLK = re.compile(r"^(?:v\.)?blk\.(\d+)\.")


def layer_of(name: str) -> int:
    m = _BLK.match(name)
    return int(m.group(1)) if m else -1


def predict_types(
    tensors: Iterable[tuple[str, Sequence[int], gguf.GGMLQuantizationType]],
    qtype: QuantType,
    *,
    n_layer: int,
    is_70b: bool = False,
) -> dict[str, gguf.GGMLQuantizationType]:
    """The ggml type llama.cpp's quantizer gives each ``(name, shape, source type)`` for ``qtype``.

    ``n_layer`` is the text model's block count (0 for an mmproj: no ``ffn_down`` mixing there). ``is_70b`` is
    llama.cpp's 70B rule (80 layers with grouped-query attention: Q4_K ``attn_v`` becomes Q5_K). Tensors are
    visited in llama.cpp's order (by layer, then name) because the Q4_K_M rule for ``attn_v`` counts them."""
    ordered = sorted(tensors, key=lambda t: (layer_of(t[0]), t[0]))
    has_output = any(name == "output.weight" for name, _, _ in ordered)
    n_attn_v = sum("attn_v.weight" in name for name, _, _ in ordered)
    q4km = qtype.name == "q4_k_m"
    i_attn_v = i_ffn_down = 0
    out: dict[str, gguf.GGMLQuantizationType] = {}
    for name, shape, current in ordered:
        if not allows_quantization(name, shape):
            out[name] = current
            continue
        new = qtype.default_type
        if qtype.is_float:  # not a quantized type: no mixing rules, no fallbacks
            out[name] = new
            continue
        ncols = int(shape[0])
        if needs_f16_pin(ncols, new):
            out[name] = _T.F16
            continue
        if name == "output.weight" or (not has_output and name == "token_embd.weight"):
            if ncols % gguf.GGML_QUANT_SIZES[new][0] != 0:
                new = _T.Q8_0
            elif new != _T.Q8_0:
                new = _T.Q6_K
        elif name == "token_embd.weight":
            pass
        elif "attn_v.weight" in name:
            if q4km and use_more_bits(i_attn_v, n_attn_v):
                new = _T.Q6_K
            if is_70b and new == _T.Q4_K:
                new = _T.Q5_K
            i_attn_v += 1
        elif "ffn_down" in name:
            if q4km and use_more_bits(i_ffn_down, n_layer):
                new = _T.Q6_K
            i_ffn_down += 1
        out[name] = fallback(ncols, new)
    return out


def is_70b(n_layer: int, n_head: int, n_head_kv: int) -> bool:
    """llama.cpp's ``LLM_TYPE_70B``: a llama with 80 layers and grouped-query attention (equal head counts make
    it the 65B), whose small ``attn_v`` gets Q5_K instead of Q4_K."""
    return n_layer == 80 and n_head != n_head_kv


__all__ = [
    "ALIASES",
    "ALL_TYPES",
    "MMPROJ_TYPES",
    "TEXT_TYPES",
    "UNQUANTIZED",
    "QuantType",
    "allows_quantization",
    "fallback",
    "is_70b",
    "needs_f16_pin",
    "normalize_bits",
    "parse_bits",
    "predict_types",
    "tensor_bytes",
    "use_more_bits",
]
