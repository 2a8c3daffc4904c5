"""An OpenAI chat request -> what the runtime takes: a system prompt, llava_cli `Message`s, generation settings.

The LLaVA-1.5 template has one system prompt (before the first USER turn), alternating USER/ASSISTANT turns, and
puts a user turn's images before its text. So:

* ``system`` (and ``developer``, OpenAI's newer name for it) messages are joined, in order, into the system prompt;
* consecutive user (or assistant) messages are merged into one turn (texts joined by a newline, images in order);
* images may only come in user messages; assistant history goes back in as its text;
* the last message must be the user's (there is nothing to answer otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llava_cli.images import LoadedImage
from llava_cli.runtime import Message
from llava_cli.server import images
from llava_cli.server.answers import AnswerMemory
from llava_cli.server.errors import bad_request
from llava_cli.server.schema import ChatCompletionRequest, ChatMessage

# What a request gets when it does not say: the same defaults as `llava run`.
DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 0.95
DEFAULT_MAX_TOKENS = 512
MAX_STOP_STRINGS = 4  # OpenAI's limit


@dataclass
class Generate:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Prompt:
    system: str | None
    messages: list[Message]  # alternating user/assistant, ending with a user message
    generate: Generate


def check_supported(req: ChatCompletionRequest) -> None:
    """Refuse the fields whose meaning we cannot honour, instead of silently answering something else."""
    if req.n not in (None, 1):
        raise bad_request("n: only one choice per request is supported (n=1)", "n", "unsupported_value")
    if req.logprobs:
        raise bad_request("logprobs: not supported by this server", "logprobs", "unsupported_value")
    if req.tools:
        raise bad_request("tools: function calling is not supported by this server", "tools", "unsupported_value")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise bad_request("response_format: only {'type': 'text'} is supported", "response_format", "unsupported_value")


def generate_settings(req: ChatCompletionRequest) -> Generate:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise bad_request(f"stop: at most {MAX_STOP_STRINGS} stop strings", "stop")
    max_tokens = req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS
    return Generate(
        max_tokens=max_tokens,
        temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
        top_p=DEFAULT_TOP_P if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=[s for s in stop if s],
    )


@dataclass
class _Turn:
    role: str
    texts: list[str] = field(default_factory=list)
    images: list[LoadedImage] = field(default_factory=list)


async def _parts(msg: ChatMessage, where: str, policy: images.ImagePolicy) -> tuple[list[str], list[LoadedImage]]:
    if msg.content is None:
        return [], []
    if isinstance(msg.content, str):
        return [msg.content], []
    texts: list[str] = []
    found: list[LoadedImage] = []
    for j, part in enumerate(msg.content):
        param = f"{where}.content[{j}]"
        if part.type == "text":
            if part.text is None:
                raise bad_request(f"{param}: a text part needs 'text'", param)
            texts.append(part.text)
        elif part.type == "image_url":
            if part.image_url is None:
                raise bad_request(f"{param}: an image_url part needs 'image_url'", param)
            if msg.role != "user":
                raise bad_request(f"{param}: only user messages can carry images", param)
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            found.append(await images.load(url, policy, param))
        else:
            raise bad_request(
                f"{param}: content parts of type {part.type!r} are not supported (only 'text' and 'image_url')",
                param,
                "unsupported_content_type",
            )
    return texts, found


async def build_prompt(
    req: ChatCompletionRequest, policy: images.ImagePolicy, answers: AnswerMemory | None = None
) -> Prompt:
    """Validate and convert `req` (images fetched and decoded); `APIError` for anything the runtime cannot take."""
    check_supported(req)
    if not req.messages:
        raise bad_request("messages: at least one message is required", "messages")
    system: list[str] = []
    turns: list[_Turn] = []
    for i, msg in enumerate(req.messages):
        where = f"messages[{i}]"
        if msg.role not in ("system", "developer", "user", "assistant"):
            raise bad_request(f"{where}.role: {msg.role!r} is not supported (system, user, assistant)", f"{where}.role")
        texts, found = await _parts(msg, where, policy)
        if msg.role in ("system", "developer"):
            system.extend(t for t in texts if t.strip())
            continue
        if turns and turns[-1].role == msg.role:
            turns[-1].texts.extend(texts)
            turns[-1].images.extend(found)
        else:
            turns.append(_Turn(msg.role, texts, found))
    if not turns or turns[-1].role != "user":
        raise bad_request("messages: the last message must be the user's", "messages")
    if turns[0].role != "user":
        raise bad_request("messages: an assistant message cannot come before the first user message", "messages")
    out: list[Message] = []
    for t in turns:
        text = "\n".join(s.strip() for s in t.texts if s.strip())
        if t.role == "user" and not text and not t.images:
            raise bad_request("messages: a user message has no text and no image", "messages")
        if t.role == "user":
            out.append(Message("user", text, images=list(t.images)))
        else:  # an answer of ours comes back with the ids it was generated as (answers.py says why)
            out.append(Message("assistant", text, tokens=answers.tokens(text) if answers is not None else None))
    return Prompt("\n".join(s.strip() for s in system) or None, out, generate_settings(req))
