"""Read and validate GGUF headers before llama.cpp ever sees the file.

llama.cpp aborts the whole process on several malformed files (a scalar key of the wrong type is a GGML_ASSERT, a
projector without ``mm.0`` segfaults), so every GGUF a user hands us goes through `read_gguf` first: it parses the
header with the ``gguf`` package's reader (memory-mapped, no weights loaded), checks that every tensor's data lies
inside the file, that the architecture is one we run, and that the keys llama.cpp asserts on have the right types.
Each failure is a one-line `ModelFileError` naming the file.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import gguf

from llava_cli import reading
from llava_cli.errors import ModelFileError

GGUF_MAGIC = b"GGUF"
TEXT_ARCHITECTURES = ("llama",)  # LLaVA-1.5 (Vicuna) and BakLLaVA (Mistral) both run as llama.cpp's `llama`
MMPROJ_ARCHITECTURE = "clip"
PROJECTOR_TYPES = ("mlp",)
LLAMA_MAX_LAYERS = 512
_TEXT_LAYER_TENSORS = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)  # llama.cpp's src/llama-hparams.h  # LLaVA-1.5's two-layer MLP projector

Kind = Literal["text", "mmproj"]
_V = gguf.GGUFValueType

# Scalar keys that llama.cpp reads with a type assertion: a wrong type aborts the process instead of failing.
_TEXT_KEYS: dict[str, _V] = {
    gguf.Keys.LLM.CONTEXT_LENGTH: _V.UINT32,
    gguf.Keys.LLM.EMBEDDING_LENGTH: _V.UINT32,
    gguf.Keys.LLM.BLOCK_COUNT: _V.UINT32,
    gguf.Keys.LLM.FEED_FORWARD_LENGTH: _V.UINT32,
    gguf.Keys.Attention.HEAD_COUNT: _V.UINT32,
    gguf.Keys.Attention.LAYERNORM_RMS_EPS: _V.FLOAT32,
}
_TEXT_OPTIONAL_KEYS: dict[str, _V] = {
    gguf.Keys.Attention.HEAD_COUNT_KV: _V.UINT32,
    gguf.Keys.Rope.FREQ_BASE: _V.FLOAT32,
    gguf.Keys.Rope.DIMENSION_COUNT: _V.UINT32,
}
_MMPROJ_KEYS: dict[str, _V] = {
    gguf.Keys.Clip.HAS_VISION_ENCODER: _V.BOOL,
    gguf.Keys.Clip.PROJECTOR_TYPE: _V.STRING,
    gguf.Keys.ClipVision.EMBEDDING_LENGTH: _V.UINT32,
    gguf.Keys.ClipVision.Attention.HEAD_COUNT: _V.UINT32,
    gguf.Keys.ClipVision.FEED_FORWARD_LENGTH: _V.UINT32,
    gguf.Keys.ClipVision.BLOCK_COUNT: _V.UINT32,
    gguf.Keys.ClipVision.PROJECTION_DIM: _V.UINT32,
    gguf.Keys.ClipVision.Attention.LAYERNORM_EPS: _V.FLOAT32,
    gguf.Keys.ClipVision.IMAGE_SIZE: _V.UINT32,
    gguf.Keys.ClipVision.PATCH_SIZE: _V.UINT32,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str  # ggml type, e.g. "F16", "Q4_K"
    shape: tuple[int, ...]  # ggml order (ne0 = row length first)
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class GGUFInfo:
    """What we need to know about a GGUF file without loading its weights."""

    path: Path
    kind: Kind
    architecture: str
    name: str | None
    file_type: str | None  # "Q4_K_M", "F16", ... (from general.file_type), None if absent
    n_embd: int  # text: embedding size; mmproj: the projector's output width (must equal the text n_embd)
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ctx_train: int  # text only (0 for an mmproj)
    n_vocab: int  # text only (0 for an mmproj)
    n_ff: int
    image_size: int = 0  # mmproj only
    patch_size: int = 0  # mmproj only
    file_size: int = 0
    tensors: tuple[TensorInfo, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.tensor_bytes / max(1, self.n_params)

    @property
    def n_image_tokens(self) -> int:
        """Image tokens per image (mmproj only): (image_size / patch_size)^2, e.g. 576 for 336/14."""
        return (self.image_size // self.patch_size) ** 2 if self.patch_size else 0

    def tensor(self, name: str) -> TensorInfo | None:
        return next((t for t in self.tensors if t.name == name), None)


def read_gguf(path: str | os.PathLike[str], expect: Kind | None = None) -> GGUFInfo:
    """Parse and validate a GGUF header. ``expect`` names the role the caller wants the file for."""
    path = Path(path)
    # A device or FIFO is refused by its type before it is opened (a FIFO without a writer blocks any open).
    fd = reading.open_regular(
        path, what="a .gguf file", error=ModelFileError, missing=f"model file not found: {reading.display_name(path)}"
    )
    try:
        size = os.fstat(fd).st_size
        magic = os.read(fd, 4)
    finally:
        os.close(fd)
    if size == 0:
        raise ModelFileError(f"{path} is empty (0 bytes)", hint="download or convert it again")
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"{path} is not a GGUF file (bad magic {magic!r})")
    _prescan(path, size)
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # the reader raises ValueError/IndexError/KeyError/... on corrupt headers
        raise ModelFileError(
            f"{path} is truncated or corrupt (cannot parse its header: {exc})",
            hint="download or convert it again",
        ) from exc
    try:
        tensors = tuple(_tensor_infos(reader, path, size))
        metadata = _scalar_metadata(reader)
        arch = metadata.get(gguf.Keys.General.ARCHITECTURE)
        if not isinstance(arch, str):
            raise ModelFileError(f"{path} has no general.architecture: not a model file we can use")
        if arch == MMPROJ_ARCHITECTURE:
            info = _mmproj_info(reader, path, metadata, tensors, size)
        elif arch in TEXT_ARCHITECTURES:
            info = _text_info(reader, path, metadata, tensors, size, arch)
        else:
            raise ModelFileError(
                f"{path} is a '{arch}' model; llava-cli runs LLaVA models "
                f"(text architecture {', '.join(TEXT_ARCHITECTURES)} + a '{MMPROJ_ARCHITECTURE}' mmproj)"
            )
    finally:
        # Drop the memory map now: on Windows an open map blocks renames, and we may rewrite this file.
        del reader
    if expect == "text" and info.kind == "mmproj":
        raise ModelFileError(
            f"{path} is a vision projector (mmproj), not a text model",
            hint="pass it as --mmproj and the text model as --model",
        )
    if expect == "mmproj" and info.kind == "text":
        raise ModelFileError(
            f"{path} is a text model, not a vision projector (mmproj)",
            hint="pass it as --model and the mmproj-*.gguf file as --mmproj",
        )
    return info


# Byte sizes of GGUF scalar value types (GGUFValueType order: UINT8 .. FLOAT64; 8 = STRING, 9 = ARRAY).
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def _prescan(path: Path, size: int) -> None:
    """Walk the KV and tensor-info sections with every count bounded by the bytes left in the file.

    The ``gguf`` reader loops over an array's declared length element by element, so one corrupted length (2^31)
    makes it build billions of empty views: gigabytes of memory and minutes before it fails. This walk does no
    allocation per element and refuses such a length at once.
    """
    # The header (keys + tensor table) is also capped, because the reader builds Python objects per array item: a
    # well-formed file with a 100-million-string array would take gigabytes before any check of ours runs.
    cap = reading.HEADER.bytes()
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pos = 0

        def over_cap(n: int) -> None:
            if pos + n > cap:
                raise reading.too_large(f"{path}: its header", None, cap, reading.HEADER, ModelFileError)

        def fail(what: str) -> ModelFileError:
            return ModelFileError(
                f"{path} is truncated or corrupt ({what} at byte {pos:,} of {size:,})",
                hint="download or convert it again",
            )

        def take(n: int, what: str) -> int:
            nonlocal pos
            if n < 0 or pos + n > size:
                raise fail(what)
            over_cap(n)
            start, pos = pos, pos + n
            return start

        def u32(what: str) -> int:
            return int(struct.unpack_from("<I", mm, take(4, what))[0])

        def u64(what: str) -> int:
            return int(struct.unpack_from("<Q", mm, take(8, what))[0])

        def value(vtype: int, depth: int) -> None:
            if vtype in _SCALAR_SIZES:
                take(_SCALAR_SIZES[vtype], "value")
            elif vtype == _STRING:
                take(u64("string length"), "string longer than the file")
            elif vtype == _ARRAY and depth < 2:
                itype, count = u32("array type"), u64("array length")
                if itype in _SCALAR_SIZES:
                    take(count * _SCALAR_SIZES[itype], f"array of {count:,} items longer than the file")
                elif itype in (_STRING, _ARRAY):
                    if count > (size - pos) // 8:
                        raise fail(f"array of {count:,} items longer than the file")
                    over_cap(8 * count)  # each item takes at least 8 bytes
                    for _ in range(count):
                        value(itype, depth + 1)
                else:
                    raise fail(f"unknown array item type {itype}")
            else:
                raise fail(f"unknown value type {vtype}")

        if size < 24:
            raise fail("header cut short")
        take(4, "magic")
        version = u32("version")
        if version not in (2, 3):
            raise fail(f"unsupported GGUF version {version}")
        n_tensors, n_kv = u64("tensor count"), u64("key count")
        if n_kv > size // 12 or n_tensors > size // 32:
            raise fail(f"{n_kv:,} keys / {n_tensors:,} tensors cannot fit")
        for _ in range(n_kv):
            take(u64("key length"), "key longer than the file")
            value(u32("value type"), 0)
        for _ in range(n_tensors):
            take(u64("tensor name length"), "tensor name longer than the file")
            n_dims = u32("dimension count")
            if not 1 <= n_dims <= 4:
                raise fail(f"a tensor with {n_dims} dimensions")
            take(8 * n_dims + 4 + 8, "tensor info")


def check_pair(text: GGUFInfo, mmproj: GGUFInfo) -> None:
    """Refuse a text model and an mmproj that do not belong together (mtmd would fail or misbehave)."""
    if text.kind != "text":
        raise ModelFileError(
            f"{text.path} is a vision projector (mmproj), not a text model",
            hint="pass it as --mmproj and the text model as --model",
        )
    if mmproj.kind != "mmproj":
        raise ModelFileError(
            f"{mmproj.path} is a text model, not a vision projector (mmproj)",
            hint="pass it as --model and the mmproj-*.gguf file as --mmproj",
        )
    if text.n_embd != mmproj.n_embd:
        raise ModelFileError(
            f"{mmproj.path.name} does not belong to {text.path.name}: the projector outputs "
            f"{mmproj.n_embd}-dim embeddings, the text model takes {text.n_embd}",
            hint="use the mmproj file published or converted with this text model",
        )


def _tensor_infos(reader: gguf.GGUFReader, path: Path, size: int) -> list[TensorInfo]:
    """Tensor infos, checked the way ggml's ``gguf_init_from_file`` checks them (llama.cpp and clip.cpp both open
    files through it): known type, 1-4 non-negative dims, rows a whole number of blocks, unique names, and each
    tensor's data exactly where the previous one ends (padded to the alignment) — then inside the file."""
    out = []
    alignment = int(reader.alignment)
    if alignment <= 0 or alignment & (alignment - 1):
        raise ModelFileError(f"{path} has alignment {alignment}, not a power of two", hint="convert it again")
    seen: set[str] = set()
    expected = 0  # where ggml expects the next tensor's data, relative to the data section
    for t in reader.tensors:
        if t.name in seen:
            raise ModelFileError(f"{path} has tensor '{t.name}' twice", hint="convert it again")
        seen.add(t.name)
        dims = [int(d) for d in t.field.parts[3]] if len(t.field.parts) > 3 else [int(d) for d in t.shape]
        if not 1 <= len(dims) <= 4 or any(d < 0 or d >= 2**62 for d in dims):
            raise ModelFileError(f"{path}: tensor '{t.name}' has impossible dimensions {dims}", hint="convert it again")
        block, _ = gguf.GGML_QUANT_SIZES[t.tensor_type]
        if dims[0] % block:
            raise ModelFileError(
                f"{path}: tensor '{t.name}' rows of {dims[0]} are not whole {t.tensor_type.name} blocks of {block}",
                hint="convert it again",
            )
        relative = int(t.data_offset) - int(reader.data_offset)
        if relative != expected:
            raise ModelFileError(
                f"{path} is corrupt: tensor '{t.name}' data is at offset {relative:,}, expected {expected:,}",
                hint="download or convert it again",
            )
        expected += -(-int(t.n_bytes) // alignment) * alignment
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ModelFileError(
                f"{path} is truncated: tensor '{t.name}' ends at byte {end:,} but the file has {size:,}",
                hint="download or convert it again",
            )
        out.append(
            TensorInfo(
                name=t.name,
                type_name=t.tensor_type.name,
                shape=tuple(int(d) for d in t.shape),
                n_elements=int(t.n_elements),
                n_bytes=int(t.n_bytes),
            )
        )
    return out


def _scalar_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every scalar and string key (arrays are skipped: the token list alone is tens of thousands of items)."""
    meta: dict[str, Any] = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or not f.types:
            continue
        vtype = f.types[0]
        if vtype == _V.ARRAY:
            continue
        if vtype == _V.STRING:
            meta[name] = bytes(f.parts[-1]).decode("utf-8", errors="replace")
        else:
            value = f.parts[-1][0]
            meta[name] = bool(value) if vtype == _V.BOOL else value.item()
    return meta


def _check_types(reader: gguf.GGUFReader, path: Path, keys: dict[str, _V], required: bool) -> None:
    for key, vtype in keys.items():
        f = reader.fields.get(key)
        if f is None:
            if required:
                raise ModelFileError(f"{path} lacks the required key '{key}'", hint="convert it again")
            continue
        if f.types[:1] != [vtype]:
            got = f.types[0].name if f.types else "?"
            raise ModelFileError(
                f"{path} has key '{key}' of type {got}, llama.cpp needs {vtype.name}",
                hint="convert it again with llava convert",
            )


def _check_byte_tokens(reader: gguf.GGUFReader, path: Path, tokens: Any) -> None:
    """Byte-fallback tokens must read ``<0xHH>``: llama.cpp parses them with substr and throws on anything else."""
    types = reader.fields.get(gguf.Keys.Tokenizer.TOKEN_TYPE)
    if types is None:
        return
    if len(types.data) != len(tokens.data):
        raise ModelFileError(
            f"{path} has {len(tokens.data)} tokens but {len(types.data)} token types", hint="convert it again"
        )
    byte_type = int(gguf.TokenType.BYTE)
    for i, (t_idx, s_idx) in enumerate(zip(types.data, tokens.data, strict=True)):
        if int(types.parts[t_idx][0]) == byte_type:
            text = bytes(tokens.parts[s_idx])
            if len(text) != 6 or not text.startswith(b"<0x") or not text.endswith(b">"):
                raise ModelFileError(f"{path}: byte token {i} reads {text!r}, not <0xHH>", hint="convert it again")


def _file_type_name(metadata: Mapping[str, Any]) -> str | None:
    value = metadata.get(gguf.Keys.General.FILE_TYPE)
    if value is None:
        return None
    try:
        name = gguf.LlamaFileType(int(value)).name
    except ValueError:
        return f"type {value}"
    return name.removeprefix("MOSTLY_").replace("ALL_", "")


def _text_info(
    reader: gguf.GGUFReader,
    path: Path,
    meta: Mapping[str, Any],
    tensors: tuple[TensorInfo, ...],
    size: int,
    arch: str,
) -> GGUFInfo:
    keys = {k.format(arch=arch): v for k, v in _TEXT_KEYS.items()}
    _check_types(reader, path, keys, required=True)
    _check_types(reader, path, {k.format(arch=arch): v for k, v in _TEXT_OPTIONAL_KEYS.items()}, required=False)
    tokens = reader.fields.get(gguf.Keys.Tokenizer.LIST)
    if tokens is None or reader.fields.get(gguf.Keys.Tokenizer.MODEL) is None:
        raise ModelFileError(f"{path} has no tokenizer (tokenizer.ggml.tokens/model)", hint="convert it again")
    n_vocab = len(tokens.data)
    _check_byte_tokens(reader, path, tokens)
    n_embd = int(meta[gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch=arch)])
    emb = next((t for t in tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        raise ModelFileError(f"{path} has no token_embd.weight tensor: not a complete text model")
    if emb.shape[:2] != (n_embd, n_vocab):
        raise ModelFileError(
            f"{path}: token_embd.weight is {list(emb.shape)} but the header says {n_embd} x {n_vocab} tokens",
            hint="convert it again",
        )
    n_head = int(meta[gguf.Keys.Attention.HEAD_COUNT.format(arch=arch)])
    if n_head == 0 or n_embd % n_head:
        raise ModelFileError(f"{path}: embedding size {n_embd} is not divisible by {n_head} heads")
    n_layer = int(meta[gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)])
    if not 1 <= n_layer <= LLAMA_MAX_LAYERS:
        # llama.cpp GGML_ASSERTs this in load_hparams: the whole process aborts.
        raise ModelFileError(f"{path}: block count {n_layer} is outside 1..{LLAMA_MAX_LAYERS}", hint="convert it again")
    names = {t.name for t in tensors}
    for i in range(n_layer):
        # llama.cpp refuses these too, but only after mapping the file, and with a less helpful message.
        for part in _TEXT_LAYER_TENSORS:
            if f"blk.{i}.{part}.weight" not in names:
                raise ModelFileError(f"{path} lacks tensor 'blk.{i}.{part}.weight'", hint="convert it again")
    if "output_norm.weight" not in names:
        raise ModelFileError(f"{path} lacks tensor 'output_norm.weight'", hint="convert it again")
    n_head_kv = int(meta.get(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch), n_head))
    if n_head_kv == 0 or n_head % n_head_kv:
        raise ModelFileError(f"{path}: {n_head} attention heads cannot share {n_head_kv} key/value heads")
    for key in (gguf.Keys.LLM.EXPERT_COUNT, gguf.Keys.LLM.EXPERT_USED_COUNT, "{arch}.nextn_predict_layers"):
        # Experts and next-token-prediction layers are asserted against the block count; LLaVA has neither.
        if meta.get(key.format(arch=arch)):
            raise ModelFileError(f"{path} has '{key.format(arch=arch)}': not a LLaVA-1.5 / BakLLaVA text model")
    return GGUFInfo(
        path=path,
        kind="text",
        architecture=arch,
        name=meta.get(gguf.Keys.General.NAME),
        file_type=_file_type_name(meta),
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ctx_train=int(meta[gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=arch)]),
        n_vocab=n_vocab,
        n_ff=int(meta[gguf.Keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch)]),
        file_size=size,
        tensors=tensors,
        metadata=meta,
    )


def _mmproj_info(
    reader: gguf.GGUFReader, path: Path, meta: Mapping[str, Any], tensors: tuple[TensorInfo, ...], size: int
) -> GGUFInfo:
    _check_types(reader, path, _MMPROJ_KEYS, required=True)
    if not meta[gguf.Keys.Clip.HAS_VISION_ENCODER]:
        raise ModelFileError(f"{path} has no vision encoder (clip.has_vision_encoder is false)")
    projector = meta[gguf.Keys.Clip.PROJECTOR_TYPE]
    if projector not in PROJECTOR_TYPES:
        raise ModelFileError(
            f"{path} has projector type '{projector}'; llava-cli runs LLaVA-1.5 projectors "
            f"({', '.join(PROJECTOR_TYPES)})"
        )
    for arr_key in (gguf.Keys.ClipVision.IMAGE_MEAN, gguf.Keys.ClipVision.IMAGE_STD):
        f = reader.fields.get(arr_key)
        if f is None or len(f.data) < 3:
            raise ModelFileError(f"{path} lacks '{arr_key}' (3 values)", hint="convert it again")
    by_name = {t.name: t for t in tensors}
    # clip.cpp dereferences these unconditionally; a missing one crashes the process.
    for required in ("mm.0.weight", "mm.2.weight", "v.patch_embd.weight", "v.position_embd.weight"):
        if required not in by_name:
            raise ModelFileError(f"{path} lacks tensor '{required}': not a LLaVA-1.5 mmproj", hint="convert it again")
    n_layer = int(meta[gguf.Keys.ClipVision.BLOCK_COUNT])
    for i in range(n_layer):
        for part in ("attn_q", "attn_k", "attn_v", "attn_out", "ffn_up", "ffn_down"):
            if f"v.blk.{i}.{part}.weight" not in by_name:
                raise ModelFileError(f"{path} lacks tensor 'v.blk.{i}.{part}.weight'", hint="convert it again")
    class_embd = by_name.get("v.class_embd")
    if class_embd is not None and class_embd.type_name != "F32":
        # ggml_concat asserts equal types during warmup: an F16 class embedding aborts the process.
        raise ModelFileError(f"{path}: v.class_embd is {class_embd.type_name}, must be F32", hint="convert it again")
    feature_layers = reader.fields.get("clip.vision.feature_layer")
    if feature_layers is not None:
        values = [int(feature_layers.parts[i][0]) for i in feature_layers.data]
        if any(v > n_layer for v in values):
            raise ModelFileError(f"{path}: feature layer {max(values)} is beyond its {n_layer} blocks")
    n_embd_v = int(meta[gguf.Keys.ClipVision.EMBEDDING_LENGTH])
    mm2 = by_name["mm.2.weight"]
    mm0 = by_name["mm.0.weight"]
    if mm0.shape[0] != n_embd_v or mm2.shape[0] != mm0.shape[1]:
        raise ModelFileError(f"{path}: projector shapes {list(mm0.shape)} / {list(mm2.shape)} do not chain")
    patch = int(meta[gguf.Keys.ClipVision.PATCH_SIZE])
    image = int(meta[gguf.Keys.ClipVision.IMAGE_SIZE])
    if patch == 0 or image % patch:
        raise ModelFileError(f"{path}: image size {image} is not a multiple of patch size {patch}")
    n_head = int(meta[gguf.Keys.ClipVision.Attention.HEAD_COUNT])
    if n_head == 0 or n_embd_v % n_head:
        raise ModelFileError(f"{path}: vision width {n_embd_v} is not divisible by {n_head} heads")
    return GGUFInfo(
        path=path,
        kind="mmproj",
        architecture=MMPROJ_ARCHITECTURE,
        name=meta.get(gguf.Keys.General.NAME),
        file_type=_file_type_name(meta),
        n_embd=int(mm2.shape[1]),
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head,
        n_ctx_train=0,
        n_vocab=0,
        n_ff=int(meta[gguf.Keys.ClipVision.FEED_FORWARD_LENGTH]),
        image_size=image,
        patch_size=patch,
        file_size=size,
        tensors=tensors,
        metadata=meta,
    )


def tensor_dtype_bytes(type_name: str) -> tuple[int, int]:
    """(block size, bytes per block) of a ggml type, from gguf's own table."""
    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return int(block), int(nbytes)


__all__ = ["GGUFInfo", "TensorInfo", "check_pair", "read_gguf", "tensor_dtype_bytes"]
