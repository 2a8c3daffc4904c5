"""`llava serve` end to end: the real server (uvicorn on 127.0.0.1, a free port) on the tiny synthetic model, driven
by the official `openai` client (and raw httpx where a client would refuse to send the bad request).

Two kinds of servers:
* in this process, uvicorn in a thread over the same app and runtime `llava serve` builds (most tests: cheap to
  start, and the runtime's jobs can be inspected);
* the real `llava serve` command in a subprocess: answers equal `llava run`, the API key, SIGTERM exits 0.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from PIL import Image

from llava_cli.cli.app import main
from llava_cli.server.app import ServerConfig, create_app
from llava_cli.server.host import listen, load_runtime
from llava_cli.server.images import ImagePolicy
from llava_cli.server.protocol import Job, Runtime
from tests.model_fixtures import test_image

ROOT = Path(__file__).resolve().parents[1]
MODEL_ID = "tiny-llava"
CTX = 2048  # 3 images fit (3 × 576), 4 do not: the context-overflow case


# ------------------------------------------------------------------------------------------------ helpers


def png_bytes(seed: int, size: int = 80) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(test_image(size, seed=seed), "RGB").save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(text: str, *urls: str) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


class RecordingRuntime:
    """The real runtime, passed through; keeps the jobs it hands out so tests can look at how each one ended."""

    def __init__(self, inner: Runtime) -> None:
        self.inner = inner
        self.n_parallel = inner.n_parallel
        self.n_ctx = inner.n_ctx
        self.jobs: list[Job] = []

    def submit(self, messages: Any, **kwargs: Any) -> Job:
        job = self.inner.submit(messages, **kwargs)
        self.jobs.append(job)
        return job

    def close(self) -> None:
        self.inner.close()


@dataclass
class ThreadServer:
    """uvicorn serving `create_app(runtime, config)` from a thread, on a free 127.0.0.1 port."""

    runtime: RecordingRuntime
    config: ServerConfig
    url: str = ""
    _server: Any = None
    _thread: Any = None
    _sock: Any = field(default=None, repr=False)

    def start(self) -> ThreadServer:
        self._sock = listen("127.0.0.1", 0)
        port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        app = create_app(self.runtime, self.config)
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def client(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=300, **kw)

    def post(self, body: bytes | dict[str, Any], **headers: str) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(
            self.url + "/v1/chat/completions",
            content=content,
            headers={"Content-Type": "application/json", **headers},
            timeout=300,
        )

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)
        self.runtime.close()
        self._sock.close()


def _serve(pair: Any, **config: Any) -> Iterator[ThreadServer]:
    runtime = RecordingRuntime(load_runtime(pair.text_path, pair.mmproj_path, n_ctx=CTX, n_threads=1))
    server = ThreadServer(runtime, ServerConfig(model_id=MODEL_ID, **config)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(tiny_pair_f16: Any) -> Iterator[ThreadServer]:
    """Defaults: one slot, queue 16, no remote images."""
    yield from _serve(tiny_pair_f16)


@pytest.fixture(scope="module")
def strict(tiny_pair_f16: Any) -> Iterator[ThreadServer]:
    """One slot and no queue (a second request is refused), remote images allowed, small size limits."""
    yield from _serve(
        tiny_pair_f16,
        max_queue=0,
        max_body_bytes=200_000,
        images=ImagePolicy(max_bytes=50_000, allow_remote=True, timeout=5.0),
    )


def _error(resp: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


# ------------------------------------------------------------------------------------------------ answers


def test_models_and_health(server: ThreadServer) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert server.client().models.retrieve(MODEL_ID).id == MODEL_ID
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL_ID and health["ctx"] == CTX


def test_answer_streaming_and_usage(server: ThreadServer) -> None:
    client = server.client()
    msgs = [image_message("What is in the picture?", data_url(png_bytes(1)))]
    whole = client.chat.completions.create(model=MODEL_ID, messages=msgs, temperature=0, max_tokens=24)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = whole.usage
    assert usage is not None
    assert usage.prompt_tokens > 576 and 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    stream = client.chat.completions.create(
        model=MODEL_ID,
        messages=msgs,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[-1].choices[0].finish_reason == choice.finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == choice.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == usage.prompt_tokens


def test_sse_wire_format(server: ThreadServer) -> None:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 4}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = "".join(resp.iter_text())
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_concurrent_requests_all_complete(server: ThreadServer) -> None:
    """Eight requests at once (one slot, the rest queued): each gets the answer it gets alone."""
    client = server.client()
    questions = [f"Question number {i}?" for i in range(8)]
    image = data_url(png_bytes(2))

    def ask(q: str) -> str:
        r = client.chat.completions.create(
            model=MODEL_ID,
            messages=[image_message(q, image)],
            temperature=0,
            max_tokens=12,
        )
        return r.choices[0].message.content or ""

    alone = {q: ask(q) for q in questions}
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def worker(q: str) -> None:
        try:
            results[q] = ask(q)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert results == alone
    assert len(set(alone.values())) > 1  # the questions differ, so must (some of) the answers


def test_prefix_reuse_second_turn(server: ThreadServer) -> None:
    """An OpenAI client re-sends the whole history: the second turn reuses the first turn's KV prefix."""
    client = server.client()
    turn1 = [image_message("Describe the image.", data_url(png_bytes(3)))]
    first = client.chat.completions.create(model=MODEL_ID, messages=turn1, temperature=0, max_tokens=10)
    assert first.usage is not None and first.usage.prompt_tokens_details is not None
    answer = first.choices[0].message.content or ""
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "And the colours?"}]
    second = client.chat.completions.create(model=MODEL_ID, messages=turn2, temperature=0, max_tokens=10)
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    # Everything of turn 1 that reached the KV cache: its prompt (image included) and its answer but possibly
    # the last sampled token (never decoded when max_tokens ended the answer).
    assert cached >= first.usage.prompt_tokens + first.usage.completion_tokens - 1
    assert 0 < second.usage.prompt_tokens - cached < 64  # only the new user turn was evaluated (no image)

    # The same history with an edited answer: what comes before the edit (turn 1's prompt, image included) is
    # reused, the edited answer and what follows are evaluated.
    edited = [*turn1, {"role": "assistant", "content": answer + " edited"}, {"role": "user", "content": "And?"}]
    third = client.chat.completions.create(model=MODEL_ID, messages=edited, temperature=0, max_tokens=4)
    assert third.usage is not None and third.usage.prompt_tokens_details is not None
    cached3 = third.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached3 < first.usage.prompt_tokens + first.usage.completion_tokens
    assert third.usage.prompt_tokens > cached3


