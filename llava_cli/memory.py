"""How much memory a LLaVA model needs, and how many layers to offload: the planner behind
``llava vram-check`` and ``--n-gpu-layers auto``.

Sizes are byte-exact where they can be: weights are the sum of the real tensor sizes in the GGUF headers, or,
without files, the sizes of the tensors llama.cpp's quantizer *would* write (its per-tensor type choice for
Q4_K_M/Q6_K, ``gguf.GGML_QUANT_SIZES`` block sizes), never params x nominal bpw. The KV cache is exact; the
compute buffer is a formula fitted to llama.cpp's own measured buffers (docs/memory.md). The CPU-side terms
(runtime, CLIP compute) are calibrated against measured peak RSS by ``bench/bench_memory.py``.

Offload follows the llama.cpp vendored in llama-cpp-python 0.3.36: ``n_gpu_layers = k`` puts the output layer
on the GPU first, then the top ``k-1`` blocks; ``n_layer + 1`` (or -1) is everything. ``token_embd`` always stays
on the CPU. See /work/shared/docs/MEMORY.md for the sources.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import gguf

from llava_cli.errors import UsageError
from llava_cli.gguf_info import GGUFInfo, check_pair, read_gguf
from llava_cli.gpu import GPU, GiB, GPUProbe, MiB, probe

QUANTS: tuple[str, ...] = ("Q4_K_M", "Q6_K", "Q8_0", "F16")
# When a model has no quality figures: more bits is never worse, and F16 is Q8_0's quality at twice the size.
DEFAULT_QUALITY = {"Q4_K_M": 94.0, "Q6_K": 97.0, "Q8_0": 100.0, "F16": 100.0}

DEFAULT_CTX = 4096  # LLaVA-1.5's trained context; the runtime's default --ctx
N_UBATCH = 512  # llama-cpp-python's default n_batch/n_ubatch
IMAGE_TOKENS = 576

# --- margins (MEMORY.md §7) ------------------------------------------------------------------------------------
MARGIN = 1024 * MiB  # llama.cpp's own --fit target: fragmentation, cuBLAS, other apps, estimate error
SMALL_GPU = 8 * GiB  # below this, the margin is max(512 MiB, 8% of the card)
CUDA_CONTEXT = 450 * MiB  # CUDA context + cuBLAS workspace, invisible to NVML before we load (Ollama: 457 MiB)
CLIP_COMPUTE_GPU = 64 * MiB  # clip.cpp's compute buffer for one 336px image (logged ~33 MB; MEMORY.md §2)
MIN_PARTIAL_BLOCKS = 4  # fewer offloaded blocks than this is not worth the PCIe traffic: text on the CPU

# --- CPU-side terms, calibrated by bench/bench_memory.py (docs/memory.md) ----------------------------------------
CPU_RUNTIME = 70 * MiB  # Python + numpy/PIL + llama.cpp/ggml code and data, threads, allocator slack
IMAGE_EMBD_COPIES = 5  # mtmd output, the engine's embedding cache, decode batches, preprocessing buffers

Quant = str
Placement = Literal["full", "partial", "cpu", "no"]


# ---------------------------------------------------------------------------------------------------------------
# Architecture figures


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
    """Adapt a catalog entry's ``architecture`` (llava_cli.catalog; models.toml names) to ours."""

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
# Weights: the tensors llama.cpp's quantizer would write


_T = gguf.GGMLQuantizationType
_FTYPE_DEFAULT = {"Q4_K_M": _T.Q4_K, "Q6_K": _T.Q6_K, "Q8_0": _T.Q8_0, "F16": _T.F16}
# llama-quant.cpp tensor_type_fallback: rows that are not a multiple of the block size
_FALLBACK = {_T.Q4_K: _T.Q5_0, _T.Q5_K: _T.Q5_1, _T.Q6_K: _T.Q8_0}


def normalize_quant(bits: str) -> Quant:
    q = bits.strip().upper().replace("-", "_")
    q = {"Q4_K": "Q4_K_M", "FP16": "F16"}.get(q, q)
    if q not in QUANTS:
        raise UsageError(f"unknown quantization {bits!r}", hint=f"choose from {', '.join(QUANTS)}")
    return q


