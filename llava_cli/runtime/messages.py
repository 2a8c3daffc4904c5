"""What crosses the runtime's API: a conversation `Message`, the `Answer` to a request and its `Timings`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from llava_cli.images import LoadedImage

FinishReason = Literal["stop", "length", "context", "cancelled"]


@dataclass
class Timings:
    """Seconds spent in each phase of one request. ``ttft`` = from the call to the first generated token. With
    several sequences in flight, ``prefill`` and ``decode`` are wall time of the steps this request took part in."""

    load_images: float = 0.0
    encode: float = 0.0  # vision encode of images not already cached
    prefill: float = 0.0  # llama_decode of the new prompt tokens and image embeddings
    ttft: float = 0.0
    decode: float = 0.0  # generation after the first token
    total: float = 0.0
    queued: float = 0.0  # waiting for a free sequence slot

    n_decoded: int = 0  # tokens generated after the first one (what ``decode`` measures)

    @property
    def decode_tokens_per_s(self) -> float:
        return 0.0 if self.decode <= 0 else self.n_decoded / self.decode


@dataclass
class Answer:
    """One assistant turn."""

    text: str
    tokens: list[int]
    finish_reason: FinishReason
    prompt_tokens: int  # positions evaluated for this request (text + image positions)
    cached_tokens: int  # positions reused from the KV cache (a conversation's earlier turns, a shared prefix)
    completion_tokens: int
    images_encoded: int  # images that went through the vision encoder for this request
    images_cached: int  # images whose embeddings came from the cache
    timings: Timings
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        t: dict[str, Any] = asdict(self.timings)
        t["decode_tokens_per_s"] = round(self.timings.decode_tokens_per_s, 3)
        return {
            "answer": self.text,
            "finish_reason": self.finish_reason,
            "tokens": {
                "prompt": self.prompt_tokens,
                "cached": self.cached_tokens,
                "completion": self.completion_tokens,
            },
            "image_encodes": {"encoded": self.images_encoded, "cached": self.images_cached},
            "timings": {k: round(v, 4) if isinstance(v, float) else v for k, v in t.items()},
            "notes": list(self.notes),
        }


@dataclass
class Message:
    """A conversation message. Assistant messages keep the generated token ids, so a replay is exact."""

    role: Literal["user", "assistant"]
    text: str
    images: list[LoadedImage] = field(default_factory=list)
    tokens: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"role": self.role, "content": self.text}
        if self.images:
            d["images"] = [{"name": im.name, "sha256": im.sha256} for im in self.images]
        return d


@dataclass
class EngineStats:
    images_encoded: int = 0  # vision encodes run by this engine (the cache avoids repeats)
    image_cache_hits: int = 0
    tokens_evaluated: int = 0  # prompt positions fed through llama_decode (text + image positions)
    kv_resets: int = 0  # requests that found nothing of their prompt in the KV cache
