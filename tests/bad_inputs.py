"""A corpus of bad (and odd-but-valid) inputs, built by the tests themselves, plus a crash-isolating CLI runner.

Every input is derived from the converter's tiny synthetic models (tests/model_fixtures.py) or drawn with
Pillow/numpy, so nothing is downloaded and nothing is checked in. Three families:

* GGUF files, each in the role the user would give it (``text``: ``--model``; ``mmproj``: ``--mmproj``):
  truncations at several offsets, wrong magic/version, absurd counts and string lengths, swapped roles, another
  architecture, an mmproj whose embedding size does not match the text model.
* Images: zero bytes, truncated JPEG/PNG, random bytes behind an image extension, a decompression bomb; and the
  odd but valid ones (1×1, 16-bit PNG, multi-frame TIFF) that must simply work.
* Hugging Face checkpoints: a missing shard, corrupt/truncated safetensors, config.json that is not JSON or is
  missing, a wrong tensor dtype, no tokenizer.
* Special files and sizes (issue #15): devices and FIFOs under an image's, a model's or a weight file's name, a
  directory where a file goes, files over their limit (sparse: no disk used), a name that is not UTF-8.

`run_cli` runs ``llava_cli.cli.app.main(argv)`` in a child forked from a clean fork server (the imports are done
once, so a case costs milliseconds instead of a 1.5 s interpreter start), with the child's own fds 0/1/2 on
files: a llama.cpp abort or segfault shows up as a negative exit code, C-level stderr is captured too, and the
pytest process never shares a crash.
"""

from __future__ import annotations

import functools
import io
import multiprocessing
import os
import struct
import sys
import zlib
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from PIL import Image

# --------------------------------------------------------------------------------------------- the runner


@dataclass
class CliResult:
    code: int  # the exit code; negative = killed by that signal (a crash)
    stdout: str
    stderr: str
    peak_rss_mb: float | None = None  # the child's peak resident memory (ru_maxrss), None if it did not say

    @property
    def crashed(self) -> bool:
        return self.code < 0

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def _child(
    argv: list[str], env: dict[str, str], cwd: str, files: tuple[str, str, str], tensor_delay: float = 0.0
) -> None:
    """Body of a forked child: the CLI's `main` with its own fds, exiting with main's code.

    ``tensor_delay`` sleeps before each checkpoint tensor is read: it only widens the window in which an interrupt
    test's signal lands mid-write (a tiny model converts in 0.05 s); the code that handles the signal is unchanged.
    """
    if tensor_delay:
        import time

        from quantize.checkpoint import Checkpoint

        read = Checkpoint.read

        def slow_read(self: Checkpoint, name: str) -> np.ndarray:
            time.sleep(tensor_delay)
            return read(self, name)

        Checkpoint.read = slow_read  # type: ignore[method-assign]
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, (name, mode) in enumerate(zip(files, (os.O_RDONLY, os.O_WRONLY, os.O_WRONLY), strict=True)):
        new = os.open(name, mode)  # stdin may be /dev/zero or a FIFO: an endless stream
        os.dup2(new, fd)
        os.close(new)
    # Python's std streams sit on fds 0/1/2: re-create them so buffered text goes to the new files.
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    from llava_cli.cli.app import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    import resource

    # Peak RSS of this process (KiB on Linux), for the memory bound of the endless-stream cases.
    Path(files[2] + ".rss").write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    os._exit(code)  # skip atexit/finalizers: what the user sees is what main printed


_CONTEXT: multiprocessing.context.ForkServerContext | None = None
# What the commands import lazily, imported once in the fork server instead of in every child.
PRELOAD = [
    "llava_cli.cli.app",
    "tests.bad_inputs",
    "llama_cpp",
    "llama_cpp.mtmd_cpp",
    "llava_cli.runtime",
    "llava_cli.resolve",
    "llava_cli.memory",
    "quantize.quantizer",
]


def _context() -> multiprocessing.context.ForkServerContext:
    global _CONTEXT
    if _CONTEXT is None:
        ctx = multiprocessing.get_context("forkserver")
        # The fork server imports the whole CLI (typer, numpy, gguf, llama_cpp's bindings) once; it never loads a
        # model, so its children start from a clean process, not a copy of pytest's threads and locks.
        ctx.set_forkserver_preload(PRELOAD)
        _CONTEXT = ctx
    return _CONTEXT


