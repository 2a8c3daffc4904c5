"""`open_model`: the one way the commands load a model — resolve ``--model`` (catalog id, checkpoint directory, or
.gguf + ``--mmproj``; downloading or converting if needed) and load it as an `Engine` (one caller) or a `Runtime`
(``parallel`` sequences at once)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, overload

from llava_cli.resolve import ResolvedModel
from llava_cli.runtime.engine import Engine
from llava_cli.runtime.runtime import Runtime

NOISE_NOTE = "{name} has random weights: its answers are noise (it only shows that the installation works)"


@overload
def open_model(
    model: str | None,
    *,
    mmproj: str | os.PathLike[str] | None = ...,
    bits: str | None = ...,
    on_progress: Callable[[int, int], None] | None = ...,
    on_note: Callable[[str], None] | None = ...,
    parallel: None = ...,
    **engine_kwargs: Any,
) -> tuple[Engine, ResolvedModel]: ...


@overload
def open_model(
    model: str | None,
    *,
    mmproj: str | os.PathLike[str] | None = ...,
    bits: str | None = ...,
    on_progress: Callable[[int, int], None] | None = ...,
    on_note: Callable[[str], None] | None = ...,
    parallel: int,
    **engine_kwargs: Any,
) -> tuple[Runtime, ResolvedModel]: ...


def open_model(
    model: str | None,
    *,
    mmproj: str | os.PathLike[str] | None = None,
    bits: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    parallel: int | None = None,
    **engine_kwargs: Any,
) -> tuple[Engine | Runtime, ResolvedModel]:
    """Resolve and load. ``parallel=None`` gives an `Engine`; an int gives a `Runtime` with that many sequence
    slots. ``engine_kwargs`` go to the constructor (``n_ctx``, ``n_threads``, ``n_gpu_layers``, ...). A model with
    random weights is announced through ``on_note``."""
    from llava_cli.resolve import resolve_model

    resolved = resolve_model(
        model, mmproj=Path(mmproj) if mmproj is not None else None, bits=bits, on_progress=on_progress
    )
    if resolved.noise and on_note is not None:
        on_note(NOISE_NOTE.format(name=resolved.name))
    if parallel is None:
        return Engine(resolved.text_path, resolved.mmproj_path, on_note=on_note, **engine_kwargs), resolved
    rt = Runtime(resolved.text_path, resolved.mmproj_path, n_parallel=parallel, on_note=on_note, **engine_kwargs)
    return rt, resolved
