"""Quantize a LLaVA GGUF pair: Q4_K_M / Q6_K / Q8_0 / F16 for the text model, F16 / Q8_0 for the mmproj.

The work is done by llama.cpp's own quantizer (`llama_model_quantize` through llama-cpp-python) so the files are
bit-for-bit what `llama-quantize` would write. It runs in a child process, for three reasons:

* progress: llama.cpp logs one ``[  i/  n] tensor-name ...`` line per tensor through its log callback; the child
  forwards the log to a pipe and the parent turns those lines into ``on_progress(i, n)``;
* Ctrl-C: the C call cannot be interrupted from Python, but a child process can be killed;
* safety: a crash inside llama.cpp (an abort, a SIGILL from a bad build) becomes a one-line error, not a dead CLI.

The child writes to a temporary name beside the final file (`llava_cli.atomic.atomic_path`), renamed only when
llama.cpp returns success. Free disk space is checked before anything is written, from the exact per-tensor types
llama.cpp will choose (`predict_types`, a port of ``llama_tensor_get_type`` in ``src/llama-quant.cpp``).

The quantized text model's header records where it came from: llama.cpp copies every key of the source file and
then applies the ``kv_overrides`` of the quantize params, so we pass ``general.quantized_by`` and three
``llava_cli.quantize.*`` keys there (a header rewrite afterwards would mean a second full copy of the file).

`measure_quality` compares quantized pairs with the F16 pair on fixed image + prompt inputs (mean KL divergence of
the next-token distributions over an answer, top-1 agreement); `llava quantize --report` and
``bench/bench_quality.py`` both use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from llava_cli import __version__
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

ProgressFn = Callable[[int, int], None]
StageFn = Callable[[str, str], None]

_QT = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class QuantType:
    """One ``--bits`` choice: the llama.cpp file type (``llama_ftype``) and its default tensor type."""

    name: str  # as written in file names: q4_k_m
    label: str  # as shown to people and recorded in the header: Q4_K_M
    ftype: int  # llama_ftype (gguf.LlamaFileType has the same numbers)
    default_type: gguf.GGMLQuantizationType


TEXT_TYPES: dict[str, QuantType] = {
    q.name: q
    for q in (
        QuantType("q4_k_m", "Q4_K_M", gguf.LlamaFileType.MOSTLY_Q4_K_M, _QT.Q4_K),
        QuantType("q6_k", "Q6_K", gguf.LlamaFileType.MOSTLY_Q6_K, _QT.Q6_K),
        QuantType("q8_0", "Q8_0", gguf.LlamaFileType.MOSTLY_Q8_0, _QT.Q8_0),
        QuantType("f16", "F16", gguf.LlamaFileType.MOSTLY_F16, _QT.F16),
    )
}
# The vendored clip loader runs any ggml type in its matmuls, but quality drops fast below 8 bits for the
# vision tower (llama.cpp's tools/quantize/README.md), so only these two are offered.
MMPROJ_TYPES: dict[str, QuantType] = {k: TEXT_TYPES[k] for k in ("f16", "q8_0")}

# Source tensor types llama.cpp quantizes from without `allow_requantize` (which would compound the error).
_FLOAT_TYPES = {"F32", "F16", "BF16"}
_GGUF_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT: every tensor's data is padded to this
_SOURCE_SUFFIX = re.compile(r"[.\-_](f32|f16|bf16|q\d\w*)$", re.IGNORECASE)  # x.f16, ggml-model-f16
_LOG_TENSOR = re.compile(rb"\[\s*(\d+)/\s*(\d+)\]")
_LOG_FAILED = re.compile(rb"failed to quantize: ([^\n]*)")


@dataclass(frozen=True)
class QualityRow:
    """One line of the quality table: a quantization compared with F16 on the same inputs."""

    bits: str
    mmproj_bits: str
    file_size: int  # text model + mmproj, bytes
    text_size: int
    bits_per_weight: float  # text model tensors
    mean_kl: float  # mean KL(F16 || quant) of the next-token distribution, nats
    top1_agreement: float  # fraction of positions where the argmax token agrees with F16
    positions: int
    reference_entropy: float = 0.0  # mean entropy of the F16 distributions (nats): how peaked the model is


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


# --------------------------------------------------------------------------------------------------- choices


def parse_bits(value: str, choices: dict[str, QuantType] = TEXT_TYPES, flag: str = "--bits") -> QuantType:
    """``Q4_K_M``, ``q4_k_m``, ``Q4-K-M`` -> the QuantType; anything else is a UsageError listing the choices."""
    key = str(value).strip().lower().replace("-", "_")
    if key in choices:
        return choices[key]
    raise UsageError(
        f"unknown {flag} value '{value}': choose one of {', '.join(choices)}",
        hint=f"for example {flag} {next(iter(choices))}",
    )


# ------------------------------------------------------------------------------------ llama.cpp's type choice


def _qtype(name: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[name]


def _layer_of(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """`tensor_allows_quantization` (llama-quant.cpp), for the tensor names a LLaVA pair contains."""
    if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return False
    excluded = ("ffn_gate_inp.weight", "attn_rel_b.weight", ".position_embd", ".patch_embd", "ssm_conv1d")
    return not any(part in name for part in excluded) and name not in ("position_embd.weight", "token_types.weight")


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _fallback(ncols: int, qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """`tensor_type_fallback`: a row length the block size does not divide gets a smaller-block type."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if ncols % block == 0:
        return qtype
    fallback = {_QT.Q4_K: _QT.Q5_0, _QT.Q5_K: _QT.Q5_1, _QT.Q6_K: _QT.Q8_0}.get(qtype, _QT.F16)
    return fallback if ncols % gguf.GGML_QUANT_SIZES[fallback][0] == 0 else _QT.F16