# A child past this much RAM is killed by `Spawned.wait`: far above any case's need (~200 MB), far below the machine.
RSS_GUARD_MB = 2048.0


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Spawned:
    """A CLI process started by `spawn_cli`, still running."""

    def __init__(self, proc: multiprocessing.process.BaseProcess, names: tuple[Path, Path, Path], argv: list[str]):
        self.proc, self.names, self.argv = proc, names, argv

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.is_alive()

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 120, rss_guard_mb: float = RSS_GUARD_MB) -> CliResult:
        """Wait for the child; kill it (and fail) past `timeout` or when it holds more than `rss_guard_mb` of RAM,
        so that a regression to an unbounded read fails the test instead of taking the machine down."""
        import time

        deadline = time.monotonic() + timeout
        while self.proc.is_alive() and time.monotonic() < deadline:
            rss = _rss_mb(self.pid)
            if rss is not None and rss > rss_guard_mb:
                self.proc.kill()
                self.proc.join()
                raise AssertionError(f"llava {' '.join(self.argv)} grew past {rss_guard_mb:.0f} MB of RAM: killed")
            self.proc.join(0.05)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
            raise AssertionError(f"llava {' '.join(self.argv)} did not finish in {timeout}s")
        assert self.proc.exitcode is not None
        rss_file = Path(str(self.names[2]) + ".rss")
        return CliResult(
            self.proc.exitcode,
            self.names[1].read_text(errors="replace"),
            self.names[2].read_text(errors="replace"),
            int(rss_file.read_text()) / 1024 if rss_file.exists() else None,
        )


def spawn_cli(
    argv: list[str],
    work: Path,
    *,
    stdin: str | bytes = "",
    stdin_path: Path | None = None,
    env: dict[str, str] | None = None,
    tensor_delay: float = 0.0,
    tag: str = "",
) -> Spawned:
    """Start ``llava <argv>`` in a fresh forked process and return at once. Its stdin is `stdin` (text or bytes),
    or the file at `stdin_path` (``/dev/zero``, a FIFO: an endless stream)."""
    work.mkdir(parents=True, exist_ok=True)
    names = (work / f".stdin{tag}", work / f".stdout{tag}", work / f".stderr{tag}")
    if stdin_path is not None:
        names = (stdin_path, *names[1:])
    else:
        names[0].write_bytes(stdin.encode() if isinstance(stdin, str) else stdin)
    names[1].write_bytes(b"")
    names[2].write_bytes(b"")
    Path(str(names[2]) + ".rss").unlink(missing_ok=True)
    child_env = {**os.environ, **(env or {}), "COLUMNS": "200", "NO_COLOR": "1"}
    args = (argv, child_env, str(work), tuple(str(n) for n in names), tensor_delay)
    proc = _context().Process(target=_child, args=args, daemon=False)
    proc.start()
    return Spawned(proc, names, argv)


