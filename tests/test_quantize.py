"""`llava quantize` / `quantize.quantize`: llama.cpp's quantizer on synthetic LLaVA pairs, run for real."""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import psutil
import pytest

from llava_cli import quality
from llava_cli.cli.app import main
from llava_cli.errors import InputNotFoundError, ModelFileError, OutputError, UsageError
from llava_cli.gguf_info import GGUFInfo, TensorInfo, read_gguf
from llava_cli.quality import measure_quality
from llava_cli.quants import MMPROJ_TYPES, TEXT_TYPES, parse_bits
from quantize import quantizer as qz
from quantize.converter import ConvertResult, convert
from quantize.quality import format_quality_table
from quantize.quantizer import QuantizeResult, quantize

ALL_BITS = ("q4_k_m", "q6_k", "q8_0", "f16")
PROMPT = "USER: <image>\nWhat is in this picture? ASSISTANT:"


def _files(folder: Path) -> list[str]:
    """Everything in `folder`, hidden temporaries included (nothing half-written may stay behind)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:"), err
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def pair256(tiny256_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> ConvertResult:
    """The 256-multiple model converted to F16 (every K-quant applies without fallbacks)."""
    return convert(tiny256_checkpoint, tmp_path_factory.mktemp("f16_256"), outtype="f16")


@pytest.fixture(scope="module")
def quantized256(pair256: ConvertResult, tmp_path_factory: pytest.TempPathFactory) -> dict[str, QuantizeResult]:
    """Each --bits of the 256-multiple model, quantized once for the module."""
    out = tmp_path_factory.mktemp("q256")
    return {bits: quantize(pair256.text_path, bits=bits, out=out) for bits in ALL_BITS}


def _answer(text_path: Path, mmproj_path: Path) -> Any:
    """llama-cpp-python's own LLaVA-1.5 chat handler (not our engine): load the pair, answer about an image."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    png = quality.quality_images()[2]
    handler = Llava15ChatHandler(clip_model_path=str(mmproj_path), verbose=False)
    llm = Llama(model_path=str(text_path), chat_handler=handler, n_ctx=2048, n_threads=2, verbose=False)
    try:
        url = "data:image/png;base64," + base64.b64encode(png).decode()
        return llm.create_chat_completion(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "What is in this picture?"},
                    ],
                }
            ],
            max_tokens=6,
            temperature=0.0,
            seed=1,
        )
    finally:
        llm.close()


# ------------------------------------------------------------------------------------------------ every --bits


@pytest.mark.parametrize("bits", ALL_BITS)
def test_every_bits_loads_and_answers(bits: str, quantized256: dict[str, QuantizeResult]) -> None:
    result = quantized256[bits]
    assert result.text_path.name == f"tiny256-llava.{bits}.gguf"
    assert result.mmproj_path.name == "mmproj-tiny256-llava.f16.gguf"
    info = read_gguf(result.text_path, expect="text")
    assert info.file_type == TEXT_TYPES[bits].label
    reply = _answer(result.text_path, result.mmproj_path)
    assert reply["usage"]["completion_tokens"] > 0
    assert reply["usage"]["prompt_tokens"] > 576  # the image's 576 tokens were part of the prompt
    assert reply["choices"][0]["message"]["role"] == "assistant"


def test_mmproj_q8_0_keeps_embeddings_and_runs(tiny_pair_f16: ConvertResult, tmp_path: Path) -> None:
    result = quantize(tiny_pair_f16.text_path, bits="q8_0", mmproj_bits="Q8_0", out=tmp_path)
    assert result.mmproj_path.name == "mmproj-tiny-llava.q8_0.gguf"
    src = read_gguf(tiny_pair_f16.mmproj_path, expect="mmproj")
    got = {t.name: t for t in read_gguf(result.mmproj_path, expect="mmproj").tensors}
    for t in src.tensors:
        if len(t.shape) == 2 and t.name.endswith(".weight") and "position_embd" not in t.name:
            assert got[t.name].type_name == "Q8_0", t.name
        else:  # patch/position embeddings, biases, norms, the class embedding: untouched
            assert got[t.name].type_name == t.type_name, t.name
    assert result.mmproj_size < src.file_size
    reply = _answer(result.text_path, result.mmproj_path)  # the vendored clip loader runs it
    assert reply["usage"]["completion_tokens"] > 0


