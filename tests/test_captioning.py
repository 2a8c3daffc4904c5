"""The batch bookkeeping of `llava_cli.captioning`: discovery, shards, templates, writers, resume, lock, Ctrl-C.

The model side is a trivial `Captioner` that describes the image's pixels: these tests are about never losing or
duplicating a record, and run in milliseconds. The real engine is exercised in tests/test_cli_caption.py.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from llava_cli import captioning as cap
from llava_cli.errors import InputNotFoundError, OutputError, UsageError
from llava_cli.images import LoadedImage


class ColourCaptioner:
    """Captions an image with its top-left pixel colour and the prompt; counts calls."""

    model_name = "colour"
    quantization = "none"

    def __init__(self, on_call=None) -> None:
        self.calls: list[str] = []
        self.on_call = on_call

    def caption(self, image: LoadedImage, prompt: str) -> tuple[str, int]:
        self.calls.append(image.name)
        if self.on_call:
            self.on_call(len(self.calls))
        r, g, b = image.image.getpixel((0, 0))
        return f" rgb({r},{g},{b}) for [{prompt}] ", 3


def make_images(folder: Path, n: int, *, ext: str = "png", start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        p = folder / f"img{i}.{ext}"
        Image.new("RGB", (8, 6), (i % 256, 10, 20)).save(p)
        paths.append(p)
    return paths


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- discovery -------------------------------------------------------------------------------------------------


def test_discovery_folder_natural_order_and_recursion(tmp_path: Path) -> None:
    make_images(tmp_path / "a", 12)
    make_images(tmp_path / "a" / "sub", 2, ext="jpg")
    (tmp_path / "a" / "img3.txt").write_text("an old caption")
    (tmp_path / "a" / ".hidden.png").write_bytes(b"x")
    found = cap.discover_images([tmp_path / "a"])
    assert [Path(p).name for p in found] == [f"img{i}.png" for i in range(12)]  # img2 before img10
    deep = cap.discover_images([tmp_path / "a"], recursive=True)
    assert len(deep) == 14 and any("sub" in p for p in deep)
    # Same set and order whatever the order and repetition of the inputs.
    assert cap.discover_images([tmp_path / "a" / "sub", tmp_path / "a", tmp_path / "a"], recursive=True) == deep


def test_discovery_by_content_glob_and_list_file(tmp_path: Path) -> None:
    make_images(tmp_path, 3)
    Image.new("RGB", (4, 4)).save(tmp_path / "no_extension", format="PNG")  # an image by content only
    (tmp_path / "notes.md").write_text("# not an image")
    found = cap.discover_images([tmp_path])
    assert sorted(Path(p).name for p in found) == ["img0.png", "img1.png", "img2.png", "no_extension"]

    assert [Path(p).name for p in cap.discover_images([str(tmp_path / "img[12].png")])] == ["img1.png", "img2.png"]
    with pytest.raises(InputNotFoundError, match="no file matches"):
        cap.discover_images([str(tmp_path / "*.gif")])
    with pytest.raises(InputNotFoundError, match="input not found"):
        cap.discover_images([tmp_path / "missing"])

    listing = tmp_path / "lists" / "todo.txt"
    listing.parent.mkdir()
    listing.write_text(f"# comment\n../img2.png\n\n{tmp_path / 'img0.png'}\n../gone.png\n")
    listed = cap.discover_images([listing])
    # Relative to the list's folder; a missing entry is kept so it gets an error record.
    assert [Path(p).name for p in listed] == ["gone.png", "img0.png", "img2.png"]


# --- shards ----------------------------------------------------------------------------------------------------


def test_shards_are_disjoint_cover_everything_and_are_stable() -> None:
    paths = [f"data/{i:05d}.jpg" for i in range(1000)]
    shards = [cap.select_shard(paths, (k, 4)) for k in range(1, 5)]
    assert sorted(p for s in shards for p in s) == sorted(paths)
    assert sum(len(s) for s in shards) == len(paths)
    assert all(150 < len(s) < 350 for s in shards)  # roughly balanced
    # A fixed value: SHA-256 based, so the same in every process, Python version and machine.
    assert (
        cap.shard_index("data/00000.jpg", 4)
        == int.from_bytes(__import__("hashlib").sha256(b"data/00000.jpg").digest()[:8], "big") % 4
    )


@pytest.mark.parametrize("spec", ["0/4", "5/4", "1/0", "a/b", "3", "-1/2"])
def test_bad_shard_specs(spec: str) -> None:
    with pytest.raises(UsageError):
        cap.parse_shard(spec)


# --- templates -------------------------------------------------------------------------------------------------


def test_template_fields_and_errors(tmp_path: Path) -> None:
    t = cap.parse_template("{filename}|{stem}|{parent}|{existing}|{{literal}}")
    assert t.render(cap.template_values("photos/cat.{x}.jpg", "old {stem}")) == (
        "cat.{x}.jpg|cat.{x}|photos|old {stem}|{literal}"
    )
    for bad in ("{nope}", "{stem.upper}", "{stem!r}", "{stem:>10}", "{unclosed"):
        with pytest.raises(UsageError):
            cap.parse_template(bad)


def test_templating_prefix_suffix_and_existing_sidecar(tmp_path: Path) -> None:
    imgs = make_images(tmp_path / "pics", 2)
    cap.sidecar_path(imgs[0]).write_text("a red thing\n")
    out = tmp_path / "out.jsonl"
    summary = cap.caption_batch(
        [tmp_path / "pics"],
        captioner=ColourCaptioner(),
        out=out,
        prompt="Improve '{existing}' for {filename} in {parent} ({stem})",
        prefix="[{stem}] ",
        suffix=" #done",
    )
    assert summary.exit_code == 0 and summary.done == 2
    recs = read_jsonl(out)
    assert recs[0]["prompt"] == "Improve 'a red thing' for img0.png in pics (img0)"
    assert recs[1]["prompt"] == "Improve '' for img1.png in pics (img1)"
    assert recs[0]["caption"] == "[img0] rgb(0,10,20) for [Improve 'a red thing' for img0.png in pics (img0)] #done"


# --- writers, resume -------------------------------------------------------------------------------------------


def test_jsonl_records_have_all_columns_and_resume_skips(tmp_path: Path) -> None:
    make_images(tmp_path / "pics", 5)
    out = tmp_path / "out.jsonl"
    first = ColourCaptioner()
    s1 = cap.caption_batch([tmp_path / "pics"], captioner=first, out=out)
    assert (s1.done, s1.skipped, s1.failed, s1.exit_code) == (5, 0, 0, 0)
    recs = read_jsonl(out)
    assert [tuple(r) for r in recs] == [cap.COLUMNS] * 5
    assert recs[0]["model"] == "colour" and recs[0]["tokens"] == 3 and recs[0]["error"] is None
    assert recs[0]["caption"] == f"rgb(0,10,20) for [{cap.DEFAULT_PROMPT}]"  # stripped

    make_images(tmp_path / "pics", 2, start=5)
    loads = []

    def factory() -> ColourCaptioner:
        loads.append(1)
        return ColourCaptioner()

    s2 = cap.caption_batch([tmp_path / "pics"], captioner=factory, out=out)
    assert (s2.done, s2.skipped) == (2, 5)
    assert [Path(r["path"]).name for r in read_jsonl(out)] == [f"img{i}.png" for i in range(7)]
    # Nothing left to do: the model is not even loaded.
    s3 = cap.caption_batch([tmp_path / "pics"], captioner=factory, out=out)
    assert (s3.done, s3.skipped, len(loads)) == (0, 7, 1)
    # Spelled differently (absolute path): still the same images, still done.
    s3b = cap.caption_batch([str((tmp_path / "pics").resolve()) + "/"], captioner=factory, out=out)
    assert (s3b.done, s3b.skipped, len(loads)) == (0, 7, 1)
    # --overwrite redoes everything into a fresh file.
    s4 = cap.caption_batch([tmp_path / "pics"], captioner=ColourCaptioner(), out=out, overwrite=True)
    assert (s4.done, s4.skipped) == (7, 0) and len(read_jsonl(out)) == 7


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_torn_last_record_is_repaired(tmp_path: Path, fmt: str) -> None:
    make_images(tmp_path / "pics", 4)
    out = tmp_path / f"out.{fmt}"
    cap.caption_batch([tmp_path / "pics"], captioner=ColourCaptioner(), out=out)
    data = out.read_bytes()
    # Simulate a process killed in the middle of writing the 4th record (the caption spans lines in CSV).
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    out.write_bytes(data[: last_start + 25])
    again = ColourCaptioner()
    summary = cap.caption_batch([tmp_path / "pics"], captioner=again, out=out, format=fmt)
    assert summary.repaired and (summary.done, summary.skipped) == (1, 3)
    assert [Path(n).name for n in again.calls] == ["img3.png"]
    # The same records as an uninterrupted run, each image exactly once.
    state = cap.read_log(out, fmt)  # type: ignore[arg-type]
    assert [Path(r.path).name for r in state.records] == [f"img{i}.png" for i in range(4)]
    assert all(r.ok for r in state.records) and not state.repaired


def test_complete_last_record_without_newline_is_kept(tmp_path: Path) -> None:
    make_images(tmp_path / "pics", 2)
    out = tmp_path / "out.jsonl"
    cap.caption_batch([tmp_path / "pics"], captioner=ColourCaptioner(), out=out)
    out.write_bytes(out.read_bytes().rstrip(b"\n"))
    summary = cap.caption_batch([tmp_path / "pics"], captioner=ColourCaptioner(), out=out)
    assert (summary.skipped, summary.repaired) == (2, False)
    assert out.read_text().endswith("}\n") and len(read_jsonl(out)) == 2


def test_foreign_or_corrupt_log_is_refused(tmp_path: Path) -> None:
    make_images(tmp_path / "pics", 1)
    out = tmp_path / "out.jsonl"
    out.write_text("not json\n" + json.dumps({"path": "x"}) + "\n")
    with pytest.raises(OutputError, match="line 1 is not a caption record"):
        cap.caption_batch([tmp_path / "pics"], captioner=ColourCaptioner(), out=out)
    bad_csv = tmp_path / "other.csv"
    bad_csv.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(OutputError, match="header is not"):
        cap.caption_batch([tmp_path / "pics"], captioner=ColourCaptioner(), out=bad_csv)


def test_csv_has_same_columns_and_survives_newlines_and_quotes(tmp_path: Path) -> None:
    make_images(tmp_path / "pics", 3)
    out = tmp_path / "out.csv"
    prompt = 'Say "hi",\nthen describe {filename}'
    cap.caption_batch([tmp_path / "pics"], captioner=ColourCaptioner(), out=out, prompt=prompt)
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == cap.COLUMNS and len(rows) == 4
    assert rows[1][2] == 'Say "hi",\nthen describe img0.png' and rows[1][7] == ""
    state = cap.read_log(out, "csv")
    assert [Path(r.path).name for r in state.records] == ["img0.png", "img1.png", "img2.png"]
    assert state.records[0].tokens == 3 and state.records[0].error is None


def test_sidecar_output_and_resume(tmp_path: Path) -> None:
    imgs = make_images(tmp_path / "pics", 3)
    Image.new("RGB", (2, 2)).save(tmp_path / "pics" / "img0.jpg")  # would also claim img0.txt
    summary = cap.caption_batch([tmp_path / "pics"], captioner=ColourCaptioner(), sidecar=True)
    assert summary.out is None and (summary.done, summary.failed) == (3, 1)
    assert "img0.txt is already the caption of" in summary.failures[0].error
    assert cap.sidecar_path(imgs[1]).read_text() == f"rgb(1,10,20) for [{cap.DEFAULT_PROMPT}]\n"
    assert not list((tmp_path / "pics").glob(".*partial"))
    (tmp_path / "pics" / "img0.jpg").unlink()
    again = ColourCaptioner()
    resumed = cap.caption_batch([tmp_path / "pics"], captioner=again, format="txt")
    assert (resumed.skipped, again.calls) == (3, [])
    with pytest.raises(UsageError, match="needs --out"):
        cap.caption_batch([tmp_path / "pics"], captioner=again, sidecar=True, prompt="{existing}")


def test_sidecar_plus_log(tmp_path: Path) -> None:
    imgs = make_images(tmp_path / "pics", 2)
    out = tmp_path / "log.csv"
    cap.caption_batch([tmp_path / "pics"], captioner=ColourCaptioner(), sidecar=True, out=out, prompt="{existing}!")
    assert cap.sidecar_path(imgs[0]).exists() and len(cap.read_log(out, "csv").records) == 2
    with pytest.raises(UsageError):
        cap.caption_batch([tmp_path / "pics"], captioner=ColourCaptioner(), format="txt", out=out)


# --- bad images ------------------------------------------------------------------------------------------------


def test_bad_images_are_recorded_and_retried_without_duplicates(tmp_path: Path) -> None:
    pics = tmp_path / "pics"
    make_images(pics, 3)
    (pics / "empty.png").write_bytes(b"")
    (pics / "text.jpg").write_text("hello")
    good = (pics / "img0.png").read_bytes()
    (pics / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (50, 50)).save(pics / "huge.png")
    out = tmp_path / "out.jsonl"
    summary = cap.caption_batch([pics], captioner=ColourCaptioner(), out=out, max_pixels=2000)
    assert (summary.done, summary.failed, summary.exit_code) == (3, 4, cap.EXIT_SOME_FAILED)
    errors = {Path(r["path"]).name: r["error"] for r in read_jsonl(out) if r["error"]}
    assert "0 bytes" in errors["empty.png"] and "not an image" in errors["text.jpg"]
    assert "truncated" in errors["truncated.png"] and "pixel limit" in errors["huge.png"]
    assert all(r["caption"] is None for r in read_jsonl(out) if r["error"])

    # Fix one, re-run: only the failures are retried, and each image still has exactly one record.
    (pics / "truncated.png").write_bytes(good)
    again = ColourCaptioner()
    s2 = cap.caption_batch([pics], captioner=again, out=out, max_pixels=2000)
    assert (s2.done, s2.failed, s2.skipped) == (1, 3, 3) and len(again.calls) == 1
    names = [Path(r["path"]).name for r in read_jsonl(out)]
    assert sorted(names) == sorted(set(names)) and len(names) == 7


def test_identical_images_still_get_one_record_each(tmp_path: Path) -> None:
    make_images(tmp_path / "pics", 1)
    (tmp_path / "pics" / "copy.png").write_bytes((tmp_path / "pics" / "img0.png").read_bytes())
    out = tmp_path / "out.jsonl"
    cap.caption_batch([tmp_path / "pics"], captioner=ColourCaptioner(), out=out)
    recs = read_jsonl(out)
    assert len(recs) == 2 and recs[0]["caption"] == recs[1]["caption"]


# --- lock, Ctrl-C ----------------------------------------------------------------------------------------------


def test_second_writer_on_the_same_output_is_refused(tmp_path: Path) -> None:
    make_images(tmp_path / "pics", 2)
    out = tmp_path / "out.jsonl"
    # A lock held by another open file description is refused exactly as another process's would be.
    refused = rf"being written by another `llava caption` process \(pid {os.getpid()}"
    with cap.output_lock(out), pytest.raises(OutputError, match=refused):
        cap.caption_batch([tmp_path / "pics"], captioner=ColourCaptioner(), out=out)
    assert not out.exists()
    cap.caption_batch([tmp_path / "pics"], captioner=ColourCaptioner(), out=out)  # released with the holder


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_first_ctrl_c_finishes_the_current_image(tmp_path: Path) -> None:
    make_images(tmp_path / "pics", 6)
    out = tmp_path / "out.jsonl"

    def interrupt(n: int) -> None:
        if n == 2:
            os.kill(os.getpid(), signal.SIGINT)

    notices: list[str] = []
    summary = cap.caption_batch(
        [tmp_path / "pics"], captioner=ColourCaptioner(interrupt), out=out, on_notice=notices.append
    )
    assert summary.interrupted and summary.exit_code == cap.EXIT_INTERRUPTED
    assert summary.done == 2 and len(read_jsonl(out)) == 2  # the image being captioned was finished and recorded
    assert "finishing the current image" in notices[0]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_second_ctrl_c_drops_the_current_image(tmp_path: Path) -> None:
    make_images(tmp_path / "pics", 6)
    out = tmp_path / "out.jsonl"

    def interrupt(n: int) -> None:
        if n == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    summary = cap.caption_batch([tmp_path / "pics"], captioner=ColourCaptioner(interrupt), out=out)
    assert summary.interrupted and summary.done == 2
    assert [Path(r["path"]).name for r in read_jsonl(out)] == ["img0.png", "img1.png"]
    resumed = cap.caption_batch([tmp_path / "pics"], captioner=ColourCaptioner(), out=out)
    assert (resumed.done, resumed.skipped) == (4, 2)


def test_progress_and_records_callbacks(tmp_path: Path) -> None:
    make_images(tmp_path / "pics", 3)
    seen: list[tuple[int, int]] = []
    recs: list[cap.CaptionRecord] = []
    cap.caption_batch(
        [tmp_path / "pics"],
        captioner=ColourCaptioner(),
        out=tmp_path / "o.jsonl",
        on_progress=lambda c, t: seen.append((c, t)),
        on_record=recs.append,
    )
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)] and [r.tokens for r in recs] == [3, 3, 3]


def test_images_are_decoded_ahead_in_a_background_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_images(tmp_path / "pics", 6)
    decoded: list[tuple[str, str]] = []
    real_load = cap.batch.load_image

    def spy(path, **kw):
        decoded.append((Path(path).name, threading.current_thread().name))
        return real_load(path, **kw)

    monkeypatch.setattr(cap.batch, "load_image", spy)
    ahead_when_first_called: list[int] = []

    def on_call(n: int) -> None:
        if n == 1:
            deadline = time.monotonic() + 5
            while len(decoded) < 4 and time.monotonic() < deadline:  # the prefetcher keeps going meanwhile
                time.sleep(0.005)
            ahead_when_first_called.append(len(decoded))

    summary = cap.caption_batch(
        [tmp_path / "pics"], captioner=ColourCaptioner(on_call), out=tmp_path / "o.jsonl", prefetch=3
    )
    assert summary.done == 6
    assert {thread for _, thread in decoded} == {"llava-caption-prefetch"}
    # While image 1 was being captioned, images 2.. were decoded (up to the prefetch depth + the one in hand).
    assert ahead_when_first_called[0] >= 4
    assert [name for name, _ in decoded] == [f"img{i}.png" for i in range(6)]