def test_stop_strings(server: ThreadServer) -> None:
    client = server.client()
    msgs = [{"role": "user", "content": "Tell me something."}]
    full = client.chat.completions.create(model=MODEL_ID, messages=msgs, temperature=0, max_tokens=40)
    text = full.choices[0].message.content or ""
    assert len(text) >= 8, text
    stop = text[4:7]
    expected = text[: text.find(stop)].strip()
    cut = client.chat.completions.create(model=MODEL_ID, messages=msgs, temperature=0, max_tokens=40, stop=[stop])
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model=MODEL_ID,
        messages=msgs,
        temperature=0,
        max_tokens=40,
        stop=stop,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


def test_harmless_fields_are_ignored_and_roles_merge(server: ThreadServer) -> None:
    """Fields OpenAI clients send that change nothing here are accepted; system/developer messages join into the
    system prompt and consecutive user messages merge (same answer as the merged form)."""
    extra = {
        "user": "someone",
        "metadata": {"k": "v"},
        "store": False,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "parallel_tool_calls": False,
        "response_format": {"type": "text"},
        "max_completion_tokens": 3,
    }
    image = data_url(png_bytes(8))
    split = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": image}]},  # a bare URL string
        {"role": "user", "content": "What is it?", "name": "x"},
    ]
    merged = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": image, "detail": "high"}}]
            + [{"type": "text", "text": "What is it?"}],
        },
    ]
    a = server.post({"model": MODEL_ID, "messages": split, "temperature": 0, **extra})
    b = server.post({"messages": merged, "temperature": 0, "max_tokens": 3})
    assert a.status_code == 200, a.text
    assert b.status_code == 200, b.text
    assert a.json()["usage"]["completion_tokens"] <= 3
    assert a.json()["choices"][0]["message"] == b.json()["choices"][0]["message"]
    assert a.json()["usage"]["prompt_tokens"] == b.json()["usage"]["prompt_tokens"]