def test_q4_k_m_runs_in_a_fresh_process(quantized256: dict[str, QuantizeResult]) -> None:
    """Q4_K/Q6_K matmuls in a child: a llama-cpp-python built for another CPU dies here with SIGILL, not later."""
    result = quantized256["q4_k_m"]
    assert {"Q4_K", "Q6_K"} <= set(result.tensor_types)  # the K-quant kernels really are exercised
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from tests.test_quantize import _answer
        reply = _answer(Path({str(result.text_path)!r}), Path({str(result.mmproj_path)!r}))
        print("TOKENS", reply["usage"]["completion_tokens"])
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode} (-4 = SIGILL: a non-portable build)\n{proc.stderr[-2000:]}"
    assert "TOKENS" in proc.stdout


# ------------------------------------------------------------------------------------- size = llama.cpp's choice


@pytest.mark.parametrize("bits", ALL_BITS)
def test_size_matches_llama_cpp_type_choice(bits: str, pair256: ConvertResult, quantized256) -> None:
    """Prediction from tensor shapes + gguf.GGML_QUANT_SIZES + the Q4_K_M rules, against what llama.cpp wrote."""
    src = read_gguf(pair256.text_path)
    result = quantized256[bits]
    predicted_types = qz.predict_types(src, TEXT_TYPES[bits])
    written = read_gguf(result.text_path)
    assert {t.name: t.type_name for t in written.tensors} == {k: v.name for k, v in predicted_types.items()}
    predicted = qz.predict_size(src, TEXT_TYPES[bits])
    assert abs(written.file_size - predicted) / predicted < 0.02, (written.file_size, predicted)
    assert result.predicted_size == predicted


def test_q4_k_m_mix_on_the_256_model(quantized256: dict[str, QuantizeResult]) -> None:
    types = {t.name: t.type_name for t in read_gguf(quantized256["q4_k_m"].text_path).tensors}
    assert types["output.weight"] == "Q6_K"
    assert types["token_embd.weight"] == "Q4_K"
    # 2 layers: use_more_bits() picks the last one for attn_v and ffn_down.
    assert (types["blk.0.attn_v.weight"], types["blk.1.attn_v.weight"]) == ("Q4_K", "Q6_K")
    assert (types["blk.0.ffn_down.weight"], types["blk.1.ffn_down.weight"]) == ("Q4_K", "Q6_K")
    assert types["blk.0.attn_norm.weight"] == "F32"
    sizes = {b: r.text_size for b, r in quantized256.items()}
    assert sizes["q4_k_m"] < sizes["q6_k"] < sizes["q8_0"] < sizes["f16"]


