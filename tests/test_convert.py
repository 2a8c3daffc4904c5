"""The converter: GGUF metadata and tensors, determinism, atomicity, and every bad input through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from llava_cli.cli.app import main
from llava_cli.errors import CheckpointError, UsageError
from quantize import ConvertResult, convert
from quantize.checkpoint import Checkpoint, open_checkpoint
from quantize.synthetic import PRESETS, make_checkpoint, padded_vocab


def _fields(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}


def _tensors(path: Path) -> dict[str, tuple[str, list[int]]]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, [int(x) for x in t.shape]) for t in reader.tensors}


def test_text_metadata(tiny_pair_f16: ConvertResult) -> None:
    spec = PRESETS["tiny"]
    kv = _fields(tiny_pair_f16.text_path)
    k = gguf.Keys
    arch = "llama"
    assert kv[k.General.ARCHITECTURE] == arch
    assert kv[k.LLM.EMBEDDING_LENGTH.format(arch=arch)] == spec.hidden_size
    assert kv[k.LLM.BLOCK_COUNT.format(arch=arch)] == spec.num_hidden_layers
    assert kv[k.LLM.FEED_FORWARD_LENGTH.format(arch=arch)] == spec.intermediate_size
    assert kv[k.Attention.HEAD_COUNT.format(arch=arch)] == spec.num_attention_heads
    assert kv[k.Attention.HEAD_COUNT_KV.format(arch=arch)] == spec.num_key_value_heads
    assert kv[k.Rope.DIMENSION_COUNT.format(arch=arch)] == spec.hidden_size // spec.num_attention_heads
    assert kv[k.Attention.LAYERNORM_RMS_EPS.format(arch=arch)] == pytest.approx(spec.rms_norm_eps)
    assert kv[k.General.FILE_TYPE] == gguf.LlamaFileType.MOSTLY_F16
    tokens = kv[k.Tokenizer.LIST]
    types = kv[k.Tokenizer.TOKEN_TYPE]
    assert isinstance(tokens, list) and isinstance(types, list)
    # One token per embedding row: SentencePiece pieces, <image>, <pad>, then unique [PAD] fillers.
    assert len(tokens) == padded_vocab(spec) == len(set(tokens))
    image_id = spec.vocab_pieces
    assert tokens[image_id] == "<image>" and types[image_id] == gguf.TokenType.CONTROL
    assert tokens[image_id + 1] == "<pad>" and kv[k.Tokenizer.PAD_ID] == image_id + 1
    assert tokens[-1] == f"[PAD{len(tokens) - 1}]" and types[-1] == gguf.TokenType.UNUSED
    assert tokens.index("<0x0A>") > 0 and types[tokens.index("<0x0A>")] == gguf.TokenType.BYTE
    assert kv[k.Tokenizer.MODEL] == "llama"


def test_text_tensors(tiny_pair_f16: ConvertResult) -> None:
    spec = PRESETS["tiny"]
    tensors = _tensors(tiny_pair_f16.text_path)
    assert len(tensors) == 2 + 1 + 9 * spec.num_hidden_layers  # embd, output, output_norm, 9 per block
    assert tensors["token_embd.weight"] == ("F16", [spec.hidden_size, padded_vocab(spec)])
    assert tensors["output.weight"][0] == "F16"
    assert tensors["output_norm.weight"][0] == "F32"
    assert tensors["blk.0.attn_norm.weight"][0] == "F32"
    assert tensors["blk.1.ffn_down.weight"] == ("F16", [spec.intermediate_size, spec.hidden_size])
    assert not any(n.startswith(("v.", "mm.")) for n in tensors)


def test_mmproj_metadata_and_tensors(tiny_pair_f16: ConvertResult) -> None:
    spec = PRESETS["tiny"]
    kv = _fields(tiny_pair_f16.mmproj_path)
    k = gguf.Keys
    depth = spec.vision_num_hidden_layers - 1  # vision_feature_layer -2
    assert kv[k.General.ARCHITECTURE] == "clip"
    assert kv[k.Clip.PROJECTOR_TYPE] == "mlp"
    assert kv[k.Clip.HAS_VISION_ENCODER] is True
    assert kv[k.ClipVision.BLOCK_COUNT] == depth
    assert kv["clip.vision.feature_layer"] == [depth]
    assert kv[k.ClipVision.IMAGE_SIZE] == 336 and kv[k.ClipVision.PATCH_SIZE] == 14
    assert kv[k.ClipVision.USE_GELU] is False
    reader = gguf.GGUFReader(str(tiny_pair_f16.mmproj_path))
    assert reader.fields["clip.vision.feature_layer"].types[-1] == gguf.GGUFValueType.INT32
    assert reader.fields[k.ClipVision.BLOCK_COUNT].types[0] == gguf.GGUFValueType.UINT32
    tensors = _tensors(tiny_pair_f16.mmproj_path)
    assert f"v.blk.{depth - 1}.attn_q.weight" in tensors and f"v.blk.{depth}.attn_q.weight" not in tensors
    assert not any(n.startswith("v.post_ln") for n in tensors)
    # Default vision layout "standard": F32 class embedding (an F16 one aborts llama.cpp in ggml_concat) and the
    # full 577-row position table (F32), as llama.cpp's own conversions write them.
    assert tensors["v.class_embd"] == ("F32", [spec.vision_hidden_size])
    assert tensors["v.position_embd.weight"] == ("F32", [spec.vision_hidden_size, 577])
    assert kv[k.General.DESCRIPTION].endswith("vision layout standard")
    assert tensors["mm.0.weight"] == ("F16", [spec.vision_hidden_size, spec.hidden_size])
    assert tensors["mm.2.weight"] == ("F16", [spec.hidden_size, spec.hidden_size])
    assert tensors["mm.0.bias"][0] == "F32" and "mm.1.weight" not in tensors


def test_no_cls_layout_drops_the_class_embedding(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = convert(tiny_checkpoint, tmp_path, vision_layout="no_cls")
    tensors = _tensors(result.mmproj_path)
    assert "v.class_embd" not in tensors
    assert tensors["v.position_embd.weight"] == ("F32", [PRESETS["tiny"].vision_hidden_size, 576])
    assert _fields(result.mmproj_path)[gguf.Keys.General.DESCRIPTION].endswith("vision layout no_cls")


def test_qk_permutation(tiny_checkpoint: Path, tiny_pair_f32: ConvertResult) -> None:
    ckpt = open_checkpoint(tiny_checkpoint)
    reader = gguf.GGUFReader(str(tiny_pair_f32.text_path))
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight").data
    hf = ckpt.read("model.layers.0.self_attn.q_proj.weight")
    n_head = PRESETS["tiny"].num_attention_heads
    hd = hf.shape[0] // n_head
    # Row 1 of each head in llama.cpp order is HF row d/2 of that head.
    assert np.array_equal(q[1], hf[hd // 2]) and np.array_equal(q[hd + 1], hf[hd + hd // 2])
    v = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight").data
    assert np.array_equal(v, ckpt.read("model.layers.0.self_attn.v_proj.weight"))


def test_convert_twice_is_byte_identical(tiny_checkpoint: Path, tmp_path: Path) -> None:
    a = convert(tiny_checkpoint, tmp_path / "a", outtype="f16", name="x")
    b = convert(tiny_checkpoint, tmp_path / "b", outtype="f16", name="x")
    assert a.text_path.read_bytes() == b.text_path.read_bytes()
    assert a.mmproj_path.read_bytes() == b.mmproj_path.read_bytes()


def test_progress_reports_bytes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    result = convert(tiny_checkpoint, tmp_path, on_progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (0, result.n_bytes) and calls[-1] == (result.n_bytes, result.n_bytes)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_error_mid_write_leaves_no_file(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_read = Checkpoint.read
    count = 0

    def failing_read(self: Checkpoint, name: str) -> np.ndarray:
        nonlocal count
        count += 1
        if count == 30:  # inside the mmproj, after the whole text model was written
            raise CheckpointError("simulated read failure")
        return real_read(self, name)

    monkeypatch.setattr(Checkpoint, "read", failing_read)
    with pytest.raises(CheckpointError):
        convert(tiny_checkpoint, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # neither final names nor temp files


def test_keyboard_interrupt_leaves_no_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    def interrupt(done: int, total: int) -> None:
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(tiny_checkpoint, tmp_path / "out", on_progress=interrupt)
    assert list((tmp_path / "out").iterdir()) == []


def test_sparse_config_gets_transformers_defaults(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "sparse"
    shutil.copytree(tiny_checkpoint, ckpt_dir)
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    del cfg["text_config"]["rms_norm_eps"], cfg["text_config"]["num_key_value_heads"], cfg["vision_feature_layer"]
    (ckpt_dir / "config.json").write_text(json.dumps(cfg))
    ckpt = open_checkpoint(ckpt_dir)
    assert ckpt.config.text.rms_norm_eps == 1e-6  # LlamaConfig default
    assert ckpt.config.text.num_key_value_heads == ckpt.config.text.num_attention_heads
    assert ckpt.config.feature_depth == PRESETS["tiny"].vision_num_hidden_layers - 1


# ------------------------------------------------------------------------------------------ CLI, bad input


def test_cli_converts_and_prints_paths(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["convert", str(tiny_checkpoint), "--out", str(tmp_path), "--name", "m", "--quiet"])
    out = capsys.readouterr().out.split()
    assert code == 0
    assert out == [str(tmp_path / "m.f16.gguf"), str(tmp_path / "mmproj-m.f16.gguf")]
    assert all(Path(p).is_file() for p in out)
    assert "v.class_embd" in _tensors(tmp_path / "mmproj-m.f16.gguf")  # standard layout by default


def test_cli_vision_layout_no_cls(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["convert", str(tiny_checkpoint), "--out", str(tmp_path), "--quiet", "--vision-layout", "no_cls"]
    assert main(args) == 0
    mmproj = Path(capsys.readouterr().out.split()[1])
    assert "v.class_embd" not in _tensors(mmproj)


def _mutated(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _bad_inputs(tiny: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (CLI args, a fragment the one-line error must contain)."""
    cases: dict[str, tuple[list[str], str]] = {}
    cases["missing dir"] = ([str(tmp / "nope")], "does not exist")

    no_cfg = _mutated(tiny, tmp / "no_cfg")
    (no_cfg / "config.json").unlink()
    cases["no config"] = ([str(no_cfg)], "no config.json")

    arch = _mutated(tiny, tmp / "arch")
    cfg = json.loads((arch / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["Qwen2VLForConditionalGeneration"], "qwen2_vl"
    (arch / "config.json").write_text(json.dumps(cfg))
    cases["unsupported architecture"] = ([str(arch)], "supported: LlavaForConditionalGeneration")

    sharded = make_checkpoint(tmp / "sharded", shards=3)
    missing_shard = _mutated(sharded, tmp / "missing_shard")
    (missing_shard / "model-00002-of-00003.safetensors").unlink()
    cases["missing shard"] = ([str(missing_shard)], "model-00002-of-00003.safetensors")

    truncated = _mutated(sharded, tmp / "truncated")
    shard = truncated / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    cases["truncated shard"] = ([str(truncated)], "truncated")

    more_layers = _mutated(tiny, tmp / "more_layers")
    cfg = json.loads((more_layers / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] += 1
    (more_layers / "config.json").write_text(json.dumps(cfg))
    cases["missing tensors"] = ([str(more_layers)], "missing from the checkpoint")

    shape = _mutated(tiny, tmp / "shape")
    cfg = json.loads((shape / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] += 64
    (shape / "config.json").write_text(json.dumps(cfg))
    cases["shape mismatch"] = ([str(shape)], "has shape")

    blocker = tmp / "a_file"
    blocker.write_text("x")
    cases["unwritable output"] = ([str(tiny), "--out", str(blocker / "sub")], "output directory")
    cases["bad outtype"] = ([str(tiny), "--outtype", "q4"], "--outtype")
    return cases


def test_bad_inputs_fail_with_one_line(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for case, (args, fragment) in _bad_inputs(tiny_checkpoint, tmp_path / "cases").items():
        argv = ["convert", *args]
        if "--out" not in args:
            argv += ["--out", str(tmp_path / "out" / case.replace(" ", "_"))]
        code = main([*argv, "--quiet"])
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert code != 0, case
        assert "Traceback" not in captured.err, case
        assert len(err.splitlines()) == 1, (case, err)
        assert err.startswith("error:") and fragment in err, (case, err)
        out_dir = tmp_path / "out" / case.replace(" ", "_")
        assert not out_dir.exists() or not any(out_dir.iterdir()), case


def test_tied_checkpoint_has_no_output_tensor(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    tensors = _tensors(convert(ckpt, tmp_path / "out").text_path)
    assert "token_embd.weight" in tensors and "output.weight" not in tensors  # llama.cpp reuses token_embd


@pytest.mark.parametrize(
    ("adder", "value"),
    [
        ("add_uint32", np.int64(3)),  # numpy scalar: gguf would write it, llama.cpp would assert
        ("add_uint32", -1),
        ("add_uint32", True),
        ("add_float32", 1),  # an int where a float is declared
        ("add_bool", 1),
    ],
)
def test_kv_type_check_refuses_bad_values(adder: str, value: object) -> None:
    from llava_cli.errors import ModelFileError
    from quantize.converter import check_kv_types

    writer = gguf.GGUFWriter(None, "llama")
    getattr(writer, adder)("llama.some_key", value)
    with pytest.raises(ModelFileError, match="llama.some_key"):
        check_kv_types(writer)


def test_unknown_vision_layout_is_a_usage_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"--vision-layout 'rolled' is not supported; choose standard, no_cls"):
        convert(tiny_checkpoint, tmp_path, vision_layout="rolled")
    assert not list(tmp_path.iterdir())
