"""GGUF header validation: every malformed file is refused with one line before llama.cpp sees it."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from llava_cli.errors import InputNotFoundError, ModelFileError
from llava_cli.gguf_info import check_pair, read_gguf
from tests.bad_inputs import rewrite_gguf


def _copy(src: Path, tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copyfile(src, dst)
    return dst


def test_reads_the_converted_pair(tiny_pair_f16) -> None:
    text = read_gguf(tiny_pair_f16.text_path, expect="text")
    mmproj = read_gguf(tiny_pair_f16.mmproj_path, expect="mmproj")
    assert text.kind == "text" and text.architecture == "llama"
    assert mmproj.kind == "mmproj" and mmproj.architecture == "clip"
    assert text.n_embd == mmproj.n_embd
    assert text.n_vocab == text.tensor("token_embd.weight").shape[1]
    assert mmproj.n_image_tokens == (mmproj.image_size // mmproj.patch_size) ** 2
    # The sizes are the real tensor bytes: they add up to (almost) the whole file.
    assert 0 < text.tensor_bytes <= text.file_size
    assert text.file_size - text.tensor_bytes < 2_000_000
    check_pair(text, mmproj)


def test_swapped_files_are_named(tiny_pair_f16) -> None:
    with pytest.raises(ModelFileError, match="is a vision projector") as exc:
        read_gguf(tiny_pair_f16.mmproj_path, expect="text")
    assert "--mmproj" in exc.value.hint
    with pytest.raises(ModelFileError, match="text model, not a vision projector"):
        read_gguf(tiny_pair_f16.text_path, expect="mmproj")
    text = read_gguf(tiny_pair_f16.text_path)
    mmproj = read_gguf(tiny_pair_f16.mmproj_path)
    with pytest.raises(ModelFileError):
        check_pair(mmproj, text)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="not found"):
        read_gguf(tmp_path / "nope.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        read_gguf(tmp_path / "empty.gguf")
    with pytest.raises(ModelFileError, match="directory"):
        read_gguf(tmp_path)


@pytest.mark.parametrize("fraction", [0.0001, 0.01, 0.3, 0.7, 0.999])
def test_truncated_files_are_refused(tiny_pair_f16, tmp_path: Path, fraction: float) -> None:
    for src in (tiny_pair_f16.text_path, tiny_pair_f16.mmproj_path):
        data = src.read_bytes()
        cut = tmp_path / f"cut-{src.name}"
        cut.write_bytes(data[: max(5, int(len(data) * fraction))])
        with pytest.raises(ModelFileError, match=r"truncated|corrupt|not a GGUF|lacks"):
            read_gguf(cut)


def test_bad_magic_version_and_counts(tiny_pair_f16, tmp_path: Path) -> None:
    data = bytearray(tiny_pair_f16.text_path.read_bytes())
    bad_magic = tmp_path / "magic.gguf"
    bad_magic.write_bytes(b"GGML" + data[4:])
    with pytest.raises(ModelFileError, match="not a GGUF"):
        read_gguf(bad_magic)
    bad_version = tmp_path / "version.gguf"
    bad_version.write_bytes(data[:4] + struct.pack("<I", 99) + data[8:])
    with pytest.raises(ModelFileError, match="corrupt"):
        read_gguf(bad_version)
    for offset, label in ((8, "tensors"), (16, "kv")):
        absurd = tmp_path / f"absurd-{label}.gguf"
        absurd.write_bytes(data[:offset] + struct.pack("<Q", 2**62) + data[offset + 8 :])
        with pytest.raises(ModelFileError):
            read_gguf(absurd)
    # The first key's string length (right after the 24-byte fixed header).
    huge_string = tmp_path / "string.gguf"
    huge_string.write_bytes(data[:24] + struct.pack("<Q", 2**60) + data[32:])
    with pytest.raises(ModelFileError):
        read_gguf(huge_string)


def test_wrong_key_type_is_refused_instead_of_aborting(tiny_pair_f16, tmp_path: Path) -> None:
    # llama.cpp reads these with a type assertion: an INT32 context length aborts the Python process.
    bad = rewrite_gguf(
        tiny_pair_f16.text_path, tmp_path / "int32.gguf", retype={"llama.context_length": gguf.GGUFValueType.INT32}
    )
    with pytest.raises(ModelFileError, match="llama.context_length.*INT32.*UINT32"):
        read_gguf(bad)
    bad = rewrite_gguf(
        tiny_pair_f16.mmproj_path,
        tmp_path / "mm-int32.gguf",
        retype={"clip.vision.image_size": gguf.GGUFValueType.INT32},
    )
    with pytest.raises(ModelFileError, match="clip.vision.image_size"):
        read_gguf(bad)


def test_missing_keys_are_refused(tiny_pair_f16, tmp_path: Path) -> None:
    bad = rewrite_gguf(
        tiny_pair_f16.text_path, tmp_path / "noeps.gguf", drop={"llama.attention.layer_norm_rms_epsilon"}
    )
    with pytest.raises(ModelFileError, match="layer_norm_rms_epsilon"):
        read_gguf(bad)
    bad = rewrite_gguf(tiny_pair_f16.mmproj_path, tmp_path / "nomean.gguf", drop={"clip.vision.image_mean"})
    with pytest.raises(ModelFileError, match="image_mean"):
        read_gguf(bad)


def test_other_architectures_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_context_length(128)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFileError, match="'gpt2' model; llava-cli runs LLaVA"):
        read_gguf(path)


def test_mismatched_pair_is_refused(tiny_pair_f16, other_width_pair) -> None:
    text = read_gguf(tiny_pair_f16.text_path)
    other_mmproj = read_gguf(other_width_pair.mmproj_path)
    assert text.n_embd != other_mmproj.n_embd
    with pytest.raises(ModelFileError, match="does not belong"):
        check_pair(text, other_mmproj)


@pytest.fixture(scope="module")
def other_width_pair(tmp_path_factory: pytest.TempPathFactory):
    """A pair converted from a checkpoint twice as wide as the default tiny one."""
    from quantize import convert
    from quantize.synthetic import PRESETS, make_checkpoint

    root = tmp_path_factory.mktemp("otherwidth")
    ckpt = make_checkpoint(root / "ckpt", hidden_size=2 * PRESETS["tiny"].hidden_size)
    return convert(ckpt, root / "out", outtype="f16")
