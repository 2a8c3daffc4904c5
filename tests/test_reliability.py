"""The reliability table: every bad input × every command that accepts it.

For each pair: a non-zero exit code (``caption``: the image is recorded as failed, the batch goes on, exit 3), exactly
one line on stderr naming the file and the problem, no Python traceback, no crash of the process (each case runs in
its own process: a llama.cpp abort or a segfault is a negative exit code), and no partial output under a final
name. The odd-but-valid images (1×1, 16-bit, multi-frame) must simply work. A handful of cases also go through a
real ``python -m llava_cli`` interpreter to show the forked runner sees what a user's shell sees.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from quantize import convert
from quantize.synthetic import make_checkpoint
from tests.bad_inputs import CASES, Case, CliResult, Sources, picture, run_cli, sparse

ROOT = Path(__file__).resolve().parents[1]

# Which commands take which family of input.
COMMANDS = {
    "text": ("run", "chat", "caption", "quantize", "vram-check"),
    "mmproj": ("run", "chat", "caption", "quantize", "vram-check"),
    "image": ("run", "chat", "caption"),
    "checkpoint": ("convert", "quantize", "run", "chat", "caption", "vram-check"),
}
# vram-check reads only config.json of a checkpoint (its estimate comes from the architecture): the weights and the
# tokenizer are not its business, so only the config cases apply to it.
VRAM_CHECKPOINT_CASES = ("ckpt-config-not-json", "ckpt-config-missing")

KNOWN: dict[tuple[str, str], pytest.MarkDecorator] = {}  # (case, command) -> xfail mark, for known open bugs

TABLE = [
    pytest.param(case.id, command, id=f"{case.id}-{command}", marks=KNOWN.get((case.id, command), ()))
    for case in CASES.values()
    for command in COMMANDS[case.family]
    if not (command == "vram-check" and case.family == "checkpoint" and case.id not in VRAM_CHECKPOINT_CASES)
]

RUNTIME = ["--ctx", "1024", "--threads", "1", "-n", "2", "--temperature", "0"]


@pytest.fixture(scope="session")
def sources(tiny_pair_f16, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Sources:  # type: ignore[no-untyped-def]
    base = tmp_path_factory.mktemp("reliability_sources")
    wide = make_checkpoint(base / "wide-llava", hidden_size=128, num_attention_heads=4, num_key_value_heads=4)
    other = convert(wide, base / "wide-gguf", outtype="f16")
    image = base / "good.png"
    picture().save(image)
    return Sources(
        text=Path(tiny_pair_f16.text_path),
        mmproj=Path(tiny_pair_f16.mmproj_path),
        other_mmproj=Path(other.mmproj_path),
        checkpoint=tiny_checkpoint,
        sharded=make_checkpoint(base / "sharded-llava", shards=2),
        image=image,
    )


def _link(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)
    return dst


def _snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def _argv(case: Case, command: str, bad: Path, src: Sources, work: Path) -> tuple[list[str], str]:
    """The command line (and stdin) that hands `bad` to `command` in the role its family says."""
    pics = work / "pics"
    if case.family == "image":
        image = bad
        # The batch: a good image on each side of the bad one.
        _link(src.image, pics / "a-good.png")
        _link(bad, pics / bad.name)
        _link(src.image, pics / "z-good.png")
    else:
        image = _link(src.image, pics / "good.png")
    if case.family in ("text", "mmproj"):
        models = bad.parent
        text = bad if case.family == "text" else _link(src.text, models / src.text.name)
        mmproj = bad if case.family == "mmproj" else _link(src.mmproj, models / src.mmproj.name)
        model = ["--model", str(text), "--mmproj", str(mmproj)]
        if command == "quantize":
            # quantize takes the text model and finds its mmproj beside it.
            return ["quantize", str(text), "--bits", "q8_0", "--out", str(work / "out"), "--quiet"], ""
    elif case.family == "checkpoint":
        if command == "convert":
            return ["convert", str(bad), "--out", str(work / "out"), "--quiet"], ""
        if command == "quantize":
            return ["quantize", str(bad), "--bits", "q8_0", "--out", str(work / "out"), "--quiet"], ""
        model = ["--model", str(bad), "--bits", "f16"]
    else:
        model = ["--model", str(src.text), "--mmproj", str(src.mmproj)]
    if command == "run":
        # --json: a valid input must give a parseable answer (the tiny random model's words may be blank).
        return ["run", *model, "--image", str(image), *RUNTIME, "--quiet", "--json", "What is this?"], ""
    if command == "chat":
        return ["chat", *model, "--image", str(image), *RUNTIME], "What is this?\n/exit\n"
    if command == "caption":
        return ["caption", str(pics), "--out", str(work / "out" / "captions.jsonl"), *model, *RUNTIME, "--quiet"], ""
    if command == "vram-check":
        return ["vram-check", *[a for a in model if a not in ("--bits", "f16")]], ""
    raise AssertionError(command)


def _named_in(line: str, case: Case, bad: Path) -> bool:
    """The error line names the file at fault: the file itself, or for a checkpoint the checkpoint directory or a
    file inside it (config.json, a shard, the tokenizer). What the problem is, is `case.expect`, checked apart."""
    if bad.name in line:
        return True
    if case.family != "checkpoint" or not bad.is_dir():
        return False
    inside = {p.name for p in bad.iterdir()} | {"config.json", "tokenizer.model", "model.safetensors"}
    return any(re.search(rf"(^|[\s/'\"(]){re.escape(name)}\b", line) for name in inside)


def _assert_no_traceback(res: CliResult) -> None:
    for stream in (res.stderr, res.stdout):
        assert "Traceback" not in stream and "internal error" not in stream, stream
        assert "GGML_ASSERT" not in stream and "Segmentation fault" not in stream, stream


@pytest.mark.parametrize(("case_id", "command"), TABLE)
def test_bad_input_table(
    case_id: str, command: str, sources: Sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = CASES[case_id]
    bad = case.build(sources, tmp_path / "inputs" / case.family)
    argv, stdin = _argv(case, command, bad, sources, tmp_path / "work")
    home = Path(os.environ["LLAVA_HOME"])
    before_home = _snapshot(home)
    res = run_cli(argv, tmp_path / "work", stdin=stdin)

    assert not res.crashed, f"process killed by signal {-res.code}: {res.stderr[-2000:]}"
    _assert_no_traceback(res)
    out = tmp_path / "work" / "out"
    if case.valid:
        assert res.code == 0, res.stderr
        if command == "caption":
            recs = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
            assert len(recs) == 3 and all(r["error"] is None for r in recs), recs
        elif command == "run":
            answer = json.loads(res.stdout)
            assert answer["images"][0]["width"] >= 1 and "answer" in answer, answer
        else:
            assert "USER" not in res.stderr and res.stdout, res.stderr
        assert "error" not in res.stderr, res.stderr
        return

    if command == "caption" and case.family == "image":
        # The batch goes on: the bad image is recorded with its error, both good ones are captioned.
        assert res.code == 3, res.stderr
        recs = {Path(r["path"]).name: r for r in map(json.loads, (out / "captions.jsonl").read_text().splitlines())}
        assert set(recs) == {"a-good.png", bad.name, "z-good.png"}, recs
        assert recs["a-good.png"]["error"] is None and recs["z-good.png"]["error"] is None
        error = recs[bad.name]["error"]
        assert bad.name in error and re.search(case.expect, error), error
        failed = [line for line in res.error_lines() if "failed:" in line and bad.name in line]
        assert len(failed) == 1, res.stderr
        return

    assert res.code > 0, f"exit 0 for a bad input; stdout: {res.stdout[-500:]}"
    lines = res.error_lines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{res.stderr}"
    line = lines[0]
    assert line.startswith("error:"), line
    assert re.search(case.expect, line), f"{case.expect!r} not in {line!r}"
    assert _named_in(line, case, bad), f"{bad.name} not named in {line!r}"
    # Nothing under a final name, no temp file left: the output folder and the models cache are as before.
    # (caption's hidden lock file stays on purpose: it is an OS lock that dies with the process.)
    assert _snapshot(out) - {"captions.jsonl", ".captions.jsonl.lock"} == set(), _snapshot(out)
    captions = out / "captions.jsonl"
    assert not captions.exists() or captions.stat().st_size == 0
    new_in_home = {p for p in _snapshot(home) - before_home if p.endswith((".gguf", ".partial"))}
    assert not new_in_home, new_in_home


# A few cases through a real interpreter, `python -m llava_cli` as a user's shell runs it: same code, same line.
SUBPROCESS_CASES = [
    ("text-truncated-half", "run"),
    ("mmproj-given-as-text", "vram-check"),
    ("image-decompression-bomb", "run"),
    ("ckpt-header-not-json", "convert"),
    ("text-absurd-string-length", "quantize"),
]


@pytest.mark.parametrize(("case_id", "command"), SUBPROCESS_CASES, ids=[f"{c}-{m}" for c, m in SUBPROCESS_CASES])
def test_real_interpreter_agrees(case_id: str, command: str, sources: Sources, tmp_path: Path) -> None:
    case = CASES[case_id]
    bad = case.build(sources, tmp_path / "inputs" / case.family)
    work = tmp_path / "work"
    argv, stdin = _argv(case, command, bad, sources, work)
    forked = run_cli(argv, work, stdin=stdin)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "NO_COLOR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "llava_cli", *argv], input=stdin, capture_output=True, text=True, cwd=work, env=env
    )
    assert proc.returncode == forked.code > 0, proc.stderr
    assert proc.stderr.strip() == forked.stderr.strip()
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# Issue #15: endless streams, FIFOs with a writer, devices named directly, oversize files, bytes that are not UTF-8.
# Every case: one clear line (or a correct record), and the child's peak RSS under MEMORY_BOUND_MB.

MEMORY_BOUND_MB = 300.0  # the forked child starts at ~60 MB; an image limit's worth of stdin (100 MiB) is read at most


@contextlib.contextmanager
def writer(fifo: Path, pattern: bytes | None) -> Iterator[Path]:
    """Hold `fifo` open for writing (so a reader's open() succeeds); with `pattern`, write it endlessly."""
    if not fifo.exists():
        os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # O_RDWR on a FIFO never blocks (Linux)
    stop = threading.Event()

    def pump() -> None:
        block = (pattern or b"") * max(1, 65536 // max(1, len(pattern or b"x")))
        while not stop.is_set():
            try:
                os.write(fd, block)
            except BlockingIOError:
                time.sleep(0.001)
            except OSError:
                return

    thread = threading.Thread(target=pump, daemon=True)
    if pattern is not None:
        thread.start()
    else:
        with contextlib.suppress(BlockingIOError):
            os.write(fd, b"\x89PNG\r\n\x1a\n" + b"\0" * 4096)  # something in the pipe, and the writer stays
    try:
        yield fifo
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(5)
        os.close(fd)


def _one_line(res: CliResult, expect: str) -> str:
    assert not res.crashed, res.stderr[-2000:]
    _assert_no_traceback(res)
    assert res.code > 0, f"exit 0; stdout: {res.stdout[-300:]}"
    lines = res.error_lines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{res.stderr}"
    assert lines[0].startswith("error:") and re.search(expect, lines[0]), f"{expect!r} not in {lines[0]!r}"
    return lines[0]


def _bounded(res: CliResult) -> None:
    assert res.peak_rss_mb is not None and res.peak_rss_mb < MEMORY_BOUND_MB, res.peak_rss_mb


def _model(src: Sources) -> list[str]:
    return ["--model", str(src.text), "--mmproj", str(src.mmproj), *RUNTIME]


# (id, argv builder, stdin, expected line). stdin: a device path, or "pipe:<pattern>" for a FIFO fed endlessly.
ENDLESS: list[tuple[str, Callable[[Sources, Path], list[str]], str, str]] = [
    (
        "run-image-zero",
        lambda s, w: ["run", "--image", "-", "x", *_model(s)],
        "/dev/zero",
        "stdin holds more than the 100 MiB image limit",
    ),
    (
        "run-image-urandom",
        lambda s, w: ["run", "--image", "-", "x", *_model(s)],
        "/dev/urandom",
        "stdin holds more than the 100 MiB image limit",
    ),
    (
        "run-image-pipe",
        lambda s, w: ["run", "--image", "-", "x", *_model(s)],
        "pipe:\x89PNG",
        "stdin holds more than the 100 MiB image limit.*--max-image-mb",
    ),
    (
        "run-prompt-zero",
        lambda s, w: ["run", "-", "--image", str(s.image), *_model(s)],
        "/dev/zero",
        r"stdin is not text \(byte 0x00",
    ),
    (
        "run-prompt-pipe",
        lambda s, w: ["run", "-", "--image", str(s.image), *_model(s)],
        "pipe:a",
        "stdin holds more than the 1 MiB prompt limit.*LLAVA_MAX_PROMPT_MB",
    ),
    ("chat-zero", lambda s, w: ["chat", *_model(s)], "/dev/zero", r"stdin line 1 is not text \(byte 0x00"),
    ("chat-urandom", lambda s, w: ["chat", *_model(s)], "/dev/urandom", r"stdin line \d+ is not text"),
    ("chat-pipe", lambda s, w: ["chat", *_model(s)], "pipe:a", "stdin line 1 holds more than the 1 MiB prompt limit"),
    (
        "caption-list-zero",
        lambda s, w: ["caption", "-", "--out", str(w / "c.jsonl"), *_model(s)],
        "/dev/zero",
        "stdin holds more than the 256 MiB list file limit",
    ),
    (
        "caption-list-urandom",
        lambda s, w: ["caption", "-", "--out", str(w / "c.jsonl"), *_model(s)],
        "/dev/urandom",
        "stdin is not a list of paths",
    ),
    (
        "caption-list-pipe",
        lambda s, w: ["caption", "-", "--out", str(w / "c.jsonl"), *_model(s)],
        "pipe:photos/a.jpg\n",
        "stdin holds more than the 4 MiB list file limit",
    ),
    (
        "caption-prompt-zero",
        lambda s, w: ["caption", str(s.image), "--prompt-file", "-", *_model(s)],
        "/dev/zero",
        r"stdin is not text",
    ),
]


@pytest.mark.parametrize(("case_id", "argv", "stdin", "expect"), ENDLESS, ids=[e[0] for e in ENDLESS])
def test_endless_stdin_is_bounded(
    case_id: str, argv: Callable[[Sources, Path], list[str]], stdin: str, expect: str, sources: Sources, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    env = {"LLAVA_MAX_LIST_MB": "4"} if case_id == "caption-list-pipe" else None
    with contextlib.ExitStack() as stack:
        if stdin.startswith("pipe:"):
            source = stack.enter_context(writer(tmp_path / "stream", stdin[5:].encode("latin-1")))
        else:
            source = Path(stdin)
        res = run_cli(argv(sources, work), work, stdin_path=source, env=env, timeout=180)
    _one_line(res, expect)
    _bounded(res)
    assert not (work / "c.jsonl").exists() or (work / "c.jsonl").stat().st_size == 0


# Special files named directly (a FIFO here has a writer holding it open: a plain open would succeed and then read
# forever): refused by type, at once, with what the file is.
SPECIAL: list[Any] = [
    (
        "run-image-fifo",
        lambda s, f, w: ["run", "--image", str(f), "x", *_model(s)],
        r"pipe is a FIFO \(named pipe\), not an image file",
    ),
    (
        "chat-image-fifo",
        lambda s, f, w: ["chat", "--image", str(f), *_model(s)],
        r"is a FIFO \(named pipe\), not an image file",
    ),
    (
        "caption-input-fifo",
        lambda s, f, w: ["caption", str(f), *_model(s)],
        r"is a FIFO .*, not a folder, an image or a list file.*give -",
    ),
    (
        "caption-prompt-file-fifo",
        lambda s, f, w: ["caption", str(s.image), "--prompt-file", str(f), *_model(s)],
        r"is a FIFO .*, not a prompt file",
    ),
    (
        "run-model-fifo",
        lambda s, f, w: ["run", "--model", str(f), "--mmproj", str(s.mmproj), "x"],
        r"is a FIFO .*, not a model file",
    ),
    (
        "run-mmproj-fifo",
        lambda s, f, w: ["run", "--model", str(s.text), "--mmproj", str(f), "x"],
        r"is a FIFO .*, not a \.gguf file",
    ),
    (
        "vram-check-model-fifo",
        lambda s, f, w: ["vram-check", "--model", str(f), "--mmproj", str(s.mmproj)],
        r"is a FIFO",
    ),
    (
        "run-image-dev-zero",
        lambda s, f, w: ["run", "--image", "/dev/zero", "x", *_model(s)],
        r"/dev/zero is a character device, not an image file",
    ),
    (
        "run-image-dev-urandom",
        lambda s, f, w: ["run", "--image", "/dev/urandom", "x", *_model(s)],
        r"/dev/urandom is a character device",
    ),
    (
        "chat-image-dev-zero",
        lambda s, f, w: ["chat", "--image", "/dev/zero", *_model(s)],
        r"/dev/zero is a character device",
    ),
    (
        "caption-input-dev-zero",
        lambda s, f, w: ["caption", "/dev/zero", *_model(s)],
        r"/dev/zero is a character device, not a folder",
    ),
    (
        "caption-prompt-file-dev-zero",
        lambda s, f, w: ["caption", str(s.image), "--prompt-file", "/dev/zero"],
        r"/dev/zero is a character device, not a prompt file",
    ),
    (
        "caption-out-dev-null",
        lambda s, f, w: ["caption", str(s.image), "--out", "/dev/null", *_model(s)],
        r"/dev/null is a character device, not a file: the log is read back",
    ),
    (
        "run-model-dev-zero",
        lambda s, f, w: ["run", "--model", "/dev/zero", "x"],
        r"/dev/zero is a character device, not a model file",
    ),
    (
        "run-mmproj-dev-zero",
        lambda s, f, w: ["run", "--model", str(s.text), "--mmproj", "/dev/zero", "x"],
        r"/dev/zero is a character device, not a \.gguf file",
    ),
    ("vram-check-dev-zero", lambda s, f, w: ["vram-check", "--model", "/dev/zero"], r"/dev/zero is a character device"),
    (
        "quantize-dev-zero",
        lambda s, f, w: ["quantize", "/dev/zero", "--bits", "q8_0", "--out", str(w / "o")],
        r"/dev/zero is a character device",
    ),
    (
        "convert-dev-zero",
        lambda s, f, w: ["convert", "/dev/zero", "--out", str(w / "o")],
        r"/dev/zero is not a directory",
    ),
    (
        "run-mmproj-directory",
        lambda s, f, w: ["run", "--model", str(s.text), "--mmproj", str(w), "x"],
        r"is a directory, not a \.gguf file",
    ),
]


@pytest.mark.parametrize(
    ("case_id", "argv", "expect"), [r if hasattr(r, "marks") else pytest.param(*r, id=r[0]) for r in SPECIAL]
)
def test_special_files_are_refused_by_type(
    case_id: str, argv: Callable[[Sources, Path, Path], list[str]], expect: str, sources: Sources, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    with writer(tmp_path / "pipe", None) as fifo:
        res = run_cli(argv(sources, fifo, work), work, timeout=60)
    _one_line(res, expect)
    _bounded(res)


def test_oversize_files_are_refused_from_their_size(sources: Sources, tmp_path: Path) -> None:
    work = tmp_path / "work"
    listed = sparse(tmp_path / "list.txt", 300 << 20, f"{sources.image}\n".encode())
    res = run_cli(["caption", str(listed), *_model(sources)], work)
    _one_line(res, r"list\.txt is 300\.0 MiB, more than the 256 MiB list file limit.*LLAVA_MAX_LIST_MB")
    _bounded(res)
    prompt = sparse(tmp_path / "prompt.txt", 2 << 20, b"Describe it.")
    res = run_cli(["caption", str(sources.image), "--prompt-file", str(prompt), *_model(sources)], work)
    _one_line(res, r"prompt\.txt is 2\.0 MiB, more than the 1 MiB prompt limit")
    # A GGUF header over its limit (the limit lowered to 1 KiB, the tiny model's header is larger).
    res = run_cli(["vram-check", "--model", str(sources.text)], work, env={"LLAVA_MAX_HEADER_MB": "0.001"})
    _one_line(res, r"its header holds more than the 0\.001 MiB model header limit.*LLAVA_MAX_HEADER_MB")


def test_image_limit_is_raised_by_the_flag_and_the_variable(sources: Sources, tmp_path: Path) -> None:
    huge = sparse(tmp_path / "huge.png", 150 << 20, (sources.image).read_bytes())  # a PNG, then a 150 MiB hole
    argv = ["run", "--image", str(huge), *_model(sources), "--json", "What is this?"]
    _one_line(run_cli(argv, tmp_path / "w"), r"huge\.png is 150\.0 MiB, more than the 100 MiB image limit")
    for extra, env in ((["--max-image-mb", "160"], None), ([], {"LLAVA_MAX_IMAGE_MB": "160"})):
        res = run_cli([*argv, *extra], tmp_path / "w", env=env)
        assert res.code == 0, res.stderr
        assert json.loads(res.stdout)["images"][0]["width"] == 48
    _one_line(run_cli([*argv, "--max-image-mb", "0.01"], tmp_path / "w"), r"more than the 0\.01 MiB image limit")


LATIN1 = {"good": b"caf\xe9.png", "bad": b"d\xe9g\xe2t.jpg", "dir": b"\xe9t\xe9"}


def _latin1_folder(src: Sources, root: Path) -> dict[str, bytes]:
    """good.png, a Latin-1 named good image, a Latin-1 named corrupt one, and a Latin-1 subfolder with an image."""
    broot = os.fsencode(root)
    os.makedirs(broot + b"/" + LATIN1["dir"])
    files = {
        "plain": broot + b"/good.png",
        "good": broot + b"/" + LATIN1["good"],
        "bad": broot + b"/" + LATIN1["bad"],
        "inner": broot + b"/" + LATIN1["dir"] + b"/inner.png",
    }
    for key, name in files.items():
        with open(name, "wb") as fh:
            fh.write(b"not an image at all" if key == "bad" else src.image.read_bytes())
    return files


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_non_utf8_names_caption_resume_and_sidecars(fmt: str, sources: Sources, tmp_path: Path) -> None:
    import base64
    import csv

    files = _latin1_folder(sources, tmp_path / "pics")
    out = tmp_path / f"captions.{fmt}"
    argv = ["caption", str(tmp_path / "pics"), "-r", "--sidecar", "--out", str(out), *_model(sources)]
    argv += ["--prompt", "Describe {filename} in {parent}.", "--quiet"]

    def records() -> list[dict[str, str]]:
        if fmt == "csv":
            return list(csv.DictReader(out.open(encoding="utf-8")))
        return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]

    res = run_cli(argv, tmp_path / "w")
    _assert_no_traceback(res)
    assert res.code == 3, res.stderr  # the corrupt one failed; the batch finished every other image
    recs = records()
    assert len(recs) == 4
    by_bytes = {base64.b64decode(r["path_bytes"]) if r.get("path_bytes") else r["path"].encode(): r for r in recs}
    assert set(by_bytes) == set(files.values())  # lossless: path_bytes gives back the exact name
    good = by_bytes[files["good"]]
    assert good["path"].endswith("caf\\xe9.png") and not good["error"]  # \xNN for people
    assert good["prompt"] == f"Describe caf\\xe9.png in {os.path.basename(str(tmp_path / 'pics'))}."
    assert by_bytes[files["inner"]]["prompt"] == "Describe inner.png in \\xe9t\\xe9."
    assert not by_bytes[files["plain"]].get("path_bytes")  # only names that are not UTF-8 carry it
    bad = by_bytes[files["bad"]]
    assert "d\\xe9g\\xe2t.jpg" in bad["error"] and "not an image" in bad["error"], bad
    failed = [line for line in res.error_lines() if "failed:" in line]
    assert len(failed) == 1 and "d\\xe9g\\xe2t.jpg" in failed[0], res.stderr
    for key in ("plain", "good", "inner"):
        assert os.path.exists(os.path.splitext(files[key])[0] + b".txt")  # sidecars at the byte names
    # Resume: the three done are recognised (by path_bytes), the failed one is retried, still one record each.
    res = run_cli(argv, tmp_path / "w")
    assert res.code == 3 and "3 skipped" in res.stderr, res.stderr
    assert sorted(r["path"] for r in records()) == sorted(r["path"] for r in recs)


def test_text_that_is_not_utf8_is_repaired_with_a_note(sources: Sources, tmp_path: Path) -> None:
    work = tmp_path / "w"
    note = "is not valid UTF-8: 1 byte replaced by U+FFFD"
    # argv: Python hands undecodable bytes over as surrogate escapes.
    res = run_cli(["run", "--image", str(sources.image), *_model(sources), "--json", "caf\udce9?"], work)
    assert res.code == 0 and f"note: the prompt {note}" in res.stderr, res.stderr
    assert "answer" in json.loads(res.stdout)
    res = run_cli(["run", "-", "--image", str(sources.image), *_model(sources), "--json"], work, stdin=b"caf\xe9?\n")
    assert res.code == 0 and f"note: the prompt {note}" in res.stderr, res.stderr
    # chat from a pipe: a message is repaired, a /image name keeps its bytes (the file is found).
    files = _latin1_folder(sources, tmp_path / "pics")
    lines = b"caf\xe9?\n/image " + files["good"] + b"\nand now?\n/exit\n"
    res = run_cli(["chat", *_model(sources)], work, stdin=lines)
    _assert_no_traceback(res)
    assert res.code == 0 and f"note: this message {note}" in res.stderr, res.stderr
    assert "caf\\xe9.png (48×40) will go with your next message" in res.stderr, res.stderr
    # A prompt file with a Latin-1 byte, and a prefix from argv with one.
    (tmp_path / "prompt.txt").write_bytes(b"D\xe9cris l'image.")
    argv = ["caption", str(sources.image), "--prompt-file", str(tmp_path / "prompt.txt"), "--prefix", "\udce9 "]
    res = run_cli([*argv, "--out", str(tmp_path / "c.jsonl"), *_model(sources), "--quiet"], work)
    assert res.code == 0, res.stderr
    assert f"note: the prompt {note}" in res.stderr and f"note: --prefix {note}" in res.stderr, res.stderr
    rec = json.loads((tmp_path / "c.jsonl").read_text(encoding="utf-8"))
    assert rec["prompt"] == "D\ufffdcris l'image." and rec["caption"].startswith("\ufffd ")
