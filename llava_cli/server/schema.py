"""Pydantic models of the OpenAI chat-completions wire format: the request we accept and what we send back.

Requests are lenient where OpenAI clients differ harmlessly (unknown fields are ignored: ``user``, ``metadata``,
``store``, ``presence_penalty``...), strict where ignoring a field would silently change the meaning of the answer
(``n`` > 1, ``tools``, ``logprobs``, a ``response_format`` other than text): those are refused in
`llava_cli.server.messages`, with the field named in the error's ``param``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# ------------------------------------------------------------------------------------------------ request


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lenient):
    url: str
    detail: str | None = None  # OpenAI's resolution hint; LLaVA-1.5 always sees 336×336, so it is ignored


class ContentPart(_Lenient):
    """One part of a message's content. Its fields are checked in messages.py by ``type`` (text, image_url), so
    that a part we do not support (input_audio, file...) or a part missing its field gets an error naming it."""

    type: str
    text: str | None = None
    # Clients send {"url": ...}; some older ones send the URL as a bare string.
    image_url: ImageURL | str | None = None


class ChatMessage(_Lenient):
    role: str  # checked in messages.py, so that an unsupported role gets a message naming it, not a schema dump
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    # Optional on our side: we serve one model. When given it must name it (see app.py).
    model: str | None = None
    messages: list[ChatMessage]
    stream: bool = False
    stream_options: StreamOptions | None = None
    # None = our defaults, the same as `llava run` (documented in docs/serving.md).
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    # Accepted only in their no-op form; anything else is refused rather than silently ignored.
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


# ------------------------------------------------------------------------------------------------ response


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


FinishReason = Literal["stop", "length"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    # Only the extra last chunk asked for with stream_options.include_usage carries usage (choices empty).
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llava-cli"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ------------------------------------------------------------------------------------------------ errors


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
