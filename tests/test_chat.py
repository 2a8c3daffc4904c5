"""`llava chat`: scripted through stdin (not a TTY), commands, KV reuse across turns, overflow offers /clear."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from llava_cli.cli.app import main
from llava_cli.cli.run import ChatRepl
from llava_cli.images import load_image
from llava_cli.runtime import Engine
from tests.model_fixtures import test_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pictures(tmp_path: Path) -> list[Path]:
    out = []
    for i in range(2):
        p = tmp_path / f"pic{i}.png"
        Image.fromarray(test_image(72, seed=10 + i), "RGB").save(p)
        out.append(p)
    return out


def _pair(pair) -> list[str]:  # type: ignore[no-untyped-def]
    return ["--model", str(pair.text_path), "--mmproj", str(pair.mmproj_path)]


def _chat(argv: list[str], script: str, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    return main(["chat", *argv])


def test_scripted_chat(
    tiny_pair_f16, pictures: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    saved = tmp_path / "out" / "chat.json"
    script = (
        "What is this?\n"
        "\n"
        f"/image {pictures[1]}\n"
        "And this one?\n"
        f"/save {saved}\n"
        "/image /no/such/file.png\n"
        "/frobnicate\n"
        "/clear\n"
        "Hello again\n"
        "/exit\n"
        "never read\n"
    )
    argv = [*_pair(tiny_pair_f16), "--image", str(pictures[0]), "--temperature", "0", "-n", "5", "--ctx", "2048"]
    code = _chat(argv, script, monkeypatch)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip()  # (answers of a random model may hold any character, so they are counted in the JSON)
    assert "Traceback" not in err
    assert "image not found: /no/such/file.png" in err and "unknown command /frobnicate" in err
    assert "conversation cleared" in err
    data = json.loads(saved.read_text())
    assert [m["role"] for m in data["messages"]] == ["user", "assistant", "user", "assistant"]
    assert data["messages"][0]["images"][0]["name"] == str(pictures[0])
    assert data["messages"][2]["images"][0]["name"] == str(pictures[1])
    assert data["model"] == "tiny-llava" and data["quantization"] == "f16"
    assert not list(saved.parent.glob(".*partial"))


def test_chat_overflow_offers_clear(
    tiny_pair_f16, pictures: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    saved = tmp_path / "c.json"
    script = f"What is this?\n/image {pictures[1]}\nAnd this?\n/clear\n/image {pictures[1]}\nAnd this?\n/save {saved}\n"
    argv = [*_pair(tiny_pair_f16), "--image", str(pictures[0]), "-n", "3", "--ctx", "700"]
    code = _chat(argv, script, monkeypatch)
    out, err = capsys.readouterr()
    assert code == 0
    assert "/clear" in err and "context holds" in err
    # The second question was refused, the chat went on: after /clear the last one was answered.
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == "And this?" and messages[0]["images"][0]["name"] == str(pictures[1])


def test_chat_turns_reuse_the_kv_cache(tiny_pair_f32, pictures: list[Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with Engine(tiny_pair_f32.text_path, tiny_pair_f32.mmproj_path, n_ctx=2048) as eng:
        repl = ChatRepl(eng, generate={"temperature": 0, "max_tokens": 4})
        repl.attached.append(load_image(pictures[0]))
        out = io.StringIO()
        repl.run(io.StringIO("What is this?\nAnd then?\nMore?\n"), out)
        evaluated_after_three = eng.stats.tokens_evaluated
        assert eng.stats.images_encoded == 1
        # Three turns cost one image plus the text of three turns, not three times the image.
        assert evaluated_after_three < 576 + 120
        assert [m.role for m in repl.conversation.messages] == ["user", "assistant"] * 3


def test_chat_through_a_pipe(tiny_pair_f16, pictures: list[Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    saved = tmp_path / "pipe.json"
    proc = subprocess.run(
        [sys.executable, "-m", "llava_cli", "chat", *_pair(tiny_pair_f16), "-i", str(pictures[0]), "-n", "3"],
        input=f"What is this?\nAnd now?\n/save {saved}\n".encode(),
        capture_output=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(json.loads(saved.read_text())["messages"]) == 4
    assert b"Traceback" not in proc.stderr


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs a POSIX pty")
def test_interactive_chat_in_a_terminal(tiny_pair_f16, pictures: list[Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With a real terminal: a prompt, /help, and input history saved across sessions."""
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: the real `llava chat` on a pseudo-terminal
        os.environ["LLAVA_HOME"] = str(tmp_path / "home")
        os.environ["PYTHONPATH"] = str(ROOT)
        argv = [sys.executable, "-m", "llava_cli", "chat", *_pair(tiny_pair_f16), "-i", str(pictures[0]), "-n", "3"]
        os.execv(sys.executable, argv)
    out = b""

    def read_until(marker: bytes, timeout: float = 60) -> None:
        nonlocal out
        end = time.time() + timeout
        while marker not in out and time.time() < end:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    return

    try:
        read_until(b"you> ")
        os.write(fd, b"What is this?\n")
        end = time.time() + 60
        while out.count(b"you> ") < 2 and time.time() < end:  # the answer, then the next prompt
            read_until(b"\x00", 0.5)
        os.write(fd, b"/help\n")
        read_until(b"/exit        quit")
        os.write(fd, b"/exit\n")
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    text = out.decode(errors="replace")
    assert "type /help for commands" in text and "/image PATH" in text
    assert os.WEXITSTATUS(status) == 0
    assert "What is this?" in (tmp_path / "home" / "chat_history").read_text()