def tensor_bytes(type_: gguf.GGMLQuantizationType, shape: Sequence[int]) -> int:
    """Bytes of a tensor of ggml type ``type_`` and ggml shape ``shape`` (ne0 = row length first)."""
    block, size = gguf.GGML_QUANT_SIZES[type_]
    n = 1
    for d in shape:
        n *= int(d)
    return n // block * size


def _use_more_bits(i: int, n: int) -> bool:
    # llama-quant.cpp: the first and last eighth of the layers, and every third one in between
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _fallback(t: gguf.GGMLQuantizationType, ncols: int) -> gguf.GGMLQuantizationType:
    if ncols % gguf.GGML_QUANT_SIZES[t][0] == 0:
        return t
    t = _FALLBACK.get(t, _T.F16)
    return t if ncols % gguf.GGML_QUANT_SIZES[t][0] == 0 else _T.F16


def text_tensor_shapes(arch: Architecture) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a llama text GGUF in file order, with ggml shapes."""
    e, kv, ff = arch.n_embd, arch.n_embd_kv, arch.n_ff
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (e, arch.n_vocab))]
    for i in range(arch.n_layer):
        out += [
            (f"blk.{i}.attn_norm.weight", (e,)),
            (f"blk.{i}.attn_q.weight", (e, e)),
            (f"blk.{i}.attn_k.weight", (e, kv)),
            (f"blk.{i}.attn_v.weight", (e, kv)),
            (f"blk.{i}.attn_output.weight", (e, e)),
            (f"blk.{i}.ffn_norm.weight", (e,)),
            (f"blk.{i}.ffn_gate.weight", (e, ff)),
            (f"blk.{i}.ffn_down.weight", (ff, e)),
            (f"blk.{i}.ffn_up.weight", (e, ff)),
        ]
    out += [("output_norm.weight", (e,)), ("output.weight", (e, arch.n_vocab))]
    return out


def quantized_types(
    tensors: Iterable[tuple[str, tuple[int, ...]]], quant: Quant, n_layer: int
) -> list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]]:
    """The ggml type llama.cpp's ``llama_model_quantize`` picks for each tensor (llama-quant.cpp
    ``llama_tensor_get_type``), for the four file types we offer, starting from an F16/F32 source."""
    tensors = list(tensors)
    default = _FTYPE_DEFAULT[quant]
    n_attn_v = sum(1 for name, _ in tensors if name.endswith("attn_v.weight"))
    i_attn_v = i_ffn_down = 0
    out = []
    for name, shape in tensors:
        if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
            out.append((name, shape, _T.F32))  # 1-D and norms keep their F32 source type
            continue
        t = default
        if quant != "F16":  # F16 is not a quantized type: no per-tensor mix, no fallback
            if name == "output.weight":
                if shape[0] % gguf.GGML_QUANT_SIZES[t][0] != 0:
                    t = _T.Q8_0
                elif t != _T.Q8_0:
                    t = _T.Q6_K
            elif name.endswith("attn_v.weight"):
                if quant == "Q4_K_M" and _use_more_bits(i_attn_v, n_attn_v):
                    t = _T.Q6_K
                i_attn_v += 1
            elif name.endswith("ffn_down.weight"):
                if quant == "Q4_K_M" and _use_more_bits(i_ffn_down, n_layer):
                    t = _T.Q6_K
                i_ffn_down += 1
            t = _fallback(t, shape[0])
        out.append((name, shape, t))
    return out


def mmproj_tensor_shapes(
    arch: Architecture, mmproj_bits: str = "F16"
) -> list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]]:
    """The mmproj our converter writes (and the published mmproj-model-f16.gguf): matmul weights at
    ``mmproj_bits`` (F16 or Q8_0), the patch embedding F16, everything else F32."""
    mm = _T.Q8_0 if mmproj_bits.upper() == "Q8_0" else _T.F16
    e, ff, d = arch.v_n_embd, arch.v_n_ff, arch.n_embd
    t: list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]] = [
        ("v.patch_embd.weight", (arch.patch_size, arch.patch_size, 3, e), _T.F16),
        ("v.class_embd", (e,), _T.F32),
        ("v.position_embd.weight", (e, arch.n_patches + 1), _T.F32),
        ("v.pre_ln.weight", (e,), _T.F32),
        ("v.pre_ln.bias", (e,), _T.F32),
    ]
    for i in range(arch.v_n_layer):
        p = f"v.blk.{i}."
        for w in ("attn_q", "attn_k", "attn_v", "attn_out"):
            t += [(p + w + ".weight", (e, e), mm), (p + w + ".bias", (e,), _T.F32)]
        for ln in ("ln1", "ln2"):
            t += [(p + ln + ".weight", (e,), _T.F32), (p + ln + ".bias", (e,), _T.F32)]
        t += [
            (p + "ffn_up.weight", (e, ff), mm),
            (p + "ffn_up.bias", (ff,), _T.F32),
            (p + "ffn_down.weight", (ff, e), mm),
            (p + "ffn_down.bias", (e,), _T.F32),
        ]
    t += [
        ("mm.0.weight", (e, d), mm),
        ("mm.0.bias", (d,), _T.F32),
        ("mm.2.weight", (d, d), mm),
        ("mm.2.bias", (d,), _T.F32),
    ]
    return t


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

    @property
    def text(self) -> int:
        return sum(self.blocks) + self.output + self.token_embd + self.other

    @property
    def bpw(self) -> float:
        return self.text * 8 / self.n_params if self.n_params else 0.0


_BLK = re.compile(r"^blk\.(\d+)\.")


# ggml's CPU backend (AVX2/NEON builds) re-lays these out for faster matmuls (CPU_REPACK buffer): the copy is
# anonymous memory while the mmap'd original stays mapped, so both count in RSS. token_embd and the output
# cannot be repacked (get_rows / not supported), nor can Q6_K, Q8_0 or F16 in the vendored ggml (measured).
REPACK_TYPES = frozenset({"Q4_0", "Q4_K", "IQ4_NL"})


def _group(
    quant: Quant, source: str, n_layer: int, tensors: Iterable[tuple[str, int, int, str]], mmproj: int
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
    return WeightSizes(quant, source, tuple(blocks), output, token_embd, other, n_params, mmproj, repacked)


def _n_elements(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def sizes_from_architecture(arch: Architecture, quant: Quant, *, mmproj_bits: str = "F16") -> WeightSizes:
    """What llama.cpp's quantizer would write for this architecture (no file needed)."""
    quant = normalize_quant(quant)
    text = quantized_types(text_tensor_shapes(arch), quant, arch.n_layer)
    mm = sum(tensor_bytes(t, s) for _, s, t in mmproj_tensor_shapes(arch, mmproj_bits))
    rows = ((n, _n_elements(s), tensor_bytes(t, s), t.name) for n, s, t in text)
    return _group(quant, "architecture", arch.n_layer, rows, mm)


