"""Runtime buffers: KV cache, llama.cpp's and clip's compute buffers, and the CPU-side process terms.

The KV cache is exact (checked against the ``llama_kv_cache`` size llama.cpp logs, ``tests/test_memory.py``).
The compute buffer is a formula fitted to llama.cpp's own reported buffers. ``CPU_RUNTIME`` and
``IMAGE_EMBD_COPIES`` are fitted to measured peak RSS by ``bench/bench_memory.py``; docs/memory.md reports that
fit and, separately, the held-out validation on models the constants were not fitted on.
"""

from __future__ import annotations

from llava_cli.memory.gpu import MiB
from llava_cli.memory.sizes import Architecture, WeightSizes

DEFAULT_CTX = 4096  # LLaVA-1.5's trained context; the runtime's default --ctx (per sequence)
# The runtime's batch sizes (llava_cli/runtime/pair.py). On the CPU one ubatch holds an image's 576 rows and a
# turn's text, so the weights stream once per prompt (prefill 0.94x the time of 512, docs/speed.md); on a GPU
# llama.cpp's 512 stays: compute is not the limit there, and without flash attention a ubatch twice as large
# doubles the KQ scores in VRAM (13B at 4K on a 12 GB card: 4 fewer layers).
N_BATCH = 1024
N_UBATCH_CPU = 1024
N_UBATCH_GPU = 512


def runtime_ubatch(n_gpu_layers: int) -> int:
    """The ubatch the runtime uses when the caller does not choose one."""
    return N_UBATCH_GPU if n_gpu_layers > 0 else N_UBATCH_CPU


IMAGE_TOKENS = 576
KV_CELL_PAD = 256  # llama.cpp pads each KV cache stream to a multiple of 256 cells
CACHE_TYPE_BYTES = {"f16": 2, "bf16": 2, "f32": 4, "q8_0": 34 / 32, "q4_0": 18 / 32}

# --- CPU-side terms, fitted by bench/bench_memory.py (docs/memory.md, "fit") ------------------------------------
CPU_RUNTIME = 70 * MiB  # Python + numpy/PIL + llama.cpp/ggml code and data, threads, allocator slack
# Fitted when mtmd encoded the images; the vision graph that replaced it keeps the same kinds of copies (its output,
# the embedding cache, decode batches, preprocessing buffers), not yet re-fitted (docs/memory.md).
IMAGE_EMBD_COPIES = 5

# --- GPU-side terms -------------------------------------------------------------------------------------------
CLIP_COMPUTE_GPU = 64 * MiB  # clip.cpp's compute buffer for one 336px image (it logs ~33 MB; 2x for safety)


def _pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def kv_cache_bytes(
    arch: Architecture, n_ctx: int, *, n_layers: int | None = None, parallel: int = 1, cache_type: str = "f16"
) -> int:
    """K and V for ``parallel`` sequences of ``n_ctx`` tokens each: per slot, the padded context x n_layer x
    n_embd_kv x 2 (K and V) x the bytes of one cache element (f16 unless ``--cache-type`` says otherwise)."""
    layers = arch.n_layer if n_layers is None else n_layers
    per_slot = _pad(n_ctx, KV_CELL_PAD) * layers * arch.n_embd_kv * 2 * CACHE_TYPE_BYTES[cache_type]
    return int(per_slot * max(1, parallel))


def compute_buffer_bytes(
    arch: Architecture, n_ctx: int, *, n_ubatch: int = N_UBATCH_GPU, flash_attn: bool = False, parallel: int = 1
) -> int:
    """llama.cpp's compute buffer for a full (single-device) graph: the peak of live f32 intermediates over
    one ubatch: whichever of attention, FFN and logits is largest, plus the KQ mask. Fitted to the buffer sizes
    llama.cpp reports for LLaVA-1.5-7B/13B at 2K/4K context, flash attention on and off (all within 1 MiB;
    tests/test_memory.py keeps those eight figures and checks the formula against the size llama.cpp reports for a
    small model). ``n_ctx`` is one sequence's context; the runtime keeps the ``parallel`` sequences in one unified
    KV stream (runtime/llamacpp.py), so the graph's attention spans all ``n_ctx x parallel`` cells."""
    cells = n_ctx * max(1, parallel)
    ub = min(n_ubatch, cells)
    n_kv = _pad(cells, KV_CELL_PAD)
    mask = n_kv * ub * (2 if flash_attn else 4)
    kq = 0 if flash_attn else n_kv * ub * arch.n_head * 4
    attn = kq + 7 * arch.n_embd * ub * 4
    ffn = 3 * arch.n_ff * ub * 4 + 4 * arch.n_embd * ub * 4
    logits = arch.n_vocab * ub * 4 + 2 * arch.n_embd * ub * 4
    return mask + max(attn, ffn, logits)


def ollama_graph_bytes(arch: Architecture, n_ctx: int, *, partial: bool, n_batch: int = N_UBATCH_GPU) -> int:
    """Ollama's former llama-arch GraphSize (github.com/ollama/ollama, fs/ggml/ggml.go before f560bd077): used
    as a floor on the GPU, where partial offload also copies CPU-resident weights to the GPU for large-batch
    matmuls."""
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
    CPU) the FFN activations dominate: n_pos x (ff + 4 e) floats (clip logs 8.05 / 17.05 MiB for e = 512 /
    1024); without, the n_pos² x heads KQ scores."""
    n_pos = arch.n_patches + 1
    ffn = n_pos * (arch.v_n_ff + 4 * arch.v_n_embd) * 4
    if flash_attn:
        return ffn
    return max(ffn, n_pos * n_pos * arch.v_n_head * 4 + 3 * n_pos * arch.v_n_embd * 4)


def image_embd_bytes(arch: Architecture) -> int:
    """One image's embeddings as the text model consumes them: n_patches x n_embd floats."""
    return arch.n_patches * arch.n_embd * 4


def cpu_peak_bytes(
    sizes: WeightSizes, arch: Architecture, n_ctx: int, *, flash_attn: bool = True, parallel: int = 1
) -> int:
    """Peak RSS of a process that loads the pair on the CPU and answers one image per sequence.

    llama.cpp maps the text file with MAP_POPULATE, so all of it counts in RSS (file pages), plus an anonymous
    copy of the repacked Q4_K tensors; the mmproj is read into a backend buffer, its F16 tensors widened to F32.
    ``flash_attn`` defaults to llama.cpp's "auto", which is on for the CPU backend. ``parallel`` sequences each
    hold a KV slot and an image's embeddings (the KV part is exact; the per-sequence image term is not yet validated
    by a run)."""
    n = max(1, parallel)
    return (
        CPU_RUNTIME
        + sizes.text
        + sizes.repacked
        + kv_cache_bytes(arch, n_ctx, parallel=n)
        + compute_buffer_bytes(arch, n_ctx, n_ubatch=N_UBATCH_CPU, flash_attn=flash_attn, parallel=n)
        + sizes.mmproj_cpu
        + clip_compute_bytes(arch, flash_attn=flash_attn)
        + IMAGE_EMBD_COPIES * image_embd_bytes(arch) * n
        + arch.n_vocab * 4 * n  # logits of the last position of each sequence
    )
