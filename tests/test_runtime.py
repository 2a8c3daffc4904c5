"""The batched runtime on real llama.cpp with the tiny F32 model: several sequences decoded together give exactly
the tokens each gives alone, prefill is chunked between decode steps, cancel frees the slot, stop strings, prefix
reuse across requests (a client re-sending its history), and a prompt too long for the context."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from PIL import Image

from llava_cli.errors import ContextOverflowError, UsageError
from llava_cli.images import LoadedImage, load_image
from llava_cli.runtime import Engine, Message, Runtime
from tests.model_fixtures import test_image

GREEDY = {"temperature": 0.0, "max_tokens": 12}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[LoadedImage]:
    d = tmp_path_factory.mktemp("rt_images")
    out = []
    for i in range(4):
        p = d / f"p{i}.png"
        Image.fromarray(test_image(96, seed=30 + i), "RGB").save(p)
        out.append(load_image(p))
    return out


@pytest.fixture(scope="module", params=["cpu: scheduler encodes", "gpu-style: encoder thread"])
def runtime(tiny_pair_f32, request: pytest.FixtureRequest) -> Iterator[Runtime]:  # type: ignore[no-untyped-def]
    # Both ways of encoding: on an all-CPU runtime the scheduler thread encodes between steps (the default here);
    # with a GPU an encoder thread overlaps the decode. Every test using this fixture runs under both.
    thread = request.param.startswith("gpu")
    with Runtime(
        tiny_pair_f32.text_path, tiny_pair_f32.mmproj_path, n_parallel=4, n_ctx=1024, n_threads=2, encode_thread=thread
    ) as rt:
        assert rt.encode_thread is thread and (rt._encoder is not None) is thread
        yield rt


def _ask(text: str, image: LoadedImage | None = None) -> list[Message]:
    return [Message("user", text, [image] if image else [])]


def test_concurrent_jobs_equal_each_alone(tiny_pair_f32, runtime: Runtime, images: list[LoadedImage]) -> None:  # type: ignore[no-untyped-def]
    requests = [
        _ask("What is this?", images[0]),
        _ask("Describe the picture.", images[1]),
        _ask("Tell me a story about nothing."),
        _ask("What colour dominates?", images[2]),
    ]
    with Engine(tiny_pair_f32.text_path, tiny_pair_f32.mmproj_path, n_ctx=1024, n_threads=2) as eng:
        alone = []
        for r in requests:
            eng.clear_kv()
            alone.append(eng.ask(r[0].text, r[0].images, **GREEDY).tokens)
    steps0, calls0 = runtime.stats.steps, runtime.stats.decode_calls
    jobs = [runtime.submit(r, **GREEDY) for r in requests]
    answers = [j.result(timeout=120) for j in jobs]
    assert [a.tokens for a in answers] == alone
    generated = sum(a.completion_tokens for a in answers)
    # Batched: far fewer llama_decode calls than one per generated token.
    assert runtime.stats.decode_calls - calls0 < generated
    assert runtime.stats.steps - steps0 < generated
    assert all(a.finish_reason in ("stop", "length") for a in answers)


def test_streaming_pieces_make_the_answer(runtime: Runtime, images: list[LoadedImage]) -> None:
    job = runtime.submit(_ask("What is this?", images[3]), temperature=0, max_tokens=16)
    pieces = list(job)
    assert job.done and "".join(pieces).strip() == job.result().text


def test_long_prefill_does_not_stall_decoding(tiny_pair_f32, images: list[LoadedImage]) -> None:  # type: ignore[no-untyped-def]
    """While an image prompt (576 rows) is prefilled in chunks of 64, the sequence already generating gets a token
    at every step."""
    with Runtime(
        tiny_pair_f32.text_path, tiny_pair_f32.mmproj_path, n_parallel=2, n_ctx=1024, n_threads=2, prefill_chunk=64
    ) as rt:
        rt.stats.keep_step_log = True
        # Long enough to still be generating when the image's chunks go in, however slow the image encode is
        # on a loaded machine; cancelled once the second answer is in.
        first = rt.submit(_ask("Count slowly."), temperature=0, max_tokens=900, ignore_eos=True)
        pieces = iter(first)
        next(pieces)  # the first sequence is generating
        second = rt.submit(_ask("What is this?", images[0]), temperature=0, max_tokens=4)
        a2 = second.result(timeout=120)
        first.cancel()
        a1 = first.result(timeout=120)
        log = list(rt.stats.step_log)
    assert a1.finish_reason == "cancelled" and a1.completion_tokens > 4
    assert a2.completion_tokens >= 1
    prefill_steps = [s for s in log if s[1] + s[2] > 0 and s[0] > 0]
    # The image went in several chunks, each riding along with a decode row of the first sequence.
    assert sum(s[2] for s in log) == 576
    assert len([s for s in prefill_steps if s[2] > 0]) >= 576 // 64
    assert all(s[1] + s[2] <= 64 for s in prefill_steps)


def test_cancel_frees_the_slot(tiny_pair_f32, images: list[LoadedImage]) -> None:  # type: ignore[no-untyped-def]
    with Runtime(tiny_pair_f32.text_path, tiny_pair_f32.mmproj_path, n_parallel=1, n_ctx=1024, n_threads=2) as rt:
        assert not rt.encode_thread  # all on the CPU: the scheduler thread encodes, once a slot is free
        long = rt.submit(_ask("Go on forever."), temperature=0, max_tokens=900, ignore_eos=True)
        waiting = rt.submit(_ask("What is this?", images[1]), **GREEDY)
        dropped = rt.submit(_ask("Never mind."), **GREEDY)
        it = iter(long)
        next(it)
        assert not waiting.done  # one slot: the second job queues behind the first
        assert rt.in_flight == 3
        dropped.cancel()  # cancelled while queued: done at once, not when the slot frees
        assert dropped.result(timeout=30).finish_reason == "cancelled" and not long.done
        long.cancel()
        a = long.result(timeout=60)
        assert a.finish_reason == "cancelled" and a.completion_tokens < 900
        b = waiting.result(timeout=120)  # it got the slot
        assert rt.in_flight == 0
        assert b.finish_reason in ("stop", "length") and b.completion_tokens > 0
        assert b.cached_tokens < 10  # the cancelled sequence's cells were dropped, not reused


def test_stop_strings(runtime: Runtime, images: list[LoadedImage]) -> None:
    full = runtime.submit(_ask("What is this?", images[0]), temperature=0, max_tokens=24).result(timeout=60)
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = runtime.submit(_ask("What is this?", images[0]), temperature=0, max_tokens=24, stop=[stop])
    pieces = list(cut)
    a = cut.result()
    assert a.finish_reason == "stop" and stop not in a.text
    assert full.text.startswith(a.text) and len(a.text) <= 3
    assert stop not in "".join(pieces)  # held back while it could still be a stop string, never streamed


def test_prefix_reuse_with_resent_history(tiny_pair_f32, runtime: Runtime, images: list[LoadedImage]) -> None:  # type: ignore[no-untyped-def]
    """An OpenAI-style client sends the whole history again: only the new turn is evaluated, and the answer is the
    one a full evaluation gives."""
    turn1 = [Message("user", "What is in this picture?", [images[2]])]
    a1 = runtime.submit(turn1, system="Be brief.", **GREEDY).result(timeout=60)
    history = [*turn1, Message("assistant", a1.text, tokens=a1.tokens), Message("user", "And its colour?")]
    encoded = runtime.images_encoded
    a2 = runtime.submit(history, system="Be brief.", **GREEDY).result(timeout=60)
    assert a2.cached_tokens > 576 and a2.prompt_tokens < 40
    assert a2.images_cached == 1 and a2.images_encoded == 0 and runtime.images_encoded == encoded
    with Engine(tiny_pair_f32.text_path, tiny_pair_f32.mmproj_path, n_ctx=1024, n_threads=2) as eng:
        chat = eng.chat(system="Be brief.", history=history[:2])
        full = chat.ask("And its colour?", **GREEDY)
    assert full.cached_tokens == 0 and full.tokens == a2.tokens


def test_prefix_copied_from_a_busy_slot(tiny_pair_f32, images: list[LoadedImage]) -> None:  # type: ignore[no-untyped-def]
    """Two requests about the same image at once: the second copies the image prefix from the first's slot
    (llama_memory_seq_cp) instead of evaluating it again."""
    with Runtime(tiny_pair_f32.text_path, tiny_pair_f32.mmproj_path, n_parallel=2, n_ctx=1024, n_threads=2) as rt:
        first = rt.submit(_ask("Describe it.", images[3]), temperature=0, max_tokens=40, ignore_eos=True)
        next(iter(first))
        second = rt.submit(_ask("Describe it in a word.", images[3]), temperature=0, max_tokens=8)
        b = second.result(timeout=120)
        first.result(timeout=120)
        assert rt.stats.prefix_copies == 1 and b.cached_tokens > 576
    with Engine(tiny_pair_f32.text_path, tiny_pair_f32.mmproj_path, n_ctx=1024, n_threads=2) as eng:
        assert eng.ask("Describe it in a word.", [images[3]], temperature=0, max_tokens=8).tokens == b.tokens


def test_context_overflow_refused_in_one_line(runtime: Runtime, images: list[LoadedImage]) -> None:
    two = [Message("user", "Compare.", [images[0], images[1]])]
    with pytest.raises(
        ContextOverflowError, match=r"needs \d+ tokens \(2 image\(s\) × 576 tokens\) but the context holds 1024"
    ):
        runtime.submit(two)
    with pytest.raises(UsageError, match="last message"):
        runtime.submit([Message("user", "Hi"), Message("assistant", "Hello")])
    # A prompt that fits but leaves little room ends at the context end, not with an error.
    a = runtime.submit(_ask("Talk.", images[0]), temperature=0, max_tokens=500, ignore_eos=True)
    ans = a.result(timeout=120)
    assert ans.finish_reason == "context" and ans.prompt_tokens + ans.cached_tokens + ans.completion_tokens == 1025


def test_closed_runtime_refuses(tiny_pair_f32) -> None:  # type: ignore[no-untyped-def]
    rt = Runtime(tiny_pair_f32.text_path, tiny_pair_f32.mmproj_path, n_parallel=2, n_ctx=512, n_threads=1)
    job = rt.submit(_ask("Hello there."), temperature=0, max_tokens=500, ignore_eos=True)
    rt.close()
    assert job.result(timeout=30).finish_reason in ("cancelled", "length", "context")
    with pytest.raises(UsageError, match="closed"):
        rt.submit(_ask("Hi"))