def sizes_from_gguf(text: GGUFInfo, mmproj: GGUFInfo | None) -> WeightSizes:
    """The real tensor sizes in the headers (no weights read)."""
    quant = (text.file_type or "").upper()
    quant = {"Q4_K": "Q4_K_M", "MOSTLY_Q4_K_M": "Q4_K_M"}.get(quant, quant) or "?"
    mm = sum(t.n_bytes for t in mmproj.tensors) if mmproj is not None else 0
    rows = ((t.name, t.n_elements, t.n_bytes, t.type_name) for t in text.tensors)
    return _group(quant, "gguf header", text.n_layer, rows, mm)


# ---------------------------------------------------------------------------------------------------------------
# Runtime buffers


def _pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def kv_cache_bytes(arch: Architecture, n_ctx: int, *, n_layers: int | None = None) -> int:
    """f16 K and V for ``n_ctx`` tokens (llama.cpp pads the cache to 256 cells)."""
    layers = arch.n_layer if n_layers is None else n_layers
    return _pad(n_ctx, 256) * layers * 2 * arch.n_embd_kv * 2


def compute_buffer_bytes(arch: Architecture, n_ctx: int, *, n_ubatch: int = N_UBATCH, flash_attn: bool = False) -> int:
    """llama.cpp's compute buffer for a full (single-device) graph: the peak of live f32 intermediates over
    one ubatch. Fitted to llama.cpp's own measured buffers (MEMORY.md §2: 7B/13B at 2K/4K, flash attention on
    and off, all reproduced to 1 MiB): whichever of attention, FFN and logits is largest, plus the KQ mask."""
    ub = min(n_ubatch, n_ctx)
    n_kv = _pad(n_ctx, 256)
    mask = n_kv * ub * (2 if flash_attn else 4)
    kq = 0 if flash_attn else n_kv * ub * arch.n_head * 4
    attn = kq + 7 * arch.n_embd * ub * 4
    ffn = 3 * arch.n_ff * ub * 4 + 4 * arch.n_embd * ub * 4
    logits = arch.n_vocab * ub * 4 + 2 * arch.n_embd * ub * 4
    return mask + max(attn, ffn, logits)


