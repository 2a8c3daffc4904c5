"""`convert()`: a llava-hf checkpoint directory -> text GGUF + mmproj GGUF, streamed one tensor at a time.

Stages: open and validate the checkpoint (config, every tensor present with the right shape, vocabulary) ->
typed metadata, checked -> tensor infos -> write both files under temporary names, each tensor read, cast and
written before the next is read (peak memory ~ the largest tensor) -> rename both only when both are complete.
The output bytes depend only on the input and the options (convert twice -> identical files).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from llava_cli.atomic import atomic_path, output_error
from llava_cli.errors import ModelFileError, UsageError
from llava_cli.quants import ALL_TYPES, parse_bits
from quantize.checkpoint import TensorPlan, open_checkpoint
from quantize.mmproj import DEFAULT_VISION_LAYOUT, VISION_LAYOUTS, add_mmproj_metadata, mmproj_tensors
from quantize.text_model import add_text_metadata, load_vocab, text_tensors

OUTTYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class ConvertResult:
    text_path: Path
    mmproj_path: Path
    name: str
    outtype: str
    vision_layout: str
    n_bytes: int
    seconds: float


def output_names(name: str, outtype: str) -> tuple[str, str]:
    """File names of a converted pair: ``<name>.<outtype>.gguf`` and ``mmproj-<name>.<outtype>.gguf``."""
    return f"{name}.{outtype}.gguf", f"mmproj-{name}.{outtype}.gguf"


def convert(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    outtype: str = "f16",
    name: str | None = None,
    on_progress: ProgressFn | None = None,
    vision_layout: str = DEFAULT_VISION_LAYOUT,
) -> ConvertResult:
    """Convert the llava-hf checkpoint in `checkpoint` into a GGUF pair in the directory `out`.

    ``outtype`` is "f16" or "f32" (1-D tensors, the class and position embeddings stay F32 either way);
    ``name`` defaults to the checkpoint folder's name; ``on_progress(bytes_done, bytes_total)`` is called
    after every tensor. ``vision_layout`` is one of ``quantize.mmproj.VISION_LAYOUTS`` (see there).
    Raises CheckpointError / InputNotFoundError for bad input, OutputError when `out` cannot be written.
    """
    # The one --bits parser, so `--outtype fp16` works here as it does for run and quantize.
    outtype = parse_bits(outtype, {k: ALL_TYPES[k] for k in OUTTYPES}, "--outtype").name
    if vision_layout not in VISION_LAYOUTS:
        raise UsageError(f"--vision-layout {vision_layout!r} is not supported; choose {', '.join(VISION_LAYOUTS)}")
    start = time.perf_counter()
    ckpt = open_checkpoint(checkpoint)
    name = name or ckpt.path.resolve().name
    ftype = int(OUTTYPES[outtype])

    vocab = load_vocab(ckpt.path, ckpt.tensors["model.embed_tokens.weight"].shape[0])
    text_writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    add_text_metadata(text_writer, ckpt, vocab, name=name, ftype=ftype)
    text_plans = text_tensors(ckpt, outtype=outtype)
    mm_writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    add_mmproj_metadata(mm_writer, ckpt, name=name, ftype=ftype, vision_layout=vision_layout)
    mm_plans = mmproj_tensors(ckpt, outtype=outtype, vision_layout=vision_layout)
    for writer in (text_writer, mm_writer):
        check_kv_types(writer)

    out_dir = Path(out)
    text_name, mm_name = output_names(name, outtype)
    total = sum(p.nbytes for p in text_plans) + sum(p.nbytes for p in mm_plans)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if on_progress is not None:
            on_progress(done, total)

    if on_progress is not None:
        on_progress(0, total)
    # Both temp files are renamed only after both are complete (the inner context renames first): an error or
    # Ctrl-C anywhere leaves neither final name behind.
    with ExitStack() as stack:
        text_tmp = stack.enter_context(atomic_path(out_dir / text_name))
        mm_tmp = stack.enter_context(atomic_path(out_dir / mm_name))
        _write_gguf(text_writer, text_plans, text_tmp, advance)
        _write_gguf(mm_writer, mm_plans, mm_tmp, advance)
    return ConvertResult(
        text_path=out_dir / text_name,
        mmproj_path=out_dir / mm_name,
        name=name,
        outtype=outtype,
        vision_layout=vision_layout,
        n_bytes=total,
        seconds=time.perf_counter() - start,
    )


def _write_gguf(writer: gguf.GGUFWriter, plans: list[TensorPlan], path: Path, advance: Callable[[int], None]) -> None:
    """Header, KV and tensor infos first, then each tensor's data in the same order (gguf's streaming API)."""
    for plan in plans:
        writer.add_tensor_info(plan.name, plan.shape, plan.np_dtype, plan.nbytes)
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for plan in plans:
            data = np.ascontiguousarray(plan.load(), dtype=plan.np_dtype)
            if data.shape != plan.shape:
                raise ModelFileError(f"internal: tensor {plan.name} came out as {data.shape}, expected {plan.shape}")
            writer.write_tensor_data(data)
            advance(plan.nbytes)
            del data
    except OSError as exc:
        raise output_error(exc, path) from exc
    finally:
        writer.close()


def check_kv_types(writer: gguf.GGUFWriter) -> None:
    """Refuse a key whose Python value does not fit its declared GGUF type before anything is written.

    llama.cpp asserts scalar types when reading (a wrong one aborts the process) and gguf's writer checks
    nothing (llama.cpp issue #9095), so a bad value must be caught here."""
    vt = gguf.GGUFValueType
    for key, val in writer.kv_data[0].items():
        ok = _value_ok(val.value, val.type)
        if val.type == vt.ARRAY:
            items = list(val.value)
            kinds = {type(x) for x in items}
            ok = bool(items) and len(kinds) == 1 and kinds.pop() in (str, float, int, bool)
        if not ok:
            raise ModelFileError(f"internal: GGUF key {key} has value {val.value!r} not valid as {val.type.name}")


def _value_ok(value: object, vtype: gguf.GGUFValueType) -> bool:
    vt = gguf.GGUFValueType
    ranges = {
        vt.UINT8: (0, 2**8),
        vt.UINT16: (0, 2**16),
        vt.UINT32: (0, 2**32),
        vt.UINT64: (0, 2**64),
        vt.INT8: (-(2**7), 2**7),
        vt.INT16: (-(2**15), 2**15),
        vt.INT32: (-(2**31), 2**31),
        vt.INT64: (-(2**63), 2**63),
    }
    if vtype in ranges:
        lo, hi = ranges[vtype]
        return type(value) is int and lo <= value < hi
    if vtype in (vt.FLOAT32, vt.FLOAT64):
        return type(value) is float and np.isfinite(value)
    if vtype == vt.BOOL:
        return type(value) is bool
    if vtype == vt.STRING:
        return isinstance(value, str) and value != ""
    return vtype == vt.ARRAY
