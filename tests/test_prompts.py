"""The token ids we feed equal what transformers' LlavaProcessor + tokenizer build for the same conversation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from llava_cli.prompts import (
    ImageSlot,
    Segment,
    Text,
    answer_segments,
    merge_text,
    render,
    user_turn,
)
from llava_cli.runtime import VocabOnly

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def processor(tiny_checkpoint: Path):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    return transformers.AutoProcessor.from_pretrained(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def vocab(tiny_pair_f16) -> Iterator[VocabOnly]:  # type: ignore[no-untyped-def]
    with VocabOnly(tiny_pair_f16.text_path) as v:
        yield v


def _hf_ids(processor, text: str, n_images: int) -> list[int | str]:  # type: ignore[no-untyped-def]
    """transformers' ids, with each expanded run of image tokens collapsed to one "IMG"."""
    images = [Image.new("RGB", (64, 48), (200, 30, 30))] * n_images or None
    ids = processor(text=text, images=images, return_tensors="np")["input_ids"][0].tolist()
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    out: list[int | str] = []
    for i in ids:
        if i == image_id:
            if out and out[-1] == "IMG":
                continue
            out.append("IMG")
        else:
            out.append(i)
    assert ids.count(image_id) == 576 * n_images  # the processor expands each <image> to 576 tokens
    return out


def _our_ids(vocab: VocabOnly, segments: list[Segment]) -> list[int | str]:
    out: list[int | str] = []
    for item in vocab.tokenizer.segments(merge_text(segments)):
        if isinstance(item, ImageSlot):
            out.append("IMG")
        else:
            out.extend(item)
    return out


CASES = {
    "one image": [*user_turn("What is this?", 1, first=True)],
    "system prompt": [*user_turn("Describe the picture.", 1, first=True, system="You are terse.")],
    "two images": [*user_turn("What differs?", 2, first=True)],
    "text only": [*user_turn("Hello there", 0, first=True)],
    "unicode": [*user_turn("Qu'est-ce que c'est ? 猫 — ok", 1, first=True)],
    "multi-turn": [
        *user_turn("What is this?", 1, first=True, system="Be brief."),
        *answer_segments("A red square."),
        *user_turn("And the colour?", 0, first=False),
        *answer_segments("Red, mostly.\nSome blue."),
        *user_turn("Look at this one", 1, first=False),
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_ids_equal_transformers(case: str, processor, vocab: VocabOnly) -> None:  # type: ignore[no-untyped-def]
    segments = CASES[case]
    text = render(merge_text(segments))
    n_images = sum(isinstance(s, ImageSlot) for s in segments)
    assert _our_ids(vocab, segments) == _hf_ids(processor, text, n_images)


def test_template_text() -> None:
    segs = merge_text(
        [
            *user_turn("What is this?", 1, first=True, system="Be brief."),
            *answer_segments("A cat."),
            *user_turn("Colour?", 0, first=False),
        ]
    )
    assert render(segs) == "Be brief. USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: Colour? ASSISTANT:"
    assert render(user_turn("Hi", 2, first=True)) == "USER: <image>\n<image>\nHi ASSISTANT:"


def test_mtmd_space_trap_is_avoided(vocab: VocabOnly) -> None:
    """llama.cpp's raw tokenizer puts a "▁" before the text after an image; our tokenizer must not."""
    raw = vocab.tokenize_raw("\nWhat", False)
    ours = vocab.tokenizer.text("\nWhat", start=False)
    assert raw[1:] == ours and len(raw) == len(ours) + 1


def test_literal_image_text_is_not_a_slot(vocab: VocabOnly) -> None:
    ids = vocab.tokenizer.text("say <image> please", start=False)
    image_id = vocab.tokenize_raw("<image>", False)
    assert len(ids) > 3 and image_id != ids[:1]
    assert all(isinstance(x, int) for x in ids)


def test_text_segment_start_gets_bos(vocab: VocabOnly) -> None:
    ids = vocab.tokenizer.text("USER: ", start=True)
    assert ids[0] == 1
    assert Text("x", start=True).start
