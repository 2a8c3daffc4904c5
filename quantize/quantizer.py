"""Quantize a LLaVA GGUF pair: Q4_K_M / Q6_K / Q8_0 / F16 for the text model, F16 / Q8_0 for the mmproj.

The work is done by llama.cpp's own quantizer (`llama_model_quantize`, run in a child process by
``quantize/llama_worker.py``) so the files are bit-for-bit what `llama-quantize` would write. This module is the
orchestration: find the pair, check free disk space, quantize text then mmproj, clean up on failure.

The child writes to a temporary name beside the final file (`llava_cli.atomic.atomic_path`), renamed only when
llama.cpp returns success. Free disk space is checked before anything is written, from the exact per-tensor types
llama.cpp will choose (``llava_cli/quants.py``, the rules the memory planner uses too).

The quantized text model's header records where it came from: llama.cpp copies every key of the source file and
then applies the ``kv_overrides`` of the quantize params, so we pass ``general.quantized_by`` and three
``llava_cli.quantize.*`` keys there (a header rewrite afterwards would mean a second full copy of the file).

With ``measure`` (``llava quantize --report`` passes ``llava_cli.quality.measure_quality``) the result is also scored
against the F16 source; the scorer is passed in because it runs the engine, which quantize/ may not import
(``quantize/quality.py``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from llava_cli import __version__, quants, reading
from llava_cli.atomic import atomic_path
from llava_cli.errors import (
    CheckpointError,
    InputNotFoundError,
    LlavaError,
    ModelFileError,
    OutputError,
    UsageError,
)
from llava_cli.gguf_info import GGUFInfo, check_pair, read_gguf
from llava_cli.quants import MMPROJ_TYPES, TEXT_TYPES, QuantType, parse_bits
from quantize.checkpoint import open_checkpoint
from quantize.converter import convert
from quantize.llama_worker import run_llama_quantize, size_text
from quantize.quality import MeasureFn, QualityRow

ProgressFn = Callable[[int, int], None]
StageFn = Callable[[str, str], None]


# Source tensor types llama.cpp quantizes from without `allow_requantize` (which would compound the error).
_FLOAT_TYPES = {"F32", "F16", "BF16"}
_GGUF_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT: every tensor's data is padded to this
_SOURCE_SUFFIX = re.compile(r"[.\-_](f32|f16|bf16|q\d\w*)$", re.IGNORECASE)  # x.f16, ggml-model-f16


@dataclass(frozen=True)
class QuantizeResult:
    """What `quantize` wrote. ``predicted_size`` is the text file size llama.cpp's type choice implies."""

    text_path: Path
    mmproj_path: Path
    bits: str
    mmproj_bits: str
    source: str
    text_size: int
    mmproj_size: int
    bits_per_weight: float
    predicted_size: int
    seconds: float
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> tensor count (text)
    report: list[QualityRow] | None = None

    def as_dict(self) -> dict[str, Any]:
        d = {
            "text_path": str(self.text_path),
            "mmproj_path": str(self.mmproj_path),
            "bits": self.bits,
            "mmproj_bits": self.mmproj_bits,
            "source": self.source,
            "text_size": self.text_size,
            "mmproj_size": self.mmproj_size,
            "bits_per_weight": round(self.bits_per_weight, 3),
            "predicted_size": self.predicted_size,
            "seconds": round(self.seconds, 2),
            "tensor_types": self.tensor_types,
        }
        if self.report is not None:
            d["report"] = [r.__dict__ for r in self.report]
        return d


# ------------------------------------------------------------------------------------ llama.cpp's type choice


def predict_types(info: GGUFInfo, qtype: QuantType) -> dict[str, gguf.GGMLQuantizationType]:
    """The ggml type llama.cpp's quantizer gives each tensor of `info` for `qtype` (Q4_K_M mixes types): the
    shared rules of ``llava_cli/quants.py``, fed this file's tensors."""
    tensors = [(t.name, t.shape, gguf.GGMLQuantizationType[t.type_name]) for t in info.tensors]
    if info.kind != "text":
        return quants.predict_types(tensors, qtype, n_layer=0)
    is_70b = quants.is_70b(info.n_layer, info.n_head, info.n_head_kv or info.n_head)
    return quants.predict_types(tensors, qtype, n_layer=info.n_layer, is_70b=is_70b)


def _pad(n: int) -> int:
    return (n + _GGUF_ALIGNMENT - 1) // _GGUF_ALIGNMENT * _GGUF_ALIGNMENT