def _ollama_graph(arch: Architecture, n_ctx: int, *, partial: bool, n_batch: int = N_UBATCH) -> int:
    """Ollama's former llama-arch GraphSize (fs/ggml/ggml.go at f560bd077^): used as a floor on the GPU,
    where partial offload also copies CPU-resident weights to the GPU for large-batch matmuls."""
    b, e, v, h = min(n_ctx, n_batch), arch.n_embd, arch.n_vocab, arch.n_head
    hd, hkv = arch.n_embd // arch.n_head, arch.n_head_kv
    if not partial:
        return max(4 * b * (1 + 4 * e + n_ctx * (1 + h)), 4 * b * (e + v))
    return 4 * b * e + max(
        4 * b * (1 + e + max(n_ctx, e)) + e * e * 9 // 16 + 4 * n_ctx * (b * h + hd * hkv),
        4 * b * (e + v) + e * v * 105 // 128,
    )


def clip_compute_bytes(arch: Architecture, *, flash_attn: bool = True) -> int:
    """clip.cpp's compute buffer for one image on the CPU. With flash attention (llama.cpp's "auto" on the
    CPU) the FFN activations dominate: n_pos x (ff + 4 e) floats (measured 8.05 / 17.05 MiB for e = 512 /
    1024); without, the n_pos² x heads KQ scores."""
    n_pos = arch.n_patches + 1
    ffn = n_pos * (arch.v_n_ff + 4 * arch.v_n_embd) * 4
    if flash_attn:
        return ffn
    return max(ffn, n_pos * n_pos * arch.v_n_head * 4 + 3 * n_pos * arch.v_n_embd * 4)


# ---------------------------------------------------------------------------------------------------------------
# Estimates and plans


@dataclass(frozen=True)
class Estimate:
    """One quantization of one model: every term in bytes, and where it fits."""

    quant: Quant
    source: str
    bpw: float
    weights: int  # the whole text GGUF's tensors
    mmproj: int
    kv_cache: int
    compute: int  # on the planned device (GPU: full- or partial-offload graph; CPU: the CPU graph)
    total: int  # full offload on the GPU (without CUDA context/margin), or the CPU peak RSS estimate
    cpu_total: int  # the process's peak RSS when everything runs on the CPU
    placement: Placement
    n_gpu_layers: int  # llama.cpp's -ngl value to use (n_layer + 1 = everything)
    n_layers_total: int  # n_layer + 1
    mmproj_on_gpu: bool
    device: str  # "GPU 0 (name)" or "CPU"
    budget: int  # usable bytes on that device after context and margin
    quality: float | None
    published_size_gb: float | None = None
    published_bpw: float | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class OffloadPlan:
    """What ``--n-gpu-layers auto`` uses. ``n_gpu_layers`` is passed to llama.cpp as is (-1 = all)."""

    n_gpu_layers: int
    mmproj_on_gpu: bool
    reason: str
    estimate: Estimate | None = None


def gpu_margin(gpu: GPU, margin: int | None = None) -> int:
    if margin is not None:
        return margin
    if gpu.total < SMALL_GPU:
        return max(512 * MiB, int(0.08 * gpu.total))
    return MARGIN


def cpu_peak_bytes(sizes: WeightSizes, arch: Architecture, n_ctx: int, *, flash_attn: bool = True) -> int:
    """Peak RSS of a process that loads the pair on the CPU and answers one image (calibrated: docs/memory.md).

    llama.cpp maps the text file with MAP_POPULATE, so all of it counts in RSS (file pages), plus an anonymous
    copy of the repacked Q4_K tensors; the mmproj is read into a malloc'd buffer. ``flash_attn`` defaults to
    llama.cpp's "auto", which is on for the CPU backend."""
    image_embd = arch.n_patches * arch.n_embd * 4
    return (
        CPU_RUNTIME
        + sizes.text
        + sizes.repacked
        + kv_cache_bytes(arch, n_ctx)
        + compute_buffer_bytes(arch, n_ctx, flash_attn=flash_attn)
        + sizes.mmproj
        + clip_compute_bytes(arch, flash_attn=flash_attn)
        + IMAGE_EMBD_COPIES * image_embd
        + arch.n_vocab * 4  # logits of the last position
    )