def _needs_f16_override(ncols: int, qtype: gguf.GGMLQuantizationType) -> bool:
    """Row lengths llama.cpp has no fallback for (Q8_0 with ncols % 32 != 0 throws): we pin those to F16."""
    return qtype == _QT.Q8_0 and ncols % 32 != 0


def predict_types(info: GGUFInfo, qtype: QuantType) -> dict[str, gguf.GGMLQuantizationType]:
    """The ggml type llama.cpp's quantizer gives each tensor of `info` for `qtype` (Q4_K_M mixes types).

    A port of ``llama_tensor_get_type`` for the architectures we handle (``llama`` text models, ``clip``
    projectors): tensors are visited in llama.cpp's order (by layer, then name) because the Q4_K_M rule for
    ``attn_v`` counts them.
    """
    tensors = sorted(info.tensors, key=lambda t: (_layer_of(t.name), t.name))
    has_output = any(t.name == "output.weight" for t in tensors)
    n_attn_v = sum("attn_v.weight" in t.name for t in tensors)
    n_layer = info.n_layer if info.kind == "text" else 0
    is_70b = info.kind == "text" and n_layer == 80 and info.n_head != info.n_head_kv
    i_attn_v = i_ffn_down = 0
    out: dict[str, gguf.GGMLQuantizationType] = {}
    for t in tensors:
        current = _qtype(t.type_name)
        if not _allows_quantization(t.name, t.shape):
            out[t.name] = current
            continue
        new = qtype.default_type
        if new in (_QT.F16, _QT.F32, _QT.BF16):  # not a quantized type: no mixing rules, no fallbacks
            out[t.name] = new
            continue
        ncols = t.shape[0]
        if _needs_f16_override(ncols, new):
            out[t.name] = _QT.F16
            continue
        q4km = qtype.name == "q4_k_m"
        if t.name == "output.weight" or (not has_output and t.name == "token_embd.weight"):
            if ncols % gguf.GGML_QUANT_SIZES[new][0] != 0:
                new = _QT.Q8_0
            elif new != _QT.Q8_0:
                new = _QT.Q6_K
        elif t.name == "token_embd.weight":
            pass
        elif "attn_v.weight" in t.name:
            if q4km and _use_more_bits(i_attn_v, n_attn_v):
                new = _QT.Q6_K
            if is_70b and new == _QT.Q4_K:
                new = _QT.Q5_K
            i_attn_v += 1
        elif "ffn_down" in t.name:
            if q4km and _use_more_bits(i_ffn_down, n_layer):
                new = _QT.Q6_K
            i_ffn_down += 1
        out[t.name] = _fallback(ncols, new)
    return out