def test_sampling_is_seeded(server: ThreadServer) -> None:
    client = server.client()
    msgs = [{"role": "user", "content": "Say anything."}]

    def ask(seed: int) -> str:
        r = client.chat.completions.create(
            model=MODEL_ID,
            messages=msgs,
            temperature=1.5,
            top_p=1.0,
            seed=seed,
            max_tokens=16,
        )
        return r.choices[0].message.content or ""

    assert ask(7) == ask(7)
    assert len({ask(s) for s in range(1, 5)}) > 1


# ------------------------------------------------------------------------------------------------ bad requests

BROKEN_BASE64 = "data:image/png;base64,iVBORw0KGgo***not base64***"
NOT_AN_IMAGE = data_url(b"these bytes are not an image at all" * 10)


def _user(content: Any) -> dict[str, Any]:
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": content}]}


def _image_part(url: str) -> list[dict[str, Any]]:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}]


BAD_REQUESTS = [
    pytest.param(b'{"messages": [', 400, "invalid_json", None, id="malformed-json"),
    pytest.param(b"\xff\xfe", 400, "invalid_json", None, id="not-utf8"),
    pytest.param(b"[1, 2]", 400, "invalid_json", None, id="not-an-object"),
    pytest.param({"model": MODEL_ID}, 400, None, "messages", id="no-messages-field"),
    pytest.param({"model": MODEL_ID, "messages": []}, 400, None, "messages", id="empty-messages"),
    pytest.param({"messages": [{"content": "x"}]}, 400, None, "messages[0].role", id="message-without-role"),
    pytest.param({"messages": [{"role": "tool", "content": "x"}]}, 400, None, "messages[0].role", id="tool-role"),
    pytest.param(
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        400,
        None,
        "messages",
        id="last-is-assistant",
    ),
    pytest.param({**_user("hi"), "n": 2}, 400, "unsupported_value", "n", id="n-2"),
    pytest.param({**_user("hi"), "logprobs": True}, 400, "unsupported_value", "logprobs", id="logprobs"),
    pytest.param({**_user("hi"), "temperature": -1}, 400, None, "temperature", id="negative-temperature"),
    pytest.param({**_user("hi"), "max_tokens": 0}, 400, None, "max_tokens", id="zero-max-tokens"),
    pytest.param({**_user("hi"), "model": "gpt-4o"}, 404, "model_not_found", "model", id="unknown-model"),
    pytest.param(_user(_image_part(BROKEN_BASE64)), 400, "invalid_base64", "messages[0].content[0]", id="base64"),
    pytest.param(_user(_image_part(NOT_AN_IMAGE)), 422, "invalid_image", "messages[0].content[0]", id="no-image"),
    pytest.param(_user(_image_part("/etc/passwd")), 400, "invalid_image_url", None, id="local-path"),
    pytest.param(_user(_image_part("file:///etc/hosts")), 400, "invalid_image_url", None, id="file-url"),
    pytest.param(_user(_image_part("C:\\x.png")), 400, "invalid_image_url", None, id="windows-path"),
    pytest.param(_user(_image_part("ftp://host/x.png")), 400, "invalid_image_url", None, id="ftp-url"),
    pytest.param(
        _user(_image_part("http://127.0.0.1:9/x.png")), 400, "remote_images_disabled", None, id="remote-not-allowed"
    ),
    pytest.param(
        _user([{"type": "input_audio", "input_audio": {}}]), 400, "unsupported_content_type", None, id="audio-part"
    ),
    pytest.param(_user([{"type": "text"}]), 400, None, "messages[0].content[0]", id="text-part-without-text"),
    pytest.param(
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": _image_part(data_url(png_bytes(1)))},
                {"role": "user", "content": "b"},
            ]
        },
        400,
        None,
        "messages[1].content[0]",
        id="image-in-assistant",
    ),
    pytest.param(
        _user(_image_part(data_url(png_bytes(1))) * 4),  # 4 × 576 image tokens > 2048
        400,
        "context_length_exceeded",
        "messages",
        id="context-overflow",
    ),
]


