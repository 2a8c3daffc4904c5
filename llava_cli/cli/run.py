"""`llava run` (one question, streamed) and `llava chat` (a REPL that keeps the conversation's KV cache)."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer

from llava_cli import reading
from llava_cli.atomic import atomic_path
from llava_cli.cli.options import (
    BitsOpt,
    CtxOpt,
    ImageFitOpt,
    JsonOpt,
    MmprojOpt,
    ModelOpt,
    NGpuLayersOpt,
    NoMmprojOffloadOpt,
    QuietOpt,
    ThreadsOpt,
)
from llava_cli.cli.progress import progress_bar
from llava_cli.errors import ContextOverflowError, LlavaError, UsageError
from llava_cli.images import LoadedImage, load_image
from llava_cli.preprocess import parse_image_fit
from llava_cli.resolve import ResolvedModel
from llava_cli.runtime import Answer, Conversation, Engine, open_model

ImageOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--image",
        "-i",
        help="An image file (JPEG, PNG, WebP, GIF, TIFF...), or - to read it from stdin. Repeat for several "
        "images. Example: --image cat.jpg --image dog.png",
        show_default=False,
    ),
]
SystemOpt = Annotated[
    str | None,
    typer.Option(
        "--system",
        "-s",
        help="A system prompt put before the first USER turn. "
        'Example: --system "You are a terse assistant. Answer in five words."',
        show_default=False,
    ),
]
MaxTokensOpt = Annotated[
    int, typer.Option("--max-tokens", "-n", min=1, help="Stop the answer after this many tokens. Example: -n 64")
]
TemperatureOpt = Annotated[
    float,
    typer.Option(
        "--temperature",
        min=0.0,
        help="Sampling temperature; 0 = greedy (deterministic). Example: --temperature 0",
    ),
]
TopPOpt = Annotated[
    float,
    typer.Option(
        "--top-p",
        min=0.0,
        max=1.0,
        help="Nucleus sampling: keep the top tokens up to this probability. Example: --top-p 0.9",
    ),
]
SeedOpt = Annotated[
    int | None,
    typer.Option("--seed", help="Random seed for sampling (default: random). Example: --seed 42", show_default=False),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show llama.cpp's own log on stderr.")]
MaxImageMbOpt = Annotated[
    float | None,
    typer.Option(
        "--max-image-mb",
        min=0.001,
        help=f"Refuse image files (and stdin) larger than this many MiB, before reading them (default "
        f"{reading.IMAGE.default_mib:g}, or ${reading.IMAGE.env}). Example: --max-image-mb 400",
        show_default=False,
    ),
]


def load_engine(
    model: str | None,
    *,
    mmproj: Path | None = None,
    bits: str | None = None,
    ctx: int = 4096,
    threads: int | None = None,
    n_gpu_layers: str = "0",
    no_mmproj_offload: bool = False,
    image_fit: str = "pad",
    verbose: bool = False,
    quiet: bool = False,
) -> tuple[Engine, ResolvedModel]:
    """`open_model` with the CLI's progress bar (shown only for a download or a conversion) and notes."""
    with lazy_progress("preparing model", quiet) as on_progress:
        return open_model(
            model,
            mmproj=mmproj,
            bits=bits,
            on_progress=on_progress,
            on_note=print_note,
            n_ctx=ctx,
            n_threads=threads,
            n_gpu_layers=n_gpu_layers,
            mmproj_offload=not no_mmproj_offload,
            image_fit=parse_image_fit(image_fit),
            verbose=verbose,
        )


@contextlib.contextmanager
def lazy_progress(description: str, quiet: bool) -> Iterator[Callable[[int, int], None]]:
    """A progress bar that only appears if there is progress to show (a download or a conversion)."""
    with contextlib.ExitStack() as stack:
        bar: list[Callable[[int, int], None]] = []

        def update(completed: int, total: int) -> None:
            if not bar:
                bar.append(stack.enter_context(progress_bar(description, unit="bytes", quiet=quiet)))
            bar[0](completed, total)

        yield update


def print_note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def _load_images(paths: list[str] | None, max_image_mb: float | None = None) -> list[LoadedImage]:
    paths = paths or []
    if paths.count("-") > 1:
        raise UsageError("--image - (stdin) can be given only once")
    max_bytes = reading.IMAGE.bytes(max_image_mb)
    images = [load_image(p, max_bytes=max_bytes) for p in paths]
    for im in images:
        for n in im.notes:
            print_note(n)
    return images


def _stream(out: TextIO) -> Callable[[str], None]:
    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    return write


