"""`llava models` (the catalog and what is on disk) and `llava pull` (download or build a model now)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from llava_cli.catalog import load_catalog
from llava_cli.cli.options import BitsOpt, JsonOpt, QuietOpt
from llava_cli.cli.progress import progress_bar
from llava_cli.quants import normalize_bits

# llava_cli.resolve (and huggingface_hub under it) is imported inside the commands: `llava --help` stays fast.

MODELS_HELP = """List the catalog's models, which quantizations are on disk, and their size.

Examples:

  llava models

  llava models --json
"""

PULL_HELP = """Download a model's text GGUF and vision projector into the Hugging Face cache, now.

When no published file has the quantization asked for, the checkpoint is downloaded and converted + quantized
locally instead. `llava run`, `chat` and `caption` do the same on first use; `pull` lets you do it ahead of time.
Honours HF_HUB_OFFLINE=1 (then it only checks the cache) and HF_ENDPOINT (a mirror).

Examples:

  llava pull llava-1.5-7b

  llava pull llava-1.5-13b --bits q6_k

  llava pull tiny-random
"""

ModelArg = Annotated[
    str,
    typer.Argument(
        help="Catalog id (see `llava models`), or a checkpoint directory to convert. Example: llava-1.5-13b",
        show_default=False,
    ),
]


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit in ("B", "KB") else f"{size:.2f} {unit}"
        size /= 1000
    return f"{n} B"


def models(json_out: JsonOpt = False) -> None:
    """List the catalog's models, which quantizations are on disk, and their size."""
    from llava_cli.resolve import model_rows

    catalog = load_catalog()
    rows = model_rows(catalog)
    if json_out:
        payload = {"default": {"model": catalog.default_model, "bits": catalog.default_bits}, "models": rows}
        typer.echo(json.dumps(payload, indent=2))
        return
    table = Table(title="llava-cli models", title_justify="left")
    table.add_column("id", style="bold", no_wrap=True)
    table.add_column("description")
    table.add_column("on disk", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    for row in rows:
        name = row["id"] + (" [green](default)[/]" if row["default"] else "")
        local = ", ".join(row["local"]) or "[dim]-[/]"
        size = _human(row["size_on_disk"]) if row["local"] else ""
        table.add_row(name, row["description"], local, size)
    console = Console(soft_wrap=False)
    console.print(table)
    files = ", ".join(str(f) for f in catalog.files)
    console.print(
        f"[dim]default: {catalog.default_model} at {catalog.default_bits}; catalogs: {files}; "
        "get one now with `llava pull <id> --bits <q>`[/]",
        highlight=False,
    )


def pull(model: ModelArg, bits: BitsOpt = None, json_out: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Download (or build) a model now."""
    from llava_cli.resolve import identify, resolve_model

    # Bad arguments fail before a progress bar is drawn.
    if bits is not None:
        normalize_bits(bits)
    identify(model)
    with progress_bar(f"pull {model}" + (f" {bits}" if bits else ""), quiet=quiet or json_out) as update:
        resolved = resolve_model(model, bits=bits, download=True, on_progress=update)
    if json_out:
        payload = {
            "model": resolved.name,
            "bits": resolved.quantization,
            "text_path": str(resolved.text_path),
            "mmproj_path": str(resolved.mmproj_path),
            "noise": resolved.noise,
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    typer.echo(f"{resolved.name} {resolved.quantization}")
    typer.echo(f"  text:   {resolved.text_path}")
    typer.echo(f"  mmproj: {resolved.mmproj_path}")
    if resolved.noise:
        typer.echo("  note: random weights, its answers are noise (it proves the installation works)")


def register(app: typer.Typer) -> None:
    """Add `models` and `pull` to the app."""
    app.command("models", help=MODELS_HELP)(models)
    app.command("pull", help=PULL_HELP)(pull)
