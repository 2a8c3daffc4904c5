"""hub.py against a real HTTP server that speaks the Hub's resolve protocol, so huggingface_hub's own download path
(HEAD metadata, ETag, X-Repo-Commit, LFS-style redirect, Range resume, cache layout) runs for real."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub.constants
import pytest

from llava_cli import hub
from llava_cli.catalog import HubFile
from llava_cli.errors import HubError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    """Serves ``repos[repo][filename] = bytes`` like huggingface.co: ``/{repo}/resolve/{rev}/{file}`` answers with
    ETag / X-Repo-Commit (GGUF files as LFS: a 302 to ``/cdn/<sha256>`` with X-Linked-Etag / X-Linked-Size), the CDN
    honours ``Range``, and ``/api/models/{repo}/revision/{rev}`` lists the files (what snapshot/model_info reads)."""

    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range header)
    cut_once: dict[str, int] = field(default_factory=dict)  # sha256 -> bytes sent before dropping the connection
    url: str = ""
    cdn_url: str = ""  # a second origin, like the Hub's CDN: huggingface_hub's HEAD does not follow it
    _servers: list[ThreadingHTTPServer] = field(default_factory=list)

    def blob(self, sha: str) -> bytes | None:
        for files in self.repos.values():
            for data in files.values():
                if hashlib.sha256(data).hexdigest() == sha:
                    return data
        return None

    def start(self) -> FakeHub:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _send(self, status: int, headers: dict[str, str], data: bytes, body: bool) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _serve(self, body: bool) -> None:
                path = self.path.split("?", 1)[0]
                fake.requests.append((self.command, path, self.headers.get("Range")))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "revision":
                    repo = f"{parts[2]}/{parts[3]}"
                    if repo not in fake.repos:
                        return self._send(404, {"X-Error-Code": "RepoNotFound"}, b"{}", body)
                    info = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": n} for n in fake.repos[repo]]}
                    return self._send(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), body)
                if parts[0] == "cdn" and len(parts) == 2:
                    return self._cdn(parts[1], body)
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, name = f"{parts[0]}/{parts[1]}", "/".join(parts[4:])
                    if repo not in fake.repos:
                        return self._send(404, {"X-Error-Code": "RepoNotFound"}, b"", body)
                    data = fake.repos[repo].get(name)
                    if data is None:
                        return self._send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, b"", body)
                    sha = hashlib.sha256(data).hexdigest()
                    if name.endswith(".gguf"):  # LFS: redirect to the CDN, metadata in X-Linked-* headers
                        headers = {
                            "Location": f"{fake.cdn_url}/cdn/{sha}",
                            "X-Linked-Etag": f'"{sha}"',
                            "X-Linked-Size": str(len(data)),
                            "X-Repo-Commit": COMMIT,
                            "ETag": '"pointer-etag"',
                        }
                        return self._send(302, headers, b"", body)
                    git_sha = hashlib.sha1(data).hexdigest()
                    return self._send(200, {"ETag": f'"{git_sha}"', "X-Repo-Commit": COMMIT}, data, body)
                self._send(404, {}, b"", body)

            def _cdn(self, sha: str, body: bool) -> None:
                data = fake.blob(sha)
                if data is None:
                    return self._send(404, {}, b"", body)
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[len("bytes=") :].split("-", 1)[0])
                headers = {"ETag": f'"{sha}"', "Accept-Ranges": "bytes"}
                if start:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                chunk = data[start:]
                cut = fake.cut_once.pop(sha, None) if body else None
                if cut is not None:  # promise the whole body, send part of it, hang up
                    self.send_response(206 if start else 200)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(chunk)))
                    self.end_headers()
                    self.wfile.write(chunk[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return None
                return self._send(206 if start else 200, headers, chunk, body)

        urls = []
        for _ in range(2):
            server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            self._servers.append(server)
            urls.append(f"http://127.0.0.1:{server.server_address[1]}")
        self.url, self.cdn_url = urls
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()


def free_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def go_online(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """What a fresh process with HF_HUB_OFFLINE=0 HF_ENDPOINT=url sees (huggingface_hub snapshots the variable)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    server = FakeHub(
        repos={
            "test/gguf": {
                "model.q4_k_m.gguf": b"GGUF" + bytes(range(256)) * 300,
                "mmproj-model.f16.gguf": b"GGUF" + b"\x01\x02" * 5000,
                "README.md": b"# test\n",
            },
            "test/ckpt": {"config.json": b'{"model_type": "llava"}', "model.safetensors": b"\0" * 64},
        }
    ).start()
    go_online(monkeypatch, server.url)
    yield server
    server.stop()