def _result_json(answer: Answer, resolved: Any, images: list[LoadedImage]) -> dict[str, Any]:
    d = answer.to_dict()
    return {
        "answer": d.pop("answer"),
        "model": resolved.name,
        "quantization": resolved.quantization,
        "noise": bool(resolved.noise),
        "images": [{"name": im.name, "sha256": im.sha256, "width": im.width, "height": im.height} for im in images],
        **d,
    }


def register(app: typer.Typer) -> None:
    """Add `llava run` and `llava chat`."""

    @app.command("run")
    def run_cmd(
        prompt: Annotated[
            str,
            typer.Argument(help='The question, or - to read it from stdin. Example: "What is in this picture?"'),
        ],
        image: ImageOpt = None,
        model: ModelOpt = None,
        mmproj: MmprojOpt = None,
        bits: BitsOpt = None,
        system: SystemOpt = None,
        max_tokens: MaxTokensOpt = 512,
        temperature: TemperatureOpt = 0.2,
        top_p: TopPOpt = 0.95,
        seed: SeedOpt = None,
        ctx: CtxOpt = 4096,
        threads: ThreadsOpt = None,
        n_gpu_layers: NGpuLayersOpt = "0",
        no_mmproj_offload: NoMmprojOffloadOpt = False,
        image_fit: ImageFitOpt = "pad",
        json_out: JsonOpt = False,
        verbose: VerboseOpt = False,
        quiet: QuietOpt = False,
        max_image_mb: MaxImageMbOpt = None,
    ) -> None:
        """Ask one question about one or more images; the answer streams to stdout.

        Examples:

          llava run --image cat.jpg "What is this?"

          cat photo.png | llava run --image - "Describe it in one sentence." --temperature 0

          llava run --model llava-1.5-13b --image a.jpg --image b.jpg "What differs between the two?"

          llava run --model model.q4_k_m.gguf --mmproj mmproj-model.f16.gguf --image cat.jpg "Colour?" --json

          llava run --image cat.jpg - < question.txt
        """
        if prompt == reading.STDIN:
            if "-" in (image or []):
                raise UsageError("the prompt and an --image cannot both come from stdin (-)")
            prompt = reading.read_text(reading.STDIN, what="prompt")
        prompt = reading.repair_with_note(prompt, "the prompt", print_note)
        system = reading.repair_with_note(system, "--system", print_note) if system is not None else None
        images = _load_images(image, max_image_mb)
        engine, resolved = load_engine(
            model,
            mmproj=mmproj,
            bits=bits,
            ctx=ctx,
            threads=threads,
            n_gpu_layers=n_gpu_layers,
            no_mmproj_offload=no_mmproj_offload,
            image_fit=image_fit,
            verbose=verbose,
            quiet=quiet or json_out,
        )
        with engine:
            answer = engine.ask(
                prompt,
                images,
                system=system,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                on_token=None if json_out else _stream(sys.stdout),
            )
        if json_out:
            print(json.dumps(_result_json(answer, resolved, images), ensure_ascii=False))
        else:
            sys.stdout.write("\n")
            sys.stdout.flush()

    @app.command("chat")
    def chat_cmd(
        image: ImageOpt = None,
        model: ModelOpt = None,
        mmproj: MmprojOpt = None,
        bits: BitsOpt = None,
        system: SystemOpt = None,
        max_tokens: MaxTokensOpt = 512,
        temperature: TemperatureOpt = 0.2,
        top_p: TopPOpt = 0.95,
        seed: SeedOpt = None,
        ctx: CtxOpt = 4096,
        threads: ThreadsOpt = None,
        n_gpu_layers: NGpuLayersOpt = "0",
        no_mmproj_offload: NoMmprojOffloadOpt = False,
        image_fit: ImageFitOpt = "pad",
        verbose: VerboseOpt = False,
        quiet: QuietOpt = False,
        max_image_mb: MaxImageMbOpt = None,
    ) -> None:
        """Chat about images. Each turn only evaluates what is new; images are encoded once.

        Commands inside the chat: /image PATH (attach an image to your next message), /clear (start over),
        /save FILE (write the conversation as JSON), /exit. When stdin is not a terminal, each line read is one
        message, so a chat can be scripted: printf 'Describe it.\\nAnd the colour?\\n' | llava chat --image cat.jpg

        Examples:

          llava chat --image cat.jpg

          llava chat --model llava-1.5-13b --ctx 8192 --system "Answer briefly."
        """
        system = reading.repair_with_note(system, "--system", print_note) if system is not None else None
        images = _load_images(image, max_image_mb)
        engine, resolved = load_engine(
            model,
            mmproj=mmproj,
            bits=bits,
            ctx=ctx,
            threads=threads,
            n_gpu_layers=n_gpu_layers,
            no_mmproj_offload=no_mmproj_offload,
            image_fit=image_fit,
            verbose=verbose,
            quiet=quiet,
        )
        with engine:
            repl = ChatRepl(
                engine,
                system=system,
                model_name=resolved.name,
                quantization=resolved.quantization,
                generate={"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed},
            )
            repl.attached.extend(images)
            repl.max_image_bytes = reading.IMAGE.bytes(max_image_mb)
            repl.run(sys.stdin, sys.stdout)


HELP_TEXT = """commands: /image PATH  attach an image to your next message
          /clear       forget the conversation (images stay cached)
          /save FILE   write the conversation as JSON
          /exit        quit (Ctrl-D works too)"""


class ChatRepl:
    """The `llava chat` loop, separate from Typer so tests can drive it with any input/output streams."""

    def __init__(
        self,
        engine: Engine,
        *,
        system: str | None = None,
        model_name: str = "",
        quantization: str = "",
        generate: dict[str, Any] | None = None,
    ) -> None:
        self.engine = engine
        self.conversation: Conversation = engine.chat(system=system)
        self.attached: list[LoadedImage] = []
        self.max_image_bytes: int | None = None  # /image's limit (None: reading.IMAGE's default)
        self.model_name = model_name
        self.quantization = quantization
        self.generate = generate or {}

    def _lines(self, stdin: TextIO, interactive: bool) -> Iterator[str]:
        if not interactive:
            # Bounded lines (an endless stream without newlines is refused at the prompt limit), bytes kept as
            # surrogate escapes so that /image names survive; messages are repaired in run().
            yield from reading.text_lines(stdin)
            return
        with contextlib.suppress(AttributeError, ValueError):
            stdin.reconfigure(errors="surrogateescape")  # type: ignore[attr-defined]  # a terminal's odd bytes
        history = None
        try:
            import readline  # line editing, and input history kept across sessions

            from llava_cli.paths import user_dir

            history = user_dir() / "chat_history"
            with contextlib.suppress(OSError):
                readline.read_history_file(history)
            readline.set_history_length(1000)
        except ImportError:  # Windows without pyreadline
            readline = None  # type: ignore[assignment]
        try:
            while True:
                try:
                    yield input("you> ")
                except EOFError:
                    print(file=sys.stderr)
                    return
        finally:
            if readline is not None and history is not None:
                with contextlib.suppress(OSError):
                    readline.write_history_file(history)

    def run(self, stdin: TextIO, stdout: TextIO) -> None:
        interactive = stdin.isatty() and stdout.isatty()
        if interactive:
            print(f"llava chat · {self.model_name} · type /help for commands", file=sys.stderr)
        for raw in self._lines(stdin, interactive):
            line = raw.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line, stdout):
                    return
                continue
            self.turn(reading.repair_with_note(line, "this message", print_note), stdout, interactive)

    def command(self, line: str, stdout: TextIO) -> bool:
        """Run a /command; False means quit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/help":
            print(HELP_TEXT, file=sys.stderr)
        elif name == "/clear":
            self.conversation.clear()
            self.attached.clear()
            print_note("conversation cleared")
        elif name == "/image":
            if not arg:
                _error("usage: /image PATH")
                return True
            try:
                im = load_image(arg, max_bytes=self.max_image_bytes)
            except LlavaError as exc:
                _error(exc.message, exc.hint)
                return True
            for n in im.notes:
                print_note(n)
            self.attached.append(im)
            print_note(f"{im.name} ({im.width}×{im.height}) will go with your next message")
        elif name == "/save":
            if not arg:
                _error("usage: /save FILE")
                return True
            try:
                self.save(Path(arg))
            except LlavaError as exc:
                _error(exc.message, exc.hint)
                return True
            print_note(f"conversation saved to {arg}")
        else:
            _error(f"unknown command {name}", "type /help")
        return True

    def save(self, path: Path) -> None:
        data = {"model": self.model_name, "quantization": self.quantization, **self.conversation.to_dict()}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def turn(self, text: str, stdout: TextIO, interactive: bool) -> None:
        images, self.attached = self.attached, []
        try:
            self.conversation.ask(text, images, on_token=_stream(stdout), **self.generate)
        except ContextOverflowError as exc:
            _error(exc.message, "type /clear to start a new conversation, or restart with a larger --ctx")
            self.attached = images  # keep them for the retry
            return
        except KeyboardInterrupt:
            if not interactive:
                raise
            stdout.write(" [interrupted]")
        stdout.write("\n")
        stdout.flush()


def _error(message: str, hint: str | None = None) -> None:
    print(f"error: {message}" + (f" ({hint})" if hint else ""), file=sys.stderr, flush=True)