def _gpu_fit(
    sizes: WeightSizes,
    arch: Architecture,
    n_ctx: int,
    gpu: GPU,
    *,
    flash_attn: bool,
    margin: int | None,
    mmproj_offload: bool,
) -> tuple[Placement, int, bool, int, int, str]:
    """(placement, n_gpu_layers, mmproj_on_gpu, compute, budget, note) for one GPU."""
    budget = gpu.free - CUDA_CONTEXT - gpu_margin(gpu, margin)
    kv_l = kv_cache_bytes(arch, n_ctx, n_layers=1)
    g_full = max(compute_buffer_bytes(arch, n_ctx, flash_attn=flash_attn), _ollama_graph(arch, n_ctx, partial=False))
    g_part = _ollama_graph(arch, n_ctx, partial=True)
    vision = sizes.mmproj + CLIP_COMPUTE_GPU
    n_all = arch.n_layer + 1
    need_full = sum(sizes.blocks) + sizes.output + sizes.other + arch.n_layer * kv_l + g_full
    if need_full + (vision if mmproj_offload else 0) <= budget:
        return "full", n_all, mmproj_offload, g_full, budget, ""

    def layers(with_vision: bool) -> int:
        """Blocks that fit after the output layer, filled top-down (output-first ngl semantics)."""
        used = (vision if with_vision else 0) + g_part + sizes.output
        if used > budget:
            return -1
        n = 0
        for i in reversed(range(arch.n_layer)):
            if used + sizes.blocks[i] + kv_l > budget:
                break
            used += sizes.blocks[i] + kv_l
            n += 1
        return n

    with_vision = layers(True) if mmproj_offload else -1
    without = layers(False)
    if with_vision >= MIN_PARTIAL_BLOCKS:
        return "partial", with_vision + 1, True, g_part, budget, ""
    if without >= MIN_PARTIAL_BLOCKS:
        note = "vision encoder on the CPU to make room for text layers" if mmproj_offload else ""
        return "partial", without + 1, False, g_part, budget, note
    vision_fits = mmproj_offload and vision <= budget
    note = f"fewer than {MIN_PARTIAL_BLOCKS} layers fit: text model on the CPU"
    if vision_fits:
        note += ", vision encoder on the GPU"
    return "no", 0, vision_fits, g_part, budget, note


