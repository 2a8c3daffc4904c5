"""`llava convert`: a Hugging Face LLaVA checkpoint directory -> text GGUF + mmproj GGUF."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llava_cli.cli.options import QuietOpt
from llava_cli.cli.progress import progress_bar, stderr

HELP = """Convert a Hugging Face LLaVA checkpoint (llava-hf layout) into a GGUF pair for llama.cpp.

Writes <name>.<outtype>.gguf (the language model) and mmproj-<name>.<outtype>.gguf (vision tower + projector)
into --out. Works on any transformers-written layout, single or sharded safetensors, F32/F16/BF16 weights,
streaming one tensor at a time. Nothing is left under the final names if it fails or is interrupted.

The mmproj is written in the standard layout (class embedding + full position table), which llava-cli computes
exactly and llama.cpp/Ollama also load; --vision-layout no_cls is for running the files in llama.cpp/Ollama.

Examples:

  llava convert ./llava-1.5-7b-hf --out models/

  llava convert ./bakLlava-v1-hf --out models/ --outtype f32 --name bakllava
"""


def register(app: typer.Typer) -> None:
    """Add `llava convert` to the app."""

    @app.command("convert", help=HELP, no_args_is_help=True)
    def convert_cmd(
        checkpoint: Annotated[
            Path,
            typer.Argument(
                help="Checkpoint directory holding config.json, *.safetensors and tokenizer.model. "
                "Example: ./llava-1.5-7b-hf",
                show_default=False,
            ),
        ],
        out: Annotated[
            Path,
            typer.Option("--out", "-o", help="Output directory (created if needed). Example: --out models/"),
        ] = Path("."),
        outtype: Annotated[
            str,
            typer.Option(
                "--outtype",
                help="Weight type of the output: f16 (half the size) or f32 (exact). Example: --outtype f32",
            ),
        ] = "f16",
        name: Annotated[
            str | None,
            typer.Option(
                "--name",
                help="Model name used in the file names and metadata (default: the checkpoint folder's name). "
                "Example: --name llava-1.5-7b",
                show_default=False,
            ),
        ] = None,
        vision_layout: Annotated[
            str,
            typer.Option(
                "--vision-layout",
                help="How the mmproj stores the class token: standard (exact in llava-cli; llama.cpp and Ollama "
                "load it too but put the class token after the patches, so one patch is lost and the others are "
                "one position off) or no_cls (drops the class token: the closer approximation inside "
                "llama.cpp/Ollama, not exact in llava-cli). Example: --vision-layout no_cls",
            ),
        ] = "standard",
        quiet: QuietOpt = False,
    ) -> None:
        from quantize.checkpoint import open_checkpoint
        from quantize.converter import convert

        open_checkpoint(checkpoint)  # a bad input fails in one line before the progress bar is drawn
        with progress_bar("Converting", unit="bytes", quiet=quiet) as on_progress:
            result = convert(
                checkpoint, out, outtype=outtype, name=name, on_progress=on_progress, vision_layout=vision_layout
            )
        if not quiet:
            mb = result.n_bytes / 1e6
            stderr.print(f"converted {mb:.1f} MB in {result.seconds:.1f} s")
        typer.echo(str(result.text_path))
        typer.echo(str(result.mmproj_path))
