"""``image_url`` content parts -> `LoadedImage`: base64 ``data:`` URLs always, http(s) URLs only when the server
was started with ``--allow-remote-images``, local paths never (a client must not make the server read its disk).

Sizes are bounded before the bytes are decoded (the base64 length, the Content-Length, then the bytes actually
received), remote fetches by a total timeout. The pixels go through `llava_cli.images.decode_image`, the same
checks `llava run` applies (corrupt, truncated, decompression bombs).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import urllib.parse
from dataclasses import dataclass

import anyio
import httpx

from llava_cli.errors import ImageError
from llava_cli.images import LoadedImage, decode_image
from llava_cli.server.errors import APIError, bad_request, from_llava

_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


@dataclass(frozen=True)
class ImagePolicy:
    max_bytes: int  # encoded image size (the file), not pixels: pixels are bounded by decode_image
    allow_remote: bool = False
    timeout: float = 10.0  # seconds for a whole remote fetch (connect + redirects + body)
    max_redirects: int = 3


def _too_large(param: str, size: int | str, limit: int) -> APIError:
    return APIError(
        413,
        f"{param}: the image is {size} bytes, more than the {limit:,}-byte limit of this server (--max-image-mb)",
        param=param,
        code="image_too_large",
    )


def _data_url(url: str, policy: ImagePolicy, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise bad_request(f"{param}: a data URL needs a ',' before its data", param, "invalid_image_url")
    if header.lower().endswith(";base64"):
        compact = "".join(payload.split())  # some clients wrap base64 at 76 columns
        if len(compact) * 3 // 4 > policy.max_bytes:
            raise _too_large(param, f"about {len(compact) * 3 // 4:,}", policy.max_bytes)
        try:
            data = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise bad_request(f"{param}: the data URL is not valid base64 ({exc})", param, "invalid_base64") from exc
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > policy.max_bytes:
        raise _too_large(param, f"{len(data):,}", policy.max_bytes)
    return data


async def _fetch(url: str, policy: ImagePolicy, param: str) -> bytes:
    if not policy.allow_remote:
        raise bad_request(
            f"{param}: this server does not fetch remote images; send the image as a base64 data URL "
            "(data:image/png;base64,...) or start the server with --allow-remote-images",
            param,
            "remote_images_disabled",
        )
    try:
        with anyio.fail_after(policy.timeout):
            async with (
                httpx.AsyncClient(follow_redirects=True, max_redirects=policy.max_redirects) as client,
                client.stream("GET", url) as resp,
            ):
                if resp.status_code != 200:
                    raise bad_request(
                        f"{param}: fetching {url} answered HTTP {resp.status_code}", param, "image_fetch_failed"
                    )
                declared = resp.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > policy.max_bytes:
                    raise _too_large(param, f"{int(declared):,}", policy.max_bytes)
                data = bytearray()
                async for block in resp.aiter_bytes():
                    data += block
                    if len(data) > policy.max_bytes:
                        raise _too_large(param, f"more than {len(data):,}", policy.max_bytes)
                return bytes(data)
    except TimeoutError as exc:
        raise bad_request(
            f"{param}: fetching {url} took more than {policy.timeout:g} s", param, "image_fetch_failed"
        ) from exc
    except httpx.HTTPError as exc:
        raise bad_request(f"{param}: cannot fetch {url} ({exc})", param, "image_fetch_failed") from exc


async def image_bytes(url: str, policy: ImagePolicy, param: str) -> bytes:
    """The encoded bytes behind an ``image_url``; `APIError` (400 or 413) when we will not or cannot get them."""
    scheme = urllib.parse.urlsplit(url.strip()).scheme.lower() if not _WINDOWS_DRIVE.match(url) else ""
    if scheme == "data":
        return _data_url(url.strip(), policy, param)
    if scheme in ("http", "https"):
        return await _fetch(url.strip(), policy, param)
    if scheme in ("", "file"):
        raise bad_request(
            f"{param}: local paths are never read by the server; send the image as a base64 data URL",
            param,
            "invalid_image_url",
        )
    raise bad_request(f"{param}: unsupported URL scheme {scheme!r}; use a base64 data URL", param, "invalid_image_url")


def decode(data: bytes, param: str) -> LoadedImage:
    """Decode and validate the pixels (CPU work: call it off the event loop). Bytes that are no usable image: 422."""
    try:
        image, notes = decode_image(data, param)
    except ImageError as exc:
        raise from_llava(exc, param) from exc
    return LoadedImage(image=image, sha256=hashlib.sha256(data).hexdigest(), name=param, notes=tuple(notes))


async def load(url: str, policy: ImagePolicy, param: str) -> LoadedImage:
    data = await image_bytes(url, policy, param)
    return await anyio.to_thread.run_sync(decode, data, param)