TEXT = HubFile("test/gguf", "model.q4_k_m.gguf")
MMPROJ = HubFile("test/gguf", "mmproj-model.f16.gguf")
FIX = "llava pull fake --bits q4_k_m"


def test_download_into_the_hub_cache_layout_with_progress(fake_hub: FakeHub) -> None:
    seen: list[tuple[int, int]] = []
    text, mmproj = hub.download_files([TEXT, MMPROJ], fix=FIX, on_progress=lambda c, t: seen.append((c, t)))
    data = fake_hub.repos["test/gguf"]
    assert text.read_bytes() == data["model.q4_k_m.gguf"]
    assert mmproj.read_bytes() == data["mmproj-model.f16.gguf"]
    # The standard cache: snapshots/<commit>/<file> -> blobs/<sha256>, refs/main = commit.
    repo_dir = hub.cache_dir() / "models--test--gguf"
    assert text.parent == repo_dir / "snapshots" / COMMIT
    assert (repo_dir / "refs" / "main").read_text() == COMMIT
    sha = hashlib.sha256(data["model.q4_k_m.gguf"]).hexdigest()
    assert text.resolve() == (repo_dir / "blobs" / sha).resolve()
    total = len(data["model.q4_k_m.gguf"]) + len(data["mmproj-model.f16.gguf"])
    assert seen[-1] == (total, total)
    assert all(t == total for _, t in seen)
    # The CDN hop happened (LFS redirect followed), and the cached file is found without the network afterwards.
    assert any(p.startswith("/cdn/") for _, p, _ in fake_hub.requests)
    assert hub.cached_file(TEXT) == text


def test_second_call_does_not_download_again(fake_hub: FakeHub) -> None:
    hub.download_files([TEXT], fix=FIX)
    before = sum(1 for m, p, _ in fake_hub.requests if m == "GET" and p.startswith("/cdn/"))
    hub.download_files([TEXT], fix=FIX)
    after = sum(1 for m, p, _ in fake_hub.requests if m == "GET" and p.startswith("/cdn/"))
    assert after == before


