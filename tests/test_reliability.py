"""The reliability table: every bad input × every command that accepts it.

For each pair: a non-zero exit code (``caption``: the image is recorded as failed, the batch goes on, exit 3), exactly
one line on stderr naming the file and the problem, no Python traceback, no crash of the process (each case runs in
its own process: a llama.cpp abort or a segfault is a negative exit code), and no partial output under a final
name. The odd-but-valid images (1×1, 16-bit, multi-frame) must simply work. A handful of cases also go through a
real ``python -m llava_cli`` interpreter to show the forked runner sees what a user's shell sees.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from quantize import convert
from quantize.synthetic import make_checkpoint
from tests.bad_inputs import CASES, Case, CliResult, Sources, picture, run_cli

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

# Found by the #15 sweep in a file this suite does not own: quantize looks for its mmproj among the *regular* files
# beside the model, so a device, FIFO or directory named mmproj-*.gguf there gets "no mmproj-*.gguf beside" instead
# of what it is (quantize/quantizer.py; reading.require_regular says it in one call).
_QUANTIZE_MMPROJ_BESIDE = pytest.mark.xfail(
    strict=True, reason="quantize/quantizer.py skips a non-regular mmproj beside the model without saying what it is"
)
KNOWN = {(c, "quantize"): _QUANTIZE_MMPROJ_BESIDE for c in ("mmproj-dev-zero", "mmproj-fifo", "mmproj-directory")}

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
    """The error line names the file at fault: the file itself, or for a checkpoint the piece of it that is bad."""
    if bad.name in line:
        return True
    return case.family == "checkpoint" and bool(re.search(case.expect, line))


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
