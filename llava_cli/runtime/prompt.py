"""A request's prompt as the scheduler sees it: the LLaVA-1.5 conversation (`llava_cli.prompts`) tokenized into
text runs and image slots, and the same as a flat list of position keys for prefix matching against the KV cache.

A position key is the token id for a text position and a negative number made of the image's content hash and the
row for an image position, so "same prefix" means same token ids and the same images (by content) in the same
places, position by position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llava_cli.errors import ContextOverflowError, UsageError
from llava_cli.images import LoadedImage
from llava_cli.prompts import ImageSlot, Segment, Tokenizer, answer_segments, user_turn
from llava_cli.runtime.messages import Message


@dataclass(frozen=True)
class ImagePiece:
    image: LoadedImage
    n_pos: int


Piece = list[int] | ImagePiece


def image_keys(sha256: str, n_pos: int) -> np.ndarray:
    h = int(sha256[:12], 16)  # 48 bits of the hash; with the 12-bit row below a key stays within int64
    return -(1 + ((h << 12) | np.arange(n_pos, dtype=np.int64)))


def keys_of(pieces: Sequence[Piece]) -> np.ndarray:
    parts = [
        image_keys(p.image.sha256, p.n_pos) if isinstance(p, ImagePiece) else np.asarray(p, np.int64) for p in pieces
    ]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def n_positions(pieces: Sequence[Piece]) -> int:
    return sum(p.n_pos if isinstance(p, ImagePiece) else len(p) for p in pieces)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def message_segments(messages: Sequence[Message], index: int, system: str | None) -> list[Segment]:
    """The template segments of ``messages[index]``: a user turn (with the system prompt if it opens the
    conversation), or an answer closed by ``</s>`` (its token ids when known, so a replay is exact)."""
    m = messages[index]
    if m.role == "user":
        return user_turn(m.text, len(m.images), first=index == 0, system=system)
    return answer_segments(tokens=m.tokens) if m.tokens is not None else answer_segments(answer=m.text)


def check_roles(messages: Sequence[Message], *, ends_with_user: bool) -> None:
    for i, m in enumerate(messages):
        if m.role not in ("user", "assistant"):
            raise UsageError(f"message {i + 1} has role {m.role!r}; only 'user' and 'assistant' are allowed")
        if m.role == "user" and i > 0 and messages[i - 1].role == "user":
            raise UsageError("history has two user messages in a row")
        if m.role == "assistant" and (i == 0 or messages[i - 1].role != "user"):
            raise UsageError("history has an assistant message that answers nothing")
        if m.role == "assistant" and m.images:
            raise UsageError("an assistant message cannot carry images")
    if ends_with_user and (not messages or messages[-1].role != "user"):
        raise UsageError("the last message must be a user message (the one to answer)")


def pieces_of(
    tokenizer: Tokenizer, segments: Sequence[Segment], images: Sequence[LoadedImage], n_image_tokens: int
) -> list[Piece]:
    out: list[Piece] = []
    for item in tokenizer.segments(segments):
        out.append(ImagePiece(images[item.index], n_image_tokens) if isinstance(item, ImageSlot) else item)
    return out


def build_pieces(
    tokenizer: Tokenizer, messages: Sequence[Message], *, system: str | None, n_image_tokens: int
) -> list[Piece]:
    """The whole conversation, up to the ``ASSISTANT:`` that the answer follows."""
    check_roles(messages, ends_with_user=True)
    system = system.strip() if system and system.strip() else None
    out: list[Piece] = []
    for i, m in enumerate(messages):
        out.extend(pieces_of(tokenizer, message_segments(messages, i, system), m.images, n_image_tokens))
    return out


def overflow(needed: int, n_ctx: int, *, n_images: int, n_image_tokens: int, history: int = 0) -> ContextOverflowError:
    """The one-line refusal of a prompt that does not fit, with the numbers."""
    detail = f" ({n_images} image(s) × {n_image_tokens} tokens)" if n_images else ""
    so_far = f", {history} of them from the conversation so far," if history else ""
    return ContextOverflowError(
        f"the prompt needs {needed} tokens{detail}{so_far} but the context holds {n_ctx}",
        hint="/clear the chat or raise --ctx" if history else f"raise --ctx; each image takes {n_image_tokens} tokens",
    )
