"""Option types shared by several commands, defined once so every command spells and explains them alike."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Catalog id (see `llava models`), a Hugging Face checkpoint dir, or a text-model .gguf "
        "(then give --mmproj). Default: the catalog's default model. Example: --model llava-1.5-13b",
        show_default=False,
    ),
]
MmprojOpt = Annotated[
    Path | None,
    typer.Option(
        "--mmproj",
        help="The vision projector .gguf that belongs to a --model given as a .gguf file. "
        "Example: --mmproj mmproj-llava-1.5-7b.f16.gguf",
        show_default=False,
    ),
]
BitsOpt = Annotated[
    str | None,
    typer.Option(
        "--bits",
        "-q",
        help="Quantization of the text model: q4_k_m, q6_k, q8_0 or f16 (any case). Example: --bits q6_k",
        show_default=False,
    ),
]
CtxOpt = Annotated[
    int,
    typer.Option("--ctx", help="Context window in tokens; each image takes 576. Example: --ctx 4096", min=64),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads", "-t", help="CPU threads (default: all cores). Example: --threads 4", min=1, show_default=False
    ),
]
NGpuLayersOpt = Annotated[
    str,
    typer.Option(
        "--n-gpu-layers",
        "-ngl",
        help="Layers to offload to the GPU: a number, 'auto' (plan from free VRAM) or 'all'. "
        "Example: --n-gpu-layers auto",
    ),
]
NoMmprojOffloadOpt = Annotated[
    bool,
    typer.Option("--no-mmproj-offload", help="Keep the vision encoder on the CPU even when a GPU is used."),
]
ImageFitOpt = Annotated[
    str,
    typer.Option(
        "--image-fit",
        help="How a picture becomes the encoder's 336x336 square: 'pad' (default; how LLaVA-1.5 was trained: "
        "pad to a square with the mean colour, then resize, so nothing is cut off) or 'crop' (transformers' "
        "CLIPImageProcessor: resize the short side, cut the centre). Example: --image-fit crop",
        case_sensitive=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts instead of text.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress bars; only results and errors.")]