def tensor_bytes(shape: Sequence[int], qtype: gguf.GGMLQuantizationType) -> int:
    """Bytes of one tensor stored as `qtype` (ggml shape: ne0 = row length first)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = math.prod(shape[1:]) if len(shape) > 1 else 1
    return rows * (shape[0] // block) * size


def _pad(n: int) -> int:
    return (n + _GGUF_ALIGNMENT - 1) // _GGUF_ALIGNMENT * _GGUF_ALIGNMENT


def predict_size(info: GGUFInfo, qtype: QuantType) -> int:
    """File size llama.cpp will write: the source's header plus every tensor at its predicted type, padded."""
    header = info.file_size - sum(_pad(t.n_bytes) for t in info.tensors)
    types = predict_types(info, qtype)
    return header + sum(_pad(tensor_bytes(t.shape, types[t.name])) for t in info.tensors)


# ---------------------------------------------------------------------------------------- the child process


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this worker when `llava quantize` dies (kill -9 included), so llama.cpp does not
    go on writing a temp file for minutes. Linux only (prctl PR_SET_PDEATHSIG); elsewhere the worker finishes."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.getppid() != parent_pid:  # the parent was already gone before prctl took effect
        os._exit(1)


def _worker_main() -> None:
    """Entry point of the child: quantize argv[1]'s JSON job, log to stdout, exit with llama.cpp's status."""
    job = json.loads(sys.argv[1])
    _die_with_parent(job["parent"])
    import llama_cpp  # imported here: the parent never loads libllama just to quantize

    out = sys.stdout.buffer

    @llama_cpp.llama_log_callback
    def _log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        out.write(text)
        out.flush()

    llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = job["ftype"]
    params.nthread = job["nthread"]
    kv = job["kv"]
    overrides = (llama_cpp.llama_model_kv_override * (len(kv) + 1))()  # zeroed last entry ends the list
    for slot, (key, value) in zip(overrides, kv.items(), strict=False):
        slot.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
        slot.key = key.encode()
        slot.value.val_str = value.encode()[:127]
    params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    pins = job["f16_tensors"]
    if pins:
        tt = (llama_cpp.llama_model_tensor_override * (len(pins) + 1))()
        for slot, name in zip(tt, pins, strict=False):
            slot.pattern = f"^{re.escape(name)}$".encode()
            slot.type = int(_QT.F16)
        params.tt_overrides = ctypes.cast(tt, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    rc = llama_cpp.llama_model_quantize(job["src"].encode(), job["dst"].encode(), ctypes.byref(params))
    out.flush()
    os._exit(int(rc))  # skip interpreter teardown: nothing left to flush, and it is faster


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _run_llama_quantize(
    src: Path,
    dst: Path,
    qtype: QuantType,
    *,
    kv: dict[str, str],
    f16_tensors: list[str],
    on_progress: ProgressFn | None,
    final: Path | None = None,
) -> None:
    """Run llama_model_quantize(src -> dst) in a child process; raise a one-line error if it fails.

    `final` is the name `dst` will be renamed to, for messages (dst itself is a hidden temporary name).
    """
    job = {
        "parent": os.getpid(),
        "src": str(src),
        "dst": str(dst),
        "ftype": int(qtype.ftype),
        "nthread": _cpu_count(),
        "kv": kv,
        "f16_tensors": f16_tensors,
    }
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-c", "from quantize.quantizer import _worker_main; _worker_main()", json.dumps(job)]
    # A new session: Ctrl-C in the terminal reaches only us, and we decide to kill the child.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
    )
    tail: deque[bytes] = deque(maxlen=40)
    try:
        assert proc.stdout is not None
        buf = b""
        while chunk := os.read(proc.stdout.fileno(), 65536):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                tail.append(line)
                m = _LOG_TENSOR.search(line)
                if m and on_progress is not None:
                    on_progress(int(m.group(1)), int(m.group(2)))
        if buf:
            tail.append(buf)
        rc = proc.wait()
    except BaseException:
        # Ctrl-C or an error in a progress callback: stop llama.cpp now; atomic_path removes the partial file.
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        raise
    if rc == 0:
        return
    log = b"\n".join(tail)
    failed = _LOG_FAILED.search(log)
    if rc < 0:
        try:
            sig = signal.Signals(-rc).name
        except ValueError:
            sig = f"signal {-rc}"
        why = f"llama.cpp crashed ({sig})"
        hint = (
            "an illegal instruction means llama-cpp-python was built for another CPU: reinstall it with "
            'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --force-reinstall --no-cache-dir llama-cpp-python'
            if sig == "SIGILL"
            else "set LLAVA_DEBUG=1 and run again to see llama.cpp's log"
        )
    else:
        why = failed.group(1).decode(errors="replace").strip() if failed else "llama_model_quantize failed"
        hint = None
    if os.environ.get("LLAVA_DEBUG") == "1":
        sys.stderr.write(log.decode(errors="replace") + "\n")
    if "iostream error" in why or "No space" in why:
        free = shutil.disk_usage(dst.parent).free
        raise OutputError(
            f"could not write {final or dst}: disk full ({_size(free)} free)",
            hint="free some space or choose another --out",
        )
    raise ModelFileError(f"quantizing {src.name} to {qtype.label} failed: {why}", hint=hint)


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
    candidates = sorted(p for p in folder.glob("mmproj-*.gguf") if p.is_file())
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
            f"not enough free space in {out_dir} for {what}: needs about {_size(needed)}, {_size(free)} free",
            hint="free some space or choose another --out",
        )


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


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
        if _allows_quantization(t.name, t.shape) and _needs_f16_override(t.shape[0], qtype.default_type)
    ]
    with atomic_path(final) as tmp:
        _run_llama_quantize(
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


# ---------------------------------------------------------------------------------------------- the command


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
    from quantize.checkpoint import open_checkpoint

    return sum(ref.n_elements for ref in open_checkpoint(path).tensors.values())


def _catalog_checkpoint(model_id: str) -> Path:
    """A catalog id whose Hugging Face checkpoint is already in the local hub cache -> its snapshot dir."""
    from llava_cli import catalog, hub

    entry = catalog.load_catalog().get(model_id)  # an unknown id: UsageError listing the catalog ids
    if not entry.checkpoint:
        raise UsageError(
            f"catalog model {model_id} has no Hugging Face checkpoint to quantize from",
            hint="pass a checkpoint directory or an F16 .gguf file",
        )
    return hub.download_checkpoint(entry.checkpoint, fix=f"huggingface-cli download {entry.checkpoint}", download=False)


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
    report: bool = False,
    on_stage: StageFn | None = None,
) -> QuantizeResult:
    """Quantize a LLaVA model to ``<model>.<bits>.gguf`` + ``mmproj-<model>.<mmproj_bits>.gguf`` in `out`.

    `source` is a Hugging Face checkpoint directory (converted to F16 in a temporary directory first), an
    F16/F32/BF16 text GGUF with its ``mmproj-*.gguf`` beside it, or a catalog id whose checkpoint is in the local
    hub cache. `out` defaults to the source GGUF's directory (the models directory for a checkpoint).
    ``on_stage(description, unit)`` announces each step; ``on_progress(done, total)`` then counts its tensors
    (bytes while converting or copying). ``report=True`` also measures quality against F16 (`measure_quality`).
    """
    qtype = parse_bits(bits)
    mtype = parse_bits(mmproj_bits, MMPROJ_TYPES, "--mmproj-bits")
    started = time.monotonic()
    src = Path(source).expanduser()
    if not src.exists():
        looks_like_path = os.sep in str(source) or str(source).endswith(".gguf") or str(source).startswith(".")
        if looks_like_path:
            raise InputNotFoundError(f"{source}: no such file or directory")
        src = _catalog_checkpoint(str(source))
    if src.is_dir() and not _is_checkpoint(src):
        raise CheckpointError(
            f"{src} is a directory without config.json: not a Hugging Face checkpoint",
            hint="pass a llava-hf checkpoint directory or a text-model .gguf file",
        )
    if src.is_file() and src.suffix.lower() != ".gguf":
        raise ModelFileError(f"{src} is not a .gguf file or a checkpoint directory")

    if src.is_dir():
        out_dir = Path(out).expanduser() if out is not None else _default_out_dir()
        return _quantize_checkpoint(src, qtype, mtype, out_dir, on_progress, on_stage, report, started)
    gsrc = _open_gguf_source(src)
    out_dir = Path(out).expanduser() if out is not None else src.parent
    return _quantize_pair(gsrc, qtype, mtype, out_dir, on_progress, on_stage, report, started)


