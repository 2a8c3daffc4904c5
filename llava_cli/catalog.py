"""The model catalog: ``models.toml`` turned into typed, validated entries.

The built-in catalog ships inside the package (``llava_cli/models.toml``); a user catalog at
``$LLAVA_HOME/models.toml`` may add models or override any field of a built-in one (tables merge key by key, the
user's value wins). Parsing is strict: an unknown key, a wrong type or an unknown quantization is a `CatalogError`
naming the file and the entry, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from llava_cli import paths
from llava_cli.errors import LlavaError, UsageError
from llava_cli.quants import ALL_TYPES, UNQUANTIZED, normalize_bits

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

# Quantizations of the text model we can download or produce, and those that are a plain conversion (no
# llama.cpp quantization pass). The spellings accepted for them are `llava_cli.quants.parse_bits`'s.
KNOWN_BITS: tuple[str, ...] = tuple(ALL_TYPES)
UNQUANTIZED_BITS: tuple[str, ...] = UNQUANTIZED

USER_CATALOG_NAME = "models.toml"
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")

Source = Literal["hub", "synthetic"]


class CatalogError(LlavaError, ValueError):
    """A catalog file (built-in or the user's) has an unknown key or a bad value."""


@dataclass(frozen=True)
class HubFile:
    """One file of a Hugging Face repo."""

    repo: str
    file: str
    revision: str = "main"
    size_gb: float | None = None  # as published (10^9 bytes), for messages before the download starts

    @property
    def url_hint(self) -> str:
        return f"https://huggingface.co/{self.repo}/blob/{self.revision}/{self.file}"


@dataclass(frozen=True)
class Architecture:
    """Figures of the text model and the vision tower (enough to estimate memory without the files)."""

    text_arch: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ff: int
    context: int
    vocab: int
    vision_layers: int
    vision_hidden: int
    vision_heads: int
    image_size: int
    patch_size: int
    vocab_padded: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def image_tokens(self) -> int:
        """Tokens one image takes in the context: one per patch (576 for 336/14)."""
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class Quantization:
    """One row of the published quantization table."""

    bits: str
    bpw: float
    size_gb: float
    quality: float | None = None  # % of the F16 model's quality, as published


@dataclass(frozen=True)
class ModelEntry:
    """One catalog model."""

    id: str
    description: str
    source: Source
    origin: Path  # the catalog file the entry (or its last override) came from, for error messages
    checkpoint: str | None = None
    default_bits: str | None = None
    architecture: Architecture | None = None
    mmproj: HubFile | None = None
    gguf: Mapping[str, HubFile] = field(default_factory=dict)
    quantizations: Mapping[str, Quantization] = field(default_factory=dict)

    @property
    def checkpoint_repo(self) -> str | None:
        """Alias of `checkpoint` (the Hugging Face repo of the llava-hf checkpoint)."""
        return self.checkpoint

    @property
    def noise(self) -> bool:
        """True when the weights are random: answers are noise."""
        return self.source == "synthetic"

    def published(self, bits: str) -> HubFile | None:
        return self.gguf.get(bits)


@dataclass(frozen=True)
class Catalog:
    models: Mapping[str, ModelEntry]
    default_model: str
    default_bits: str
    files: tuple[Path, ...]  # the catalog files read, built-in first

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self.models.values())

    def __contains__(self, model_id: object) -> bool:
        return model_id in self.models

    def get(self, model_id: str) -> ModelEntry:
        """The entry for `model_id`; an unknown id is a `UsageError` listing the known ones."""
        try:
            return self.models[model_id]
        except KeyError:
            known = ", ".join(self.models)
            raise UsageError(
                f"unknown model {model_id!r}: not a catalog id, a checkpoint directory or a .gguf file",
                hint=f"catalog ids: {known} (see `llava models`)",
            ) from None

    @property
    def default(self) -> ModelEntry:
        return self.models[self.default_model]

    def bits_for(self, entry: ModelEntry, bits: str | None) -> str:
        """The quantization to use for `entry`: --bits if given, else the entry's default, else the catalog's."""
        if bits is not None:
            return normalize_bits(bits)
        return entry.default_bits or self.default_bits