def run_cli(
    argv: list[str],
    work: Path,
    *,
    stdin: str | bytes = "",
    stdin_path: Path | None = None,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> CliResult:
    """Run ``llava <argv>`` in a fresh forked process; return its exit code, output and peak memory."""
    return spawn_cli(argv, work, stdin=stdin, stdin_path=stdin_path, env=env).wait(timeout)


# ------------------------------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class Sources:
    """The good inputs every bad one is derived from."""

    text: Path  # a valid F16 text GGUF
    mmproj: Path  # its valid mmproj
    other_mmproj: Path  # a valid mmproj of a model with another embedding size
    checkpoint: Path  # a valid single-file checkpoint
    sharded: Path  # a valid 2-shard checkpoint
    image: Path  # a valid PNG


@dataclass(frozen=True)
class Case:
    """One input. ``build(sources, folder)`` writes it under `folder` and returns its path; ``expect`` is a
    regex the error line must match; ``valid`` cases must succeed instead."""

    id: str
    family: str  # "text" | "mmproj" | "image" | "checkpoint"
    build: Callable[[Sources, Path], Path]
    expect: str
    valid: bool = False


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _gguf_layout(path: Path) -> dict[str, int]:
    """Byte offsets inside a valid GGUF: where the KV section, the tensor infos and the data start."""
    reader = gguf.GGUFReader(path)
    kv_start = 24
    first_tensor_info = min(int(t.field.offset) for t in reader.tensors)
    data_start = int(reader.data_offset)
    return {"kv": kv_start, "tensor_info": first_tensor_info, "data": data_start}


def _truncate(role: str, where: str) -> Callable[[Sources, Path], Path]:
    def build(src: Sources, folder: Path) -> Path:
        good = src.text if role == "text" else src.mmproj
        data = good.read_bytes()
        layout = _gguf_layout(good)
        cut = {
            "zero": 0,
            "magic": 4,
            "header": 20,
            "kv": layout["kv"] + 13,  # inside the first key
            "tensor-info": layout["tensor_info"] + 9,  # inside the first tensor's name
            "data": layout["data"] + 100,  # just after the weights start
            "half": len(data) // 2,
            "last-byte": len(data) - 1,
        }[where]
        return _write(folder / good.name, data[:cut])

    return build


def _patch(role: str, offset: int, blob: bytes) -> Callable[[Sources, Path], Path]:
    def build(src: Sources, folder: Path) -> Path:
        good = src.text if role == "text" else src.mmproj
        data = bytearray(good.read_bytes())
        data[offset : offset + len(blob)] = blob
        return _write(folder / good.name, bytes(data))

    return build


def _tensor_field(role: str, index: int, part: int, value: int) -> Callable[[Sources, Path], Path]:
    """Overwrite one tensor-info field (part 3: the first dimension, part 5: the data offset) of tensor `index`."""

    def build(src: Sources, folder: Path) -> Path:
        good = src.text if role == "text" else src.mmproj
        field = gguf.GGUFReader(good).tensors[index].field
        at = int(field.offset) + sum(int(p.nbytes) for p in field.parts[:part])
        data = bytearray(good.read_bytes())
        data[at : at + 8] = struct.pack("<Q", value)
        return _write(folder / good.name, bytes(data))

    return build


def _kv_value(role: str, key: str, value: int) -> Callable[[Sources, Path], Path]:
    """Overwrite the (32-bit) value of KV `key`: a header that parses and whose numbers lie."""

    def build(src: Sources, folder: Path) -> Path:
        good = src.text if role == "text" else src.mmproj
        field = gguf.GGUFReader(good).fields[key]
        at = int(field.offset) + sum(int(p.nbytes) for p in field.parts[:-1])
        data = bytearray(good.read_bytes())
        data[at : at + 4] = struct.pack("<I", value)
        return _write(folder / good.name, bytes(data))

    return build


def _array_length(role: str, key: str, value: int) -> Callable[[Sources, Path], Path]:
    """Overwrite the declared length of array KV `key` (the gguf reader loops over it element by element)."""

    def build(src: Sources, folder: Path) -> Path:
        good = src.text if role == "text" else src.mmproj
        field = gguf.GGUFReader(good).fields[key]
        at = int(field.offset) + sum(int(p.nbytes) for p in field.parts[:4])  # key len, key, type, item type
        data = bytearray(good.read_bytes())
        data[at : at + 8] = struct.pack("<Q", value)
        return _write(folder / good.name, bytes(data))

    return build


def _swapped(role: str) -> Callable[[Sources, Path], Path]:
    """The other file of the pair, under a name that fits the role it is given in."""

    def build(src: Sources, folder: Path) -> Path:
        if role == "text":
            return _write(folder / src.text.name, src.mmproj.read_bytes())
        return _write(folder / src.mmproj.name, src.text.read_bytes())

    return build


def rewrite_gguf(
    src: Path,
    dst: Path,
    *,
    arch: str | None = None,
    drop: AbstractSet[str] = frozenset(),
    retype: dict[str, gguf.GGUFValueType] | None = None,
) -> Path:
    """Copy a GGUF through the writer, optionally relabelling its architecture (its `<arch>.` keys follow), dropping
    keys, or rewriting keys with another value type: what a buggy or foreign converter writes."""
    reader = gguf.GGUFReader(src)
    old_arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    arch = arch or old_arch
    dst.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(dst, arch)
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop:
            continue
        key = f"{arch}." + name.removeprefix(f"{old_arch}.") if name.startswith(f"{old_arch}.") else name
        vtype = f.types[0]
        if retype and name in retype:
            writer.add_key_value(key, f.contents(), retype[name])
        elif vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, f.contents(), vtype, sub_type=f.types[-1])
        else:
            writer.add_key_value(key, f.contents(), vtype)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_shape=None, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _other_architecture(src: Sources, folder: Path) -> Path:
    """The tiny text model relabelled as a Qwen2 model: a well-formed GGUF llama.cpp would load, not LLaVA."""
    return rewrite_gguf(src.text, folder / src.text.name, arch="qwen2")


