"""Run the app: load the runtime, bind the socket, serve with uvicorn, and stop cleanly on SIGTERM or Ctrl-C.

Stopping: the listening socket closes at once, new requests on open connections get 503, requests in flight run
to the end for up to ``shutdown_timeout`` seconds and are then cancelled (their slots freed), the runtime is
closed, and the process exits 0. (uvicorn re-raises the signal after a graceful stop so that the default handler
runs; for a server whose normal way to stop is a signal, that would turn every clean stop into an error code.)
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections.abc import Callable, Generator
from typing import Any

import uvicorn

from llava_cli.errors import UsageError
from llava_cli.preprocess import ImageFit
from llava_cli.runtime import Runtime as ModelRuntime
from llava_cli.runtime.llamacpp import GpuLayers
from llava_cli.server.app import ServerConfig, create_app
from llava_cli.server.protocol import Runtime

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def load_runtime(
    text_path: str | os.PathLike[str],
    mmproj_path: str | os.PathLike[str],
    *,
    n_parallel: int = 1,
    n_ctx: int = 4096,
    n_threads: int | None = None,
    n_gpu_layers: GpuLayers | str = 0,
    mmproj_offload: bool = True,
    image_fit: ImageFit = "pad",
    verbose: bool = False,
    on_note: Callable[[str], None] | None = None,
) -> Runtime:
    """The runtime the server runs on: ``n_parallel`` sequence slots of ``n_ctx`` positions each, decoded
    together (llava_cli/runtime/runtime.py), with prefix reuse across requests and one shared image cache."""
    return ModelRuntime(
        text_path,
        mmproj_path,
        n_parallel=n_parallel,
        n_ctx=n_ctx,
        n_threads=n_threads,
        n_gpu_layers=n_gpu_layers,
        mmproj_offload=mmproj_offload,
        image_fit=image_fit,
        verbose=verbose,
        on_note=on_note,
    )


def listen(host: str, port: int) -> socket.socket:
    """A bound TCP socket for host:port, or one plain UsageError (port taken, unknown host...)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", hint="check --host") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UsageError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}", hint="choose another --port, or stop what uses it"
        ) from exc
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None], on_ready: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_signal = on_signal
        self._on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_ready()

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._on_signal()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            yield
            # The stop was asked for: do not re-raise the signal (see the module docstring).
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()


def run_server(
    text_path: str | os.PathLike[str],
    mmproj_path: str | os.PathLike[str],
    config: ServerConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    parallel: int = 1,
    ctx: int = 4096,
    threads: int | None = None,
    n_gpu_layers: GpuLayers | str = 0,
    mmproj_offload: bool = True,
    image_fit: ImageFit = "pad",
    shutdown_timeout: float = 30.0,
    verbose: bool = False,
    on_note: Callable[[str], None] | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve `config.model_id` until SIGTERM/Ctrl-C. ``on_ready(url)`` is called once requests are accepted."""
    sock = listen(host, port)
    try:
        runtime = load_runtime(
            text_path,
            mmproj_path,
            n_parallel=parallel,
            n_ctx=ctx,
            n_threads=threads,
            n_gpu_layers=n_gpu_layers,
            mmproj_offload=mmproj_offload,
            image_fit=image_fit,
            verbose=verbose,
            on_note=on_note,
        )
        try:
            app = create_app(runtime, config)
            bound_host, bound_port = sock.getsockname()[:2]
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            url = f"http://{shown}:{bound_port}"
            uv_config = uvicorn.Config(
                app,
                log_level="info" if verbose else "warning",
                access_log=verbose,
                timeout_graceful_shutdown=max(1, math.ceil(shutdown_timeout)),
                lifespan="on",
            )
            server = _Server(uv_config, app.state.begin_shutdown, lambda: on_ready(url) if on_ready else None)
            server.run(sockets=[sock])
        finally:
            runtime.close()
    finally:
        sock.close()
