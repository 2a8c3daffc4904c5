"""`llava doctor`: which ggml CPU kernels this install runs and why (llava_cli/cpu_kernels.py does the work)."""

from __future__ import annotations

import json

import typer
from rich.console import Console

from llava_cli import cpu_kernels
from llava_cli.cli.options import JsonOpt

HELP = """Show which CPU kernels llama.cpp runs in this install, and why.

Compares the instruction sets the installed ggml CPU backend was compiled with against those this CPU
advertises and the OS enables (XCR0; AMX also needs the kernel's per-process permission), and says what a
faster or safer build would change.

Examples:

  llava doctor

  llava doctor --json
"""


def render(r: cpu_kernels.KernelReport, console: Console) -> None:
    console.print(f"CPU backend: {r.library or 'not loaded'}")
    console.print(f"  compiled with: {' '.join(r.compiled) or 'baseline x86-64'} [dim]({r.level} level)[/]")
    console.print(f"CPU advertises: {' '.join(r.advertised) or '(unknown)'}")
    xcr0 = f"{r.xcr0:#x}" if r.xcr0 is not None else "unreadable"
    amx = {True: "granted", False: "refused", None: "n/a"}[r.amx_permitted]
    console.print(f"OS enables: {' '.join(r.usable) or '(unknown)'}  [dim](XCR0 {xcr0}, AMX permission {amx})[/]")
    for name, tag in r.variants.items():
        console.print(f"  variant {name}" + (f" [dim]({tag})[/]" if tag else ""))
    for note in r.notes:
        console.print(f"note: {note}")


def register(app: typer.Typer) -> None:
    """Add `doctor` to the app."""

    @app.command("doctor", help=HELP)
    def doctor(json_out: JsonOpt = False) -> None:
        report = cpu_kernels.inspect()
        if json_out:
            typer.echo(json.dumps(report.to_json(), indent=2))
        else:
            render(report, Console(highlight=False, soft_wrap=True))
