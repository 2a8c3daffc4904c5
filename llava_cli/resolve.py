"""Turn a ``--model`` value into a local text GGUF + mmproj GGUF pair.

``--model`` may be:

* nothing: the catalog's default model (LLaVA-1.5-7B at Q4_K_M);
* a catalog id (``llava-1.5-13b``): the published GGUF for the quantization from the hub cache, downloaded on first
  use; when no published file has that quantization, the checkpoint is downloaded and converted + quantized
  locally, once, into ``models_dir()/<id>/``;
* ``tiny-random``: a random-weight model built locally from a synthetic checkpoint (no network); its answers are
  noise and `ResolvedModel.noise` says so;
* a Hugging Face checkpoint directory: converted (and quantized) once into ``models_dir()/<name>/``; converted
  again only when the checkpoint's files change;
* a text-model ``.gguf`` path, with ``--mmproj`` or an ``mmproj-*.gguf`` beside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llava_cli import hub, paths, reading
from llava_cli.atomic import atomic_path
from llava_cli.catalog import UNQUANTIZED_BITS, Catalog, ModelEntry, load_catalog, normalize_bits
from llava_cli.errors import CheckpointError, InputNotFoundError, ModelFileError, UsageError

# The one edge from llava_cli into quantize/: building a model locally. quantize/ imports only llava_cli's
# foundation modules (errors, atomic, gguf_info, quants), never this one (tests/test_architecture.py checks).
from quantize.converter import ConvertResult, convert
from quantize.quantizer import QuantizeResult, quantize
from quantize.synthetic import make_checkpoint

ProgressFn = Callable[[int, int], None]

MANIFEST = "llava-source.json"  # in each models_dir()/<name>/: where the files came from, which bits exist
_CHECKPOINT_FILES = ("config.json", "tokenizer.model", "tokenizer.json", "preprocessor_config.json")


@dataclass(frozen=True)
class ResolvedModel:
    """A local GGUF pair ready for `Engine`, and what it is."""

    text_path: Path
    mmproj_path: Path
    name: str  # catalog id, checkpoint name or GGUF file stem
    quantization: str  # q4_k_m, f16, ... ("unknown" for a GGUF whose header does not say)
    noise: bool = False  # random weights (tiny-random): answers are noise


def pull_command(model_id: str, bits: str) -> str:
    """The command that downloads (or builds) `model_id` at `bits`: quoted in every 'missing' message."""
    return f"llava pull {model_id} --bits {bits}"


Kind = Literal["catalog", "checkpoint", "gguf"]


@dataclass(frozen=True)
class ModelRef:
    """What a ``--model`` value names, before anything is downloaded or built."""

    kind: Kind
    path: Path | None = None  # the checkpoint directory or the text .gguf
    mmproj: Path | None = None  # the given --mmproj, or the one found beside a .gguf
    entry: ModelEntry | None = None  # the catalog entry


def identify(
    model: str | None,
    *,
    mmproj: Path | None = None,
    catalog: Catalog | None = None,
    find_mmproj: bool = True,
) -> ModelRef:
    """The one place that decides what ``--model`` means (``run``, ``chat``, ``caption``, ``pull``,
    ``vram-check`` and ``quantize``'s SOURCE all come here). Checks only what can be checked without the
    network: the path exists, a directory has a config.json, the mmproj is there. ``find_mmproj=False`` leaves
    a .gguf without ``--mmproj`` alone (vram-check plans the text model by itself then)."""
    if model is None:
        cat = catalog or load_catalog()
        if mmproj is not None:
            raise UsageError(f"--mmproj goes with a --model .gguf file; catalog model {cat.default.id} brings its own")
        return ModelRef("catalog", entry=cat.default)
    path = Path(model).expanduser()
    if path.is_dir():
        if mmproj is not None:
            raise UsageError("--mmproj goes with a --model .gguf file; a checkpoint directory holds its own projector")
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"{path} has no config.json: not a Hugging Face checkpoint directory",
                hint="give a llava-hf checkpoint directory, a catalog id, or a .gguf file",
            )
        return ModelRef("checkpoint", path=path)
    if model.lower().endswith(".gguf") or path.exists():  # a FIFO or a device too: refused as what it is
        reading.require_regular(
            path,
            what="a model file",
            error=ModelFileError,
            missing=f"{path}: no such file",
            hint="give --model a .gguf file",
        )
        if mmproj is not None:
            mmproj = mmproj.expanduser()
            reading.require_regular(
                mmproj,
                what="a .gguf file",
                error=ModelFileError,
                missing=f"{mmproj}: no such file",
                hint="give --mmproj a .gguf file",
            )
        elif find_mmproj:
            mmproj = _mmproj_beside(path)
        return ModelRef("gguf", path=path, mmproj=mmproj)
    cat = catalog or load_catalog()
    if model not in cat and (os.sep in model or model.startswith((".", "~")) or (os.altsep and os.altsep in model)):
        raise InputNotFoundError(
            f"{model}: no such file or directory", hint="give a checkpoint directory or a .gguf file"
        )
    entry = cat.get(model)  # an unknown id: UsageError listing the catalog ids
    if mmproj is not None:
        raise UsageError(f"--mmproj goes with a --model .gguf file; catalog model {entry.id} brings its own")
    return ModelRef("catalog", entry=entry)


def resolve_model(
    model: str | None,
    *,
    mmproj: Path | None = None,
    bits: str | None = None,
    download: bool = True,
    on_progress: ProgressFn | None = None,
    catalog: Catalog | None = None,
) -> ResolvedModel:
    """Resolve a ``--model`` value (see the module docstring) to a local GGUF pair.

    ``download=False`` never touches the network: a catalog model that is not local is a `HubError` naming the
    ``llava pull`` command. ``on_progress(completed, total)`` reports download bytes or conversion steps.
    """
    norm_bits = normalize_bits(bits) if bits is not None else None
    cat = catalog or load_catalog()
    ref = identify(model, mmproj=mmproj, catalog=cat)
    if ref.kind == "checkpoint":
        assert ref.path is not None
        name = _checkpoint_name(ref.path)
        return _convert_into(ref.path, paths.models_dir() / name, name, norm_bits or "q4_k_m", on_progress, noise=False)
    if ref.kind == "gguf":
        assert ref.path is not None and ref.mmproj is not None
        return _resolve_gguf(ref.path, ref.mmproj, norm_bits)
    assert ref.entry is not None
    return _resolve_entry(cat, ref.entry, norm_bits, download, on_progress)


def quantize_source(source: str) -> tuple[Path, Path]:
    """``llava quantize SOURCE`` -> (the checkpoint dir or F16 .gguf to quantize, the default output dir).

    A catalog id means its Hugging Face checkpoint, which must already be in the local hub cache (quantize
    never downloads); a checkpoint's outputs go to the models directory, a .gguf's beside it."""
    ref = identify(source, find_mmproj=False)
    if ref.kind == "gguf":
        assert ref.path is not None
        return ref.path, ref.path.parent
    if ref.kind == "checkpoint":
        assert ref.path is not None
        return ref.path, paths.models_dir()
    entry = ref.entry
    assert entry is not None
    if not entry.checkpoint:
        raise UsageError(
            f"catalog model {entry.id} has no Hugging Face checkpoint to quantize from",
            hint="pass a checkpoint directory or an F16 .gguf file",
        )
    ckpt = hub.download_checkpoint(entry.checkpoint, fix=f"huggingface-cli download {entry.checkpoint}", download=False)
    return ckpt, paths.models_dir()


# ------------------------------------------------------------------------------------------------ GGUF path


def _resolve_gguf(path: Path, mmproj: Path, bits: str | None) -> ResolvedModel:
    from llava_cli.gguf_info import read_gguf

    info = read_gguf(path)
    quant = (info.file_type or "unknown").lower()
    if bits is not None and quant != bits:
        raise UsageError(
            f"{path.name} is already {quant}; --bits {bits} applies to catalog models and checkpoints",
            hint=f"drop --bits, or make that quantization with `llava quantize {path} --bits {bits}`",
        )
    return ResolvedModel(path, mmproj, _gguf_name(path), quant)


def _gguf_name(path: Path) -> str:
    return re.sub(r"\.(f32|f16|bf16|q\d\w*)$", "", path.name[: -len(".gguf")], flags=re.IGNORECASE) or path.stem


def _mmproj_beside(text: Path) -> Path:
    """The ``mmproj-*.gguf`` next to a text GGUF: the one named after it, else the only one."""
    candidates = sorted(p for p in text.parent.glob("mmproj-*.gguf") if p.is_file() and p != text)
    if not candidates:
        raise UsageError(
            f"{text} is a text model only: LLaVA also needs its vision projector (mmproj) GGUF",
            hint="give it with --mmproj mmproj-<model>.gguf, or put the mmproj-*.gguf file beside the model",
        )
    if len(candidates) == 1:
        return candidates[0]
    name = _gguf_name(text)
    same = [p for p in candidates if _gguf_name(Path(p.name.removeprefix("mmproj-"))) == name]
    if same:
        return same[0]
    listed = ", ".join(p.name for p in candidates)
    raise UsageError(f"several vision projectors beside {text.name} ({listed})", hint="choose one with --mmproj")


# ----------------------------------------------------------------------------------------------- catalog id


def _resolve_entry(
    cat: Catalog,
    entry: ModelEntry,
    bits: str | None,
    download: bool,
    on_progress: ProgressFn | None,
) -> ResolvedModel:
    use_bits = bits or entry.default_bits or cat.default_bits
    if entry.source == "synthetic":
        return _build_synthetic(entry, use_bits, on_progress)
    fix = pull_command(entry.id, use_bits)
    published = entry.published(use_bits)
    if published is not None:
        assert entry.mmproj is not None  # the catalog parser guarantees it
        text, proj = hub.download_files([published, entry.mmproj], fix=fix, on_progress=on_progress, download=download)
        return ResolvedModel(text, proj, entry.id, use_bits)
    # No published file with this quantization: convert the checkpoint locally (once).
    out_dir = paths.models_dir() / entry.id
    local = _manifest_pair(out_dir, use_bits)
    if local is not None:
        return ResolvedModel(local[0], local[1], entry.id, use_bits)
    if entry.checkpoint is None:
        have = ", ".join(entry.gguf) or "none"
        raise UsageError(
            f"{entry.id} has no published {use_bits} file and no checkpoint to convert (published: {have})"
        )
    ckpt = hub.download_checkpoint(entry.checkpoint, fix=fix, on_progress=on_progress, download=download)
    return _convert_into(ckpt, out_dir, entry.id, use_bits, on_progress, noise=False)


def local_pair(entry: ModelEntry, bits: str) -> tuple[Path, Path] | None:
    """The local GGUF pair of a catalog model at `bits` if it is already on disk (hub cache or converted), else None."""
    published = entry.published(bits)
    if published is not None and entry.mmproj is not None:
        text, proj = hub.cached_file(published), hub.cached_file(entry.mmproj)
        if text is not None and proj is not None:
            return text, proj
    return _manifest_pair(paths.models_dir() / entry.id, bits)


# -------------------------------------------------------------------------------------- local conversions


def _read_manifest(out_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"files": {}}
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else {"files": {}}


def _write_manifest(out_dir: Path, data: dict[str, Any]) -> None:
    with atomic_path(out_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _manifest_pair(out_dir: Path, bits: str, fingerprint: list[Any] | None = None) -> tuple[Path, Path] | None:
    data = _read_manifest(out_dir)
    if fingerprint is not None and data.get("fingerprint") != fingerprint:
        return None
    entry = data["files"].get(bits)
    if not isinstance(entry, dict):
        return None
    text, proj = out_dir / str(entry.get("text")), out_dir / str(entry.get("mmproj"))
    return (text, proj) if text.is_file() and proj.is_file() else None


def _fingerprint(ckpt: Path) -> list[Any]:
    """Names, sizes and mtimes of the checkpoint's files: a change means the conversion is stale."""
    files = [ckpt / n for n in _CHECKPOINT_FILES] + sorted(ckpt.glob("*.safetensors"))
    out = []
    for f in files:
        with contextlib.suppress(OSError):
            st = f.stat()
            out.append([f.name, st.st_size, st.st_mtime_ns])
    return out


def _checkpoint_name(ckpt: Path) -> str:
    resolved = ckpt.resolve()
    name = resolved.name
    if re.fullmatch(r"[0-9a-f]{40}", name):  # a hub snapshot dir: models--owner--name/snapshots/<commit>
        name = resolved.parents[1].name.split("--")[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name.removesuffix("-hf")).strip("-.")
    return name or "model"


def _convert_into(
    ckpt: Path, out_dir: Path, name: str, bits: str, on_progress: ProgressFn | None, *, noise: bool
) -> ResolvedModel:
    """Convert (+ quantize) `ckpt` into `out_dir` unless an up-to-date result is recorded in its manifest."""
    fingerprint = _fingerprint(ckpt)
    found = _manifest_pair(out_dir, bits, fingerprint)
    if found is not None:
        return ResolvedModel(found[0], found[1], name, bits, noise)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = _read_manifest(out_dir)
    if data.get("fingerprint") != fingerprint:
        data = {"checkpoint": str(ckpt.resolve()), "fingerprint": fingerprint, "files": {}}
    result: ConvertResult | QuantizeResult
    if bits in UNQUANTIZED_BITS:
        result = convert(ckpt, out_dir, outtype=bits, name=name, on_progress=on_progress)
    else:
        result = quantize(ckpt, bits=bits, out=out_dir, on_progress=on_progress)
    text, proj = Path(result.text_path), Path(result.mmproj_path)
    data["files"][bits] = {"text": os.path.relpath(text, out_dir), "mmproj": os.path.relpath(proj, out_dir)}
    _write_manifest(out_dir, data)
    return ResolvedModel(text, proj, name, bits, noise)


def _build_synthetic(entry: ModelEntry, bits: str, on_progress: ProgressFn | None) -> ResolvedModel:
    """tiny-random: a synthetic checkpoint written once into models_dir()/<id>/, then converted like any other."""
    out_dir = paths.models_dir() / entry.id
    ckpt = out_dir / f"{entry.id}-hf"
    if not (ckpt / "config.json").is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: an interrupted build never leaves a checkpoint that looks complete.
        tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".building-"))
        try:
            make_checkpoint(tmp / "ckpt")
            shutil.rmtree(ckpt, ignore_errors=True)
            os.replace(tmp / "ckpt", ckpt)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _convert_into(ckpt, out_dir, entry.id, bits, on_progress, noise=True)