@pytest.mark.parametrize(("body", "status", "code", "param"), BAD_REQUESTS)
def test_bad_request(server: ThreadServer, body: Any, status: int, code: str | None, param: str | None) -> None:
    _error(server.post(body), status, code, param)
    # The server is fine afterwards.
    assert server.post(_user("hi") | {"max_tokens": 2}).status_code == 200


def test_bad_request_streaming_still_gets_its_status(server: ThreadServer) -> None:
    """Errors found before the first token (here: context overflow, raised by the runtime) are a 4xx, not a
    200 stream with an error inside."""
    body = _user(_image_part(data_url(png_bytes(1))) * 4) | {"stream": True}
    _error(server.post(body), 400, "context_length_exceeded")


def test_openai_client_sees_typed_errors(server: ThreadServer) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as br:
        client.chat.completions.create(
            model=MODEL_ID,
            messages=[image_message("x", BROKEN_BASE64)],
        )
    assert br.value.code == "invalid_base64"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=MODEL_ID, messages=[image_message("x", NOT_AN_IMAGE)])


def test_unknown_route_and_method(server: ThreadServer) -> None:
    _error(httpx.get(server.url + "/v1/nothing"), 404, "not_found")
    _error(httpx.get(server.url + "/v1/chat/completions"), 405, "method_not_allowed")


def test_body_and_image_limits(strict: ThreadServer) -> None:
    big_image = os.urandom(60_000)  # over the 50 KB image limit, under the 200 KB body limit
    _error(strict.post(_user(_image_part(data_url(big_image)))), 413, "image_too_large", "messages[0].content[0]")
    _error(strict.post(_user("x" * 300_000)), 413, "request_too_large")
    # No Content-Length (chunked upload): counted while reading.
    chunks = (b'{"messages": [{"role": "user", "content": "' + b"x" * 50_000 for _ in range(1))

    def body() -> Iterator[bytes]:
        yield from chunks
        for _ in range(4):
            yield b"y" * 50_000
        yield b'"}]}'

    resp = httpx.post(strict.url + "/v1/chat/completions", content=body(), timeout=60)
    _error(resp, 413, "request_too_large")


# ------------------------------------------------------------------------------------------------ remote images