def estimate(
    sizes: WeightSizes,
    arch: Architecture,
    *,
    n_ctx: int = DEFAULT_CTX,
    gpus: GPUProbe | None = None,
    flash_attn: bool | None = None,
    margin: int | None = None,
    mmproj_offload: bool = True,
    quality: float | None = None,
    published_size_gb: float | None = None,
    published_bpw: float | None = None,
) -> Estimate:
    """Estimate one quantization and place it on the largest usable GPU, else the CPU.

    ``flash_attn=None`` is llama.cpp's "auto": counted as on for the CPU (where auto enables it) and as off for
    the GPU, the larger compute buffer, since auto depends on the device there."""
    fa_cpu = True if flash_attn is None else flash_attn
    fa_gpu = bool(flash_attn)
    if n_ctx < 64:
        raise UsageError(f"--ctx {n_ctx} is too small", hint=f"use at least {IMAGE_TOKENS + 64} for one image")
    kv = kv_cache_bytes(arch, n_ctx)
    cpu_total = cpu_peak_bytes(sizes, arch, n_ctx, flash_attn=fa_cpu)
    cpu_compute = compute_buffer_bytes(arch, n_ctx, flash_attn=fa_cpu)
    common: dict[str, Any] = dict(
        quant=sizes.quant,
        source=sizes.source,
        bpw=sizes.bpw,
        weights=sizes.text,
        mmproj=sizes.mmproj,
        kv_cache=kv,
        cpu_total=cpu_total,
        n_layers_total=arch.n_layer + 1,
        quality=quality,
        published_size_gb=published_size_gb,
        published_bpw=published_bpw,
    )
    usable = gpus.usable_gpus if gpus is not None else ()
    if usable:
        # LLaVA is not split across GPUs here (v1): plan for the one with the most free memory.
        gpu = max(usable, key=lambda g: g.free)
        placement, ngl, mm_gpu, compute, budget, note = _gpu_fit(
            sizes, arch, n_ctx, gpu, flash_attn=fa_gpu, margin=margin, mmproj_offload=mmproj_offload
        )
        g_full = max(compute_buffer_bytes(arch, n_ctx, flash_attn=fa_gpu), _ollama_graph(arch, n_ctx, partial=False))
        total = sum(sizes.blocks) + sizes.output + sizes.other + kv + g_full + sizes.mmproj + CLIP_COMPUTE_GPU
        if placement != "full":
            # What stays on the CPU must fit in RAM too.
            gpu_blocks = max(ngl - 1, 0)
            cpu_part = (
                sum(sizes.blocks[: arch.n_layer - gpu_blocks])
                + sizes.token_embd
                + kv_cache_bytes(arch, n_ctx, n_layers=arch.n_layer - gpu_blocks)
                + cpu_compute
                + (0 if mm_gpu else sizes.mmproj + clip_compute_bytes(arch, flash_attn=fa_cpu))
                + CPU_RUNTIME
            )
            if cpu_part > gpus.host.available:  # type: ignore[union-attr]
                note = (note + "; " if note else "") + "the CPU-side part does not fit in available RAM"
                placement = "no"
        return Estimate(
            **common,
            compute=compute,
            total=total,
            placement=placement,
            n_gpu_layers=ngl,
            mmproj_on_gpu=mm_gpu,
            device=f"GPU {gpu.index} ({gpu.name})",
            budget=budget,
            note=note,
        )
    available = gpus.host.available if gpus is not None else 0
    fits = gpus is None or cpu_total <= available
    return Estimate(
        **common,
        compute=cpu_compute,
        total=cpu_total,
        placement="cpu" if fits else "no",
        n_gpu_layers=0,
        mmproj_on_gpu=False,
        device="CPU",
        budget=available,
        note="" if fits else "more than the available RAM",
    )


# ---------------------------------------------------------------------------------------------------------------
# Whole models: every quantization, and a recommendation


@dataclass(frozen=True)
class ModelReport:
    model: str
    arch: Architecture
    n_ctx: int
    probe: GPUProbe
    estimates: tuple[Estimate, ...]
    recommended: Estimate | None
    recommendation: str
    hints: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "n_ctx": self.n_ctx,
            "architecture": asdict(self.arch),
            "gpus": [asdict(g) for g in self.probe.gpus],
            "gpu_source": self.probe.source,
            "gpu_offload_supported": self.probe.offload_supported,
            "host_ram": asdict(self.probe.host),
            "notes": list(self.probe.notes),
            "estimates": [e.to_json() for e in self.estimates],
            "recommended": self.recommended.quant if self.recommended else None,
            "recommended_n_gpu_layers": self.recommended.n_gpu_layers if self.recommended else None,
            "recommended_mmproj_on_gpu": self.recommended.mmproj_on_gpu if self.recommended else None,
            "recommendation": self.recommendation,
            "hints": list(self.hints),
        }


def _quality_key(e: Estimate) -> tuple[float, int]:
    q = e.quality if e.quality is not None else DEFAULT_QUALITY.get(e.quant, 0.0)
    return (q, -e.weights)  # equal quality: the smaller file wins (Q8_0 over F16)


def recommend(estimates: Sequence[Estimate]) -> Estimate | None:
    """Best quality that fits fully (GPU) or in RAM (CPU); else the partial plan offloading the largest share
    of the model; else nothing."""
    full = [e for e in estimates if e.placement in ("full", "cpu")]
    if full:
        return max(full, key=_quality_key)
    partial = [e for e in estimates if e.placement == "partial"]
    if partial:
        return max(partial, key=lambda e: (e.n_gpu_layers / e.n_layers_total, _quality_key(e)))
    # Nothing fits on the GPU: the text model runs on the CPU; pick by RAM.
    cpu_ok = [e for e in estimates if e.placement == "no" and e.cpu_total <= _available(e)]
    return max(cpu_ok, key=_quality_key) if cpu_ok else None