# ------------------------------------------------------------------------------------------- what is on disk


def _local_bits(entry: ModelEntry, models_dir: Path) -> list[str]:
    """Every quantization we could find on disk for `entry`: catalog ones plus what the manifest records."""
    bits = list(dict.fromkeys([*entry.gguf, *entry.quantizations]))
    return bits + [b for b in _read_manifest(models_dir / entry.id)["files"] if b not in bits]


def model_rows(catalog: Catalog) -> list[dict[str, Any]]:
    """One dict per model: what `llava models --json` prints."""
    root = paths.models_dir()
    rows = []
    for entry in catalog:
        local: dict[str, Any] = {}
        seen: set[Path] = set()
        total = 0
        for bits in _local_bits(entry, root):
            pair = local_pair(entry, bits)
            if pair is None:
                continue
            size = 0
            for f in pair:
                real = f.resolve()
                n = real.stat().st_size
                size += n
                if real not in seen:
                    seen.add(real)
                    total += n
            local[bits] = {"text_path": str(pair[0]), "mmproj_path": str(pair[1]), "bytes": size}
        rows.append(
            {
                "id": entry.id,
                "description": entry.description,
                "source": entry.source,
                "checkpoint": entry.checkpoint,
                "default": entry.id == catalog.default_model,
                "default_bits": entry.default_bits or catalog.default_bits,
                "published": sorted(entry.gguf),
                "local": local,
                "size_on_disk": total,
                "noise": entry.noise,
            }
        )
    return rows