def predict_size(info: GGUFInfo, qtype: QuantType) -> int:
    """File size llama.cpp will write: the source's header plus every tensor at its predicted type, padded."""
    header = info.file_size - sum(_pad(t.n_bytes) for t in info.tensors)
    types = predict_types(info, qtype)
    return header + sum(_pad(quants.tensor_bytes(types[t.name], t.shape)) for t in info.tensors)


# -------------------------------------------------------------------------------------------------- helpers


def _quantized_tensors(info: GGUFInfo) -> list[str]:
    return sorted({t.type_name for t in info.tensors if t.type_name not in _FLOAT_TYPES})


def _refuse_quantized(info: GGUFInfo, role: str) -> None:
    """llama.cpp only requantizes with `allow_requantize`, and the errors compound: ask for the float file."""
    types = _quantized_tensors(info)
    if types:
        label = info.file_type or "/".join(types)
        raise ModelFileError(
            f"{info.path} is already quantized ({label}); quantizing a {role} twice compounds the rounding error",
            hint="quantize from the F16 (or F32/BF16) GGUF, or from the Hugging Face checkpoint",
        )


def _model_name(path: Path) -> str:
    """``llava-1.5-7b.f16.gguf`` -> ``llava-1.5-7b`` (the part our outputs are named after)."""
    return _SOURCE_SUFFIX.sub("", path.name.removesuffix(".gguf")) or path.stem


def find_mmproj(text: GGUFInfo) -> GGUFInfo:
    """The ``mmproj-*.gguf`` beside a text GGUF that belongs to it (same name preferred, float preferred)."""
    folder = text.path.parent
    found = sorted(folder.glob("mmproj-*.gguf"))
    candidates = [p for p in found if p.is_file()]
    if not candidates and found:  # a FIFO, device or folder with the right name: say what it is
        reading.require_regular(
            found[0], what="an mmproj file", error=ModelFileError, hint="replace it with the mmproj"
        )
    if not candidates:
        raise InputNotFoundError(
            f"no mmproj-*.gguf beside {text.path}: a LLaVA text model needs its vision projector",
            hint="put the mmproj next to the text model (as `llava convert` writes it), or quantize the checkpoint",
        )
    name = _model_name(text.path)

    def rank(p: Path) -> tuple[int, int, str]:
        same = _model_name(Path(p.name.removeprefix("mmproj-"))) == name
        is_float = bool(re.search(r"[.\-_](f32|f16|bf16)\.gguf$", p.name, re.IGNORECASE))
        return (0 if same else 1, 0 if is_float else 1, p.name)

    errors: list[str] = []
    for path in sorted(candidates, key=rank):
        try:
            info = read_gguf(path, expect="mmproj")
            check_pair(text, info)
        except LlavaError as exc:
            errors.append(str(exc))
            continue
        return info
    raise ModelFileError(
        f"none of the mmproj files beside {text.path.name} belongs to it ({errors[0]})",
        hint="put the mmproj converted with this model next to it",
    )


