"""resolve_model for each --model form, and `llava pull` exit codes/messages."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from llava_cli.cli.app import main
from llava_cli.errors import CheckpointError, HubError, InputNotFoundError, ModelFileError, UsageError
from llava_cli.paths import models_dir, user_dir
from llava_cli.resolve import MANIFEST, resolve_model
from quantize.synthetic import make_checkpoint
from tests.test_hub import FakeHub, go_online

FAKE_CATALOG = """
[models.fake-7b]
description = "a fake model served by the test hub"
checkpoint = "test/fake-7b-hf"

[models.fake-7b.mmproj]
repo = "test/fake-gguf"
file = "mmproj-model-f16.gguf"

[models.fake-7b.gguf.q4_k_m]
repo = "test/fake-gguf"
file = "ggml-model-q4_k.gguf"
"""


# ------------------------------------------------------------------------------------------------ tiny-random


def test_tiny_random_is_built_locally_once() -> None:
    r = resolve_model("tiny-random")
    assert r.noise and r.name == "tiny-random" and r.quantization == "f16"
    assert r.text_path.parent == models_dir() / "tiny-random"
    assert r.text_path.is_file() and r.mmproj_path.is_file()
    stamp = r.text_path.stat().st_mtime_ns
    again = resolve_model("tiny-random", bits="F16")
    assert again == r and r.text_path.stat().st_mtime_ns == stamp  # not rebuilt


def test_default_model_comes_from_the_catalog() -> None:
    (user_dir() / "models.toml").write_text('[defaults]\nmodel = "tiny-random"\n')
    r = resolve_model(None)
    assert r.name == "tiny-random" and r.noise and r.quantization == "f16"  # the entry's default_bits wins


# ------------------------------------------------------------------------------------------- checkpoint dir


def test_checkpoint_dir_is_converted_once_and_again_when_it_changes(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "my-llava-hf")
    r = resolve_model(str(ckpt), bits="f16")
    assert (r.name, r.quantization, r.noise) == ("my-llava", "f16", False)
    assert r.text_path.parent == models_dir() / "my-llava"
    manifest = json.loads((models_dir() / "my-llava" / MANIFEST).read_text())
    assert manifest["checkpoint"] == str(ckpt.resolve())
    stamp = r.text_path.stat().st_mtime_ns
    assert resolve_model(str(ckpt), bits="f16").text_path.stat().st_mtime_ns == stamp  # cached
    os.utime(ckpt / "config.json", ns=(1, 1))  # the checkpoint changed: convert again
    assert resolve_model(str(ckpt), bits="f16").text_path.stat().st_mtime_ns != stamp


def test_checkpoint_dir_quantized(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "q-llava", preset="tiny256")
    r = resolve_model(str(ckpt), bits="Q8_0")
    assert r.quantization == "q8_0" and r.text_path.is_file() and r.mmproj_path.is_file()
    assert "q8_0" in json.loads((models_dir() / "q-llava" / MANIFEST).read_text())["files"]


def test_directory_without_config_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="has no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(UsageError, match="--mmproj goes with a --model .gguf"):
        resolve_model(str(tmp_path), mmproj=tmp_path / "x.gguf")


# --------------------------------------------------------------------------------------------------- .gguf


@pytest.fixture
def pair_dir(tiny_pair_f16, tmp_path: Path) -> tuple[Path, Path]:
    d = tmp_path / "pair"
    d.mkdir()
    text = Path(shutil.copy(tiny_pair_f16.text_path, d / "tiny.f16.gguf"))
    proj = Path(shutil.copy(tiny_pair_f16.mmproj_path, d / "mmproj-tiny.f16.gguf"))
    return text, proj


def test_gguf_with_explicit_or_neighbouring_mmproj(pair_dir: tuple[Path, Path], tmp_path: Path) -> None:
    text, proj = pair_dir
    r = resolve_model(str(text), mmproj=proj)
    assert (r.text_path, r.mmproj_path, r.name, r.quantization, r.noise) == (text, proj, "tiny", "f16", False)
    assert resolve_model(str(text)).mmproj_path == proj  # found beside it
    # Several projectors: the one named after the model wins; with none named so, the user must choose.
    other = Path(shutil.copy(proj, text.parent / "mmproj-other.f16.gguf"))
    assert resolve_model(str(text)).mmproj_path == proj
    proj.unlink()
    assert resolve_model(str(text)).mmproj_path == other
    shutil.copy(other, text.parent / "mmproj-third.f16.gguf")
    with pytest.raises(UsageError, match="several vision projectors") as info:
        resolve_model(str(text))
    assert "--mmproj" in (info.value.hint or "")


def test_gguf_errors(pair_dir: tuple[Path, Path], tmp_path: Path) -> None:
    text, proj = pair_dir
    alone = tmp_path / "alone"
    alone.mkdir()
    lonely = Path(shutil.copy(text, alone / "lonely.f16.gguf"))
    with pytest.raises(UsageError, match="text model only") as info:
        resolve_model(str(lonely))
    assert "--mmproj" in (info.value.hint or "")
    with pytest.raises(InputNotFoundError, match="nope.gguf: no such file"):
        resolve_model(str(tmp_path / "nope.gguf"), mmproj=proj)
    with pytest.raises(InputNotFoundError, match="missing-mmproj.gguf: no such file"):
        resolve_model(str(text), mmproj=tmp_path / "missing-mmproj.gguf")
    with pytest.raises(UsageError, match="already f16; --bits q4_k_m applies"):
        resolve_model(str(text), bits="q4_k_m")
    bad = alone / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelFileError):
        resolve_model(str(bad), mmproj=proj)


# ------------------------------------------------------------------------------------------ catalog via hub


@pytest.fixture
def fake_catalog_hub(monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path) -> FakeHub:
    (user_dir() / "models.toml").write_text(FAKE_CATALOG)
    ckpt_files = {p.name: p.read_bytes() for p in tiny_checkpoint.iterdir() if p.is_file()}
    server = FakeHub(
        repos={
            "test/fake-gguf": {
                "ggml-model-q4_k.gguf": b"GGUF-text" * 1000,
                "mmproj-model-f16.gguf": b"GGUF-proj" * 500,
            },
            "test/fake-7b-hf": ckpt_files,
        }
    ).start()
    go_online(monkeypatch, server.url)
    yield server
    server.stop()


def test_catalog_model_is_downloaded_on_first_use(fake_catalog_hub: FakeHub) -> None:
    seen: list[tuple[int, int]] = []
    r = resolve_model("fake-7b", bits="Q4_K_M", on_progress=lambda c, t: seen.append((c, t)))
    assert (r.name, r.quantization, r.noise) == ("fake-7b", "q4_k_m", False)
    assert r.text_path.read_bytes() == fake_catalog_hub.repos["test/fake-gguf"]["ggml-model-q4_k.gguf"]
    assert "models--test--fake-gguf" in str(r.text_path)
    assert seen[-1][0] == seen[-1][1] == 9000 + 4500
    assert resolve_model("fake-7b", download=False) == r  # now local


def test_unpublished_quantization_converts_the_checkpoint(fake_catalog_hub: FakeHub) -> None:
    r = resolve_model("fake-7b", bits="f16")
    assert r.text_path.parent == models_dir() / "fake-7b" and r.quantization == "f16"
    assert any(p == "/api/models/test/fake-7b-hf/revision/main" for _, p, _ in fake_catalog_hub.requests)
    fake_catalog_hub.stop()
    assert resolve_model("fake-7b", bits="f16", download=False) == r


def test_not_local_and_download_false_names_the_pull_command(fake_catalog_hub: FakeHub) -> None:
    with pytest.raises(HubError, match="not downloaded yet") as info:
        resolve_model("fake-7b", download=False)
    assert info.value.hint == "run: llava pull fake-7b --bits q4_k_m"
    assert fake_catalog_hub.requests == []


def test_offline_and_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    (user_dir() / "models.toml").write_text(FAKE_CATALOG)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE=1 forbids") as info:
        resolve_model("fake-7b")
    assert "llava pull fake-7b --bits q4_k_m" in (info.value.hint or "")


def test_unknown_ids_and_paths() -> None:
    with pytest.raises(UsageError, match="unknown model 'llava-9'"):
        resolve_model("llava-9")
    with pytest.raises(InputNotFoundError, match="no such file or directory"):
        resolve_model("./models/llava-9")
    with pytest.raises(UsageError, match="unknown quantization"):
        resolve_model("tiny-random", bits="q3")
    with pytest.raises(UsageError, match="--mmproj goes with a --model .gguf file"):
        resolve_model("tiny-random", mmproj=Path("x.gguf"))


# ------------------------------------------------------------------------------------------------- the CLI


def test_cli_pull_tiny_random_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pull", "tiny-random", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "tiny-random" and data["bits"] == "f16" and data["noise"] is True
    assert Path(data["text_path"]).is_file()
    assert main(["models", "--json"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)["models"]}
    assert list(rows["tiny-random"]["local"]) == ["f16"] and rows["tiny-random"]["size_on_disk"] > 0


def test_cli_pull_text_mentions_noise(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pull", "tiny-random", "--quiet"]) == 0
    assert "answers are noise" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["pull", "llava-9"], 2, "unknown model 'llava-9'"),
        (["pull", "llava-1.5-7b", "--bits", "q5"], 2, "unknown quantization 'q5'"),
        (
            ["pull", "llava-1.5-7b"],
            1,
            "HF_HUB_OFFLINE=1 forbids downloading it (when online, run: HF_HUB_OFFLINE=0 llava pull llava-1.5-7b "
            "--bits q4_k_m)",
        ),
    ],
)
def test_cli_pull_errors(args: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == code
    err = capsys.readouterr().err
    assert message in " ".join(err.split())
    assert "Traceback" not in err


def test_cli_pull_unreachable_hub(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_hub import free_port_url

    url = free_port_url()
    go_online(monkeypatch, url)
    assert main(["pull", "bakllava-1", "--quiet"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"cannot reach the model hub at {url}" in err
    assert "abetlen/BakLLaVA-1-GGUF/bakllava-1.Q4_K.gguf" in err
    assert "llava pull bakllava-1 --bits q4_k_m" in err