def _other_mmproj(src: Sources, folder: Path) -> Path:
    return _write(folder / src.mmproj.name, src.other_mmproj.read_bytes())


def _gguf_cases() -> list[Case]:
    cases: list[Case] = []
    for role in ("text", "mmproj"):
        for where in ("zero", "magic", "header", "kv", "tensor-info", "data", "half", "last-byte"):
            if role == "mmproj" and where in ("header", "kv", "last-byte"):
                continue  # the text file covers these offsets; the mmproj keeps the most telling ones
            expect = r"empty \(0 bytes\)" if where == "zero" else r"truncated|corrupt|not a GGUF"
            cases.append(Case(f"{role}-truncated-{where}", role, _truncate(role, where), expect))
        cases.append(Case(f"{role}-bad-magic", role, _patch(role, 0, b"GGML"), r"not a GGUF file \(bad magic"))
    cases += [
        Case("text-version-99", "text", _patch("text", 4, struct.pack("<I", 99)), r"corrupt|version"),
        Case("text-version-1", "text", _patch("text", 4, struct.pack("<I", 1)), r"corrupt|version"),
        Case("text-absurd-tensor-count", "text", _patch("text", 8, struct.pack("<Q", 2**62)), r"corrupt|truncated"),
        Case("text-absurd-kv-count", "text", _patch("text", 16, struct.pack("<Q", 2**62)), r"corrupt|truncated"),
        Case("text-absurd-string-length", "text", _patch("text", 24, struct.pack("<Q", 2**60)), r"corrupt|truncated"),
        Case("mmproj-absurd-tensor-count", "mmproj", _patch("mmproj", 8, struct.pack("<Q", 2**40)), r"corrupt"),
        # Well-formed headers whose tensor table lies: ggml's loader refuses these, so must we.
        Case("text-tensor-offset-overlaps", "text", _tensor_field("text", 3, 5, 0), r"corrupt: tensor .* offset"),
        Case("mmproj-tensor-dim-shrunk", "mmproj", _tensor_field("mmproj", 5, 3, 1), r"corrupt|blocks"),
        # Found by the fuzzer: the gguf reader loops over an array length element by element (the mmproj one took
        # >11 GB and minutes before this was refused up front).
        Case("text-array-length-huge", "text", _array_length("text", "tokenizer.ggml.token_type", 2**31), r"corrupt"),
        Case("mmproj-array-length-huge", "mmproj", _array_length("mmproj", "clip.vision.image_mean", 2**31), "corrupt"),
        # llama.cpp GGML_ASSERTs 0 < block_count <= 512 in load_hparams: an abort, not an error, if it gets there.
        Case("text-block-count-huge", "text", _kv_value("text", "llama.block_count", 33_554_434), r"block count"),
        Case("text-block-count-zero", "text", _kv_value("text", "llama.block_count", 0), r"block count"),
        Case("text-kv-heads-zero", "text", _kv_value("text", "llama.attention.head_count_kv", 0), r"key/value heads"),
        Case("mmproj-given-as-text", "text", _swapped("text"), r"projector \(mmproj\), not a (LLaVA )?text model"),
        Case("text-given-as-mmproj", "mmproj", _swapped("mmproj"), r"text model, not a vision projector"),
        Case("text-other-architecture", "text", _other_architecture, r"'qwen2' model; llava-cli runs LLaVA"),
        Case("mmproj-embedding-mismatch", "mmproj", _other_mmproj, r"does not belong to .*128-dim .* takes 64"),
    ]
    return cases


