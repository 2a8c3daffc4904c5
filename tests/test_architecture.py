"""The dependency rules of docs/architecture.md, checked on the source (static imports, no code run).

quantize/ builds on llava_cli's foundation modules only; nothing in that foundation imports quantize/, so the
edge between the two packages goes one way per module: llava_cli's application layer (the resolver, the CLI,
vram-check's checkpoint reader) -> quantize/ -> llava_cli's foundation.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What quantize/ may use from llava_cli: errors, atomic writes, bounded reads, GGUF header reading, the
# quantization types and rules, the install's CPU flags (for the SIGILL hint), and the package version. None of
# these imports quantize/.
FOUNDATION = {
    "llava_cli",
    "llava_cli.errors",
    "llava_cli.atomic",
    "llava_cli.cpu_kernels",
    "llava_cli.gguf_info",
    "llava_cli.quants",
    "llava_cli.reading",
}


def _imports(path: Path) -> set[str]:
    """Every module named by an import statement in ``path`` (``from a import b`` gives ``a`` and ``a.b``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_quantize_uses_only_llava_cli_foundation() -> None:
    modules = {m for p in ROOT.joinpath("llava_cli").rglob("*.py") for m in [_module(p)]}
    for path in sorted(ROOT.joinpath("quantize").glob("*.py")):
        used = {m for m in _imports(path) if m.split(".")[0] == "llava_cli" and m in modules}
        assert used <= FOUNDATION, f"{path.name} imports {sorted(used - FOUNDATION)} from llava_cli"


def test_the_foundation_never_imports_quantize() -> None:
    for name in sorted(FOUNDATION):
        path = ROOT / (name.replace(".", "/") + (".py" if name != "llava_cli" else "/__init__.py"))
        assert not {m for m in _imports(path) if m.split(".")[0] == "quantize"}, path


def test_llava_cli_reaches_quantize_by_static_import_only() -> None:
    """The resolver builds models with a plain import (no importlib detour that hides the edge)."""
    for path in ROOT.joinpath("llava_cli").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "import_module(" not in text, path
    assert {"quantize.converter.convert", "quantize.quantizer.quantize"} <= _imports(ROOT / "llava_cli/resolve.py")


def test_one_home_for_the_type_rules_and_the_bits_parser() -> None:
    """llama.cpp's per-tensor rules and --bits parsing live in llava_cli/quants.py only."""
    for path in [*ROOT.joinpath("llava_cli").rglob("*.py"), *ROOT.joinpath("quantize").glob("*.py")]:
        if path.name == "quants.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        dupes = defined & {"use_more_bits", "_use_more_bits", "normalize_bits", "parse_bits", "normalize_quant"}
        assert not dupes, f"{path.relative_to(ROOT)} defines {sorted(dupes)}"
