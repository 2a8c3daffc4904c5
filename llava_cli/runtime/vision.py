"""LLaVA-1.5's vision tower + projector computed on ggml, with transformers' semantics exactly.

What ``LlavaModel.get_image_features`` computes (transformers, select strategy ``default``), and what the graph
below builds, in order:

1. patch embedding: the 14×14 stride-14 conv as one matmul over the image's patches (im2col in numpy: a reshape
   and a transpose, ~1 ms per image), no bias;
2. the class token first at position 0, patch i at position i+1 (``v.position_embd`` rows in HF order);
3. ``pre_layrnorm``; then exactly the encoder blocks LLaVA uses: ``hidden_states[k]`` for each feature layer k
   (k = output of k blocks; several layers are concatenated along the features, in the file's order), no
   post-layernorm. Blocks are pre-LN: x += attn(LN1(x)); x += fc2(quick_gelu(fc1(LN2(x))));
4. the CLS row dropped, then the projector ``mm.0`` -> erf-GELU -> ``mm.2``.

Numerics: quick-GELU is computed as ``silu(1.702 x) / 1.702`` (= x·sigmoid(1.702 x)), because ggml's CPU
``gelu_quick`` reads an F16 lookup table (~1e-4 error); ``gelu_erf`` computes erff directly. Attention is either
``mul_mat`` + ``soft_max_ext`` or ``flash_attn_ext`` with F32 K/V and F32 accumulation (bench/bench_vision.py
measures both; they agree to ~1e-6). On F32 files the image features match transformers within 1e-4 relative
(tests/test_vision_graph.py).

mmproj layouts read (all ``clip`` GGUFs with projector ``mlp``):

* ours, standard (``llava convert`` default): ``v.class_embd`` F32, the full N+1-row position table,
  ``block_count`` = depth and ``clip.vision.feature_layer = [depth]``.
* ours, ``rolled`` (an older opt-in, recorded in general.description): the position table rotated by one row for
  llama.cpp's CLS-last graph; rotated back here, so it computes exactly too.
* ours, ``no_cls`` (the previous default): no class embedding, N position rows. Runs as what it is: the patches
  alone, each with its HF position (no CLS token in attention), all N outputs kept.
* llama.cpp's legacy script (the published LLaVA-1.5 files): ``v.class_embd`` F32, the full table (F16 in F16
  files), ``block_count`` 23 with or without ``clip.vision.feature_layer`` (without the key every stored block
  runs: the script stores exactly the blocks LLaVA uses), fc1/fc2 stored as ``ffn_down``/``ffn_up`` (detected by
  shape as clip.cpp does), ``mm.0``/``mm.2``, ``projection_dim`` 768 (unused).

Every tensor the graph touches is checked (present, exact shape, a type ggml can multiply) before any ggml object
exists, so a bad file is one ModelFileError line, never a ggml abort.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from llava_cli.errors import ModelFileError
from llava_cli.gguf_info import read_gguf
from llava_cli.preprocess import IMAGE_FITS, ImageFit, preprocess
from llava_cli.runtime import ggml

if TYPE_CHECKING:
    from PIL import Image

    from llava_cli.images import LoadedImage

_Q = gguf.GGMLQuantizationType
# Weight types ggml's mul_mat takes on every backend we may run (llama-quantize can write K-quants into an mmproj).
MATMUL_TYPES = frozenset(
    {_Q.F32, _Q.F16, _Q.BF16, _Q.Q8_0, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K}
)
# Tensors read into numpy (embeddings, norms, biases) and kept F32 on the backend.
FLOAT_TYPES = frozenset({_Q.F32, _Q.F16})
FEATURE_LAYER_KEY = "clip.vision.feature_layer"
QUICK_GELU_COEF = 1.702  # CLIP's quick_gelu: x * sigmoid(1.702 x)
DEFAULT_MAX_BATCH = 4  # images per graph evaluation (memory: ~100 MB of activations per CLIP-L image)
# Attention kernel when the caller does not choose, from measurements at equal results (docs/vision.md): flash
# attention (F32 K/V) is faster for CLIP-L's 64-wide heads (bench/bench_vision.py: 0.91x mtmd vs 1.15x for
# soft_max), equal at 64 in the tiny256 test model, and ~20x slower for 16-wide heads (the tiny test model).
FLASH_ATTN_MIN_HEAD_DIM = 64
# F16 matmul weights are widened to F32 once at load when the graph runs on the CPU: ggml's F16 matmul converts
# every activation row to F16 and widens the weights again per dot product, its F32 one runs the sgemm kernels
# directly. CLIP-L encode 2.41 -> 2.06 s (0.85x) on an AVX-512 build, 0.94x on AVX2 (docs/speed.md), for twice the
# vision weights' RAM (0.6 -> 1.2 GB for CLIP-L). The values are the file's; only the arithmetic is wider.


@dataclass(frozen=True)
class VisionSpec:
    """What an mmproj file is, validated: sizes, the blocks to run, and how its tensors are laid out."""

    path: Path
    n_embd_v: int
    n_head: int
    n_ff: int
    eps: float
    image_size: int
    patch_size: int
    feature_layers: tuple[int, ...]  # hidden_states indices, concatenated in this order
    has_cls: bool
    rolled: bool  # position table stored rotated for llama.cpp's CLS-last graph
    ffn_swapped: bool  # fc1 stored as ffn_down (llama.cpp's legacy script)
    activation: str  # encoder FFN: "quick_gelu" | "gelu" | "silu"
    proj_hidden: int
    n_embd: int  # projector output width
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    layout: str  # for messages and docs: "standard" | "rolled" | "no_cls"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid**2

    @property
    def n_tokens(self) -> int:
        """Tokens through the encoder: the patches, plus CLS first when the file has one."""
        return self.n_patches + (1 if self.has_cls else 0)

    @property
    def n_blocks(self) -> int:
        return max(self.feature_layers)


def inspect_mmproj(path: str | Path) -> tuple[VisionSpec, dict[str, Any]]:
    """Validate `path` as an mmproj this graph computes; return its spec and the reader's tensors by name.

    Raises ModelFileError (one line naming the file and the problem) for anything the graph could not take."""
    info = read_gguf(path, expect="mmproj")  # header, key types, projector type 'mlp', tensor bounds
    path = info.path
    reader = gguf.GGUFReader(path, "r")
    tensors = {t.name: t for t in reader.tensors}
    meta = info.metadata

    def fail(what: str) -> ModelFileError:
        return ModelFileError(f"{path}: {what}", hint="convert the checkpoint again with `llava convert`")

    if reader.fields.get("clip.vision.image_grid_pinpoints") is not None:
        raise fail("has image_grid_pinpoints (LLaVA-1.6 tiling), which llava-cli does not run")
    vh = int(meta[gguf.Keys.ClipVision.EMBEDDING_LENGTH])
    n_head = int(meta[gguf.Keys.ClipVision.Attention.HEAD_COUNT])
    n_ff = int(meta[gguf.Keys.ClipVision.FEED_FORWARD_LENGTH])
    n_stored = int(meta[gguf.Keys.ClipVision.BLOCK_COUNT])
    image, patch = info.image_size, info.patch_size

    def shape(name: str) -> tuple[int, ...] | None:
        t = tensors.get(name)
        return None if t is None else tuple(int(d) for d in t.shape)

    def need(name: str, ne: tuple[int, ...], types: frozenset[Any] = FLOAT_TYPES, optional: bool = False) -> bool:
        t = tensors.get(name)
        if t is None:
            if optional:
                return False
            raise fail(f"lacks tensor '{name}'")
        if t.tensor_type not in types:
            allowed = ", ".join(sorted(q.name for q in types))
            raise fail(f"tensor '{name}' is {t.tensor_type.name}; the vision graph takes {allowed} there")
        got = tuple(int(d) for d in t.shape)
        # GGUF drops trailing 1-dims, ggml keeps up to 4: compare without them.
        while len(got) > len(ne) and got[-1] == 1:
            got = got[:-1]
        if got != ne:
            raise fail(f"tensor '{name}' has shape {list(got)}, the graph needs {list(ne)}")
        return True

    # Feature layers: the key as written (llama.cpp's index k = HF hidden_states[k]); without it every stored
    # block runs (llama.cpp's legacy script stores exactly the blocks LLaVA uses and writes no key).
    field = reader.fields.get(FEATURE_LAYER_KEY)
    layers = tuple(int(field.parts[i][0]) for i in field.data) if field is not None else (n_stored,)
    if not layers or any(k < 0 or k > n_stored for k in layers) or max(layers) == 0:
        raise fail(f"feature layers {list(layers)} do not fit its {n_stored} blocks")

    # Patch embedding: never quantized (ggml's conv kernels and our numpy im2col take F16/F32 only).
    need("v.patch_embd.weight", (patch, patch, 3, vh))
    need("v.patch_embd.bias", (vh,), optional=True)
    has_cls = need("v.class_embd", (vh,), optional=True)
    n_patches = (image // patch) ** 2
    need("v.position_embd.weight", (vh, n_patches + (1 if has_cls else 0)))
    need("v.pre_ln.weight", (vh,))
    need("v.pre_ln.bias", (vh,))
    up, down = shape("v.blk.0.ffn_up.weight"), shape("v.blk.0.ffn_down.weight")
    # llama.cpp's legacy script names fc1 `ffn_down` and fc2 `ffn_up`; clip.cpp detects it by shape, so do we.
    # With n_ff == n_embd the shapes cannot tell, and the names are taken as written.
    swapped = n_ff != vh and up == (n_ff, vh) and down == (vh, n_ff)
    fc1, fc2 = ("ffn_down", "ffn_up") if swapped else ("ffn_up", "ffn_down")
    for i in range(max(layers)):
        b = f"v.blk.{i}."
        for part in ("attn_q", "attn_k", "attn_v", "attn_out"):
            need(b + part + ".weight", (vh, vh), MATMUL_TYPES)
            need(b + part + ".bias", (vh,))
        for ln in ("ln1", "ln2"):
            need(b + ln + ".weight", (vh,))
            need(b + ln + ".bias", (vh,))
        need(b + fc1 + ".weight", (vh, n_ff), MATMUL_TYPES)
        need(b + fc1 + ".bias", (n_ff,))
        need(b + fc2 + ".weight", (n_ff, vh), MATMUL_TYPES)
        need(b + fc2 + ".bias", (vh,))
    mm0 = shape("mm.0.weight")
    hidden = mm0[1] if mm0 is not None and len(mm0) == 2 else -1
    need("mm.0.weight", (vh * len(layers), hidden), MATMUL_TYPES)
    need("mm.0.bias", (hidden,), optional=True)
    mm2 = shape("mm.2.weight")
    out = mm2[1] if mm2 is not None and len(mm2) == 2 else -1
    need("mm.2.weight", (hidden, out), MATMUL_TYPES)
    need("mm.2.bias", (out,), optional=True)

    if meta.get(gguf.Keys.ClipVision.USE_SILU):
        activation = "silu"
    elif meta.get(gguf.Keys.ClipVision.USE_GELU):
        activation = "gelu"  # HF "gelu" is the erf form
    else:
        activation = "quick_gelu"
    description = str(meta.get(gguf.Keys.General.DESCRIPTION, ""))
    rolled = has_cls and description.rstrip().endswith("vision layout rolled")
    mean = _float_array(reader, gguf.Keys.ClipVision.IMAGE_MEAN)
    std = _float_array(reader, gguf.Keys.ClipVision.IMAGE_STD)
    spec = VisionSpec(
        path=path,
        n_embd_v=vh,
        n_head=n_head,
        n_ff=n_ff,
        eps=float(meta[gguf.Keys.ClipVision.Attention.LAYERNORM_EPS]),
        image_size=image,
        patch_size=patch,
        feature_layers=layers,
        has_cls=has_cls,
        rolled=rolled,
        ffn_swapped=swapped,
        activation=activation,
        proj_hidden=hidden,
        n_embd=out,
        image_mean=mean,
        image_std=std,
        layout="rolled" if rolled else "standard" if has_cls else "no_cls",
    )
    return spec, tensors


def _float_array(reader: gguf.GGUFReader, key: str) -> tuple[float, float, float]:
    f = reader.fields[key]  # presence and length >= 3 checked by read_gguf
    a, b, c = (float(f.parts[i][0]) for i in f.data[:3])
    return (a, b, c)


class VisionEncoder:
    """The mmproj's vision tower + projector on a ggml backend. ``encode`` is thread-safe (one graph at a time).

    ``n_threads``: CPU threads (the engine's). ``use_gpu``: run on the first GPU in ggml's device registry when
    the build has one (CPU otherwise). ``flash_attn``: attention kernel, None = the measured default.
    ``max_batch``: images per graph evaluation; larger batches are split. ``f32_weights``: widen F16 matmul
    weights to F32 at load (None = on the CPU backend, where it is faster; see above)."""

    def __init__(
        self,
        mmproj_path: str | Path,
        *,
        n_threads: int,
        use_gpu: bool = False,
        flash_attn: bool | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        image_fit: ImageFit = "pad",
        f32_weights: bool | None = None,
    ) -> None:
        if image_fit not in IMAGE_FITS:
            raise ValueError(f"image_fit must be one of {', '.join(IMAGE_FITS)}")
        self.spec, tensors = inspect_mmproj(mmproj_path)
        spec = self.spec
        self.image_size = spec.image_size
        self.n_image_tokens = spec.n_patches
        self.n_embd = spec.n_embd
        self.image_mean = spec.image_mean
        self.image_std = spec.image_std
        self.image_fit: ImageFit = image_fit
        head_dim = spec.n_embd_v // spec.n_head
        self.flash_attn = head_dim >= FLASH_ATTN_MIN_HEAD_DIM if flash_attn is None else bool(flash_attn)
        self.max_batch = max(1, int(max_batch))
        self._lock = threading.Lock()
        self._g = ggml.lib()
        self._graphs: dict[int, _Graph] = {}
        self._weights_ctx = 0
        self._weights_buf = 0
        self._galloc = 0
        self._f32_weights = f32_weights
        self.backend = ggml.Backend(ggml.pick_device(ggml.list_devices(), use_gpu), n_threads)
        try:
            self._load_weights(tensors)
            self._galloc = self._g.ggml_gallocr_new(self._g.ggml_backend_get_default_buffer_type(self.backend.ptr))
            if self.backend.is_gpu and not self.backend.supports_graph(self._graph(1).gf):
                # A GPU backend without one of our ops: run on the CPU rather than fail.
                self._reset_backend(ggml.Backend(None, n_threads), tensors)
        except BaseException:
            self.close()
            raise
        del tensors

    # ------------------------------------------------------------------------------------------ weights

    def _load_weights(self, tensors: dict[str, Any]) -> None:
        """Weights into a no_alloc context, allocated in one backend buffer, filled with tensor_set."""
        g, spec = self._g, self.spec
        host: dict[str, tuple[int, tuple[int, ...], Any]] = {}  # name -> (ggml type, ne, array or GGUF tensor)

        widen = not self.backend.is_gpu if self._f32_weights is None else self._f32_weights
        self.f32_weights = widen

        def raw(name: str) -> None:  # a matmul weight, uploaded as stored (Q8_0/... stay so; F16 see above)
            t = tensors[name]
            ne = tuple(int(d) for d in t.shape[:2])
            gtype = ggml.TYPE_F32 if widen and int(t.tensor_type) == ggml.TYPE_F16 else int(t.tensor_type)
            host[name] = (gtype, ne, t)  # read from the file at upload, one tensor at a time (see below)

        def f32(name: str, data: np.ndarray) -> None:  # float data kept F32 (norms, biases, embeddings)
            data = np.ascontiguousarray(data, dtype=np.float32)
            host[name] = (ggml.TYPE_F32, tuple(reversed(data.shape)), data)

        def vec(name: str) -> np.ndarray:
            return np.asarray(tensors[name].data, dtype=np.float32).reshape(-1)

        vh = spec.n_embd_v
        # The conv kernel (vh, 3, P, P) as a (vh, 3·P·P) matrix over our im2col rows; F32 so that the input
        # patches are not rounded to F16 (it is 2.4 MB for CLIP-L).
        f32("patch", np.asarray(tensors["v.patch_embd.weight"].data, dtype=np.float32).reshape(vh, -1))
        # One additive table per token position: row 0 (CLS) = class embedding + its position, rows 1.. = the
        # patch positions (+ the conv bias, if any). The CLS input row is zeros, so W·0 + table[0] is exactly
        # HF's class_embedding + position_embedding(0).
        pos = np.asarray(tensors["v.position_embd.weight"].data, dtype=np.float32).reshape(spec.n_tokens, vh)
        if spec.rolled:
            pos = np.roll(pos, 1, axis=0)  # stored as rows (1..N, 0) for llama.cpp's CLS-last graph
        table = pos.copy()
        first = 1 if spec.has_cls else 0
        if spec.has_cls:
            table[0] = vec("v.class_embd") + pos[0]
        if "v.patch_embd.bias" in tensors:
            table[first:] = pos[first:] + vec("v.patch_embd.bias")
        f32("pos", table)
        for name in ("v.pre_ln.weight", "v.pre_ln.bias"):
            f32(name, vec(name))
        fc1, fc2 = ("ffn_down", "ffn_up") if spec.ffn_swapped else ("ffn_up", "ffn_down")
        for i in range(spec.n_blocks):
            b = f"v.blk.{i}."
            for part, alias in (("attn_q", "q"), ("attn_k", "k"), ("attn_v", "v"), ("attn_out", "o")):
                raw(b + part + ".weight")
                host[b + alias] = host.pop(b + part + ".weight")
                f32(b + alias + "_b", vec(b + part + ".bias"))
            for ln in ("ln1", "ln2"):
                f32(b + ln + "_w", vec(b + ln + ".weight"))
                f32(b + ln + "_b", vec(b + ln + ".bias"))
            for src, alias in ((fc1, "fc1"), (fc2, "fc2")):
                raw(b + src + ".weight")
                host[b + alias] = host.pop(b + src + ".weight")
                f32(b + alias + "_b", vec(b + src + ".bias"))
        for m in ("mm.0", "mm.2"):
            raw(m + ".weight")
            if m + ".bias" in tensors:
                f32(m + ".bias", vec(m + ".bias"))

        self._weights_ctx = ggml.new_context(len(host))
        self._w: dict[str, int] = {}
        for name, (gtype, ne, _) in host.items():
            if len(ne) == 1:
                t = g.ggml_new_tensor_1d(self._weights_ctx, gtype, ne[0])
            else:
                t = g.ggml_new_tensor_2d(self._weights_ctx, gtype, ne[0], ne[1])
            g.ggml_set_name(t, name.encode()[:63])
            self._w[name] = t
        self._weights_buf = g.ggml_backend_alloc_ctx_tensors(self._weights_ctx, self.backend.ptr)
        if not self._weights_buf:
            raise ModelFileError(f"{spec.path}: could not allocate the vision weights on {self.backend.name}")
        # Matmul weights are read with plain file reads, one tensor at a time, rather than through the reader's
        # memory map: touched map pages stay in the process's RSS until the map goes, on top of the backend copy
        # (for CLIP-L widened to F32: 0.6 GB of file pages beside 1.2 GB of weights at the peak).
        with open(spec.path, "rb") as f:
            for name, (gtype, _, src) in host.items():
                t = self._w[name]
                buf = src if isinstance(src, np.ndarray) else _read_tensor(f, src, gtype)
                if g.ggml_nbytes(t) != buf.nbytes:  # tensor_set would GGML_ASSERT on a size mismatch
                    raise ModelFileError(f"{spec.path}: tensor '{name}' holds {buf.nbytes} bytes, expected more")
                g.ggml_backend_tensor_set(t, buf.ctypes.data, 0, buf.nbytes)
                del buf

    def _reset_backend(self, backend: ggml.Backend, tensors: dict[str, Any]) -> None:
        self._free_graphs()
        self._free_weights()
        self.backend.free()
        self.backend = backend
        self._load_weights(tensors)
        self._galloc = self._g.ggml_gallocr_new(self._g.ggml_backend_get_default_buffer_type(self.backend.ptr))

    # ------------------------------------------------------------------------------------------ graph

    def _graph(self, batch: int) -> _Graph:
        graph = self._graphs.get(batch)
        if graph is None:
            graph = self._graphs[batch] = _Graph(self, batch)
        return graph

    # ------------------------------------------------------------------------------------------ API

    def preprocess(self, image: Image.Image, fit: ImageFit | None = None) -> np.ndarray:
        """RGB image -> float32 (3, S, S) normalised pixels with this file's size and mean/std."""
        return preprocess(
            image, fit=fit or self.image_fit, size=self.image_size, mean=self.image_mean, std=self.image_std
        )

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 pixels -> (B, n_image_tokens, n_embd) float32 image embeddings."""
        s = self.image_size
        pixels = np.asarray(pixels, dtype=np.float32)
        if pixels.ndim == 3:
            pixels = pixels[None]
        if pixels.ndim != 4 or pixels.shape[1:] != (3, s, s):
            raise ValueError(f"pixels must be (B, 3, {s}, {s}), got {pixels.shape}")
        out = np.empty((pixels.shape[0], self.n_image_tokens, self.n_embd), dtype=np.float32)
        with self._lock:
            if not self.backend.ptr:
                raise RuntimeError("VisionEncoder is closed")
            for start in range(0, pixels.shape[0], self.max_batch):
                chunk = pixels[start : start + self.max_batch]
                out[start : start + len(chunk)] = self._graph(len(chunk)).run(chunk)
        return out

    def encode_images(self, images: Sequence[LoadedImage], fit: ImageFit | None = None) -> list[np.ndarray]:
        """The runtime's ImageEncoder interface: each image -> (n_image_tokens, n_embd) float32."""
        if not images:
            return []
        batch = np.stack([self.preprocess(img.image, fit) for img in images])
        return list(self.encode(batch))

    def close(self) -> None:
        with self._lock:
            self._free_graphs()
            if self._galloc:
                self._g.ggml_gallocr_free(self._galloc)
                self._galloc = 0
            self._free_weights()
            if getattr(self, "backend", None) is not None:
                self.backend.free()

    def _free_graphs(self) -> None:
        for graph in self._graphs.values():
            graph.free()
        self._graphs.clear()

    def _free_weights(self) -> None:
        if self._weights_buf:
            self._g.ggml_backend_buffer_free(self._weights_buf)
            self._weights_buf = 0
        if self._weights_ctx:
            self._g.ggml_free(self._weights_ctx)
            self._weights_ctx = 0

    def __enter__(self) -> VisionEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Graph node budget: ~40 nodes per block + the embeddings and projector; 64 per block leaves room.
_NODES_PER_BLOCK = 64


def _read_tensor(f: Any, t: Any, gtype: int) -> np.ndarray:
    """A GGUF tensor's bytes read from the open file `f` (F16 widened to F32 when `gtype` asks for it)."""
    f.seek(int(t.data_offset))
    if int(t.tensor_type) == ggml.TYPE_F16:
        data = np.fromfile(f, dtype=np.float16, count=int(t.n_elements))
        return data.astype(np.float32) if gtype == ggml.TYPE_F32 else data
    if int(t.tensor_type) == ggml.TYPE_F32:
        return np.fromfile(f, dtype=np.float32, count=int(t.n_elements))
    return np.fromfile(f, dtype=np.uint8, count=int(t.n_bytes))


class _Graph:
    """The compute graph for one batch size, in its own no_alloc context (tensors placed by the gallocr)."""

    def __init__(self, enc: VisionEncoder, batch: int) -> None:
        g, spec, w = enc._g, enc.spec, enc._w
        self.enc, self.batch = enc, batch
        size = _NODES_PER_BLOCK * (spec.n_blocks + 2)
        self.ctx = ggml.new_context(size, size)
        ctx = self.ctx
        vh, n_head, T, B = spec.n_embd_v, spec.n_head, spec.n_tokens, batch
        d = vh // n_head
        self.n_in = 3 * spec.patch_size**2

        def linear(x: int, name: str, bias: str | None) -> int:
            y = g.ggml_mul_mat(ctx, w[name], x)
            return g.ggml_add(ctx, y, w[bias]) if bias else y

        def layer_norm(x: int, weight: str, bias: str) -> int:
            return g.ggml_add(ctx, g.ggml_mul(ctx, g.ggml_norm(ctx, x, spec.eps), w[weight]), w[bias])

        self.inp = g.ggml_new_tensor_3d(ctx, ggml.TYPE_F32, self.n_in, T, B)
        g.ggml_set_name(self.inp, b"patches")
        g.ggml_set_input(self.inp)
        x = g.ggml_add(ctx, g.ggml_mul_mat(ctx, w["patch"], self.inp), w["pos"])  # [vh, T, B]
        x = layer_norm(x, "v.pre_ln.weight", "v.pre_ln.bias")
        features = {0: x}
        scale = 1.0 / math.sqrt(d)
        for i in range(spec.n_blocks):
            b = f"v.blk.{i}."
            h = layer_norm(x, b + "ln1_w", b + "ln1_b")
            q = g.ggml_reshape_4d(ctx, linear(h, b + "q", b + "q_b"), d, n_head, T, B)
            k = g.ggml_reshape_4d(ctx, linear(h, b + "k", b + "k_b"), d, n_head, T, B)
            v = g.ggml_reshape_4d(ctx, linear(h, b + "v", b + "v_b"), d, n_head, T, B)
            q = g.ggml_permute(ctx, q, 0, 2, 1, 3)  # [d, T, H, B]
            k = g.ggml_permute(ctx, k, 0, 2, 1, 3)
            if enc.flash_attn:
                v = g.ggml_permute(ctx, v, 0, 2, 1, 3)
                a = g.ggml_flash_attn_ext(ctx, q, k, v, None, scale, 0.0, 0.0)  # [d, H, T, B]
                g.ggml_prec_set_acc(a, ggml.PREC_F32)
            else:
                kq = g.ggml_soft_max_ext(ctx, g.ggml_mul_mat(ctx, k, q), None, scale, 0.0)  # [T, T, H, B]
                vt = g.ggml_cont(ctx, g.ggml_permute(ctx, v, 1, 2, 0, 3))  # [T, d, H, B]
                a = g.ggml_mul_mat(ctx, vt, kq)  # [d, T, H, B]
                a = g.ggml_cont(ctx, g.ggml_permute(ctx, a, 0, 2, 1, 3))  # [d, H, T, B]
            a = g.ggml_reshape_3d(ctx, a, vh, T, B)
            x = g.ggml_add(ctx, x, linear(a, b + "o", b + "o_b"))
            h = linear(layer_norm(x, b + "ln2_w", b + "ln2_b"), b + "fc1", b + "fc1_b")
            if spec.activation == "quick_gelu":
                h = g.ggml_scale(ctx, g.ggml_silu(ctx, g.ggml_scale(ctx, h, QUICK_GELU_COEF)), 1.0 / QUICK_GELU_COEF)
            elif spec.activation == "gelu":
                h = g.ggml_gelu_erf(ctx, h)
            else:
                h = g.ggml_silu(ctx, h)
            x = g.ggml_add(ctx, x, linear(h, b + "fc2", b + "fc2_b"))
            features[i + 1] = x
        x = features[spec.feature_layers[0]]
        for k_ in spec.feature_layers[1:]:
            x = g.ggml_concat(ctx, x, features[k_], 0)
        # The projector runs on every row (CLS included: 1/577 of the work); the CLS row is dropped on read-back.
        x = g.ggml_gelu_erf(ctx, linear(x, "mm.0.weight", "mm.0.bias" if "mm.0.bias" in w else None))
        self.out = linear(x, "mm.2.weight", "mm.2.bias" if "mm.2.bias" in w else None)
        g.ggml_set_name(self.out, b"image_embd")
        g.ggml_set_output(self.out)
        self.gf = g.ggml_new_graph_custom(ctx, size, False)
        g.ggml_build_forward_expand(self.gf, self.out)

    def run(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) -> (B, n_patches, n_embd)."""
        enc, g, spec = self.enc, self.enc._g, self.enc.spec
        B, P, grid = pixels.shape[0], spec.patch_size, spec.grid
        # im2col: (B, 3, gy, P, gx, P) -> (B, gy·gx, 3·P·P), each row in the conv kernel's (c, ky, kx) order.
        patches = pixels.reshape(B, 3, grid, P, grid, P).transpose(0, 2, 4, 1, 3, 5).reshape(B, grid * grid, -1)
        inp = np.zeros((B, spec.n_tokens, self.n_in), dtype=np.float32)
        inp[:, spec.n_tokens - spec.n_patches :] = patches  # row 0 stays zero for CLS (see _load_weights)
        if not g.ggml_gallocr_alloc_graph(enc._galloc, self.gf):
            raise MemoryError(f"could not allocate the vision graph ({B} images) on {enc.backend.name}")
        g.ggml_backend_tensor_set(self.inp, inp.ctypes.data, 0, inp.nbytes)
        status = g.ggml_backend_graph_compute(enc.backend.ptr, self.gf)
        if status != 0:
            raise RuntimeError(f"ggml graph compute failed with status {status}")
        out = np.empty((B, spec.n_tokens, spec.n_embd), dtype=np.float32)
        g.ggml_backend_tensor_get(self.out, out.ctypes.data, 0, out.nbytes)
        return out[:, spec.n_tokens - spec.n_patches :]

    def free(self) -> None:
        if self.ctx:
            self.enc._g.ggml_free(self.ctx)
            self.ctx = 0


__all__ = ["VisionEncoder", "VisionSpec", "inspect_mmproj"]