# ------------------------------------------------------------------------------------------------- images


def picture(size: tuple[int, int] = (48, 40), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


@functools.cache
def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    picture((96, 80)).save(buf, fmt)
    return buf.getvalue()


def _img(name: str, make: Callable[[], bytes]) -> Callable[[Sources, Path], Path]:
    return lambda src, folder: _write(folder / name, make())


@functools.cache
def _bomb() -> bytes:
    """A real 12000×12000 1-bit PNG: 144 MP (over our 100 MP guard and Pillow's 89 MP warning), 20 KB on disk."""
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, "PNG", optimize=False)
    return buf.getvalue()


@functools.cache
def _header_bomb() -> bytes:
    """A PNG whose header claims 65535×65535 (4.3 GP) with a few bytes of data: refused before decoding."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", 65535, 65535, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@functools.cache
def _png16() -> bytes:
    ramp = (np.arange(40 * 48, dtype=np.uint32).reshape(40, 48) * 34).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")  # mode I;16
    return buf.getvalue()


@functools.cache
def _tiff_frames() -> bytes:
    frames = [picture((40, 32), seed=i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


@functools.cache
@functools.cache
def _tiff_bad_ifd() -> bytes:
    """A TIFF whose first directory claims 7 entries, so the width/height tags are cut off (found by the fuzzer)."""
    data = bytearray(_tiff_frames())
    (ifd,) = struct.unpack("<I", data[4:8])
    data[ifd] = 7
    return bytes(data)


def _tiny() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def _image_cases() -> list[Case]:
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    jpeg, png = _encoded("JPEG"), _encoded("PNG")
    return [
        Case("image-zero-bytes", "image", _img("empty.jpg", lambda: b""), r"empty \(0 bytes\)"),
        Case("image-truncated-jpeg", "image", _img("cut.jpg", lambda: jpeg[: len(jpeg) // 2]), r"truncated"),
        Case("image-truncated-png", "image", _img("cut.png", lambda: png[: len(png) // 2]), r"truncated"),
        Case("image-png-header-only", "image", _img("head.png", lambda: png[:33]), r"truncated|corrupt|not an image"),
        Case("image-random-bytes-jpg", "image", _img("noise.jpg", lambda: noise), r"not an image"),
        Case("image-text-as-png", "image", _img("notes.png", lambda: b"shopping: milk, eggs\n"), r"not an image"),
        Case("image-decompression-bomb", "image", _img("bomb.png", _bomb), r"decompression-bomb"),
        Case("image-header-bomb", "image", _img("claims.png", _header_bomb), r"decompression-bomb"),
        Case("image-tiff-bad-directory", "image", _img("broken.tiff", _tiff_bad_ifd), r"truncated|corrupt"),
        Case("image-1x1", "image", _img("dot.png", _tiny), "", valid=True),
        Case("image-16-bit-png", "image", _img("deep.png", _png16), "", valid=True),
        Case("image-multi-frame-tiff", "image", _img("frames.tiff", _tiff_frames), "", valid=True),
    ]


# -------------------------------------------------------------------------------------------- checkpoints


def _copy_checkpoint(src: Path, folder: Path) -> Path:
    out = folder / src.name
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def _ckpt(mutate: Callable[[Path], None], *, sharded: bool = False) -> Callable[[Sources, Path], Path]:
    def build(src: Sources, folder: Path) -> Path:
        out = _copy_checkpoint(src.sharded if sharded else src.checkpoint, folder)
        mutate(out)
        return out

    return build


def _drop_second_shard(ckpt: Path) -> None:
    shards = sorted(ckpt.glob("model-*.safetensors"))
    assert len(shards) >= 2, shards
    shards[-1].unlink()


def _header_length(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 2**50)
    f.write_bytes(bytes(data))


def _header_garbage(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"#" * 32  # the JSON header no longer parses
    f.write_bytes(bytes(data))


def _truncated_weights(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) * 2 // 3])


def _config_not_json(ckpt: Path) -> None:
    (ckpt / "config.json").write_text('{"architectures": ["LlavaForConditionalGeneration"], "text_config": {')


def _config_missing(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()


def _int_weights(ckpt: Path) -> None:
    """Every F32 tensor relabelled I32 (same byte size, so the file stays self-consistent)."""
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + n].replace(b'"F32"', b'"I32"')
    f.write_bytes(data[:8] + header + data[8 + n :])


def _f64_weights(ckpt: Path) -> None:
    """The projector's first weight stored as F64: a dtype no LLaVA checkpoint uses (rewritten consistently)."""
    from safetensors.numpy import load_file, save_file

    f = ckpt / "model.safetensors"
    tensors = load_file(str(f))
    name = next(k for k in tensors if "multi_modal_projector" in k and k.endswith("weight"))
    tensors[name] = tensors[name].astype(np.float64)
    save_file(tensors, str(f), metadata={"format": "pt"})


