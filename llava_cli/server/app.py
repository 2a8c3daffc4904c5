"""The FastAPI app: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``, over any `Runtime`.

A request goes: API key -> body size -> JSON -> schema -> model name -> a place in the queue (else 503) -> images
fetched and decoded -> ``runtime.submit`` -> the answer, whole or streamed. Everything before the first generated
token can still fail with a proper status code, so a streamed response only starts (200, ``text/event-stream``)
once the first piece or the end of the job is known; an error after that is sent as a last SSE ``error`` event.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from llava_cli import __version__
from llava_cli.errors import LlavaError
from llava_cli.runtime import Answer
from llava_cli.server.admission import Admission
from llava_cli.server.answers import AnswerMemory
from llava_cli.server.errors import APIError, bad_request, from_llava, install_handlers, param_path
from llava_cli.server.images import ImagePolicy
from llava_cli.server.messages import Prompt, build_prompt
from llava_cli.server.protocol import Job, Runtime
from llava_cli.server.schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    Usage,
)
from llava_cli.server.streaming import Event, Failed, Finished, JobEvents, TextTail, sse

# How often a handler waiting for a non-streamed answer checks whether its client is still there.
DISCONNECT_POLL_S = 0.5


@dataclass
class ServerConfig:
    model_id: str  # what /v1/models lists and responses name; a request's "model" must be it (or absent)
    api_key: str | None = None
    images: ImagePolicy = field(default_factory=lambda: ImagePolicy(max_bytes=20 * 1024 * 1024))
    max_body_bytes: int = 64 * 1024 * 1024
    max_queue: int = 16
    created: int = field(default_factory=lambda: int(time.time()))


def _finish_reason(answer: Answer) -> str:
    # "context" (the context window is full) is OpenAI's "length" too.
    return "stop" if answer.finish_reason == "stop" else "length"


def _usage(answer: Answer) -> Usage:
    prompt = answer.prompt_tokens + answer.cached_tokens
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=answer.completion_tokens,
        total_tokens=prompt + answer.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=answer.cached_tokens),
    )


def _job_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, LlavaError):
        return from_llava(exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")


async def _read_body(request: Request, limit: int) -> bytes:
    def too_large(size: str) -> APIError:
        return APIError(
            413,
            f"the request body is {size} bytes, more than the {limit:,}-byte limit of this server (--max-body-mb)",
            code="request_too_large",
        )

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(f"{int(declared):,}")
    body = bytearray()
    async for block in request.stream():
        body += block
        if len(body) > limit:
            raise too_large(f"more than {len(body):,}")
    return bytes(body)


def _parse(body: bytes) -> ChatCompletionRequest:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON ({exc})", code="invalid_json") from exc
    if not isinstance(payload, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = param_path(tuple(first.get("loc", ())))
        raise bad_request(f"{param}: {first.get('msg', 'invalid value')}" if param else first["msg"], param) from exc


def create_app(runtime: Runtime, config: ServerConfig) -> FastAPI:
    """The app over `runtime` (not owned: the caller closes it after the server stops)."""
    admission = Admission(runtime.n_parallel, config.max_queue)
    state = {"closing": False}
    answers = AnswerMemory()
    app = FastAPI(title="llava serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.admission = admission
    app.state.runtime = runtime

    def begin_shutdown() -> None:
        """Called by the host on SIGTERM/Ctrl-C: new requests get 503 while the ones in flight finish."""
        state["closing"] = True

    app.state.begin_shutdown = begin_shutdown
    install_handlers(app)

    async def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(
                401,
                "missing or incorrect API key: send the header 'Authorization: Bearer <key>' with the key the "
                "server was started with (--api-key / LLAVA_API_KEY)",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {
            "status": "shutting_down" if state["closing"] else "ok",
            "model": config.model_id,
            "parallel": admission.parallel,
            "ctx": runtime.n_ctx,
            "running": admission.running,
            "queued": admission.queued,
        }
        return JSONResponse(body, status_code=503 if state["closing"] else 200)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=config.model_id, created=config.created)])

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def model(model_id: str) -> ModelCard:
        if model_id != config.model_id:
            raise _unknown_model(model_id)
        return ModelCard(id=config.model_id, created=config.created)

    def _unknown_model(name: str) -> APIError:
        return APIError(
            404,
            f"the model {name!r} does not exist on this server; it serves {config.model_id!r} (GET /v1/models)",
            param="model",
            code="model_not_found",
        )

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request) -> Response:
        if state["closing"]:
            raise _shutting_down()
        req = _parse(await _read_body(request, config.max_body_bytes))
        if req.model is not None and req.model != config.model_id:
            raise _unknown_model(req.model)
        started = admission.try_acquire()
        if started is None:
            wait = admission.retry_after()
            raise APIError(
                503,
                f"all {admission.parallel} slot(s) are busy and {admission.capacity - admission.parallel} "
                f"request(s) are queued (--max-queue); retry in about {wait} s",
                type="server_error",
                code="server_busy",
                headers={"Retry-After": str(wait)},
            )
        try:
            prompt = await build_prompt(req, config.images, answers)
            job = await anyio.to_thread.run_sync(partial(_submit, runtime, prompt))
        except BaseException:
            admission.release(started)
            raise
        events = JobEvents(job, on_end=partial(admission.release, started))
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await _stream(events, request, completion_id, config.model_id, include_usage, answers)
        return await _whole(events, request, completion_id, config.model_id, answers)

    return app


def _submit(runtime: Runtime, prompt: Prompt) -> Job:
    g = prompt.generate
    try:
        return runtime.submit(
            prompt.messages,
            system=prompt.system,
            max_tokens=g.max_tokens,
            temperature=g.temperature,
            top_p=g.top_p,
            seed=g.seed,
            stop=g.stop,
        )
    except LlavaError as exc:
        raise from_llava(exc) from exc


async def _next_or_gone(events: JobEvents, request: Request) -> Event:
    """The next event of a job whose client may hang up before the response starts; cancels the job if so
    (it then ends as a cancelled `Finished`, and its slot is freed)."""
    while True:
        try:
            return await events.next(DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                events.cancel()


async def _whole(
    events: JobEvents, request: Request, completion_id: str, model_id: str, answers: AnswerMemory
) -> JSONResponse:
    try:
        while True:
            item = await _next_or_gone(events, request)
            if isinstance(item, Failed):
                raise _job_error(item.error)
            if isinstance(item, Finished):
                answer = item.answer
                break
    finally:
        events.cancel()  # a no-op once the job is over; frees the slot if the handler itself was cancelled
    if answer.finish_reason == "cancelled":
        raise _shutting_down()
    answers.remember(answer)
    body = ChatCompletion(
        id=completion_id,
        created=int(time.time()),
        model=model_id,
        choices=[
            Choice(message=AssistantMessage(content=answer.text), finish_reason=_finish_reason(answer))  # type: ignore[arg-type]
        ],
        usage=_usage(answer),
    )
    return JSONResponse(body.model_dump())


def _chunk(completion_id: str, created: int, model_id: str, delta: Delta, finish: str | None = None) -> bytes:
    chunk = ChatCompletionChunk(
        id=completion_id,
        created=created,
        model=model_id,
        choices=[ChunkChoice(delta=delta, finish_reason=finish)],  # type: ignore[arg-type]
    ).model_dump()
    chunk["choices"][0]["delta"] = delta.model_dump(exclude_none=True)
    return sse(chunk)


async def _stream(
    events: JobEvents,
    request: Request,
    completion_id: str,
    model_id: str,
    include_usage: bool,
    answers: AnswerMemory,
) -> Response:
    # Wait for the first event before answering 200: an error up to here still gets its own status code.
    try:
        first = await _next_or_gone(events, request)
    except BaseException:
        events.cancel()
        raise
    if isinstance(first, Failed):
        raise _job_error(first.error)
    if isinstance(first, Finished) and first.answer.finish_reason == "cancelled":
        raise _shutting_down()
    created = int(time.time())

    async def body() -> AsyncIterator[bytes]:
        tail = TextTail()
        item: Event = first
        try:
            yield _chunk(completion_id, created, model_id, Delta(role="assistant", content=""))
            while True:
                if isinstance(item, str):
                    text = tail.feed(item)
                    if text:
                        yield _chunk(completion_id, created, model_id, Delta(content=text))
                elif isinstance(item, Finished):
                    answer = item.answer
                    if answer.finish_reason == "cancelled":
                        yield sse(_shutting_down().body())
                        return
                    answers.remember(answer)
                    yield _chunk(completion_id, created, model_id, Delta(), _finish_reason(answer))
                    if include_usage:
                        usage = ChatCompletionChunk(
                            id=completion_id, created=created, model=model_id, choices=[], usage=_usage(answer)
                        )
                        yield sse(usage.model_dump())
                    yield sse("[DONE]")
                    return
                else:
                    yield sse(_job_error(item.error).body())
                    return
                item = await events.next()
        finally:
            # The client went away (Starlette cancels this generator) or the stream ended: free the slot now.
            events.cancel()

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
