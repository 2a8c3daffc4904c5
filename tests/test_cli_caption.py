"""`llava caption` end to end with the real engine on the converter's tiny model: exit codes, outputs, resume after
SIGKILL, Ctrl-C, the output lock, shards, bad images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from llava_cli import captioning as cap
from llava_cli.cli.app import main

ROOT = Path(__file__).resolve().parents[1]


def make_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i:03d}.png"
        Image.new("RGB", (24 + i % 7, 20), ((i * 37) % 256, (i * 91) % 256, 128)).save(p)
        paths.append(p)
    return paths


def model_args(pair) -> list[str]:
    return ["--model", str(pair.text_path), "--mmproj", str(pair.mmproj_path), "--ctx", "1024", "--threads", "1"]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def spawn(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.Popen[str]:
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "llava_cli", "caption", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_records(out: Path, n: int, proc: subprocess.Popen[str], timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists():
            count = out.read_bytes().count(b"\n")
            if count >= n:
                return count
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()}")  # type: ignore[union-attr]
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no {n} records in {timeout}s")


def test_caption_folder_jsonl(tiny_pair_f16, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_images(tmp_path / "pics", 3)
    out = tmp_path / "captions.jsonl"
    code = main(["caption", str(tmp_path / "pics"), "--out", str(out), "-n", "4", *model_args(tiny_pair_f16)])
    assert code == 0
    recs = records(out)
    assert [Path(r["path"]).name for r in recs] == ["img000.png", "img001.png", "img002.png"]
    assert all(r["error"] is None and r["caption"] and 1 <= r["tokens"] <= 4 for r in recs)
    assert recs[0]["model"] == Path(tiny_pair_f16.text_path).name.removesuffix(".f16.gguf")
    assert recs[0]["quantization"] == "f16" and recs[0]["prompt"] == cap.DEFAULT_PROMPT
    err = capsys.readouterr().err
    assert "finished: 3 captioned, 0 skipped (already done), 0 failed of 3" in err
    # Same command again: everything is skipped, the model is not even loaded.
    assert main(["caption", str(tmp_path / "pics"), "--out", str(out), *model_args(tiny_pair_f16)]) == 0
    assert "0 captioned, 3 skipped" in capsys.readouterr().err and len(records(out)) == 3


def test_identical_images_are_encoded_once_and_model_loaded_once(tiny_pair_f16, tmp_path: Path) -> None:
    from llava_cli.runtime import Engine

    imgs = make_images(tmp_path / "pics", 3)
    for i in range(3):
        (tmp_path / "pics" / f"dup{i}.png").write_bytes(imgs[0].read_bytes())
    with Engine(tiny_pair_f16.text_path, tiny_pair_f16.mmproj_path, n_ctx=1024, n_threads=1) as engine:
        # Sampling (no seed): every image is asked, but the duplicates' embeddings come from the engine's cache.
        sampled = cap.EngineCaptioner(engine, model_name="tiny", quantization="f16", max_tokens=3, temperature=0.8)
        summary = cap.caption_batch([tmp_path / "pics"], captioner=sampled, out=tmp_path / "s.jsonl")
        assert summary.done == 6 and sampled.memo_hits == 0
        assert engine.stats.images_encoded == 3 and engine.stats.image_cache_hits == 3

        # Greedy: a duplicate (same bytes, same prompt) gets the same caption without running the model.
        engine.clear_image_cache()
        greedy = cap.EngineCaptioner(engine, model_name="tiny", quantization="f16", max_tokens=3)
        summary = cap.caption_batch([tmp_path / "pics"], captioner=greedy, out=tmp_path / "g.jsonl")
        assert summary.done == 6 and greedy.memo_hits == 3
        assert engine.stats.images_encoded == 3 + 3 and engine.stats.image_cache_hits == 3
    by_name = {Path(r["path"]).name: r for r in records(tmp_path / "g.jsonl")}
    assert by_name["dup2.png"]["caption"] == by_name["img000.png"]["caption"]
    assert by_name["dup2.png"]["tokens"] == by_name["img000.png"]["tokens"]


def test_csv_sidecar_prompt_file_and_templating(tiny_pair_f16, tmp_path: Path) -> None:
    imgs = make_images(tmp_path / "pics", 2)
    cap.sidecar_path(imgs[0]).write_text("an old caption")
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Improve '{existing}' for {filename}\n")
    out = tmp_path / "log.csv"
    args = ["caption", str(tmp_path / "pics"), "--sidecar", "--out", str(out), "--prompt-file", str(prompt_file)]
    assert main([*args, "--prefix", "{stem}: ", "-n", "3", "--quiet", *model_args(tiny_pair_f16)]) == 0
    state = cap.read_log(out, "csv")
    assert [r.prompt for r in state.records] == ["Improve 'an old caption' for img000.png", "Improve '' for img001.png"]
    for img, rec in zip(imgs, state.records, strict=True):
        assert rec.caption.startswith(f"{img.stem}: ")
        assert cap.sidecar_path(img).read_text() == rec.caption + "\n"


def test_usage_errors(tiny_pair_f16, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_images(tmp_path / "pics", 1)
    base = ["caption", str(tmp_path / "pics"), "--out", str(tmp_path / "o.jsonl"), *model_args(tiny_pair_f16)]
    assert main([*base, "--shard", "0/3"]) == 2
    assert "bad --shard 0/3" in capsys.readouterr().err
    assert main([*base, "--prompt", "Describe {file}"]) == 2
    assert "unknown field {file} in --prompt" in capsys.readouterr().err
    assert main([*base, "--prompt", "x", "--prompt-file", str(tmp_path / "p.txt")]) == 2
    assert main(["caption", str(tmp_path / "nope"), *model_args(tiny_pair_f16)]) == 1
    assert "input not found" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_bad_images_are_recorded_and_the_batch_goes_on(
    tiny_pair_f16, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pics = tmp_path / "pics"
    make_images(pics, 2)
    (pics / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (pics / "half.png").write_bytes((pics / "img000.png").read_bytes()[:40])
    out = tmp_path / "o.jsonl"
    code = main(["caption", str(pics), "--out", str(out), "-n", "2", *model_args(tiny_pair_f16)])
    assert code == cap.EXIT_SOME_FAILED == 3
    recs = {Path(r["path"]).name: r for r in records(out)}
    assert recs["img000.png"]["error"] is None and recs["img001.png"]["error"] is None
    assert "broken.jpg" in recs["broken.jpg"]["error"] and "half.png" in recs["half.png"]["error"]
    err = capsys.readouterr().err
    assert "failed:" in err and "2 captioned, 0 skipped (already done), 2 failed of 4" in err


def test_shards_are_disjoint_and_complete(tiny_pair_f16, tmp_path: Path) -> None:
    make_images(tmp_path / "pics", 12)
    outs = []
    for k in (1, 2, 3):
        out = tmp_path / f"c.{k}.jsonl"
        args = ["caption", str(tmp_path / "pics"), "--shard", f"{k}/3", "--out", str(out), "-n", "1", "--quiet"]
        assert main([*args, *model_args(tiny_pair_f16)]) == 0
        outs.append({r["path"] for r in records(out)})
    assert sum(len(s) for s in outs) == 12 and len(set().union(*outs)) == 12
    assert all(outs)  # 12 images over 3 shards: none empty with this hash


@pytest.mark.slow
def test_sigkill_mid_batch_then_resume(tiny_pair_f16, tmp_path: Path) -> None:
    n = 40
    make_images(tmp_path / "pics", n)
    out = tmp_path / "captions.jsonl"
    args = [str(tmp_path / "pics"), "--out", str(out), "-n", "24", "--quiet", *model_args(tiny_pair_f16)]
    proc = spawn(args)
    wait_for_records(out, 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    before = records(out)
    assert 5 <= len(before) < n, "the kill must land mid-batch"
    # And a write torn by the kill (what a crash mid-line leaves): a record cut in half, no newline.
    half = json.dumps({"path": str(tmp_path / "pics" / "img999.png"), "caption": "cut"})[:30]
    with open(out, "a") as fh:
        fh.write(half)

    rerun = spawn(args)
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert "repaired" in err and "cut off a torn last record" in err
    after = records(out)  # every line parses: the torn one is gone
    names = [Path(r["path"]).name for r in after]
    assert sorted(names) == [f"img{i:03d}.png" for i in range(n)]  # each image exactly once
    assert all(r["error"] is None for r in after)
    assert after[: len(before)] == before  # nothing that was written is lost or rewritten
    assert f"{n - len(before)} captioned, {len(before)} skipped" in err


@pytest.mark.slow
def test_sigint_finishes_cleanly_with_summary_and_130(tiny_pair_f16, tmp_path: Path) -> None:
    make_images(tmp_path / "pics", 40)
    out = tmp_path / "captions.jsonl"
    args = [str(tmp_path / "pics"), "--out", str(out), "-n", "24", "--quiet", *model_args(tiny_pair_f16)]
    proc = spawn(args)
    wait_for_records(out, 3, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted:" in err and "Traceback" not in err
    done = records(out)  # no torn line
    assert 3 <= len(done) < 40 and f"interrupted: {len(done)} captioned" in err
    assert out.read_bytes().endswith(b"\n")


@pytest.mark.slow
def test_second_process_on_the_same_output_refuses(
    tiny_pair_f16, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_images(tmp_path / "pics", 40)
    out = tmp_path / "captions.jsonl"
    args = [str(tmp_path / "pics"), "--out", str(out), "-n", "24", "--quiet", *model_args(tiny_pair_f16)]
    proc = spawn(args)
    try:
        wait_for_records(out, 1, proc)
        code = main(["caption", *args])
        err = capsys.readouterr().err
        assert code == 1
        assert f"{out} is being written by another `llava caption` process (pid {proc.pid})" in err
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_parallel_equals_sequential_in_input_order(
    tiny_pair_f32, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """--parallel 3 over 7 images (one unreadable, two with the same bytes): the same records as --parallel 1, in
    input order, the failure included; the chosen level is printed."""
    pics = make_images(tmp_path / "pics", 6)
    (tmp_path / "pics" / "img003b.png").write_bytes(b"not an image")
    (tmp_path / "pics" / "img005.png").write_bytes(pics[1].read_bytes())
    outs = {}
    for level in ("1", "3"):
        out = tmp_path / f"p{level}.jsonl"
        code = main(
            [
                "caption",
                str(tmp_path / "pics"),
                "--out",
                str(out),
                "-n",
                "6",
                "--parallel",
                level,
                *model_args(tiny_pair_f32),
            ]
        )
        assert code == cap.EXIT_SOME_FAILED
        assert f"(--parallel {level})" in capsys.readouterr().err
        outs[level] = records(out)
    names = [Path(r["path"]).name for r in outs["3"]]
    assert names == sorted(names) and len(names) == 7
    assert [(r["caption"], r["tokens"], r["error"] is None) for r in outs["3"]] == [
        (r["caption"], r["tokens"], r["error"] is None) for r in outs["1"]
    ]
    assert sum(r["error"] is not None for r in outs["3"]) == 1


def test_parallel_default_is_printed(tiny_pair_f16, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    make_images(tmp_path / "pics", 2)
    code = main(
        ["caption", str(tmp_path / "pics"), "--out", str(tmp_path / "c.jsonl"), "-n", "2", *model_args(tiny_pair_f16)]
    )
    assert code == 0
    assert f"captioning {cap.DEFAULT_PARALLEL} images at a time (--parallel {cap.DEFAULT_PARALLEL})" in (
        capsys.readouterr().err
    )
