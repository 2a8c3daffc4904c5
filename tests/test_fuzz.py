"""Property-based fuzzing of the two validators that stand between a user's file and C code.

A valid tiny GGUF (text model or mmproj) is mutated in its header (bytes, 32/64-bit fields set to edge values,
deletions, insertions, truncation) or its weights; `read_gguf` must either refuse it with a one-line
`ModelFileError` naming the file, or accept it — and then llama.cpp, in a forked child, loads it and answers one
token about an image. Never a crash, and never a file the validator passes that llama.cpp then refuses.
Same for images through `load_image`: an RGB picture or an `ImageError`, nothing else.

The number of examples is bounded for CI, with fixed examples (derandomized); ``LLAVA_FUZZ_EXAMPLES=N`` runs N
random examples per target for a long local run.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llava_cli.errors import ImageError, ModelFileError
from llava_cli.gguf_info import check_pair, read_gguf
from llava_cli.images import load_image
from tests.bad_inputs import load_in_child, picture

EXAMPLES = int(os.environ.get("LLAVA_FUZZ_EXAMPLES", "0")) or None


def _fuzz(default_examples: int) -> settings:
    return settings(
        max_examples=EXAMPLES or default_examples,
        # CI runs the same examples every time (a failure is reproducible); a long local run explores.
        derandomize=EXAMPLES is None,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


INTERESTING_32 = [0, 1, 2, 3, 7, 13, 255, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF]
INTERESTING_64 = [0, 1, 12, 2**31, 2**32, 2**40, 2**62, 2**63, 2**64 - 1]


def _mutations(size: int, header_end: int) -> st.SearchStrategy[list[tuple]]:
    header = st.integers(0, header_end - 1)
    one = st.one_of(
        st.tuples(st.just("byte"), header, st.integers(0, 255)),
        st.tuples(st.just("u32"), header, st.sampled_from(INTERESTING_32)),
        st.tuples(st.just("u64"), header, st.sampled_from(INTERESTING_64)),
        st.tuples(st.just("delete"), header, st.integers(1, 16)),
        st.tuples(st.just("insert"), header, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("truncate"), st.integers(0, size - 1)),
    )
    if header_end < size:  # a GGUF: also scribble over the weights
        weights = st.tuples(st.just("weights"), st.integers(header_end, size - 1), st.binary(min_size=1, max_size=64))
        one = st.one_of(one, weights)
    return st.lists(one, min_size=1, max_size=3)


def _apply(data: bytes, mutations: list[tuple]) -> bytes:
    buf = bytearray(data)
    for m in mutations:
        if not buf:
            break
        kind, off = m[0], min(m[1], max(0, len(buf) - 1))
        if kind == "byte":
            buf[off] = m[2]
        elif kind in ("u32", "u64"):
            blob = struct.pack("<I" if kind == "u32" else "<Q", m[2])
            buf[off : off + len(blob)] = blob
        elif kind == "delete":
            del buf[off : off + m[2]]
        elif kind == "insert":
            buf[off:off] = m[2]
        elif kind == "truncate":
            del buf[off:]
        elif kind == "weights":
            buf[off : off + len(m[2])] = m[2]
    return bytes(buf)


def _data_offset(path: Path) -> int:
    return int(gguf.GGUFReader(path).data_offset)


@pytest.fixture(scope="module")
def fuzz_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "good.png"
    picture().save(path)
    return path


def _check_mutant(role: str, pair, mutant_bytes: bytes, image: Path, stats: dict[str, int]) -> None:  # type: ignore[no-untyped-def]
    good = Path(pair.text_path if role == "text" else pair.mmproj_path)
    with tempfile.TemporaryDirectory() as tmp:
        mutant = Path(tmp) / good.name
        mutant.write_bytes(mutant_bytes)
        try:
            info = read_gguf(mutant, expect=role)  # type: ignore[arg-type]
            other = read_gguf(pair.mmproj_path if role == "text" else pair.text_path)
            check_pair(info, other) if role == "text" else check_pair(other, info)
        except ModelFileError as exc:
            message = str(exc)
            assert "\n" not in message and (mutant.name in message or str(mutant) in message), message
            stats["refused"] += 1
            return
        text, mmproj = (mutant, Path(pair.mmproj_path)) if role == "text" else (Path(pair.text_path), mutant)
        code, outcome, llama_log = load_in_child(text, mmproj, image, Path(tmp) / "child")
        assert code >= 0, f"llama.cpp crashed (signal {-code}) on a file read_gguf accepted:\n{llama_log[-3000:]}"
        assert code == 0 and outcome, f"the child failed without a LlavaError (exit {code}):\n{llama_log[-3000:]}"
        # Accepted means usable: a file llama.cpp then refuses (even politely) is a gap in the validator.
        assert outcome["ok"], f"read_gguf accepted a file llama.cpp refuses: {outcome}"
        stats["loaded"] += 1


@pytest.mark.parametrize("role", ["text", "mmproj"])
def test_mutated_gguf_is_refused_or_loads(role: str, tiny_pair_f16, fuzz_image: Path) -> None:  # type: ignore[no-untyped-def]
    good = Path(tiny_pair_f16.text_path if role == "text" else tiny_pair_f16.mmproj_path)
    data = good.read_bytes()
    stats = {"refused": 0, "loaded": 0}

    @_fuzz(150)
    @given(_mutations(len(data), _data_offset(good)))
    def prop(mutations: list[tuple]) -> None:
        _check_mutant(role, tiny_pair_f16, _apply(data, mutations), fuzz_image, stats)

    prop()
    print(f"\nfuzz {role} GGUF: {stats}")
    # The property ran on real mutants: some refused by the validator, and not every example trivially so.
    assert stats["refused"] > 0 and sum(stats.values()) >= (EXAMPLES or 150) * 0.9, stats


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    picture((40, 32), seed=3).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "TIFF", "WEBP"])
def test_mutated_image_is_refused_or_rgb(fmt: str) -> None:
    data = _encoded(fmt)
    stats = {"refused": 0, "accepted": 0}

    @_fuzz(200)
    @given(_mutations(len(data), len(data)))
    def prop(mutations: list[tuple]) -> None:
        mutant = _apply(data, mutations)
        try:
            loaded = load_image(mutant)
        except ImageError as exc:
            assert "\n" not in str(exc) and "<bytes>" in str(exc), str(exc)
            stats["refused"] += 1
            return
        assert loaded.image.mode == "RGB" and loaded.width >= 1 and loaded.height >= 1
        pixels = np.asarray(loaded.image)
        assert pixels.shape == (loaded.height, loaded.width, 3) and pixels.dtype == np.uint8
        stats["accepted"] += 1

    prop()
    print(f"\nfuzz {fmt}: {stats}")
    assert stats["refused"] > 0, stats


# ----------------------------------------------------------------------------------------------------------------
# File names (issue #15): any bytes a Linux name may hold. Create the files, discover them, caption them with a fake
# captioner (the model is not what is tested), stop halfway, resume: every file captioned exactly once, its record's
# path giving back its exact bytes, its sidecar beside it, and the shards a partition of the set.


class _NameCaptioner:
    """Answers with the prompt it was given (which holds the {filename}); stops the batch after `stop_after`."""

    model_name = "fake"
    quantization = "none"

    def __init__(self, stop_after: int | None = None) -> None:
        self.calls = 0
        self.stop_after = stop_after

    def caption(self, image: Any, prompt: str) -> tuple[str, int]:
        self.calls += 1
        if self.stop_after is not None and self.calls > self.stop_after:
            raise KeyboardInterrupt  # a second Ctrl-C: the current image is dropped, not recorded
        return f"seen: {prompt}", 1


_NAME_BYTES = st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_"))
_NAMES = st.lists(
    _NAME_BYTES.filter(lambda b: not b.startswith(b".")), min_size=1, max_size=6, unique_by=lambda b: b.lower()
)


def test_any_file_name_is_captioned_once_and_resumed() -> None:
    from llava_cli.captioning import caption_batch, read_log, select_shard
    from llava_cli.captioning.inputs import discover_images

    png = _encoded("PNG")
    stats = {"names": 0, "not_utf8": 0}

    @_fuzz(60)
    @given(_NAMES, st.integers(0, 6), st.sampled_from(["jsonl", "csv"]))
    def prop(stems: list[bytes], stop_after: int, fmt: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(os.fsencode(tmp), b"pics")
            os.mkdir(folder)
            # Unique stems (case-folded, so no two share a sidecar on any filesystem), all PNGs.
            files = []
            for stem in stems:
                raw = os.path.join(folder, stem + b".png")
                with open(raw, "wb") as fh:
                    fh.write(png)
                files.append(os.fsdecode(raw))
            stats["names"] += len(files)
            stats["not_utf8"] += sum(1 for f in files if not _utf8(os.fsencode(f)))
            found = discover_images([os.fsdecode(folder)])
            assert sorted(found) == sorted(files)
            assert sorted(p for k in range(1, 4) for p in select_shard(found, (k, 3))) == sorted(found)
            out = Path(tmp) / f"log.{fmt}"
            kw: dict[str, Any] = {"out": out, "sidecar": True, "prompt": "{filename}"}
            first = caption_batch([os.fsdecode(folder)], captioner=_NameCaptioner(stop_after), **kw)
            assert first.interrupted == (stop_after < len(files))
            second = caption_batch([os.fsdecode(folder)], captioner=_NameCaptioner(), **kw)
            assert second.skipped == first.done and second.done == len(files) - first.done
            records = read_log(out, fmt).records  # type: ignore[arg-type]  # fmt is "jsonl" or "csv"
            assert sorted(r.fs_path for r in records) == sorted(files)  # nothing lost, nothing twice
            for r in records:
                raw = os.fsencode(r.fs_path)
                assert r.ok and (r.path_bytes is None) == _utf8(raw)
                assert r.path == raw.decode("utf-8", "backslashreplace")
                assert r.caption == "seen: " + os.path.basename(raw).decode("utf-8", "backslashreplace")
                with open(os.path.splitext(raw)[0] + b".txt", encoding="utf-8", newline="") as fh:
                    assert fh.read() == r.caption + "\n"

    prop()
    print(f"\nfuzz file names: {stats}")
    assert stats["not_utf8"] > 0, stats  # the property met names that are not UTF-8


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