# ---------------------------------------------------------------------------------------------------------- parsing

_ENTRY_KEYS = {
    "description": str,
    "source": str,
    "checkpoint": str,
    "default_bits": str,
    "architecture": dict,
    "mmproj": dict,
    "gguf": dict,
    "quantizations": dict,
}
_ARCH_INT_KEYS = (
    "layers",
    "hidden",
    "heads",
    "kv_heads",
    "ff",
    "context",
    "vocab",
    "vision_layers",
    "vision_hidden",
    "vision_heads",
    "image_size",
    "patch_size",
)
_ARCH_KEYS = {"text_arch": str, "vocab_padded": int, **{k: int for k in _ARCH_INT_KEYS}}
_FILE_KEYS = {"repo": str, "file": str, "revision": str, "size_gb": float}
_QUANT_KEYS = {"bpw": float, "size_gb": float, "quality": float}
_TOP_KEYS = {"defaults", "models"}
_DEFAULT_KEYS = {"model": str, "bits": str}


class _Where:
    """Builds error messages that name the file and the entry."""

    def __init__(self, file: Path, entry: str | None = None) -> None:
        self.file = file
        self.entry = entry

    def error(self, problem: str) -> CatalogError:
        where = f"{self.file}" + (f", entry {self.entry!r}" if self.entry else "")
        return CatalogError(f"{where}: {problem}", hint=f"fix or remove it in {self.file}")