class ImageHost:
    """A local HTTP server for image URLs. ``gate``: when set, each request waits for it before answering."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.gate: threading.Event | None = None
        self.arrived = threading.Event()
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                host.arrived.set()
                if host.gate is not None:
                    host.gate.wait(30)
                data = host.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def image_host() -> Iterator[ImageHost]:
    host = ImageHost({"/small.png": png_bytes(5), "/big.png": os.urandom(80_000)})
    yield host
    host.close()


def test_remote_image_when_allowed(strict: ThreadServer, image_host: ImageHost) -> None:
    client = strict.client()
    question = "What is this?"
    by_url = client.chat.completions.create(
        model=MODEL_ID,
        messages=[image_message(question, image_host.url + "/small.png")],
        temperature=0,
        max_tokens=12,
    )
    inline = client.chat.completions.create(
        model=MODEL_ID,
        messages=[image_message(question, data_url(png_bytes(5)))],
        temperature=0,
        max_tokens=12,
    )
    assert by_url.choices[0].message.content == inline.choices[0].message.content
    _error(strict.post(_user(_image_part(image_host.url + "/missing.png"))), 400, "image_fetch_failed")
    _error(strict.post(_user(_image_part(image_host.url + "/big.png"))), 413, "image_too_large")


def test_full_server_answers_503_with_retry_after(strict: ThreadServer, image_host: ImageHost) -> None:
    """One slot, no queue: while a request holds the slot (its image still downloading), the next one is 503."""
    image_host.gate = threading.Event()
    holder: dict[str, httpx.Response] = {}
    body = _user(_image_part(image_host.url + "/small.png")) | {"max_tokens": 4}
    t = threading.Thread(target=lambda: holder.update(r=strict.post(body)))
    t.start()
    try:
        assert image_host.arrived.wait(30)
        busy = strict.post(_user("hi"))
        _error(busy, 503, "server_busy")
        assert int(busy.headers["Retry-After"]) >= 1
        health = httpx.get(strict.url + "/health").json()
        assert health["running"] == 1
    finally:
        image_host.gate.set()
        t.join(60)
    assert holder["r"].status_code == 200, holder["r"].text
    assert strict.post(_user("hi") | {"max_tokens": 2}).status_code == 200


def test_hang_up_mid_stream_frees_the_slot(strict: ThreadServer) -> None:
    """A client that reads the first chunk and hangs up: its job ends (cancelled if it was still generating) and
    the only slot is free again, so the next request is served instead of refused.

    The tiny model generates ~10k tokens/s and meets its end-of-sequence within ~100 tokens, so the job may be
    over before the hang-up is seen; the slot must be given back either way (a leak would make every later
    request a 503 here: one slot, no queue)."""
    jobs_before = len(strict.runtime.jobs)
    msgs = [image_message("Tell me everything.", data_url(png_bytes(6)))]
    body = {"model": MODEL_ID, "messages": msgs, "stream": True, "max_tokens": 1400, "temperature": 0}
    with httpx.stream("POST", strict.url + "/v1/chat/completions", json=body, timeout=300) as resp:
        assert resp.status_code == 200
        next(resp.iter_bytes())
    answer = strict.runtime.jobs[jobs_before].result(timeout=120)
    assert answer.finish_reason in ("cancelled", "stop", "length")
    deadline = time.monotonic() + 30
    while True:  # the slot is given back by the job's pump thread, a moment after the job ends
        r = strict.post(_user("hi") | {"max_tokens": 2})
        if r.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert r.status_code == 200, r.text
    assert httpx.get(strict.url + "/health").json()["running"] == 0


def test_cancel_a_queued_job(tiny_pair_f16: Any) -> None:
    """Runtime level: a job cancelled while it waits behind another one never runs, and the runtime goes on."""
    runtime = load_runtime(tiny_pair_f16.text_path, tiny_pair_f16.mmproj_path, n_ctx=CTX, n_threads=1)
    try:
        from llava_cli.images import load_image
        from llava_cli.runtime import Message

        image = load_image(png_bytes(7))
        first = runtime.submit([Message("user", "Describe it.", images=[image])], max_tokens=64, temperature=0)
        second = runtime.submit([Message("user", "Hello")], max_tokens=64)
        second.cancel()
        assert list(second) == []
        assert second.result(timeout=120).finish_reason == "cancelled"
        assert first.result(timeout=120).finish_reason in ("stop", "length")
        assert "".join(first).strip() == first.result().text
        third = runtime.submit([Message("user", "Hello")], max_tokens=4, temperature=0)
        assert third.result(timeout=120).completion_tokens > 0
    finally:
        runtime.close()


# ------------------------------------------------------------------------------------------------ the real command


@dataclass
class Serve:
    proc: subprocess.Popen[str]
    url: str
    stderr: list[str]


def _start_serve(pair: Any, *extra: str, env: dict[str, str] | None = None) -> Serve:
    argv = [sys.executable, "-m", "llava_cli", "serve", "--model", str(pair.text_path), "--mmproj"]
    argv += [str(pair.mmproj_path), "--ctx", str(CTX), "--port", "0", "--threads", "1", *extra]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=full_env, cwd=ROOT)
    lines: list[str] = []
    ready = threading.Event()
    found: dict[str, str] = {}

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
            if m:
                found["url"] = m.group(1)
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(60) or "url" not in found:
        proc.kill()
        raise AssertionError("llava serve did not start: " + "".join(lines))
    return Serve(proc, found["url"], lines)


@pytest.fixture(scope="module")
def serve_cmd(tiny_pair_f16: Any) -> Iterator[Serve]:
    s = _start_serve(tiny_pair_f16, env={"LLAVA_API_KEY": "sesame"})
    yield s
    s.proc.terminate()
    s.proc.wait(30)


@pytest.mark.slow
def test_command_answer_equals_llava_run(
    serve_cmd: Serve, tiny_pair_f16: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    picture = tmp_path / "pic.png"
    picture.write_bytes(png_bytes(9, size=120))
    question = "What is in this picture?"
    code = main(
        [
            "run",
            "--model",
            str(tiny_pair_f16.text_path),
            "--mmproj",
            str(tiny_pair_f16.mmproj_path),
            "--ctx",
            str(CTX),
            "--threads",
            "1",
            "--image",
            str(picture),
            "--temperature",
            "0",
            "-n",
            "24",
            "--json",
            question,
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    expected = json.loads(out)
    client = openai.OpenAI(base_url=serve_cmd.url + "/v1", api_key="sesame", max_retries=0)
    msgs = [image_message(question, data_url(picture.read_bytes()))]
    got = client.chat.completions.create(model=MODEL_ID, messages=msgs, temperature=0, max_tokens=24)
    assert got.choices[0].message.content == expected["answer"]
    assert got.usage is not None and got.usage.completion_tokens == expected["tokens"]["completion"]
    assert got.usage.prompt_tokens == expected["tokens"]["prompt"]
    streamed = client.chat.completions.create(
        model=MODEL_ID,
        messages=msgs,
        temperature=0,
        max_tokens=24,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected["answer"]


@pytest.mark.slow
def test_command_api_key(serve_cmd: Serve) -> None:
    for key in (None, "wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        resp = httpx.post(serve_cmd.url + "/v1/chat/completions", json=_user("hi"), headers=headers)
        _error(resp, 401, "invalid_api_key")
        _error(httpx.get(serve_cmd.url + "/v1/models", headers=headers), 401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=serve_cmd.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(serve_cmd.url + "/health").status_code == 200  # for load balancers: no key needed
    ok = openai.OpenAI(base_url=serve_cmd.url + "/v1", api_key="sesame", max_retries=0).models.list()
    assert [m.id for m in ok.data] == [MODEL_ID]


@pytest.mark.slow
def test_command_sigterm_finishes_in_flight_and_exits_0(tiny_pair_f16: Any) -> None:
    s = _start_serve(tiny_pair_f16)
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model=MODEL_ID,
        messages=[image_message("Go on.", data_url(png_bytes(4)))],
        max_tokens=200,
        temperature=0,
        stream=True,
    )
    chunks = [next(iter(stream))]
    s.proc.send_signal(signal.SIGTERM)
    chunks += list(stream)  # the request in flight runs to its end
    assert chunks[-1].choices and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert s.proc.wait(30) == 0, "".join(s.stderr)
    err = "".join(s.stderr)
    assert "Traceback" not in err and "stopped" in err
    with pytest.raises(httpx.ConnectError):  # nothing listens any more
        httpx.get(s.url + "/health")


@pytest.mark.slow
def test_command_port_in_use_is_one_line(tiny_pair_f16: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [sys.executable, "-m", "llava_cli", "serve", "--model", str(tiny_pair_f16.text_path)]
        argv += ["--mmproj", str(tiny_pair_f16.mmproj_path), "--port", str(port)]
        proc = subprocess.run(
            argv, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=60
        )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(port) in lines[0], proc.stderr
