"""The LLaVA-1.5 (Vicuna v1) conversation template, and its tokenization exactly as transformers does it.

A conversation renders as (LLaVA's ``conv_vicuna_v1``: separator " " after a user turn, ``</s>`` after an answer)::

    [{system} ]USER: <image>\\n{prompt} ASSISTANT: {answer}</s>USER: {prompt 2} ASSISTANT:

We never hand this string to a tokenizer in one piece. It is cut into segments (text, image slot, end-of-sequence)
and each text segment is tokenized on its own, because of two traps:

* llama.cpp's SentencePiece tokenizer prepends a space ("▁") to every raw text fragment that starts the input or
  follows a special token; transformers' LLaVA tokenizer (``legacy: false``, Metaspace ``prepend_scheme: first``)
  only does so at the very start of the string. So the text after ``<image>`` must be ``"<0x0A>What"``, not
  ``"▁" "<0x0A>" "What"`` (which is what ``mtmd_tokenize`` feeds), and the text after ``</s>`` starts with ``USER``,
  not ``▁USER``.
* llama-cpp-python's Llava15ChatHandler renders its template without the newlines, so it is not used either.

`tokenize_segments` applies these rules given the model's raw ``llama_tokenize``; tests compare the result with
what transformers' LlavaProcessor builds for the same conversation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class Text:
    """Plain text; ``start`` marks the text that begins the whole sequence (gets BOS and the SentencePiece space)."""

    text: str
    start: bool = False


@dataclass(frozen=True)
class ImageSlot:
    """Where the embeddings of the turn's image number ``index`` go."""

    index: int


@dataclass(frozen=True)
class Tokens:
    """Token ids fed as they are (an answer the model generated earlier, or the end-of-sequence separator)."""

    ids: tuple[int, ...]


@dataclass(frozen=True)
class EndOfTurn:
    """The ``</s>`` that closes an assistant answer (the model's end-of-sequence token)."""


Segment = Text | ImageSlot | Tokens | EndOfTurn


def user_turn(prompt: str, n_images: int, *, first: bool, system: str | None = None) -> list[Segment]:
    """The segments of one user turn, up to and including the ``ASSISTANT:`` generation prompt.

    ``first`` is True for the turn that opens the conversation (the only place the system prompt goes).
    """
    head = f"{system.strip()} USER: " if first and system and system.strip() else "USER: "
    segments: list[Segment] = [Text(head, start=first)]
    for i in range(n_images):
        segments += [ImageSlot(i), Text("\n")]
    segments.append(Text(f"{prompt.strip()} ASSISTANT:"))
    return merge_text(segments)


def answer_segments(answer: str | None = None, tokens: Sequence[int] | None = None) -> list[Segment]:
    """An assistant answer and its closing ``</s>``: generated token ids when we have them (exact replay), else text."""
    body: Segment = Tokens(tuple(tokens)) if tokens is not None else Text(" " + (answer or "").strip())
    return [body, EndOfTurn()]


def merge_text(segments: Sequence[Segment]) -> list[Segment]:
    """Join adjacent non-start text segments (fewer tokenizer calls, and merges across them stay possible)."""
    out: list[Segment] = []
    for seg in segments:
        prev = out[-1] if out else None
        if isinstance(seg, Text) and isinstance(prev, Text) and not seg.start:
            out[-1] = Text(prev.text + seg.text, start=prev.start)
        else:
            out.append(seg)
    return out


def render(segments: Sequence[Segment], *, eos: str = "</s>") -> str:
    """The conversation as one string with ``<image>`` markers: what transformers' processor is given."""
    parts = []
    for seg in segments:
        if isinstance(seg, Text):
            parts.append(seg.text)
        elif isinstance(seg, ImageSlot):
            parts.append(IMAGE_TOKEN)
        elif isinstance(seg, EndOfTurn):
            parts.append(eos)
        else:
            raise ValueError("token segments have no text form")
    return "".join(parts)


RawTokenize = Callable[[str, bool], list[int]]
"""``(text, add_special) -> ids``: llama_tokenize with parse_special=False (a literal "<image>" in a user's prompt
is text, not an image slot)."""


class Tokenizer:
    """Turn segments into token ids the way transformers does, on top of llama.cpp's raw tokenizer."""

    def __init__(self, raw: RawTokenize, eos_id: int) -> None:
        self._raw = raw
        self.eos_id = eos_id
        # llama.cpp always prepends "▁" to a fragment; tokenizing "\n" first shows what that prefix becomes
        # ("▁" "<0x0A>" with LLaMA's vocab) so it can be cut off again for text that continues a sequence.
        self._guard = "\n"
        self._guard_ids = raw(self._guard, False)

    def text(self, text: str, *, start: bool) -> list[int]:
        """Token ids of `text`: with BOS and the leading space when it starts the sequence, else neither."""
        if start:
            return self._raw(text, True)
        if not text:
            return []
        ids = self._raw(self._guard + text, False)
        n = len(self._guard_ids)
        if ids[:n] == self._guard_ids:
            return ids[n:]
        # The guard merged with the text (a vocab with a piece spanning the newline): fall back to dropping the
        # lone space token, which is what llama.cpp put in front.
        ids = self._raw(text, False)
        space = self._raw(" ", False)
        if len(space) == 1 and ids[:1] == space and not text.startswith(" "):
            return ids[1:]
        return ids

    def segments(self, segments: Sequence[Segment]) -> list[list[int] | ImageSlot]:
        """Tokenize text segments; image slots pass through. Adjacent id runs are joined."""
        out: list[list[int] | ImageSlot] = []
        for seg in segments:
            if isinstance(seg, ImageSlot):
                out.append(seg)
                continue
            if isinstance(seg, Text):
                ids = self.text(seg.text, start=seg.start)
            elif isinstance(seg, Tokens):
                ids = list(seg.ids)
            else:
                ids = [self.eos_id]
            if out and isinstance(out[-1], list):
                out[-1].extend(ids)
            elif ids:
                out.append(ids)
        return out
