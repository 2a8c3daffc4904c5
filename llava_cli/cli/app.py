"""The `llava` app: one Typer app, one error boundary.

Each command module exposes ``register(app)``; this file only wires them together and turns our
exceptions into one-line messages (the traceback only with ``LLAVA_DEBUG=1``).
"""

from __future__ import annotations

import errno
import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

from llava_cli import __version__
from llava_cli.cli import caption, convert, doctor, models, quantize, run, serve, vram
from llava_cli.errors import LlavaError

HELP = """Ask local LLaVA vision-language models about images.

Examples:

  llava run --image cat.jpg "What is this?"

  llava chat --image cat.jpg

  llava caption photos/ --recursive --out captions.jsonl

  llava convert ./llava-1.5-7b-hf --out models/

  llava quantize ./llava-1.5-7b-hf --bits q4_k_m

  llava vram-check --model llava-1.5-13b
"""


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llava-cli {__version__}")
        raise typer.Exit()


def make_app() -> typer.Typer:
    app = typer.Typer(
        name="llava",
        help=HELP,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich",
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def _root(
        version: bool = typer.Option(
            False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ) -> None:
        pass

    for module in (run, caption, convert, quantize, models, vram, serve, doctor):
        module.register(app)
    return app


app = make_app()

# Typer >= 0.20 vendors its own copy of click; take the exception classes from whichever click Typer uses.
_ClickException: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _fail(message: str, hint: str | None, code: int) -> int:
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    # Messages are text, not markup: `pip install "llava-cli[ray]"` or a path like photos[1].jpg must print as is.
    line = f"[bold red]error:[/] {escape(message)}"
    if hint:
        line += f" [dim]({escape(hint)})[/]"
    err.print(line, markup=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `llava` script. Returns (and exits with) the process exit code."""
    debug = os.environ.get("LLAVA_DEBUG") == "1"
    try:
        # Without standalone mode Typer *returns* the code of typer.Exit(n), and turns Ctrl-C into 130.
        rv = app(args=argv, standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
        if code == 130:
            _fail("interrupted", None, 130)
    except typer.Exit as exc:
        code = exc.exit_code
    except _ClickException as exc:  # bad flags: click prints usage + message
        exc.show()  # type: ignore[attr-defined]
        code = exc.exit_code  # type: ignore[attr-defined]
    except (KeyboardInterrupt, typer.Abort):
        code = _fail("interrupted", None, 130)
    except LlavaError as exc:
        if debug:
            raise
        code = _fail(exc.message, exc.hint, exc.exit_code)
    except OSError as exc:
        if debug:
            raise
        if exc.errno == errno.ENOSPC:
            code = _fail("disk full", "free some space and run the same command again", 1)
        else:
            where = f" {exc.filename}" if exc.filename else ""
            code = _fail(f"{exc.strerror or exc}{where}", None, 1)
    except Exception as exc:  # a bug of ours: still one line, the traceback on request
        if debug:
            raise
        code = _fail(
            f"internal error: {type(exc).__name__}: {exc}",
            "set LLAVA_DEBUG=1 to see the traceback, and please report it",
            1,
        )
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
