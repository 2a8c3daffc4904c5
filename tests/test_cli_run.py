"""`llava run` through the real CLI boundary: answers, --json, stdin images, and one-line errors for bad input."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_cli.cli.app import main
from tests.model_fixtures import test_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pair_args(tiny_pair_f16) -> list[str]:  # type: ignore[no-untyped-def]
    return ["--model", str(tiny_pair_f16.text_path), "--mmproj", str(tiny_pair_f16.mmproj_path), "--ctx", "1024"]


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    p = tmp_path / "pic.png"
    Image.fromarray(test_image(80, seed=3), "RGB").save(p)
    return p


def _one_line_error(capsys: pytest.CaptureFixture[str], code: int, *needles: str) -> str:
    out, err = capsys.readouterr()
    assert code != 0
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_run_streams_an_answer(pair_args: list[str], picture: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", *pair_args, "--image", str(picture), "--temperature", "0", "-n", "8", "What is this?"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.endswith("\n") and out.strip()
    assert "Traceback" not in err


def test_run_json(pair_args: list[str], picture: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    second = tmp_path / "b.jpg"
    Image.fromarray(test_image(64, seed=4), "RGB").save(second)
    args = [a if a != "1024" else "2048" for a in pair_args]
    argv = ["run", *args, "-i", str(picture), "-i", str(second), "--system", "Be brief.", "--json"]
    code = main([*argv, "--temperature", "0", "--seed", "1", "--max-tokens", "6", "--threads", "1", "Compare?"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert set(data) >= {"answer", "model", "quantization", "tokens", "timings", "images", "finish_reason"}
    assert data["quantization"] == "f16" and data["model"] == "tiny-llava"
    assert data["tokens"]["completion"] <= 6 and data["tokens"]["prompt"] > 2 * 576
    assert [im["name"] for im in data["images"]] == [str(picture), str(second)]
    assert data["timings"]["ttft"] > 0


def test_run_image_from_stdin(pair_args: list[str], picture: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "llava_cli", "run", *pair_args, "--image", "-", "--json", "-n", "4", "Hi"],
        input=picture.read_bytes(),
        capture_output=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    data = json.loads(proc.stdout)
    assert data["images"][0]["name"] == "<stdin>"


def test_gpu_layers_on_cpu_build_warns(
    pair_args: list[str], picture: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import llama_cpp

    from llava_cli.runtime import llamacpp

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("GPU build")
    monkeypatch.setattr(llamacpp, "_warned_gpu", False)
    code = main(["run", *pair_args, "-i", str(picture), "--n-gpu-layers", "all", "-n", "2", "Hi"])
    _, err = capsys.readouterr()
    assert code == 0
    assert "without GPU support" in err and 'CMAKE_ARGS="-DGGML_CUDA=on $(python -m llava_cli.cpu_kernels)"' in err


def test_tiny_random_says_noise(picture: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--model", "tiny-random", "-i", str(picture), "-n", "3", "--quiet", "What is this?"])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert "noise" in err


# ------------------------------------------------------------------------------------------------ bad input


def _bomb(path: Path) -> Path:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 9)))
    return path


def _bad_images(tmp: Path) -> dict[str, tuple[Path, str]]:
    good = io.BytesIO()
    noisy = np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8)
    Image.fromarray(noisy, "RGB").save(good, "JPEG")
    (tmp / "zero.jpg").write_bytes(b"")
    (tmp / "cut.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 3])
    (tmp / "notes.png").write_text("not an image")
    corrupt = bytearray(good.getvalue())
    corrupt[2:40] = os.urandom(38)
    (tmp / "corrupt.jpg").write_bytes(bytes(corrupt))
    return {
        "missing": (tmp / "missing.jpg", "image not found"),
        "zero-byte": (tmp / "zero.jpg", "empty (0 bytes)"),
        "truncated": (tmp / "cut.jpg", "truncated or corrupt"),
        "non-image": (tmp / "notes.png", "not an image"),
        "corrupt": (tmp / "corrupt.jpg", "corrupt.jpg"),
        "bomb": (_bomb(tmp / "bomb.png"), "decompression-bomb"),
    }


@pytest.mark.parametrize("kind", ["missing", "zero-byte", "truncated", "non-image", "corrupt", "bomb"])
def test_bad_image(kind: str, pair_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, needle = _bad_images(tmp_path)[kind]
    code = main(["run", *pair_args, "--image", str(path), "What is this?"])
    line = _one_line_error(capsys, code, needle)
    assert path.name in line


def test_missing_model(picture: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["run", "--model", str(tmp_path / "nope.gguf"), "--mmproj", str(tmp_path / "m.gguf"), "-i", str(picture), "Hi"]
    )
    _one_line_error(capsys, code, "nope.gguf")


def test_truncated_gguf(tiny_pair_f16, picture: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    cut = tmp_path / "cut.f16.gguf"
    data = Path(tiny_pair_f16.text_path).read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    code = main(["run", "--model", str(cut), "--mmproj", str(tiny_pair_f16.mmproj_path), "-i", str(picture), "Hi"])
    _one_line_error(capsys, code, "cut.f16.gguf")


def test_swapped_model_and_mmproj(tiny_pair_f16, picture: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    argv = ["run", "--model", str(tiny_pair_f16.mmproj_path), "--mmproj", str(tiny_pair_f16.text_path)]
    code = main([*argv, "-i", str(picture), "Hi"])
    line = _one_line_error(capsys, code, "mmproj")
    assert Path(tiny_pair_f16.mmproj_path).name in line


def test_context_too_small(pair_args: list[str], picture: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a if a != "1024" else "256" for a in pair_args]
    code = main(["run", *argv, "-i", str(picture), "Hi"])
    _one_line_error(capsys, code, "576 tokens", "context holds 256")


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ("run", "chat"):
        assert main([cmd, "--help"]) == 0
    out = capsys.readouterr().out
    for flag in (
        "--image",
        "--system",
        "--max-tokens",
        "--temperature",
        "--top-p",
        "--seed",
        "--ctx",
        "--threads",
        "--n-gpu-layers",
        "--no-mmproj-offload",
        "--json",
    ):
        assert flag in out
