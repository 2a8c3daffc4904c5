"""`llava serve`: an OpenAI-compatible HTTP server (chat completions with images) over the runtime."""

from __future__ import annotations

from typing import Annotated

import typer

from llava_cli.cli.options import (
    BitsOpt,
    CtxOpt,
    ImageFitOpt,
    MmprojOpt,
    ModelOpt,
    NGpuLayersOpt,
    NoMmprojOffloadOpt,
    QuietOpt,
    ThreadsOpt,
)
from llava_cli.cli.run import VerboseOpt, lazy_progress, print_note
from llava_cli.preprocess import parse_image_fit
from llava_cli.runtime.loader import NOISE_NOTE

MB = 1024 * 1024


def register(app: typer.Typer) -> None:
    """Add `llava serve`."""

    @app.command("serve")
    def serve_cmd(
        model: ModelOpt = None,
        mmproj: MmprojOpt = None,
        bits: BitsOpt = None,
        host: Annotated[
            str,
            typer.Option(
                "--host",
                help="Address to listen on. 127.0.0.1 = this machine only; 0.0.0.0 = every interface (give an "
                "--api-key then). Example: --host 0.0.0.0",
            ),
        ] = "127.0.0.1",
        port: Annotated[
            int,
            typer.Option("--port", "-p", min=0, max=65535, help="TCP port (0 = any free port). Example: --port 8000"),
        ] = 8080,
        parallel: Annotated[
            int,
            typer.Option(
                "--parallel", "-np", min=1, help="Requests decoded at the same time (slots). Example: --parallel 4"
            ),
        ] = 1,
        ctx: CtxOpt = 4096,
        api_key: Annotated[
            str | None,
            typer.Option(
                "--api-key",
                envvar="LLAVA_API_KEY",
                help="Require 'Authorization: Bearer KEY' on /v1/* (also read from LLAVA_API_KEY). "
                "Example: --api-key $(openssl rand -hex 16)",
                show_default=False,
            ),
        ] = None,
        allow_remote_images: Annotated[
            bool,
            typer.Option(
                "--allow-remote-images",
                help="Let clients pass http(s) image URLs, which the server then downloads (bounded by "
                "--max-image-mb and a 10 s timeout). Off: only base64 data URLs.",
            ),
        ] = False,
        max_body_mb: Annotated[
            float,
            typer.Option(
                "--max-body-mb", min=0.01, help="Largest request body, in MB (413 above). Example: --max-body-mb 32"
            ),
        ] = 64.0,
        max_image_mb: Annotated[
            float,
            typer.Option(
                "--max-image-mb", min=0.01, help="Largest image file, in MB (413 above). Example: --max-image-mb 5"
            ),
        ] = 20.0,
        max_queue: Annotated[
            int,
            typer.Option(
                "--max-queue",
                min=0,
                help="Requests that may wait while every slot is busy; beyond, 503 with Retry-After. "
                "Example: --max-queue 64",
            ),
        ] = 16,
        shutdown_timeout: Annotated[
            float,
            typer.Option(
                "--shutdown-timeout",
                min=0.0,
                help="On SIGTERM/Ctrl-C, seconds to let requests in flight finish before they are cancelled. "
                "Example: --shutdown-timeout 5",
            ),
        ] = 30.0,
        threads: ThreadsOpt = None,
        n_gpu_layers: NGpuLayersOpt = "0",
        no_mmproj_offload: NoMmprojOffloadOpt = False,
        image_fit: ImageFitOpt = "pad",
        verbose: VerboseOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Serve the model over an OpenAI-compatible API: POST /v1/chat/completions (text and image_url parts,
        streaming), GET /v1/models, GET /health. Stop with Ctrl-C or SIGTERM (requests in flight finish first).

        Examples:

          llava serve --model llava-1.5-7b

          llava serve --model model.q4_k_m.gguf --mmproj mmproj.f16.gguf --port 8000 --parallel 4

          LLAVA_API_KEY=secret llava serve --host 0.0.0.0 --allow-remote-images

        Then: curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json'
        -d '{"messages": [{"role": "user", "content": "Hello"}]}'  (more in docs/serving.md)
        """
        from llava_cli.resolve import resolve_model
        from llava_cli.server.app import ServerConfig
        from llava_cli.server.host import LOOPBACK, run_server
        from llava_cli.server.images import ImagePolicy

        if host not in LOOPBACK and not api_key:
            print_note(f"listening on {host} without --api-key: anyone who can reach this port can use the model")
        with lazy_progress("preparing model", quiet) as on_progress:
            resolved = resolve_model(model, mmproj=mmproj, bits=bits, on_progress=on_progress)
        if resolved.noise:
            print_note(NOISE_NOTE.format(name=resolved.name))
        config = ServerConfig(
            model_id=resolved.name,
            api_key=api_key or None,
            images=ImagePolicy(max_bytes=int(max_image_mb * MB), allow_remote=allow_remote_images),
            max_body_bytes=int(max_body_mb * MB),
            max_queue=max_queue,
        )

        def ready(url: str) -> None:
            typer.echo(
                f"llava serve: {resolved.name} at {url}/v1 ({parallel} slot(s) × {ctx} tokens, queue {max_queue}; "
                "Ctrl-C to stop)",
                err=True,
            )

        run_server(
            resolved.text_path,
            resolved.mmproj_path,
            config,
            host=host,
            port=port,
            parallel=parallel,
            ctx=ctx,
            threads=threads,
            n_gpu_layers=n_gpu_layers,
            mmproj_offload=not no_mmproj_offload,
            image_fit=parse_image_fit(image_fit),
            shutdown_timeout=shutdown_timeout,
            verbose=verbose,
            on_note=print_note,
            on_ready=ready,
        )
        if not quiet:
            typer.echo("llava serve: stopped", err=True)