def _llava_7b_shapes() -> GGUFInfo:
    """LLaVA-1.5-7B's text tensors (shapes only, ggml order) as the header reader would report them at F16."""
    h, ff, vocab, layers = 4096, 11008, 32064, 32
    shapes: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (h, vocab)), ("output.weight", (h, vocab))]
    shapes.append(("output_norm.weight", (h,)))
    for i in range(layers):
        p = f"blk.{i}."
        shapes += [(p + n, (h, h)) for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight")]
        shapes += [(p + "ffn_gate.weight", (h, ff)), (p + "ffn_up.weight", (h, ff)), (p + "ffn_down.weight", (ff, h))]
        shapes += [(p + "attn_norm.weight", (h,)), (p + "ffn_norm.weight", (h,))]
    tensors = tuple(TensorInfo(name, "F16" if len(s) > 1 else "F32", s, math.prod(s), 0) for name, s in shapes)
    return GGUFInfo(
        path=Path("llava-1.5-7b.f16.gguf"),
        kind="text",
        architecture="llama",
        name="llava-1.5-7b",
        file_type="F16",
        n_embd=h,
        n_layer=layers,
        n_head=32,
        n_head_kv=32,
        n_ctx_train=4096,
        n_vocab=vocab,
        n_ff=ff,
        tensors=tensors,
    )


def test_q4_k_m_averages_about_4_8_bits_per_weight_on_llava_7b() -> None:
    info = _llava_7b_shapes()
    n = sum(t.n_elements for t in info.tensors)
    bpw = {b: 8 * (qz.predict_size(info, q) - info.file_size) / n for b, q in TEXT_TYPES.items()}
    assert 4.75 < bpw["q4_k_m"] < 4.95, bpw  # llama.cpp reports 4.85 BPW for LLaMA-7B Q4_K_M
    assert 6.5 < bpw["q6_k"] < 6.7 and 8.4 < bpw["q8_0"] < 8.6 and 15.9 < bpw["f16"] < 16.1, bpw
    types = Counter(t.name for t in qz.predict_types(info, TEXT_TYPES["q4_k_m"]).values())
    assert types["Q6_K"] == 1 + 16 + 16  # output + half of attn_v + half of ffn_down (use_more_bits)


# ------------------------------------------------------------------------------------------------ sources


def test_checkpoint_source_converts_then_quantizes_and_cleans_up(tiny_checkpoint: Path, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    stages: list[str] = []
    result = quantize(
        tiny_checkpoint,
        bits="Q8_0",
        out=tmp_path,
        on_progress=lambda d, t: seen.append((d, t)),
        on_stage=lambda desc, unit: stages.append(desc),
    )
    assert _files(tmp_path) == ["mmproj-tiny-llava.f16.gguf", "tiny-llava.q8_0.gguf"]  # no F16 intermediate left
    assert stages[0].startswith("converting") and any("Q8_0" in s for s in stages)
    n_tensors = len(read_gguf(result.text_path).tensors)
    assert (n_tensors, n_tensors) in seen  # llama.cpp's per-tensor log drove the progress callback
    meta = read_gguf(result.text_path).metadata
    assert meta["llava_cli.quantize.source"] == "tiny-llava (checkpoint)"
    assert meta["llava_cli.quantize.type"] == "Q8_0"
    assert meta[gguf.Keys.General.QUANTIZED_BY].startswith("llava-cli ")
    assert meta[gguf.Keys.General.FILE_TYPE] == gguf.LlamaFileType.MOSTLY_Q8_0


def test_f32_gguf_source_and_metadata(tiny_pair_f32: ConvertResult, tmp_path: Path) -> None:
    result = quantize(tiny_pair_f32.text_path, bits="f16", mmproj_bits="f16", out=tmp_path)
    assert result.text_path.name == "tiny-llava.f16.gguf"
    assert read_gguf(result.mmproj_path).file_type == "F16"  # the F32 mmproj was converted, not copied
    meta = read_gguf(result.text_path).metadata
    assert meta["llava_cli.quantize.source"] == tiny_pair_f32.text_path.name
    assert "llama-cpp-python" in meta["llava_cli.quantize.tool"]


def test_bf16_gguf_source(tiny_pair_f32: ConvertResult, tmp_path: Path) -> None:
    """BF16 sources are quantized like F16 ones (the converter writes F32/F16; llama.cpp itself makes the BF16)."""
    bf16 = qz.QuantType("bf16", "BF16", gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16)
    src = tmp_path / "tiny-llava.bf16.gguf"
    qz.run_llama_quantize(tiny_pair_f32.text_path, src, bf16, kv={}, f16_tensors=[], on_progress=None)
    shutil.copy(tiny_pair_f32.mmproj_path, tmp_path / tiny_pair_f32.mmproj_path.name)
    assert read_gguf(src).file_type == "BF16"
    result = quantize(src, bits="q8_0", out=tmp_path / "out")
    assert result.text_path.name == "tiny-llava.q8_0.gguf" and result.tensor_types.get("Q8_0")
    assert read_gguf(result.mmproj_path).file_type == "F16"


def test_catalog_id_uses_the_cached_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A catalog id quantizes the checkpoint found in the local hub cache (offline: nothing is downloaded)."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = Path(os.environ["HF_HUB_CACHE"]) / "models--llava-hf--llava-1.5-7b-hf"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(sha)
    shutil.copytree(tiny_checkpoint, repo_dir / "snapshots" / sha)
    assert main(["quantize", "llava-1.5-7b", "--bits", "q8_0", "--out", str(tmp_path), "--quiet"]) == 0
    assert _files(tmp_path) == ["llava-1.5-7b.q8_0.gguf", "mmproj-llava-1.5-7b.f16.gguf"]


def test_catalog_id_not_in_cache_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", "llava-1.5-13b", "--bits", "q4_k_m", "--out", str(tmp_path)]) != 0
    assert "llava-hf/llava-1.5-13b-hf" in _one_line_error(capsys)
    assert _files(tmp_path) == []


# ------------------------------------------------------------------------------------------------- bad inputs


def test_unknown_bits_lists_the_choices(tiny_pair_f16: ConvertResult, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UsageError, match="q4_k_m, q6_k, q8_0, f16"):
        quantize(tiny_pair_f16.text_path, bits="q5_k_m")
    with pytest.raises(UsageError, match="for --mmproj-bits: choose one of f16, q8_0"):
        quantize(tiny_pair_f16.text_path, mmproj_bits="q4_k_m")
    assert main(["quantize", str(tiny_pair_f16.text_path), "--bits", "Q3"]) == 2
    assert "choose one of q4_k_m, q6_k, q8_0, f16" in _one_line_error(capsys)


def test_bits_accepts_any_case() -> None:
    assert parse_bits("Q4_K_M") is parse_bits("q4-k-m") is parse_bits("q4_k") is TEXT_TYPES["q4_k_m"]
    assert parse_bits("Q8_0", MMPROJ_TYPES) is MMPROJ_TYPES["q8_0"]
    assert parse_bits("fp16", TEXT_TYPES) is TEXT_TYPES["f16"]


def test_quantized_source_is_refused(
    quantized256: dict[str, QuantizeResult], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = quantized256["q8_0"].text_path
    with pytest.raises(ModelFileError, match=r"already quantized \(Q8_0\).*") as exc:
        quantize(source, bits="q4_k_m", out=tmp_path)
    assert "F16" in (exc.value.hint or "")
    assert main(["quantize", str(source), "--bits", "q4_k_m", "--out", str(tmp_path)]) == 1
    assert "already quantized" in _one_line_error(capsys)
    assert _files(tmp_path) == []


def test_missing_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InputNotFoundError):
        quantize(tmp_path / "nope.f16.gguf", out=tmp_path)
    assert main(["quantize", str(tmp_path / "nope.f16.gguf"), "--out", str(tmp_path / "o")]) == 1
    assert "no such file" in _one_line_error(capsys)
    assert _files(tmp_path) == []


def test_mmproj_as_source_is_refused(tiny_pair_f16: ConvertResult, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="vision projector"):
        quantize(tiny_pair_f16.mmproj_path, out=tmp_path)
    assert _files(tmp_path) == []


def test_other_architecture_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gpt2.f16.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = tmp_path / "out"
    assert main(["quantize", str(path), "--out", str(out)]) == 1
    assert "'gpt2' model" in _one_line_error(capsys)
    assert _files(out) == []


def test_text_gguf_without_mmproj_beside_it(tiny_pair_f16: ConvertResult, tmp_path: Path) -> None:
    lone = tmp_path / "lone.f16.gguf"
    shutil.copy(tiny_pair_f16.text_path, lone)
    with pytest.raises(InputNotFoundError, match="no mmproj"):
        quantize(lone, out=tmp_path / "out")
    assert _files(tmp_path / "out") == []


def test_not_enough_disk_is_refused_before_writing(
    tiny_pair_f16: ConvertResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(qz.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(OutputError, match="not enough free space"):
        quantize(tiny_pair_f16.text_path, bits="q4_k_m", out=tmp_path)
    assert main(["quantize", str(tiny_pair_f16.text_path), "--out", str(tmp_path)]) == 1
    assert "not enough free space" in _one_line_error(capsys)
    assert _files(tmp_path) == []


def test_disk_full_while_writing_leaves_no_file(
    pair256: ConvertResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The kernel's ENOSPC reaches llama.cpp's writer: its temporary output is made a link to /dev/full (every
    write fails with ENOSPC), as if another process filled the disk after the free-space check. No root needed."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    run = qz.run_llama_quantize

    def onto_full_disk(src: Path, dst: Path, *args, **kwargs):  # type: ignore[no-untyped-def]
        dst.unlink(missing_ok=True)
        dst.symlink_to("/dev/full")
        return run(src, dst, *args, **kwargs)

    monkeypatch.setattr(qz, "run_llama_quantize", onto_full_disk)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="disk full") as exc:
        quantize(pair256.text_path, bits="q4_k_m", out=out)
    assert "tiny256-llava.q4_k_m.gguf" in str(exc.value)
    assert _files(out) == []
    assert main(["quantize", str(pair256.text_path), "--bits", "q8_0", "--out", str(out), "--quiet"]) == 1
    assert "disk full" in _one_line_error(capsys)
    assert _files(out) == []


def test_ctrl_c_kills_llama_cpp_and_leaves_no_file(pair256: ConvertResult, tmp_path: Path) -> None:
    def interrupt(done: int, total: int) -> None:
        if done >= 2:
            raise KeyboardInterrupt

    def alive() -> set[int]:
        return {c.pid for c in psutil.Process().children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE}

    before = alive()
    with pytest.raises(KeyboardInterrupt):
        quantize(pair256.text_path, bits="q6_k", out=tmp_path, on_progress=interrupt)
    assert _files(tmp_path) == []
    assert alive() <= before  # the llama.cpp child was killed and reaped


def test_cli_ctrl_c_exits_130_and_leaves_no_file(
    pair256: ConvertResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import contextlib

    import llava_cli.cli.quantize as cli

    @contextlib.contextmanager
    def bar(description: str, *, unit: str = "bytes", quiet: bool = False):
        def update(done: int, total: int) -> None:
            if done >= 2:  # the user presses Ctrl-C while llama.cpp is at the second tensor
                raise KeyboardInterrupt

        yield update

    monkeypatch.setattr(cli, "progress_bar", bar)
    assert main(["quantize", str(pair256.text_path), "--bits", "q6_k", "--out", str(tmp_path)]) == 130
    assert "interrupted" in _one_line_error(capsys)
    assert _files(tmp_path) == []


def test_output_over_its_source_is_refused(tiny_pair_f16: ConvertResult) -> None:
    with pytest.raises(UsageError, match="overwrite its source"):
        quantize(tiny_pair_f16.text_path, bits="f16")  # default out = the source's folder


# ---------------------------------------------------------------------------------------------------- quality


@pytest.mark.slow
def test_quality_orders_the_quantizations(pair256: ConvertResult, quantized256: dict[str, QuantizeResult]) -> None:
    inputs = list(zip(quality.quality_images(), quality.QUALITY_PROMPTS, strict=True))[:2]
    candidates = {(b, "f16"): (quantized256[b].text_path, pair256.mmproj_path) for b in ("f16", "q8_0", "q4_k_m")}
    rows = measure_quality(pair256.text_path, pair256.mmproj_path, candidates, n_answer=8, inputs=inputs)
    by_bits = {r.bits: r for r in rows[1:]}
    assert rows[0].mean_kl == 0 and rows[0].top1_agreement == 1
    # F16 written by llama.cpp's quantizer holds the same weights: identical distributions.
    assert by_bits["f16"].mean_kl < 1e-6 and by_bits["f16"].top1_agreement == 1
    assert 0 < by_bits["q8_0"].mean_kl < by_bits["q4_k_m"].mean_kl
    assert by_bits["q8_0"].mean_kl < 0.05
    assert by_bits["q8_0"].bits_per_weight > by_bits["q4_k_m"].bits_per_weight
    table = format_quality_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| Q4_K_M |" in table


def test_scorer_greedy_answer_is_the_engines(tiny_pair_f16: ConvertResult) -> None:
    """The quality table scores through the path users run: the scorer's greedy answer, built and fed by
    llava_cli/runtime/scoring.py, is token for token what `Engine.ask` at temperature 0 generates."""
    from llava_cli.runtime import Engine
    from llava_cli.runtime.scoring import Scorer

    inputs = list(zip(quality.quality_images(), quality.QUALITY_PROMPTS, strict=True))
    pair = (tiny_pair_f16.text_path, tiny_pair_f16.mmproj_path)
    with Scorer(*pair) as scorer:
        scored = [scorer.answer_logits(image, prompt, None, 12) for image, prompt in inputs]
    with Engine(*pair, n_ctx=1024, n_gpu_layers=0) as engine:
        answers = [engine.ask(prompt, [image], temperature=0, max_tokens=12) for image, prompt in inputs]
    for (tokens, logits), answer in zip(scored, answers, strict=True):
        assert logits.shape == (12, scorer.n_vocab) and logits.dtype == np.float32
        assert tokens[: len(answer.tokens)] == answer.tokens
        if answer.finish_reason == "stop":  # the engine stopped at end-of-sequence; the scorer went on from it
            assert tokens[len(answer.tokens)] == engine.tokenizer.eos_id
    assert len({tuple(t) for t, _ in scored}) > 1  # the answers depend on the input: the comparison can fail
    # Teacher forcing on the given answer reproduces the greedy run's logits exactly (same batches, same cache).
    with Scorer(*pair) as scorer:
        tokens, logits = scorer.answer_logits(inputs[0][0], inputs[0][1], scored[0][0], 12)
    assert tokens == scored[0][0] and np.array_equal(logits, scored[0][1])


@pytest.mark.slow
def test_cli_report_json(tiny_pair_f16: ConvertResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["quantize", str(tiny_pair_f16.text_path), "-q", "Q8_0", "--out", str(tmp_path), "--report", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["bits"] == "q8_0" and Path(data["text_path"]).exists()
    assert [r["bits"] for r in data["report"]] == ["f16", "q8_0"]
    assert 0 < data["report"][1]["mean_kl"] < 0.5 and data["report"][1]["positions"] == 4 * 16


def test_cli_text_output(tiny_pair_f16: ConvertResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", str(tiny_pair_f16.text_path), "--bits", "q4_k_m", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tiny-llava.q4_k_m.gguf" in out and "bits/weight" in out
    assert _files(tmp_path) == ["mmproj-tiny-llava.f16.gguf", "tiny-llava.q4_k_m.gguf"]
