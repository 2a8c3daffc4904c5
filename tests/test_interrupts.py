"""Interrupts, concurrent writers and full disks: what a killed or starved process leaves behind.

* SIGINT and SIGKILL mid-write during ``convert``, ``quantize`` and ``caption``: the previous good outputs are
  byte-identical afterwards, and the next run succeeds (and cleans up what a SIGKILL could not).
* Two ``caption`` processes on one output file: the second refuses at once (a lock), no interleaved lines.
* Disk full: a real few-hundred-KB tmpfs when this machine lets us mount one (root), and always an ENOSPC
  injected at the writer boundary: one clear line, the temp file removed, nothing under the final name.

Every process is real (forked from a clean fork server, see tests/bad_inputs.py), so the signals are real ones.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import pytest
from PIL import Image

from llava_cli.cli.app import main
from quantize import convert
from quantize.synthetic import make_checkpoint
from tests.bad_inputs import Spawned, spawn_cli

SIGNALS = [pytest.param(signal.SIGINT, id="SIGINT"), pytest.param(signal.SIGKILL, id="SIGKILL")]


def _digest(folder: Path) -> dict[str, str]:
    """Every visible file's SHA-256 (temp files are hidden dot-files)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".")
    }


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.partial"))


def _wait_for(predicate: Callable[[], bool], proc: Spawned, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if not proc.alive():
            res = proc.wait()
            raise AssertionError(f"process ended ({res.code}) before {what}: {res.stderr[-1500:]}")
        time.sleep(0.005)
    proc.proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def _check_interrupted(res, sig: int) -> None:  # type: ignore[no-untyped-def]
    if sig == signal.SIGKILL:
        assert res.code == -signal.SIGKILL
    else:
        assert res.code == 130, res.stderr
        assert "Traceback" not in res.stderr and "interrupted" in res.stderr, res.stderr


# --------------------------------------------------------------------------------------------------- convert


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny checkpoints with the same name and different weights (seed): an old model and its update."""
    base = tmp_path_factory.mktemp("interrupt_ckpts")
    return make_checkpoint(base / "v1" / "tiny-llava", seed=1), make_checkpoint(base / "v2" / "tiny-llava", seed=2)


@pytest.mark.parametrize("sig", SIGNALS)
def test_convert_interrupted_keeps_the_previous_pair(sig: int, two_checkpoints, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    old, new = two_checkpoints
    out = tmp_path / "models"
    convert(old, out)
    before = _digest(out)
    assert len(before) == 2

    proc = spawn_cli(["convert", str(new), "--out", str(out), "--quiet"], tmp_path / "work", tensor_delay=0.02)
    _wait_for(lambda: bool(_temps(out)), proc, "the temp file to appear")
    time.sleep(0.1)  # well inside the write: ~70 tensors at 20 ms each
    proc.signal(sig)
    res = proc.wait()
    _check_interrupted(res, sig)
    assert _digest(out) == before, "the previous good pair changed"
    if sig == signal.SIGINT:
        assert _temps(out) == []  # cleaned up on the way out
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    else:
        assert _temps(out), "a SIGKILL cannot clean up: the temp file must still be there for this test to mean much"

    # The next run succeeds, writes the new weights, and removes what the killed run left behind.
    assert main(["convert", str(new), "--out", str(out), "--quiet"]) == 0
    after = _digest(out)
    assert set(after) == set(before) and after != before
    assert _temps(out) == []


# -------------------------------------------------------------------------------------------------- quantize


@pytest.fixture(scope="module")
def quantize_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An F16 pair big enough that Q4_K_M takes a second or two (33 MB text model, rows multiple of 256)."""
    base = tmp_path_factory.mktemp("interrupt_quant")
    ckpt = make_checkpoint(
        base / "mid-llava",
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    return convert(ckpt, base / "f16").text_path


def _quant_workers(out: Path) -> list[int]:
    """Pids of llama.cpp quantize workers writing into `out` (their job JSON names the destination)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"_worker_main" in cmdline and str(out).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.mark.parametrize(
    "sig",
    [
        pytest.param(signal.SIGINT, id="SIGINT"),
        pytest.param(signal.SIGKILL, id="SIGKILL"),
    ],
)
def test_quantize_interrupted_keeps_the_previous_files(sig: int, quantize_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    argv = ["quantize", str(quantize_source), "--bits", "q4_k_m", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    before = _digest(out)
    assert len(before) == 2
    # Make the old files distinguishable from a re-run's: a re-run writes the same bytes.
    for name in before:
        with open(out / name, "ab") as fh:
            fh.write(b"\0" * 32)  # trailing padding past the last tensor: still a valid GGUF
    before = _digest(out)

    proc = spawn_cli(argv, tmp_path / "work")
    _wait_for(lambda: bool(_temps(out)) and (out / _temps(out)[0]).stat().st_size > 0, proc, "llama.cpp writing")
    proc.signal(sig)
    res = proc.wait()
    _check_interrupted(res, sig)
    try:
        assert _digest(out) == before, "the previous good files changed"
        if sig == signal.SIGINT:
            assert _temps(out) == []
            # The llama.cpp worker went down with its parent.
            assert _quant_workers(out) == []
        else:
            # The parent is gone; its llama.cpp worker must go too, not run on for minutes (7B: several) writing a
            # multi-GB temp file. A worker that dies with its parent is gone within milliseconds; the job itself
            # takes seconds, so one still there after 0.5 s was orphaned.
            deadline = time.monotonic() + 0.5
            while _quant_workers(out) and time.monotonic() < deadline:
                time.sleep(0.02)
            orphans = _quant_workers(out)
            assert orphans == [], f"quantize worker(s) {orphans} outlived their killed parent"
    finally:
        for pid in _quant_workers(out):  # the workers this test started, by pid
            os.kill(pid, signal.SIGKILL)
    assert main(argv) == 0
    assert set(_digest(out)) == set(before) and _temps(out) == []


# --------------------------------------------------------------------------------------------------- caption


def _images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (20 + i % 5, 16), ((i * 53) % 256, (i * 17) % 256, 90)).save(folder / f"img{i:03d}.png")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _model(pair) -> list[str]:  # type: ignore[no-untyped-def]
    return ["--model", str(pair.text_path), "--mmproj", str(pair.mmproj_path), "--ctx", "1024", "--threads", "1"]


def test_caption_sigkill_then_sigint_then_resume(tiny_pair_f16, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    n = 30
    _images(tmp_path / "pics", n)
    out = tmp_path / "captions.jsonl"
    argv = ["caption", str(tmp_path / "pics"), "--out", str(out), "-n", "16", "--quiet", *_model(tiny_pair_f16)]

    def lines() -> int:
        return out.read_bytes().count(b"\n") if out.exists() else 0

    first = spawn_cli(argv, tmp_path / "w1")
    _wait_for(lambda: lines() >= 4, first, "4 records")
    first.signal(signal.SIGKILL)
    assert first.wait().code == -signal.SIGKILL
    after_kill = out.read_bytes()
    kept = [json.loads(line) for line in after_kill.split(b"\n") if line.strip().endswith(b"}")]
    assert 4 <= len(kept) < n

    second = spawn_cli(argv, tmp_path / "w2")
    _wait_for(lambda: lines() >= len(kept) + 4, second, "4 more records")
    second.signal(signal.SIGINT)
    res = second.wait()
    assert res.code == 130 and "Traceback" not in res.stderr, res.stderr
    recs = _records(out)  # SIGINT finishes the line it is writing: every line parses
    assert recs[: len(kept)] == kept, "records written before the SIGKILL were lost or rewritten"
    assert len(kept) + 4 <= len(recs) < n

    third = spawn_cli(argv, tmp_path / "w3").wait()
    assert third.code == 0, third.stderr
    final = _records(out)
    assert final[: len(recs)] == recs
    assert sorted(Path(r["path"]).name for r in final) == [f"img{i:03d}.png" for i in range(n)]
    assert all(r["error"] is None for r in final)


def test_second_caption_on_the_same_output_refuses(tiny_pair_f16, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _images(tmp_path / "pics", 20)
    out = tmp_path / "captions.jsonl"
    argv = ["caption", str(tmp_path / "pics"), "--out", str(out), "-n", "16", "--quiet", *_model(tiny_pair_f16)]
    first = spawn_cli(argv, tmp_path / "w1")
    try:
        _wait_for(lambda: out.exists() and out.stat().st_size > 0, first, "the first record")
        second = spawn_cli(argv, tmp_path / "w2", tag="2").wait(60)
        assert second.code == 1, second.stderr
        (line,) = second.stderr.strip().splitlines()
        assert f"{out} is being written by another `llava caption` process (pid {first.pid})" in line
        assert first.alive(), "the refusal must come while the first process is still writing"
    finally:
        res = first.wait()
    assert res.code == 0, res.stderr
    recs = _records(out)  # no interleaved or torn lines
    assert sorted(Path(r["path"]).name for r in recs) == [f"img{i:03d}.png" for i in range(20)]


# ------------------------------------------------------------------------------------------------- disk full


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount small tmpfs filesystems (root only); skip where that is not allowed."""
    mounted: list[Path] = []
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")

    def make(size: str) -> Path:
        mnt = tmp_path / f"fs{len(mounted)}"
        mnt.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
        mounted.append(mnt)
        return mnt

    yield make
    for mnt in mounted:
        subprocess.run(["umount", str(mnt)], check=False)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_convert_on_a_full_disk(tiny_checkpoint: Path, tmpfs, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    out = tmpfs("200k")  # the text GGUF alone is ~310 KB
    assert main(["convert", str(tiny_checkpoint), "--out", str(out), "--quiet"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "disk full while writing" in line and "tiny-llava.f16.gguf" in line
    assert list(out.iterdir()) == []  # no final name, no temp file


def test_quantize_on_a_full_disk(tiny_pair_f16, tmpfs, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    out = tmpfs("100k")
    argv = ["quantize", str(tiny_pair_f16.text_path), "--bits", "q8_0", "--out", str(out), "--quiet"]
    assert main(argv) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert re.search(r"disk|space", line) and str(out) in line, line
    assert list(out.iterdir()) == []


def test_caption_on_a_full_disk(tiny_pair_f16, tmpfs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    _images(tmp_path / "pics", 3)
    out_dir = tmpfs("64k")
    (out_dir / "filler").write_bytes(b"\0" * (64 * 1024 - 4096))  # leave a page: the lock file still fits
    with pytest.raises(OSError):
        (out_dir / "probe").write_bytes(b"\0" * 8192)
    (out_dir / "probe").unlink(missing_ok=True)
    out = out_dir / "captions.jsonl"
    argv = ["caption", str(tmp_path / "pics"), "--out", str(out), "-n", "64", "--quiet", *_model(tiny_pair_f16)]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    line = _one_error_line(err)
    assert "disk full" in line and "captions.jsonl" in line, line
    # Whatever made it to disk is whole records: the next run (with space) resumes from them.
    (out_dir / "filler").unlink()
    assert main(argv) == 0
    assert sorted(Path(r["path"]).name for r in _records(out)) == ["img000.png", "img001.png", "img002.png"]


def test_enospc_at_the_writer_boundary(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Where no tmpfs can be mounted: the kernel's ENOSPC raised by the GGUF writer after a few tensors."""
    calls = {"n": 0}
    write = gguf.GGUFWriter.write_tensor_data

    def full_after_three(self, tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full_after_three)
    out = tmp_path / "models"
    assert main(["convert", str(tiny_checkpoint), "--out", str(out), "--quiet"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "disk full while writing" in line and "tiny-llava.f16.gguf" in line and "free some space" in line
    assert calls["n"] == 4 and list(out.iterdir()) == []