def _default_out_dir() -> Path:
    from llava_cli.paths import models_dir

    return models_dir()


def _quantize_checkpoint(
    ckpt: Path,
    qtype: QuantType,
    mtype: QuantType,
    out_dir: Path,
    on_progress: ProgressFn | None,
    on_stage: StageFn | None,
    report: bool,
    started: float,
) -> QuantizeResult:
    from quantize.converter import convert

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
        return _quantize_pair(gsrc, qtype, mtype, out_dir, on_progress, on_stage, report, started)


def _quantize_pair(
    src: _Source,
    qtype: QuantType,
    mtype: QuantType,
    out_dir: Path,
    on_progress: ProgressFn | None,
    on_stage: StageFn | None,
    report: bool,
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
    if report:
        if on_stage:
            on_stage("measuring quality against F16", "inputs")
        rows = measure_quality(
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
    return all(_qtype(t.type_name) == types[t.name] for t in info.tensors)


# ------------------------------------------------------------------------------------------ measured quality

QUALITY_PROMPTS = (
    "Describe this image in detail.",
    "What colors do you see?",
    "How many shapes are there, and where are they?",
    "Write a one-sentence caption.",
)


def quality_images(size: int = 336) -> list[bytes]:
    """Four fixed PNG images (gradients, a checkerboard, shapes, seeded noise): the same bytes on every run."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    grad = np.stack([xx, yy, 1 - xx], axis=-1)
    checker = (((np.arange(size)[:, None] // 42) + (np.arange(size)[None, :] // 42)) % 2).astype(np.float32)
    checker = np.stack([checker, 0.2 + 0.6 * checker, 1 - checker], axis=-1)
    shapes = Image.new("RGB", (size, size), (240, 240, 230))
    draw = ImageDraw.Draw(shapes)
    draw.ellipse((30, 40, 150, 160), fill=(200, 30, 30))
    draw.rectangle((180, 60, 300, 200), fill=(30, 60, 200))
    draw.polygon([(60, 300), (160, 190), (260, 310)], fill=(40, 170, 60))
    noise = np.random.default_rng(1234).random((size // 16, size // 16, 3), dtype=np.float32)
    noise = np.kron(noise, np.ones((16, 16, 1), dtype=np.float32))[:size, :size]
    noise = np.pad(noise, ((0, size - noise.shape[0]), (0, size - noise.shape[1]), (0, 0)), mode="edge")
    images = [
        Image.fromarray((grad * 255).astype(np.uint8)),
        Image.fromarray((checker * 255).astype(np.uint8)),
        shapes,
        Image.fromarray((noise * 255).astype(np.uint8)),
    ]
    out = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


_QUIET_LOG: Any = None  # the ctypes callback must outlive every call into mtmd: keep a reference here


def _quiet_mtmd_logs() -> None:
    """mtmd and clip log every image they encode to stderr; keep the CLI's output clean unless debugging."""
    global _QUIET_LOG
    if os.environ.get("LLAVA_DEBUG") == "1":
        return
    import llama_cpp
    from llama_cpp import mtmd_cpp

    if _QUIET_LOG is None:
        _QUIET_LOG = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    mtmd_cpp.mtmd_log_set(_QUIET_LOG, None)
    mtmd_cpp.mtmd_helper_log_set(_QUIET_LOG, None)


class _Scorer:
    """A GGUF pair loaded with llama-cpp-python + mtmd, giving the next-token logits over an answer."""

    def __init__(self, text_path: Path, mmproj_path: Path, *, n_ctx: int = 1024) -> None:
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self._lc, self._mt = llama_cpp, mtmd_cpp
        _quiet_mtmd_logs()
        self.llm = llama_cpp.Llama(
            model_path=str(text_path), n_ctx=n_ctx, n_batch=512, n_threads=_cpu_count(), n_gpu_layers=0, verbose=False
        )
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = _cpu_count()
        params.warmup = False
        self.mtmd = mtmd_cpp.mtmd_init_from_file(str(mmproj_path).encode(), self.llm.model, params)
        if not self.mtmd:
            self.llm.close()
            raise ModelFileError(f"llama.cpp could not load the vision projector {mmproj_path}")
        self.n_vocab = self.llm.n_vocab()

    def close(self) -> None:
        if self.mtmd:
            self._mt.mtmd_free(self.mtmd)
            self.mtmd = None
        self.llm.close()

    def _row(self) -> Any:
        import numpy as np

        ptr = self._lc.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)

    def answer_logits(
        self, image: bytes, prompt: str, answer: Sequence[int] | None, n_answer: int
    ) -> tuple[list[int], Any]:
        """Logits predicting each answer token. With ``answer=None`` the answer is decoded greedily."""
        import numpy as np

        lc, mt = self._lc, self._mt
        ctx = self.llm.ctx
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        marker = mt.mtmd_default_marker().decode()
        text = f"USER: {marker}\n{prompt} ASSISTANT:".encode()
        data = (ctypes.c_uint8 * len(image)).from_buffer(bytearray(image))
        bitmap = mt.mtmd_helper_bitmap_init_from_buf(self.mtmd, data, len(image), False)
        chunks = mt.mtmd_input_chunks_init()
        try:
            inp = mt.mtmd_input_text()
            inp.text, inp.text_len, inp.add_special, inp.parse_special = text, len(text), True, True
            bitmaps = (mt.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mt.mtmd_tokenize(self.mtmd, chunks, ctypes.byref(inp), bitmaps, 1) != 0:
                raise ModelFileError("mtmd could not tokenize the quality prompt")
            n_past = lc.llama_pos(0)
            if mt.mtmd_helper_eval_chunks(self.mtmd, ctx, chunks, 0, 0, 512, True, ctypes.byref(n_past)) != 0:
                raise ModelFileError("llama.cpp failed to evaluate the quality prompt")
        finally:
            mt.mtmd_input_chunks_free(chunks)
            mt.mtmd_bitmap_free(bitmap)
        tokens: list[int] = []
        rows = []
        row = self._row()
        for k in range(n_answer):
            rows.append(row)
            tok = int(answer[k]) if answer is not None else int(np.argmax(row))
            tokens.append(tok)
            if k == n_answer - 1:
                break
            arr = (lc.llama_token * 1)(tok)
            if lc.llama_decode(ctx, lc.llama_batch_get_one(arr, 1)) != 0:
                raise ModelFileError("llama.cpp failed to decode an answer token")
            row = self._row()
        return tokens, np.stack(rows)


def _log_softmax(x: Any) -> Any:
    import numpy as np

    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def measure_quality(
    f16_text: str | os.PathLike[str],
    f16_mmproj: str | os.PathLike[str],
    candidates: dict[tuple[str, str], tuple[Path, Path]],
    *,
    n_answer: int = 16,
    inputs: Sequence[tuple[bytes, str]] | None = None,
    on_progress: ProgressFn | None = None,
) -> list[QualityRow]:
    """Compare each candidate pair with the F16 pair on fixed image + prompt inputs.

    The F16 pair answers each input greedily (`n_answer` tokens); every candidate is then fed the same answer
    (teacher forcing), so the next-token distributions are compared position by position: mean KL(F16 || quant)
    in nats and the fraction of positions whose top-1 token agrees. `candidates` maps (bits, mmproj_bits) to a
    (text, mmproj) pair. The F16 pair itself is the first row (KL 0, agreement 1).
    """
    import numpy as np

    if inputs is None:
        inputs = list(zip(quality_images(), QUALITY_PROMPTS, strict=True))
    total = len(inputs) * (len(candidates) + 1)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_progress:
            on_progress(done, total)

    f16_text, f16_mmproj = Path(f16_text), Path(f16_mmproj)
    scorer = _Scorer(f16_text, f16_mmproj)
    reference: list[tuple[list[int], Any]] = []
    try:
        for image, prompt in inputs:
            reference.append(scorer.answer_logits(image, prompt, None, n_answer))
            tick()
    finally:
        scorer.close()

    entropy = sum(float(-(np.exp(lp) * lp).sum()) for lp in (_log_softmax(r) for _, r in reference))
    entropy /= max(1, sum(len(t) for t, _ in reference))

    def row_for(bits: str, mbits: str, text: Path, mmproj: Path, logits: list[Any]) -> QualityRow:
        kls, agree, n = 0.0, 0, 0
        for (tokens, ref), got in zip(reference, logits, strict=True):
            lp, lq = _log_softmax(ref), _log_softmax(got)
            kls += float((np.exp(lp) * (lp - lq)).sum())
            agree += int((ref.argmax(axis=-1) == got.argmax(axis=-1)).sum())
            n += len(tokens)
        info = read_gguf(text)
        return QualityRow(
            bits=bits,
            mmproj_bits=mbits,
            file_size=text.stat().st_size + mmproj.stat().st_size,
            text_size=text.stat().st_size,
            bits_per_weight=info.bits_per_weight,
            mean_kl=kls / max(1, n),
            top1_agreement=agree / max(1, n),
            positions=n,
            reference_entropy=entropy,
        )

    mm_info = read_gguf(f16_mmproj)
    rows = [
        row_for(
            (read_gguf(f16_text).file_type or "f16").lower(),
            _mm_label(mm_info),
            f16_text,
            f16_mmproj,
            [r for _, r in reference],
        )
    ]
    for (bits, mbits), (text, mmproj) in candidates.items():
        scorer = _Scorer(Path(text), Path(mmproj))
        logits = []
        try:
            for (image, prompt), (tokens, _) in zip(inputs, reference, strict=True):
                logits.append(scorer.answer_logits(image, prompt, tokens, n_answer)[1])
                tick()
        finally:
            scorer.close()
        rows.append(row_for(bits, mbits, Path(text), Path(mmproj), logits))
    return rows


def _mm_label(info: GGUFInfo) -> str:
    return (info.file_type or "f16").lower()


def format_quality_table(rows: Sequence[QualityRow]) -> str:
    """A Markdown table of `rows` (what docs/quantization.md shows)."""
    lines = [
        "| text | mmproj | text size | pair size | bits/weight | mean KL vs F16 (nats) | top-1 agreement |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.bits.upper()} | {r.mmproj_bits.upper()} | {r.text_size / 2**20:,.2f} MiB | "
            f"{r.file_size / 2**20:,.2f} MiB | {r.bits_per_weight:.2f} | {r.mean_kl:.5f} | "
            f"{100 * r.top1_agreement:.1f}% |"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - `python -m quantize.quantizer` is not a user entry point
    sys.exit("use `llava quantize`")
