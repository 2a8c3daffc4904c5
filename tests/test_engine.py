"""The engine on real llama-cpp-python with tiny synthetic models: KV reuse, image cache, overflow, sampling, GPU
fallback, bad model files, and a Q4_K_M model (no SIGILL)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_cli.cpu_kernels import GPU_REINSTALL
from llava_cli.errors import ContextOverflowError, InputNotFoundError, ModelFileError, UsageError
from llava_cli.images import load_image
from llava_cli.runtime import Engine, Message, llamacpp
from tests.model_fixtures import test_image


def _png(path: Path, seed: int) -> Path:
    Image.fromarray(test_image(96, seed=seed), "RGB").save(path)
    return path


@pytest.fixture(scope="module")
def engine(tiny_pair_f32) -> Iterator[Engine]:  # type: ignore[no-untyped-def]
    # F32 weights: bit-for-bit stable results, so "KV reuse == full evaluation" can be asserted exactly.
    with Engine(tiny_pair_f32.text_path, tiny_pair_f32.mmproj_path, n_ctx=2048, n_threads=2) as eng:
        yield eng


@pytest.fixture
def pictures(tmp_path: Path) -> list[Path]:
    return [_png(tmp_path / f"p{i}.png", seed=i) for i in range(3)]


GREEDY = {"temperature": 0.0, "max_tokens": 12}


def test_ask_returns_answer(engine: Engine, pictures: list[Path]) -> None:
    a = engine.ask("What is this?", [pictures[0]], **GREEDY)
    assert a.completion_tokens == len(a.tokens) > 0
    assert a.finish_reason in ("stop", "length")
    assert a.prompt_tokens > 576  # 576 image positions + the text
    assert a.cached_tokens == 0
    assert a.timings.ttft > 0 and a.timings.total >= a.timings.ttft
    d = a.to_dict()
    assert d["answer"] == a.text and d["tokens"]["completion"] == a.completion_tokens
    assert "decode_tokens_per_s" in d["timings"]


def test_kv_reuse_equals_full_evaluation(engine: Engine, pictures: list[Path]) -> None:
    """Three turns (a second image arrives in turn 2) with KV reuse == a fresh evaluation of the same history."""
    chat = engine.chat(system="Be brief.")
    answers = [
        chat.ask("What is this?", [pictures[0]], **GREEDY),
        chat.ask("And this one?", [pictures[1]], **GREEDY),
        chat.ask("Which is brighter?", **GREEDY),
    ]
    # Later turns only evaluated their own tokens.
    assert answers[1].cached_tokens > 576 and answers[1].prompt_tokens < answers[1].cached_tokens
    assert answers[2].prompt_tokens < 40 and answers[2].images_encoded == 0
    for n in range(1, 3):
        fresh = engine.chat(system="Be brief.", history=chat.messages[: 2 * n])
        engine.clear_kv()
        replay = fresh.ask(chat.messages[2 * n].text, chat.messages[2 * n].images, **GREEDY)
        assert replay.cached_tokens == 0  # everything evaluated in one go
        assert replay.tokens == answers[n].tokens, f"turn {n + 1} differs after a full re-evaluation"


def test_conversations_take_turns_on_one_kv_cache(engine: Engine, pictures: list[Path]) -> None:
    a, b = engine.chat(), engine.chat()
    a1 = a.ask("What is this?", [pictures[0]], **GREEDY)
    b.ask("Describe it.", [pictures[1]], **GREEDY)
    a2 = a.ask("More detail?", **GREEDY)  # a lost the KV cache to b: it replays all but the common "USER:" prefix
    assert a2.cached_tokens == len(engine.tokenizer.text("USER: ", start=True)) and a2.prompt_tokens > 576
    solo = engine.chat()
    solo.ask("What is this?", [pictures[0]], **GREEDY)
    assert solo.ask("More detail?", **GREEDY).tokens == a2.tokens
    assert a1.tokens == solo.messages[1].tokens


def test_same_image_bytes_encoded_once(tiny_pair_f32, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = _png(tmp_path / "a.png", seed=7)
    copy = tmp_path / "same-bytes-other-name.png"
    shutil.copyfile(first, copy)
    with Engine(tiny_pair_f32.text_path, tiny_pair_f32.mmproj_path, n_ctx=2048, n_threads=2) as eng:
        a = eng.ask("What is this?", [first], **GREEDY)
        assert a.images_encoded == 1 and eng.stats.images_encoded == 1
        b = eng.ask("What is this?", [copy], **GREEDY)
        assert b.images_encoded == 0 and b.images_cached == 1
        assert b.tokens == a.tokens  # the cached embeddings are the same embeddings
        chat = eng.chat()
        chat.ask("Look.", [load_image(first)], **GREEDY)
        chat.ask("Again?", **GREEDY)
        chat.ask("And now both?", [copy], **GREEDY)
        assert eng.stats.images_encoded == 1
        eng.ask("Other?", [_png(tmp_path / "b.png", seed=8)], **GREEDY)
        assert eng.stats.images_encoded == 2


def test_image_cache_is_bounded(tiny_pair_f32, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with Engine(tiny_pair_f32.text_path, tiny_pair_f32.mmproj_path, n_ctx=2048, image_cache_mb=0) as eng:
        for i in range(3):
            eng.ask("?", [_png(tmp_path / f"{i}.png", seed=20 + i)], max_tokens=1)
        assert eng.image_cache_size == 1  # only the most recent survives a zero budget


def test_context_overflow_has_the_numbers(tiny_pair_f32, pictures: list[Path]) -> None:  # type: ignore[no-untyped-def]
    with Engine(tiny_pair_f32.text_path, tiny_pair_f32.mmproj_path, n_ctx=660) as eng:
        chat = eng.chat()
        chat.ask("What is this?", [pictures[0]], max_tokens=4, temperature=0)
        # The context is exactly --ctx positions (llama.cpp's padding to 256 cells is not handed out).
        assert eng.n_ctx == 660
        pattern = (
            rf"needs \d+ tokens \(1 image\(s\) × 576 tokens\), \d+ of them from the conversation.*holds {eng.n_ctx}"
        )
        with pytest.raises(ContextOverflowError, match=pattern):
            chat.ask("And this?", [pictures[1]], max_tokens=4)
        # The conversation survives: a short text turn still fits, and after clear() a new image does.
        chat.ask("Colour?", max_tokens=2, temperature=0)
        chat.clear()
        user_prefix = len(eng.tokenizer.text("USER: ", start=True))  # all a new picture has in common with the old
        assert chat.ask("And this?", [pictures[1]], max_tokens=2, temperature=0).cached_tokens == user_prefix
        with pytest.raises(ContextOverflowError, match=r"needs \d+ tokens \(2 image\(s\) × 576 tokens\) but") as exc:
            eng.ask("Two?", [pictures[0], pictures[1]], max_tokens=2)
        assert exc.value.hint is not None and "raise --ctx" in exc.value.hint


def test_generation_stops_at_the_context_end(tiny_pair_f32, pictures: list[Path]) -> None:  # type: ignore[no-untyped-def]
    """The context is exactly n_ctx positions: the answer runs into its end and says so."""
    with Engine(tiny_pair_f32.text_path, tiny_pair_f32.mmproj_path, n_ctx=2048) as eng:
        probe = eng.ask("What is this?", [pictures[0]], max_tokens=6, temperature=0)
    assert probe.finish_reason == "length"  # six tokens without an end of sequence: room for five is enough
    n_prompt = probe.prompt_tokens
    with Engine(tiny_pair_f32.text_path, tiny_pair_f32.mmproj_path, n_ctx=n_prompt + 4) as eng:
        a = eng.ask("What is this?", [pictures[0]], max_tokens=500, temperature=0)
    assert a.finish_reason == "context"
    # n_prompt + 4 positions hold the prompt and four generated tokens; a fifth is sampled and never decoded.
    assert a.completion_tokens == 5 and a.tokens == probe.tokens[:5]
    assert a.prompt_tokens + a.completion_tokens == n_prompt + 4 + 1


def test_streaming_pieces_make_the_answer(engine: Engine, pictures: list[Path]) -> None:
    pieces: list[str] = []
    a = engine.ask("What is this?", [pictures[2]], on_token=pieces.append, temperature=0, max_tokens=24)
    assert all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces).strip() == a.text


def test_seeded_sampling_is_reproducible(engine: Engine, pictures: list[Path]) -> None:
    kw = {"temperature": 1.0, "top_p": 0.95, "max_tokens": 16}
    a = engine.ask("Tell me.", [pictures[0]], seed=42, **kw)
    b = engine.ask("Tell me.", [pictures[0]], seed=42, **kw)
    c = engine.ask("Tell me.", [pictures[0]], seed=43, **kw)
    assert a.tokens == b.tokens
    assert c.tokens != a.tokens  # 16 tokens from a ~400-token vocabulary at T=1: a collision is ~impossible


def test_history_as_text_replays(engine: Engine, pictures: list[Path]) -> None:
    """A chat loaded back from JSON (answers as text, no token ids) can continue."""
    im = load_image(pictures[0])
    chat = engine.chat(history=[Message("user", "What is this?", [im]), Message("assistant", "A red square.")])
    a = chat.ask("Why?", **GREEDY)
    assert a.prompt_tokens + a.cached_tokens > 576 and a.images_encoded + a.images_cached == 1
    assert chat.messages[1].tokens == engine.tokenizer.text(" A red square.", start=False)
    with pytest.raises(UsageError):
        engine.chat(history=[Message("assistant", "hi")])


def test_gpu_request_on_cpu_build_warns_once(tiny_pair_f32, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python has GPU support")
    monkeypatch.setattr(llamacpp, "_warned_gpu", False)
    notes: list[str] = []
    kw = {"n_ctx": 1024, "on_note": notes.append}
    with Engine(tiny_pair_f32.text_path, tiny_pair_f32.mmproj_path, n_gpu_layers="all", **kw) as eng:
        assert eng.n_gpu_layers == 0 and not eng.mmproj_offload
        a = eng.ask("Hi", max_tokens=2, temperature=0)
        assert a.finish_reason in ("stop", "length") and a.completion_tokens == len(a.tokens) <= 2
        assert a.finish_reason == "stop" or a.completion_tokens == 2
    with Engine(tiny_pair_f32.text_path, tiny_pair_f32.mmproj_path, n_gpu_layers=10, **kw):
        pass
    assert len(notes) == 1
    assert GPU_REINSTALL in notes[0] and "llama-cpp-python==0.3.36" in notes[0]
    with Engine(tiny_pair_f32.text_path, tiny_pair_f32.mmproj_path, n_gpu_layers="auto", **kw) as eng:
        assert eng.n_gpu_layers == 0  # the planner says CPU; no warning for auto
    assert len(notes) == 1
    with pytest.raises(UsageError, match="--n-gpu-layers 'many'"):
        Engine(tiny_pair_f32.text_path, tiny_pair_f32.mmproj_path, n_gpu_layers="many")


def test_bad_model_files(tiny_pair_f16, tiny256_checkpoint, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    text, mmproj = tiny_pair_f16.text_path, tiny_pair_f16.mmproj_path
    with pytest.raises(InputNotFoundError, match="nope.gguf"):
        Engine(tmp_path / "nope.gguf", mmproj)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(text.read_bytes()[: text.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="cut.gguf"):
        Engine(truncated, mmproj)
    with pytest.raises(ModelFileError, match="vision projector"):
        Engine(mmproj, text)  # swapped
    from quantize import convert

    other = convert(tiny256_checkpoint, tmp_path / "other", outtype="f16")
    with pytest.raises(ModelFileError, match="does not belong"):
        Engine(text, other.mmproj_path)


def test_q4_k_m_runs(tiny256_checkpoint, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Quantized weights load and run (the AMX/SIGILL trap: the build must not use instructions this CPU lacks)."""
    from quantize import convert

    f16 = convert(tiny256_checkpoint, tmp_path / "f16", outtype="f16")
    try:
        from quantize import quantize

        q = quantize(f16.text_path, bits="q4_k_m", out=tmp_path / "q")
        text_path, mmproj_path = q.text_path, q.mmproj_path
    except ImportError:  # the quantizer module is not there: use llama.cpp's quantizer directly
        import ctypes

        import llama_cpp

        text_path, mmproj_path = tmp_path / "q4.gguf", f16.mmproj_path
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        assert (
            llama_cpp.llama_model_quantize(str(f16.text_path).encode(), str(text_path).encode(), ctypes.byref(params))
            == 0
        )
    with Engine(text_path, mmproj_path, n_ctx=1024) as eng:
        assert eng.text_info.file_type in (None, "Q4_K_M", "MOSTLY_Q4_K_M")
        img = Image.fromarray(np.full((50, 80, 3), 128, np.uint8))
        buf = tmp_path / "g.webp"
        img.save(buf, "WEBP")
        a = eng.ask("What is this?", [buf], max_tokens=8, temperature=0)
        assert a.completion_tokens > 0


def test_closed_engine_refuses_politely(tiny_pair_f32) -> None:  # type: ignore[no-untyped-def]
    eng = Engine(tiny_pair_f32.text_path, tiny_pair_f32.mmproj_path, n_ctx=1024)
    chat = eng.chat()
    eng.close()
    eng.close()  # twice is fine
    with pytest.raises(UsageError, match="closed"):
        chat.ask("Hi")