def _available(e: Estimate) -> int:
    return e.budget if e.device == "CPU" else 1 << 62


def _describe(e: Estimate) -> str:
    if e.placement == "full":
        where = f"fully on {e.device}, --n-gpu-layers all ({e.n_layers_total}/{e.n_layers_total})"
    elif e.placement == "partial":
        where = f"{e.n_gpu_layers} of {e.n_layers_total} layers on {e.device}"
        where += ", vision encoder on the " + ("GPU" if e.mmproj_on_gpu else "CPU")
    elif e.placement == "cpu":
        where = f"on the CPU ({e.total / GiB:.1f} GiB of {e.budget / GiB:.1f} GiB available RAM)"
    else:
        where = "text model on the CPU" + (", vision encoder on the GPU" if e.mmproj_on_gpu else "")
    return f"{e.quant} {where}"


def build_report(
    model: str,
    arch: Architecture,
    sizes_by_quant: Mapping[Quant, WeightSizes],
    *,
    n_ctx: int = DEFAULT_CTX,
    gpus: GPUProbe,
    published: Mapping[Quant, Mapping[str, float]] | None = None,
    flash_attn: bool | None = None,
    margin: int | None = None,
    mmproj_offload: bool = True,
) -> ModelReport:
    published = published or {}
    ests = []
    for q in QUANTS:
        if q not in sizes_by_quant:
            continue
        pub = published.get(q, {})
        ests.append(
            estimate(
                sizes_by_quant[q],
                arch,
                n_ctx=n_ctx,
                gpus=gpus,
                flash_attn=flash_attn,
                margin=margin,
                mmproj_offload=mmproj_offload,
                quality=pub.get("quality"),
                published_size_gb=pub.get("size_gb"),
                published_bpw=pub.get("bpw"),
            )
        )
    best = recommend(ests)
    hints: list[str] = []
    if best is None:
        line = "nothing fits: not in GPU memory, not in available RAM"
        hints.append("try a smaller --ctx, close other programs, or use a machine with more memory")
    else:
        line = "recommended: " + _describe(best)
    if gpus.gpus and not gpus.offload_supported:
        from llava_cli.gpu import GPU_REINSTALL_HINT

        hints.append("this llama-cpp-python build cannot use the GPU: " + GPU_REINSTALL_HINT)
    elif not gpus.gpus:
        hints.append("no GPU found: planning for CPU RAM")
    # A smaller context before a lower quality (MEMORY.md §7 step 6).
    if best is not None and best.placement == "partial" and n_ctx > 2048:
        better = [q for q in sizes_by_quant if q == best.quant]
        for q in better:
            e2 = estimate(
                sizes_by_quant[q],
                arch,
                n_ctx=2048,
                gpus=gpus,
                flash_attn=flash_attn,
                margin=margin,
                mmproj_offload=mmproj_offload,
            )
            if e2.placement == "full":
                hints.append(f"{q} fits fully with --ctx 2048 (one image + ~1400 tokens of chat)")
    return ModelReport(model, arch, n_ctx, gpus, tuple(ests), best, line, tuple(hints))


def report_for_files(
    text_path: str | os.PathLike[str],
    mmproj_path: str | os.PathLike[str] | None,
    *,
    n_ctx: int = DEFAULT_CTX,
    gpus: GPUProbe | None = None,
    published: Mapping[Quant, Mapping[str, float]] | None = None,
    flash_attn: bool | None = None,
    margin: int | None = None,
    mmproj_offload: bool = True,
) -> ModelReport:
    """Report for a local GGUF pair: the file's own quantization from its header, the others derived from
    its architecture (labelled "architecture")."""
    text, mm = _read_pair(text_path, mmproj_path)
    arch = architecture_from_gguf(text, mm)
    real = sizes_from_gguf(text, mm)
    by_quant: dict[Quant, WeightSizes] = {}
    for q in QUANTS:
        derived = sizes_from_architecture(arch, q)
        if mm is not None:
            derived = replace(derived, mmproj=real.mmproj)
        by_quant[q] = derived
    if real.quant in QUANTS:
        by_quant[real.quant] = real
    else:
        by_quant = {real.quant: real, **by_quant}
    return build_report(
        Path(text_path).name,
        arch,
        by_quant,
        n_ctx=n_ctx,
        gpus=gpus or probe(),
        published=published,
        flash_attn=flash_attn,
        margin=margin,
        mmproj_offload=mmproj_offload,
    )