def _no_tokenizer(ckpt: Path) -> None:
    (ckpt / "tokenizer.model").unlink()


def _no_weights(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()


def _checkpoint_cases() -> list[Case]:
    return [
        Case("ckpt-missing-shard", "checkpoint", _ckpt(_drop_second_shard, sharded=True), r"model-00002-of-00002"),
        Case("ckpt-header-length-absurd", "checkpoint", _ckpt(_header_length), r"model\.safetensors"),
        Case("ckpt-header-not-json", "checkpoint", _ckpt(_header_garbage), r"model\.safetensors"),
        Case("ckpt-truncated-weights", "checkpoint", _ckpt(_truncated_weights), r"model\.safetensors"),
        Case("ckpt-config-not-json", "checkpoint", _ckpt(_config_not_json), r"config\.json"),
        Case("ckpt-config-missing", "checkpoint", _ckpt(_config_missing), r"config\.json"),
        Case("ckpt-int32-weights", "checkpoint", _ckpt(_int_weights), r"I32"),
        Case("ckpt-f64-weight", "checkpoint", _ckpt(_f64_weights), r"F64"),
        Case("ckpt-no-tokenizer", "checkpoint", _ckpt(_no_tokenizer), r"tokenizer"),
        Case("ckpt-no-weights", "checkpoint", _ckpt(_no_weights), r"safetensors"),
    ]


# ------------------------------------------------------------------ special files, oversize files, odd names
# (issue #15) Every command that reads an input refuses a device, a FIFO or a directory by its type, before opening
# it, and a file over its limit by its size, before reading it. Devices are symlinks under an image's or a model's
# name (what a glob or a typo produces); FIFOs have no writer, so a plain open() would block forever.


def _symlink_to(target: str, name: str) -> Callable[[Sources, Path], Path]:
    def build(src: Sources, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / name
        link.unlink(missing_ok=True)
        os.symlink(target, link)
        return link

    return build


def _fifo(name: str) -> Callable[[Sources, Path], Path]:
    def build(src: Sources, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.unlink(missing_ok=True)
        os.mkfifo(path)
        return path

    return build


def _directory(name: str) -> Callable[[Sources, Path], Path]:
    def build(src: Sources, folder: Path) -> Path:
        (folder / name).mkdir(parents=True, exist_ok=True)
        return folder / name

    return build


def sparse(path: Path, size: int, head: bytes = b"") -> Path:
    """A file of `size` bytes that takes no disk space beyond `head` (the rest is a hole of zeros)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(head)
    os.truncate(path, size)
    return path


def _oversize_image(src: Sources, folder: Path) -> Path:
    """A real PNG header followed by a 150 MiB hole: over the 100 MiB image limit, refused from its size."""
    return sparse(folder / "huge.png", 150 << 20, _encoded("PNG"))


def _non_utf8_name(src: Sources, folder: Path) -> Path:
    """A valid PNG whose name is Latin-1 bytes ("café.png" from an old archive): not UTF-8, must simply work."""
    folder.mkdir(parents=True, exist_ok=True)
    return _write(folder / os.fsdecode(b"caf\xe9.png"), _encoded("PNG"))


def _safetensors_fifo(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    f.unlink()
    os.mkfifo(f)


def _header_over_limit(ckpt: Path) -> None:
    """A safetensors header length of 120 MiB in a (sparse) 130 MiB file: inside the file, over the 100 MiB limit."""
    f = ckpt / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.write(struct.pack("<Q", 120 << 20))
    os.truncate(f, 130 << 20)


NOT_REGULAR = {"device": r"is a character device, not ", "fifo": r"is a FIFO \(named pipe\), not "}


def _special_cases() -> list[Case]:
    image_limit = r"150\.0 MiB, more than the 100 MiB image limit"
    return [
        Case("image-dev-zero", "image", _symlink_to("/dev/zero", "zero.jpg"), NOT_REGULAR["device"] + "an image"),
        Case("image-dev-urandom", "image", _symlink_to("/dev/urandom", "noise.png"), NOT_REGULAR["device"]),
        Case("image-fifo", "image", _fifo("pipe.jpg"), NOT_REGULAR["fifo"] + "an image"),
        Case("image-oversize", "image", _oversize_image, image_limit),
        Case("image-non-utf8-name", "image", _non_utf8_name, "", valid=True),
        Case("text-dev-zero", "text", _symlink_to("/dev/zero", "zero.gguf"), NOT_REGULAR["device"]),
        Case("text-fifo", "text", _fifo("pipe.gguf"), NOT_REGULAR["fifo"]),
        Case("mmproj-dev-zero", "mmproj", _symlink_to("/dev/zero", "mmproj-zero.gguf"), NOT_REGULAR["device"]),
        Case("mmproj-fifo", "mmproj", _fifo("mmproj-pipe.gguf"), NOT_REGULAR["fifo"]),
        Case("mmproj-directory", "mmproj", _directory("mmproj-dir.gguf"), r"is a directory, not "),
        Case("ckpt-safetensors-fifo", "checkpoint", _ckpt(_safetensors_fifo), r"model\.safetensors is a FIFO"),
        Case("ckpt-header-over-limit", "checkpoint", _ckpt(_header_over_limit), r"120\.0 MiB, more than the 100 MiB"),
    ]


def all_cases() -> list[Case]:
    return [*_gguf_cases(), *_image_cases(), *_checkpoint_cases(), *_special_cases()]


CASES = {c.id: c for c in all_cases()}


# ------------------------------------------------------------------------------ loading through llama.cpp


def _engine_child(text: str, mmproj: str, image: str, result: str) -> None:
    """Body of a forked child: load the pair with the real Engine and answer one token about `image`.

    Writes {"ok": true} or {"ok": false, "error": <one-line LlavaError>} to `result`; any other exception is a
    traceback and exit code 1, a llama.cpp abort a negative exit code.
    """
    import json

    from llava_cli.errors import LlavaError
    from llava_cli.images import load_image
    from llava_cli.runtime import Engine

    fd = os.open(result + ".stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)  # llama.cpp's own log, in case it aborts
    try:
        with Engine(text, mmproj, n_ctx=1024, n_threads=1, n_gpu_layers=0, on_note=lambda _m: None) as engine:
            answer = engine.ask("What is this?", images=[load_image(image)], max_tokens=1, temperature=0.0)
            outcome = {"ok": True, "completion_tokens": answer.completion_tokens}
    except LlavaError as exc:
        outcome = {"ok": False, "error": str(exc), "type": type(exc).__name__}
    Path(result).write_text(json.dumps(outcome))
    os._exit(0)


def load_in_child(text: Path, mmproj: Path, image: Path, work: Path, timeout: float = 120) -> tuple[int, dict, str]:
    """Load `text` + `mmproj` with llama.cpp in a forked child; (exit code, outcome, llama.cpp's stderr)."""
    import json

    work.mkdir(parents=True, exist_ok=True)
    result = work / "engine.json"
    result.unlink(missing_ok=True)
    proc = _context().Process(target=_engine_child, args=(str(text), str(mmproj), str(image), str(result)))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise AssertionError(f"loading {text.name} + {mmproj.name} did not finish in {timeout}s")
    assert proc.exitcode is not None
    err_file = Path(str(result) + ".stderr")
    err = err_file.read_text(errors="replace") if err_file.exists() else ""
    outcome = json.loads(result.read_text()) if result.exists() else {}
    return proc.exitcode, outcome, err