def test_dropped_connection_is_resumed_with_a_range_request(fake_hub: FakeHub) -> None:
    # huggingface_hub writes the body in DOWNLOAD_CHUNK_SIZE pieces: the connection drops after one full piece,
    # so the retry must ask for the rest only.
    chunk = huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE
    data = bytes(range(251)) * ((chunk + chunk // 2) // 251)
    fake_hub.repos["test/big"] = {"big.gguf": data}
    sha = hashlib.sha256(data).hexdigest()
    fake_hub.cut_once[sha] = chunk + 1000
    seen: list[tuple[int, int]] = []
    (path,) = hub.download_files(
        [HubFile("test/big", "big.gguf")], fix=FIX, on_progress=lambda c, t: seen.append((c, t))
    )
    assert path.read_bytes() == data
    gets = [r for m, p, r in fake_hub.requests if m == "GET" and p == f"/cdn/{sha}"]
    assert gets == [None, f"bytes={chunk}-"]
    assert seen[-1] == (len(data), len(data))


def _big_file(fake_hub: FakeHub) -> tuple[HubFile, bytes, str, int]:
    chunk = huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE
    data = bytes(range(251)) * ((2 * chunk + chunk // 2) // 251)
    fake_hub.repos["test/big"] = {"big.gguf": data}
    return HubFile("test/big", "big.gguf"), data, hashlib.sha256(data).hexdigest(), chunk


def test_interrupted_process_resumes_from_its_partial_file(fake_hub: FakeHub) -> None:
    big, data, sha, chunk = _big_file(fake_hub)

    def ctrl_c(done: int, total: int) -> None:
        if done > chunk:  # Ctrl-C while the second piece arrives: the first is on disk
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hub.download_files([big], fix=FIX, on_progress=ctrl_c)
    (partial,) = hub.partial_dir().iterdir()
    assert partial.stat().st_size == chunk and hub.cached_file(big) is None
    # "The next run": only the rest is requested, the result is whole and in the cache, the partial is gone.
    seen: list[tuple[int, int]] = []
    (path,) = hub.download_files([big], fix=FIX, on_progress=lambda c, t: seen.append((c, t)))
    assert path.read_bytes() == data
    gets = [r for m, p, r in fake_hub.requests if m == "GET" and p == f"/cdn/{sha}"]
    assert gets == [None, f"bytes={chunk}-"]
    assert seen[0][0] >= chunk and seen[-1] == (len(data), len(data))
    assert list(hub.partial_dir().iterdir()) == []


def test_corrupt_partial_file_is_detected_and_removed(fake_hub: FakeHub) -> None:
    big, data, sha, chunk = _big_file(fake_hub)
    hub.partial_dir().mkdir(parents=True)
    (hub.partial_dir() / f"models--test--big--{sha}").write_bytes(b"\xff" * 1000)  # not the file's first bytes
    with pytest.raises(HubError, match="SHA-256 mismatch"):
        hub.download_files([big], fix=FIX)
    assert list(hub.partial_dir().iterdir()) == []
    (path,) = hub.download_files([big], fix=FIX)
    assert path.read_bytes() == data


def test_offline_with_nothing_cached_names_file_and_fix(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError) as info:
        hub.download_files([TEXT, MMPROJ], fix=FIX)
    assert "test/gguf/model.q4_k_m.gguf" in info.value.message
    assert "HF_HUB_OFFLINE" in info.value.message
    assert FIX in (info.value.hint or "")
    assert fake_hub.requests == []  # offline means no request at all


def test_offline_with_a_filled_cache_works(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    online = hub.download_files([TEXT, MMPROJ], fix=FIX)
    fake_hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.download_files([TEXT, MMPROJ], fix=FIX) == online


def test_unreachable_hub_with_nothing_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    url = free_port_url()
    go_online(monkeypatch, url)
    with pytest.raises(HubError) as info:
        hub.download_files([TEXT], fix=FIX)
    assert f"cannot reach the model hub at {url}" in info.value.message
    assert "test/gguf/model.q4_k_m.gguf" in info.value.message
    assert FIX in (info.value.hint or "")


def test_unreachable_hub_falls_back_to_the_cache(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    online = hub.download_files([TEXT], fix=FIX)
    fake_hub.stop()
    assert hub.download_files([TEXT], fix=FIX) == online


def test_missing_file_and_missing_repo(fake_hub: FakeHub) -> None:
    with pytest.raises(HubError, match="test/gguf/nope.gguf: file not found"):
        hub.download_files([HubFile("test/gguf", "nope.gguf")], fix=FIX)
    with pytest.raises(HubError, match="repository not found"):
        hub.download_files([HubFile("test/absent", "x.gguf")], fix=FIX)


def test_download_false_never_touches_the_network(fake_hub: FakeHub) -> None:
    with pytest.raises(HubError, match="not downloaded yet") as info:
        hub.download_files([TEXT], fix=FIX, download=False)
    assert info.value.hint == f"run: {FIX}"
    assert fake_hub.requests == []


def test_checkpoint_snapshot(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    snap = hub.download_checkpoint("test/ckpt", fix="llava pull x")
    assert (snap / "config.json").read_bytes() == fake_hub.repos["test/ckpt"]["config.json"]
    assert (snap / "model.safetensors").is_file()
    assert snap.name == COMMIT
    # Offline afterwards: the snapshot comes from the cache.
    fake_hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.download_checkpoint("test/ckpt", fix="llava pull x") == snap
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        hub.download_checkpoint("test/other", fix="llava pull x")


def test_environment_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("HF_ENDPOINT", "http://example.invalid/")
    monkeypatch.setenv("HF_HUB_OFFLINE", "yes")
    assert hub.cache_dir() == tmp_path / "c"
    assert hub.endpoint() == "http://example.invalid"
    assert hub.is_offline()
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert hub.cache_dir() == tmp_path / "h" / "hub"
    assert not hub.is_offline()
