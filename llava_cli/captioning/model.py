"""The real model behind the batch loop: `EngineCaptioner` over a loaded engine, and `caption()`, which resolves
``--model`` and loads it once, only if some image still needs a caption."""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llava_cli.captioning.batch import CaptionSummary, caption_batch
from llava_cli.images import LoadedImage


class EngineCaptioner:
    """A `Captioner` over a loaded `Engine`: each image is a fresh one-turn conversation; the engine (model,
    vision encoder, image-embedding cache keyed by the image bytes' SHA-256) stays loaded for the whole batch.

    When decoding is deterministic (greedy, or a fixed seed), an image whose bytes and prompt were already captioned
    gets the same caption again without running the model: duplicates in a dataset cost nothing.
    """

    MEMO_ENTRIES = 100_000  # (sha256, prompt) -> caption; ~30 MB at most

    def __init__(
        self,
        engine: Any,
        *,
        model_name: str,
        quantization: str,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 0.95,
        seed: int | None = None,
        system: str | None = None,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.quantization = quantization
        self.options = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
        self.system = system
        self.deterministic = temperature == 0 or seed is not None
        self._memo: OrderedDict[tuple[str, str], tuple[str, int]] = OrderedDict()
        self.memo_hits = 0

    def caption(self, image: LoadedImage, prompt: str) -> tuple[str, int]:
        key = (image.sha256, prompt)
        if self.deterministic and key in self._memo:
            self._memo.move_to_end(key)
            self.memo_hits += 1
            return self._memo[key]
        answer = self.engine.ask(prompt, [image], system=self.system, **self.options)
        result = (answer.text, answer.completion_tokens)
        if self.deterministic:
            self._memo[key] = result
            if len(self._memo) > self.MEMO_ENTRIES:
                self._memo.popitem(last=False)
        return result


def caption(
    inputs: Sequence[str | os.PathLike[str]],
    *,
    model: str | None = None,
    mmproj: str | os.PathLike[str] | None = None,
    bits: str | None = None,
    ctx: int = 2048,
    threads: int | None = None,
    n_gpu_layers: str | int = 0,
    mmproj_offload: bool = True,
    max_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 0.95,
    seed: int | None = None,
    system: str | None = None,
    verbose: bool = False,
    on_note: Callable[[str], None] | None = None,
    **batch: Any,
) -> CaptionSummary:
    """`caption_batch` with the real model: resolve ``model`` (catalog id, checkpoint dir or .gguf + ``mmproj``) and
    load it once, only if some image still needs a caption. Keyword arguments are `llava caption`'s flags.

    Example::

        from llava_cli.captioning import caption
        summary = caption(["photos/"], model="llava-1.5-7b", recursive=True, out="captions.jsonl")
    """
    note = on_note or (lambda message: print(f"note: {message}", file=sys.stderr))
    engines: list[Any] = []

    def load() -> EngineCaptioner:
        captioner = load_captioner(
            model=model,
            mmproj=mmproj,
            bits=bits,
            ctx=ctx,
            threads=threads,
            n_gpu_layers=n_gpu_layers,
            mmproj_offload=mmproj_offload,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            system=system,
            verbose=verbose,
            on_note=note,
        )
        engines.append(captioner.engine)
        return captioner

    batch.setdefault("on_notice", note)
    try:
        return caption_batch(inputs, captioner=load, **batch)
    finally:
        for engine in engines:
            engine.close()


def load_captioner(
    *,
    model: str | None = None,
    mmproj: str | os.PathLike[str] | None = None,
    bits: str | None = None,
    ctx: int = 2048,
    threads: int | None = None,
    n_gpu_layers: str | int = 0,
    mmproj_offload: bool = True,
    max_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 0.95,
    seed: int | None = None,
    system: str | None = None,
    verbose: bool = False,
    on_note: Callable[[str], None] | None = None,
) -> EngineCaptioner:
    """Resolve ``model`` and load its engine: the one loading path of `caption()` and of each Ray replica
    (ray_data.py). The caller closes ``captioner.engine``."""
    from llava_cli.engine import Engine
    from llava_cli.resolve import resolve_model

    note = on_note or (lambda message: print(f"note: {message}", file=sys.stderr))
    resolved = resolve_model(model, mmproj=Path(mmproj) if mmproj is not None else None, bits=bits)
    if resolved.noise:
        note(f"{resolved.name} has random weights: its captions are noise")
    engine = Engine(
        resolved.text_path,
        resolved.mmproj_path,
        n_ctx=ctx,
        n_threads=threads,
        n_gpu_layers=n_gpu_layers,
        mmproj_offload=mmproj_offload,
        verbose=verbose,
        on_note=note,
    )
    return EngineCaptioner(
        engine,
        model_name=resolved.name,
        quantization=resolved.quantization,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        system=system,
    )