def _check_free_space(out_dir: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(out_dir).free
    # A margin for the header rewrite and for anything else writing to the same disk meanwhile.
    if free < needed * 1.02 + 16 * 2**20:
        raise OutputError(
            f"not enough free space in {out_dir} for {what}: needs about {size_text(needed)}, {size_text(free)} free",
            hint="free some space or choose another --out",
        )


def _existing_dir(path: Path) -> Path:
    """The nearest existing ancestor (for disk_usage before the output directory is created)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def _header_kv(source: str, qtype: QuantType) -> dict[str, str]:
    try:
        from importlib.metadata import version

        lcp = version("llama-cpp-python")
    except Exception:  # not installed as a distribution (a source checkout on sys.path)
        lcp = "unknown"
    return {
        gguf.Keys.General.QUANTIZED_BY: f"llava-cli {__version__}",
        "llava_cli.quantize.source": source[-127:],
        "llava_cli.quantize.type": qtype.label,
        "llava_cli.quantize.tool": f"llava-cli {__version__} / llama-cpp-python {lcp} llama_model_quantize",
    }


def _quantize_file(
    info: GGUFInfo,
    final: Path,
    qtype: QuantType,
    *,
    source_label: str,
    on_progress: ProgressFn | None,
) -> None:
    """Quantize one GGUF (text or mmproj) to `final`, atomically."""
    if final.resolve() == info.path.resolve():
        raise UsageError(
            f"the output {final} would overwrite its source",
            hint="choose another --out",
        )
    f16_pins = [
        t.name
        for t in info.tensors
        if quants.allows_quantization(t.name, t.shape) and quants.needs_f16_pin(t.shape[0], qtype.default_type)
    ]
    with atomic_path(final) as tmp:
        run_llama_quantize(
            info.path,
            tmp,
            qtype,
            kv=_header_kv(source_label, qtype),
            f16_tensors=f16_pins,
            on_progress=on_progress,
            final=final,
        )


def _copy_file(src: Path, final: Path, on_progress: ProgressFn | None) -> None:
    total = src.stat().st_size
    done = 0
    with atomic_path(final) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
        while chunk := fin.read(16 * 2**20):
            fout.write(chunk)
            done += len(chunk)
            if on_progress:
                on_progress(done, total)


@dataclass
class _Source:
    text: GGUFInfo
    mmproj: GGUFInfo
    name: str
    label: str  # recorded in the header


def _is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _checkpoint_elements(path: Path) -> int:
    """Parameter count of a checkpoint, from its validated safetensors headers (no weights read).

    Goes through `open_checkpoint` so a corrupt header is the converter's one-line CheckpointError, not a
    MemoryError from a 2^50-byte header length."""
    return sum(ref.n_elements for ref in open_checkpoint(path).tensors.values())


def _open_gguf_source(path: Path) -> _Source:
    text = read_gguf(path)
    if text.kind == "mmproj":
        raise ModelFileError(
            f"{path} is a vision projector (mmproj), not a LLaVA text model",
            hint="pass the text model .gguf; the mmproj-*.gguf beside it is quantized along with it",
        )
    _refuse_quantized(text, "model")
    mmproj = find_mmproj(text)
    return _Source(text=text, mmproj=mmproj, name=_model_name(path), label=path.name)


def quantize(
    source: str | os.PathLike[str],
    *,
    bits: str = "q4_k_m",
    mmproj_bits: str = "f16",
    out: str | os.PathLike[str] | None = None,
    on_progress: ProgressFn | None = None,
    measure: MeasureFn | None = None,
    on_stage: StageFn | None = None,
) -> QuantizeResult:
    """Quantize a LLaVA model to ``<model>.<bits>.gguf`` + ``mmproj-<model>.<mmproj_bits>.gguf`` in `out`.

    `source` is a Hugging Face checkpoint directory (converted to F16 in a temporary directory first) or an
    F16/F32/BF16 text GGUF with its ``mmproj-*.gguf`` beside it (``llava_cli/resolve.py: quantize_source`` turns
    the command's SOURCE, a catalog id included, into one of these). `out` defaults to the source GGUF's
    directory; a checkpoint needs it.
    ``on_stage(description, unit)`` announces each step; ``on_progress(done, total)`` then counts its tensors
    (bytes while converting or copying). ``measure`` (e.g. ``llava_cli.quality.measure_quality``) also scores the
    quantized pair against the F16 source: its rows become ``result.report``.
    """
    qtype = parse_bits(bits, TEXT_TYPES)
    mtype = parse_bits(mmproj_bits, MMPROJ_TYPES, "--mmproj-bits")
    started = time.monotonic()
    src = Path(source).expanduser()
    if not src.exists():
        raise InputNotFoundError(f"{source}: no such file or directory")
    if src.is_dir() and not _is_checkpoint(src):
        raise CheckpointError(
            f"{src} has no config.json: not a Hugging Face checkpoint directory",
            hint="pass a llava-hf checkpoint directory or a text-model .gguf file",
        )
    if src.is_file() and src.suffix.lower() != ".gguf":
        raise ModelFileError(f"{src} is not a .gguf file or a checkpoint directory")

    if src.is_dir():
        if out is None:
            raise UsageError("quantizing a checkpoint needs an output directory", hint="e.g. --out models/")
        out_dir = Path(out).expanduser()
        return _quantize_checkpoint(src, qtype, mtype, out_dir, on_progress, on_stage, measure, started)
    gsrc = _open_gguf_source(src)
    out_dir = Path(out).expanduser() if out is not None else src.parent
    return _quantize_pair(gsrc, qtype, mtype, out_dir, on_progress, on_stage, measure, started)


def _quantize_checkpoint(
    ckpt: Path,
    qtype: QuantType,
    mtype: QuantType,
    out_dir: Path,
    on_progress: ProgressFn | None,
    on_stage: StageFn | None,
    measure: MeasureFn | None,
    started: float,
) -> QuantizeResult:
    name = ckpt.resolve().name
    if re.fullmatch(r"[0-9a-f]{40}", name):  # a hub snapshot dir: name it after the repo instead
        name = ckpt.resolve().parents[1].name.removeprefix("models--").split("--")[-1]
    name = name.removesuffix("-hf")
    # The F16 intermediate (2 bytes per weight) and the final files must fit side by side.
    n = _checkpoint_elements(ckpt)
    nominal_bpw = {"q4_k_m": 4.9, "q6_k": 6.6, "q8_0": 8.5, "f16": 16.0}[qtype.name]
    _check_free_space(_existing_dir(out_dir), int(n * 2 + n * nominal_bpw / 8), f"converting {ckpt.name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    # The intermediate lives under `out` (same disk we checked) in a hidden directory removed on any exit.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".llava-quantize-") as tmp:
        if on_stage:
            on_stage(f"converting {ckpt.name} to F16", "bytes")  # the converter counts bytes written
        converted = convert(ckpt, tmp, outtype="f16", name=name, on_progress=on_progress)
        text = read_gguf(converted.text_path, expect="text")
        mmproj = read_gguf(converted.mmproj_path, expect="mmproj")
        gsrc = _Source(text=text, mmproj=mmproj, name=name, label=f"{ckpt.name} (checkpoint)")
        return _quantize_pair(gsrc, qtype, mtype, out_dir, on_progress, on_stage, measure, started)


def _quantize_pair(
    src: _Source,
    qtype: QuantType,
    mtype: QuantType,
    out_dir: Path,
    on_progress: ProgressFn | None,
    on_stage: StageFn | None,
    measure: MeasureFn | None,
    started: float,
) -> QuantizeResult:
    text_final = out_dir / f"{src.name}.{qtype.name}.gguf"
    mmproj_final = out_dir / f"mmproj-{src.name}.{mtype.name}.gguf"
    predicted = predict_size(src.text, qtype)
    mmproj_same = _mmproj_is_already(src.mmproj, mtype)
    if not mmproj_same:
        _refuse_quantized(src.mmproj, "vision projector")
    mmproj_needed = src.mmproj.file_size if mmproj_same else predict_size(src.mmproj, mtype)
    if mmproj_same and mmproj_final.resolve() == src.mmproj.path.resolve():
        mmproj_needed = 0
    _check_free_space(_existing_dir(out_dir), predicted + mmproj_needed, f"{text_final.name} and {mmproj_final.name}")

    if on_stage:
        on_stage(f"quantizing {src.text.path.name} to {qtype.label}", "tensors")
    _quantize_file(src.text, text_final, qtype, source_label=src.label, on_progress=on_progress)
    try:
        if mmproj_same:
            if mmproj_final.resolve() != src.mmproj.path.resolve():
                if on_stage:
                    on_stage(f"copying {src.mmproj.path.name}", "bytes")
                _copy_file(src.mmproj.path, mmproj_final, on_progress)
        else:
            if on_stage:
                on_stage(f"quantizing {src.mmproj.path.name} to {mtype.label}", "tensors")
            _quantize_file(src.mmproj, mmproj_final, mtype, source_label=src.mmproj.path.name, on_progress=on_progress)
    except BaseException:
        # Half a pair is not a usable model: take the text file back out too.
        with contextlib.suppress(FileNotFoundError):
            text_final.unlink()
        raise
    text_info = read_gguf(text_final, expect="text")
    mmproj_info = read_gguf(mmproj_final, expect="mmproj")
    counts: dict[str, int] = {}
    for t in text_info.tensors:
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
    rows = None
    if measure is not None:
        if on_stage:
            on_stage("measuring quality against F16", "inputs")
        rows = measure(
            src.text.path,
            src.mmproj.path,
            {(qtype.name, mtype.name): (text_final, mmproj_final)},
            on_progress=on_progress,
        )
    return QuantizeResult(
        text_path=text_final,
        mmproj_path=mmproj_final,
        bits=qtype.name,
        mmproj_bits=mtype.name,
        source=src.label,
        text_size=text_info.file_size,
        mmproj_size=mmproj_info.file_size,
        bits_per_weight=text_info.bits_per_weight,
        predicted_size=predicted,
        seconds=time.monotonic() - started,
        tensor_types=counts,
        report=rows,
    )


def _mmproj_is_already(info: GGUFInfo, mtype: QuantType) -> bool:
    """True when the mmproj's matmul weights are already in the requested type (then we copy it)."""
    types = predict_types(info, mtype)
    return all(gguf.GGMLQuantizationType[t.type_name] == types[t.name] for t in info.tensors)