def _read_pair(
    text_path: str | os.PathLike[str], mmproj_path: str | os.PathLike[str] | None
) -> tuple[GGUFInfo, GGUFInfo | None]:
    text = read_gguf(text_path, "text")
    mm = read_gguf(mmproj_path, "mmproj") if mmproj_path is not None else None
    if mm is not None:
        check_pair(text, mm)
    return text, mm


def report_for_architecture(
    model: str,
    arch: Architecture,
    *,
    n_ctx: int = DEFAULT_CTX,
    gpus: GPUProbe | None = None,
    published: Mapping[Quant, Mapping[str, float]] | None = None,
    flash_attn: bool | None = None,
    margin: int | None = None,
    mmproj_offload: bool = True,
    local: Mapping[Quant, tuple[Path, Path | None]] | None = None,
) -> ModelReport:
    """Report from architecture figures; quantizations with local files use their real header sizes."""
    by_quant = {q: sizes_from_architecture(arch, q) for q in QUANTS}
    for q, (text_path, mm_path) in (local or {}).items():
        text, mm = _read_pair(text_path, mm_path)
        real = sizes_from_gguf(text, mm)
        by_quant[normalize_quant(q)] = replace(
            real, quant=normalize_quant(q), mmproj=real.mmproj or by_quant[normalize_quant(q)].mmproj
        )
    return build_report(
        model,
        arch,
        by_quant,
        n_ctx=n_ctx,
        gpus=gpus or probe(),
        published=published,
        flash_attn=flash_attn,
        margin=margin,
        mmproj_offload=mmproj_offload,
    )


# ---------------------------------------------------------------------------------------------------------------
# --n-gpu-layers auto


def plan_offload(
    text_path: str | os.PathLike[str],
    mmproj_path: str | os.PathLike[str] | None,
    *,
    n_ctx: int,
    gpus: GPUProbe | None = None,
    flash_attn: bool | None = None,
    mmproj_offload: bool = True,
) -> OffloadPlan:
    """How many layers of this GGUF pair to offload, from the real tensor sizes and the free GPU memory.

    ``gpus`` defaults to a fresh probe. ``mmproj_offload=False`` (--no-mmproj-offload) keeps CLIP on the CPU.
    """
    gpus = gpus if gpus is not None else probe()
    text, mm = _read_pair(text_path, mmproj_path)
    arch = architecture_from_gguf(text, mm)
    sizes = sizes_from_gguf(text, mm)
    if not gpus.gpus:
        return OffloadPlan(0, False, "no GPU found: running on the CPU")
    if not gpus.offload_supported:
        return OffloadPlan(0, False, "this llama-cpp-python build has no GPU support: running on the CPU")
    e = estimate(sizes, arch, n_ctx=n_ctx, gpus=gpus, flash_attn=flash_attn, mmproj_offload=mmproj_offload)
    free = f"{e.budget / GiB:.1f} GiB usable on {e.device}"
    if e.placement == "full":
        return OffloadPlan(-1, e.mmproj_on_gpu, f"all {e.n_layers_total} layers fit ({free})", e)
    if e.placement == "partial":
        why = f"{e.n_gpu_layers} of {e.n_layers_total} layers fit ({free})"
        if e.note:
            why += f"; {e.note}"
        return OffloadPlan(e.n_gpu_layers, e.mmproj_on_gpu, why, e)
    return OffloadPlan(0, e.mmproj_on_gpu, f"{e.note or 'too little GPU memory'} ({free})", e)


__all__ = [
    "Architecture",
    "Estimate",
    "ModelReport",
    "OffloadPlan",
    "QUANTS",
    "WeightSizes",
    "architecture_from_catalog",
    "architecture_from_gguf",
    "build_report",
    "compute_buffer_bytes",
    "cpu_peak_bytes",
    "estimate",
    "kv_cache_bytes",
    "plan_offload",
    "recommend",
    "report_for_architecture",
    "report_for_files",
    "sizes_from_architecture",
    "sizes_from_gguf",
]