def _type_name(t: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", dict: "a table"}[t]


def _check_keys(table: Mapping[str, Any], schema: Mapping[str, type], where: _Where, path: str) -> None:
    """Reject unknown keys and values of the wrong type (int is accepted for a float, bool never for a number)."""
    for key, value in table.items():
        prefix = f"{path}.{key}" if path else key
        if key not in schema:
            known = ", ".join(schema)
            raise where.error(f"unknown key {prefix!r} (known: {known})")
        want = schema[key]
        ok = isinstance(value, want) and not isinstance(value, bool)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise where.error(f"{prefix} must be {_type_name(want)}, got {value!r}")


def _bits_key(key: str, where: _Where, path: str) -> str:
    try:
        return normalize_bits(key)
    except UsageError:
        raise where.error(f"{path}: unknown quantization {key!r} (known: {', '.join(KNOWN_BITS)})") from None


def _check_entry(raw: Mapping[str, Any], where: _Where) -> None:
    """Structural check of one (possibly partial, when overriding) entry: keys and value types."""
    _check_keys(raw, _ENTRY_KEYS, where, "")
    if "source" in raw and raw["source"] not in ("hub", "synthetic"):
        raise where.error(f"source must be 'hub' or 'synthetic', got {raw['source']!r}")
    if "default_bits" in raw:
        _bits_key(raw["default_bits"], where, "default_bits")
    if "architecture" in raw:
        _check_keys(raw["architecture"], _ARCH_KEYS, where, "architecture")
        for key in (*_ARCH_INT_KEYS, "vocab_padded"):
            if key in raw["architecture"] and raw["architecture"][key] <= 0:
                raise where.error(f"architecture.{key} must be positive, got {raw['architecture'][key]}")
    if "mmproj" in raw:
        _check_file(raw["mmproj"], where, "mmproj")
    for key, value in raw.get("gguf", {}).items():
        _bits_key(key, where, "gguf")
        if not isinstance(value, dict):
            raise where.error(f"gguf.{key} must be a table with repo and file")
        _check_file(value, where, f"gguf.{key}")
    for key, value in raw.get("quantizations", {}).items():
        _bits_key(key, where, "quantizations")
        if not isinstance(value, dict):
            raise where.error(f"quantizations.{key} must be a table with bpw, size_gb, quality")
        _check_keys(value, _QUANT_KEYS, where, f"quantizations.{key}")
        for k in ("bpw", "size_gb"):
            if k in value and not 0 < value[k] <= 64:
                raise where.error(f"quantizations.{key}.{k} must be > 0, got {value[k]}")
        if "quality" in value and not 0 < value["quality"] <= 100:
            raise where.error(f"quantizations.{key}.quality must be a percentage in (0, 100], got {value['quality']}")


def _check_file(raw: Mapping[str, Any], where: _Where, path: str) -> None:
    _check_keys(raw, _FILE_KEYS, where, path)
    if "repo" in raw and not _REPO_RE.match(raw["repo"]):
        raise where.error(f"{path}.repo must look like 'owner/name', got {raw['repo']!r}")
    if "file" in raw and not raw["file"].endswith(".gguf"):
        raise where.error(f"{path}.file must be a .gguf file, got {raw['file']!r}")
    if "revision" in raw and not raw["revision"].strip():
        raise where.error(f"{path}.revision must not be empty")
    if "size_gb" in raw and raw["size_gb"] <= 0:
        raise where.error(f"{path}.size_gb must be > 0, got {raw['size_gb']}")


def _hub_file(raw: Mapping[str, Any], where: _Where, path: str) -> HubFile:
    for key in ("repo", "file"):
        if key not in raw:
            raise where.error(f"{path} needs {key!r}")
    size = raw.get("size_gb")
    return HubFile(raw["repo"], raw["file"], raw.get("revision", "main"), float(size) if size is not None else None)


def _build_entry(model_id: str, raw: Mapping[str, Any], where: _Where) -> ModelEntry:
    """Required keys and cross-field rules, on the merged entry."""
    source: Source = raw.get("source", "hub")
    if "description" not in raw:
        raise where.error("missing 'description'")
    arch = None
    if "architecture" in raw:
        missing = [k for k in ("text_arch", *_ARCH_INT_KEYS) if k not in raw["architecture"]]
        if missing:
            raise where.error(f"architecture is missing {', '.join(missing)}")
        a = raw["architecture"]
        arch = Architecture(**{k: a[k] for k in ("text_arch", *_ARCH_INT_KEYS)}, vocab_padded=a.get("vocab_padded"))
        if arch.hidden % arch.heads or arch.heads % arch.kv_heads:
            raise where.error("architecture: hidden must divide by heads and heads by kv_heads")
    gguf_files = {_bits_key(k, where, "gguf"): _hub_file(v, where, f"gguf.{k}") for k, v in raw.get("gguf", {}).items()}
    mmproj = _hub_file(raw["mmproj"], where, "mmproj") if "mmproj" in raw else None
    quants = {}
    for key, value in raw.get("quantizations", {}).items():
        bits = _bits_key(key, where, "quantizations")
        for k in ("bpw", "size_gb"):
            if k not in value:
                raise where.error(f"quantizations.{key} needs {k!r}")
        quality = value.get("quality")
        quants[bits] = Quantization(
            bits, float(value["bpw"]), float(value["size_gb"]), float(quality) if quality is not None else None
        )
    if source == "hub":
        if "checkpoint" not in raw and not gguf_files:
            raise where.error("a hub model needs 'checkpoint' or at least one [gguf.<bits>] file")
        if "checkpoint" in raw and not _REPO_RE.match(raw["checkpoint"]):
            raise where.error(f"checkpoint must look like 'owner/name', got {raw['checkpoint']!r}")
        if gguf_files and mmproj is None:
            raise where.error("published [gguf.<bits>] files need the [mmproj] file that goes with them")
    elif gguf_files or mmproj or "checkpoint" in raw:
        raise where.error("a synthetic model is built locally: it takes no checkpoint, gguf or mmproj")
    default_bits = _bits_key(raw["default_bits"], where, "default_bits") if "default_bits" in raw else None
    return ModelEntry(
        id=model_id,
        description=raw["description"],
        source=source,
        origin=where.file,
        checkpoint=raw.get("checkpoint"),
        default_bits=default_bits,
        architecture=arch,
        mmproj=mmproj,
        gguf=MappingProxyType(gguf_files),
        quantizations=MappingProxyType(quants),
    )


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: tables merge key by key, any other value of `over` replaces base's."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_toml(text: str, file: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{file}: not valid TOML: {exc}", hint=f"fix the syntax of {file}") from exc
    where = _Where(file)
    for key in data:
        if key not in _TOP_KEYS:
            raise where.error(f"unknown top-level key {key!r} (known: defaults, models)")
    if "defaults" in data:
        if not isinstance(data["defaults"], dict):
            raise where.error("[defaults] must be a table")
        _check_keys(data["defaults"], _DEFAULT_KEYS, _Where(file, "defaults"), "defaults")
    if "models" in data and not isinstance(data["models"], dict):
        raise where.error("[models] must be a table of [models.<id>] entries")
    for model_id, raw in data.get("models", {}).items():
        entry_where = _Where(file, model_id)
        if not _ID_RE.match(model_id):
            raise entry_where.error("model ids are lowercase letters, digits, '.', '_' and '-'")
        if not isinstance(raw, dict):
            raise entry_where.error("must be a table")
        _check_entry(raw, entry_where)
    return data


def builtin_catalog_path() -> Path:
    """The catalog shipped in the package."""
    return Path(str(resources.files("llava_cli").joinpath("models.toml")))


def user_catalog_path() -> Path:
    return paths.user_dir() / USER_CATALOG_NAME


def parse_catalog(sources: list[tuple[str, Path]]) -> Catalog:
    """Build a catalog from TOML texts, each with the file it came from; later sources override earlier ones."""
    raw_models: dict[str, dict[str, Any]] = {}
    origin: dict[str, Path] = {}
    defaults: dict[str, Any] = {}
    defaults_origin = sources[0][1] if sources else Path("models.toml")
    for text, file in sources:
        data = _read_toml(text, file)
        if "defaults" in data:
            defaults.update(data["defaults"])
            defaults_origin = file
        for model_id, raw in data.get("models", {}).items():
            raw_models[model_id] = _merge(raw_models.get(model_id, {}), raw)
            origin[model_id] = file
    models = {mid: _build_entry(mid, raw, _Where(origin[mid], mid)) for mid, raw in raw_models.items()}
    where = _Where(defaults_origin, "defaults")
    for key in ("model", "bits"):
        if key not in defaults:
            raise where.error(f"[defaults] needs {key!r}")
    if defaults["model"] not in models:
        raise where.error(f"default model {defaults['model']!r} is not in the catalog")
    default_bits = _bits_key(defaults["bits"], where, "bits")
    return Catalog(
        models=MappingProxyType(models),
        default_model=defaults["model"],
        default_bits=default_bits,
        files=tuple(file for _, file in sources),
    )


def load_catalog(*, user_file: Path | None = None) -> Catalog:
    """The built-in catalog plus the user's (``$LLAVA_HOME/models.toml`` unless `user_file` is given), if present."""
    builtin = resources.files("llava_cli").joinpath("models.toml").read_text(encoding="utf-8")
    sources = [(builtin, builtin_catalog_path())]
    user = user_file if user_file is not None else user_catalog_path()
    if user.is_file():
        try:
            sources.append((user.read_text(encoding="utf-8"), user))
        except (OSError, UnicodeDecodeError) as exc:
            raise CatalogError(f"{user}: cannot read the user catalog: {exc}") from exc
    return parse_catalog(sources)


def get(model_id: str) -> ModelEntry:
    """Shortcut: the entry for `model_id` in the catalog as loaded now (built-in + user)."""
    return load_catalog().get(model_id)
