"""The real model behind the batch loop: `EngineCaptioner` over a loaded engine, and `caption()`, which resolves
``--model`` and loads it once, only if some image still needs a caption."""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from llava_cli.captioning.batch import CaptionSummary, caption_batch
from llava_cli.errors import LlavaError, UsageError
from llava_cli.images import LoadedImage
from llava_cli.preprocess import parse_image_fit
from llava_cli.quants import normalize_bits

# Images in flight for `llava caption` when --parallel is not given: the best of 1/2/4/8 in bench/bench_parallel.py
# caption (docs/runtime.md): on 2 CPU cores, 4 sequences decode ~2x the tokens/s of one, 8 add little and double the
# KV memory.
DEFAULT_PARALLEL = 4


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


class _Done:
    """A handle whose result is already known (a memo hit, or a request refused at once)."""

    def __init__(self, result: tuple[str, int] | None = None, error: LlavaError | None = None) -> None:
        self._result, self._error = result, error

    def result(self) -> tuple[str, int]:
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        pass


class _Pending:
    def __init__(self, owner: RuntimeCaptioner, key: tuple[str, str], job: Any) -> None:
        self._owner, self._key, self._job = owner, key, job

    def result(self) -> tuple[str, int]:
        answer = self._job.result()
        result = (answer.text, answer.completion_tokens)
        self._owner._remember(self._key, result)
        return result

    def cancel(self) -> None:
        self._job.cancel()


class RuntimeCaptioner(EngineCaptioner):
    """A `Captioner` over a `Runtime` with ``parallel`` sequence slots: the batch loop keeps several images in flight
    (``submit``), their vision encodes, prefills and decodes overlapping on one model. Same memo as the engine's."""

    def __init__(self, runtime: Any, **kwargs: Any) -> None:
        super().__init__(runtime, **kwargs)
        self.parallel: int = runtime.n_parallel

    def submit(self, image: LoadedImage, prompt: str) -> _Done | _Pending:
        key = (image.sha256, prompt)
        if self.deterministic and key in self._memo:
            self._memo.move_to_end(key)
            self.memo_hits += 1
            return _Done(self._memo[key])
        from llava_cli.runtime import Message

        try:
            job = self.engine.submit([Message("user", prompt, [image])], system=self.system, **self.options)
        except LlavaError as exc:  # e.g. a prompt too long for the context: this image fails, the batch goes on
            return _Done(error=exc)
        return _Pending(self, key, job)

    def caption(self, image: LoadedImage, prompt: str) -> tuple[str, int]:
        return self.submit(image, prompt).result()

    def _remember(self, key: tuple[str, str], result: tuple[str, int]) -> None:
        if self.deterministic:
            self._memo[key] = result
            if len(self._memo) > self.MEMO_ENTRIES:
                self._memo.popitem(last=False)


def load_captioner(
    *,
    model: str | None = None,
    mmproj: str | os.PathLike[str] | None = None,
    bits: str | None = None,
    ctx: int = 2048,
    threads: int | None = None,
    n_gpu_layers: str | int = 0,
    mmproj_offload: bool = True,
    image_fit: str = "pad",
    parallel: int = 1,
    max_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 0.95,
    seed: int | None = None,
    system: str | None = None,
    verbose: bool = False,
    on_note: Callable[[str], None] | None = None,
) -> EngineCaptioner:
    """Resolve ``model`` and load it (`open_model`): the one loading path of `caption()` and of each Ray replica
    (ray_data.py). ``parallel`` > 1 gives a `RuntimeCaptioner` with that many sequence slots. The caller closes
    ``captioner.engine``."""
    from llava_cli.runtime import open_model

    if parallel < 1:
        raise UsageError(f"--parallel {parallel} must be at least 1")
    note = on_note or (lambda message: print(f"note: {message}", file=sys.stderr))
    model_obj, resolved = open_model(
        model,
        mmproj=mmproj,
        bits=bits,
        on_note=note,
        parallel=parallel if parallel > 1 else None,
        n_ctx=ctx,
        n_threads=threads,
        n_gpu_layers=n_gpu_layers,
        mmproj_offload=mmproj_offload,
        image_fit=parse_image_fit(image_fit),
        verbose=verbose,
    )
    kind = RuntimeCaptioner if parallel > 1 else EngineCaptioner
    return kind(
        model_obj,
        model_name=resolved.name,
        quantization=resolved.quantization,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        system=system,
    )


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
    image_fit: str = "pad",
    parallel: int | None = None,
    max_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 0.95,
    seed: int | None = None,
    system: str | None = None,
    verbose: bool = False,
    on_note: Callable[[str], None] | None = None,
    on_parallel: Callable[[int], None] | None = None,
    **batch: Any,
) -> CaptionSummary:
    """`caption_batch` with the real model: resolve ``model`` (catalog id, checkpoint dir or .gguf + ``mmproj``) and
    load it once, only if some image still needs a caption. ``parallel``: images in flight at once (sequence slots
    of a `Runtime`, each with ``ctx`` positions; default `DEFAULT_PARALLEL`); 1 = one after another on an
    `Engine`; ``on_parallel(n)`` is told the level once the model is loaded. Keyword arguments are `llava caption`'s
    flags.

    Example::

        from llava_cli.captioning import caption
        summary = caption(["photos/"], model="llava-1.5-7b", recursive=True, out="captions.jsonl", parallel=4)
    """
    parallel = DEFAULT_PARALLEL if parallel is None else parallel
    if parallel < 1:
        raise UsageError(f"--parallel {parallel} must be at least 1")
    # Bad values fail now, not after the model load (which a finished batch never reaches).
    parse_image_fit(image_fit)
    if bits is not None:
        normalize_bits(bits)
    note = on_note or (lambda message: print(f"note: {message}", file=sys.stderr))
    loaded: list[EngineCaptioner] = []

    def load() -> EngineCaptioner:
        captioner = load_captioner(
            model=model,
            mmproj=mmproj,
            bits=bits,
            ctx=ctx,
            threads=threads,
            n_gpu_layers=n_gpu_layers,
            mmproj_offload=mmproj_offload,
            image_fit=image_fit,
            parallel=parallel,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            system=system,
            verbose=verbose,
            on_note=note,
        )
        loaded.append(captioner)
        if on_parallel is not None:
            on_parallel(parallel)
        return captioner

    batch.setdefault("on_notice", note)
    try:
        return caption_batch(inputs, captioner=load, **batch)
    finally:
        for c in loaded:
            c.engine.close()
