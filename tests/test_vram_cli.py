"""`llava vram-check` end to end through the CLI boundary (main()), with fake GPUs at the probe boundary,
and the planner on real converted GGUF headers."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from llava_cli import gpu as gpu_mod
from llava_cli import memory
from llava_cli.cli.app import main
from llava_cli.gpu import GPU, GiB, GPUProbe, HostMemory, MiB
from tests.test_memory import CARDS, install_smi, smi_lines

HOST = HostMemory(total=32 * GiB, available=28 * GiB)


@pytest.fixture(autouse=True)
def _fixed_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """No real NVML, fixed RAM; GPU support as a GPU build would report it (the CPU wheel here says no)."""
    monkeypatch.setattr(gpu_mod, "_import_pynvml", lambda: None)
    monkeypatch.setattr(gpu_mod, "host_memory", lambda: HOST)
    monkeypatch.setattr(gpu_mod, "gpu_offload_supported", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    code = main(["vram-check", *args, "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def test_planned_12gb_card_for_13b(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "--model", "llava-1.5-13b", "--gpu-memory", "12GB")
    assert data["gpu_source"] == "--gpu-memory"
    assert data["recommended"] == "Q4_K_M"
    assert 30 < data["recommended_n_gpu_layers"] < 41
    rows = {e["quant"]: e for e in data["estimates"]}
    assert list(rows) == ["Q4_K_M", "Q6_K", "Q8_0", "F16"]
    # ours beside the published table
    assert rows["Q6_K"]["published_size_gb"] == 11.1 and rows["Q6_K"]["weights"] / 1e9 == pytest.approx(10.68, abs=0.01)
    assert rows["F16"]["placement"] == "partial"
    assert any("--ctx 2048" in h for h in data["hints"])


def test_fake_nvidia_smi_24gb_card_in_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    install_smi(tmp_path, monkeypatch, smi_lines(CARDS[24]))
    code = main(["vram-check", "--model", "llava-1.5-7b"])
    out = capsys.readouterr().out
    assert code == 0
    assert "GPU 0: NVIDIA GeForce RTX 4090" in out and "nvidia-smi" in out
    assert "recommended: Q8_0 fully on GPU 0" in out
    for q in ("Q4_K_M", "Q6_K", "Q8_0", "F16"):
        assert q in out


def test_two_fake_gpus_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    install_smi(tmp_path, monkeypatch, smi_lines(CARDS[8], CARDS[80]))
    data = run_json(capsys, "--model", "llava-1.5-13b")
    assert [g["name"] for g in data["gpus"]] == [CARDS[8][0], CARDS[80][0]]
    assert data["recommended"] == "Q8_0"
    assert all(e["device"].startswith("GPU 1 ") for e in data["estimates"])


def test_failing_nvidia_smi_plans_for_ram(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    install_smi(tmp_path, monkeypatch, "NVIDIA-SMI has failed\n", code=9)
    code = main(["vram-check", "--model", "llava-1.5-7b"])
    out = capsys.readouterr().out
    assert code == 0
    assert "No GPU found" in out and "nvidia-smi failed (exit 9" in out
    assert "recommended: Q8_0 on the CPU" in out


def test_cpu_only_build_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    install_smi(tmp_path, monkeypatch, smi_lines(CARDS[24]))
    monkeypatch.setattr(gpu_mod, "gpu_offload_supported", lambda: False)
    code = main(["vram-check", "--model", "llava-1.5-7b"])
    out = capsys.readouterr().out
    assert code == 0
    assert "no GPU support" in out and "GGML_CUDA=on" in out
    assert "on the CPU" in out


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--model", "nope.gguf"], 1, "model file not found: nope.gguf"),
        (["--model", "no-such-model"], 2, "unknown model 'no-such-model'"),
        (["--model", "llava-1.5-7b", "--gpu-memory", "lots"], 2, "--gpu-memory: cannot read 'lots'"),
        (["--model", "llava-1.5-7b", "--gpu-memory", "0GB"], 2, "not a positive size"),
    ],
)
def test_bad_inputs(args: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["vram-check", *args]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_not_a_gguf_and_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_text("this is not a model\n")
    assert main(["vram-check", "--model", str(fake)]) == 1
    assert "not a GGUF file" in capsys.readouterr().err
    assert main(["vram-check", "--model", str(tmp_path)]) == 2
    assert "is a directory without config.json" in capsys.readouterr().err


def test_ctx_below_minimum_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["vram-check", "--model", "llava-1.5-7b", "--ctx", "10"]) == 2


def test_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["vram-check", "--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--model", "--mmproj", "--ctx", "--gpu-memory", "--no-mmproj-offload", "--json"):
        assert opt in out


# ---------------------------------------------------------------------------------- real GGUF headers


def _summed(path: Path) -> int:
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def test_estimate_from_headers_equals_summed_tensor_bytes(tiny_pair_f16, capsys: pytest.CaptureFixture[str]) -> None:
    text, mm = tiny_pair_f16.text_path, tiny_pair_f16.mmproj_path
    data = run_json(capsys, "--model", str(text), "--mmproj", str(mm), "--gpu-memory", "8GB")
    rows = {e["quant"]: e for e in data["estimates"]}
    f16 = rows["F16"]
    assert f16["source"] == "gguf header"
    assert f16["weights"] == _summed(text)
    assert f16["mmproj"] == _summed(mm)
    # the other quantizations are derived from the same header's architecture
    assert {rows[q]["source"] for q in ("Q4_K_M", "Q6_K", "Q8_0")} == {"architecture"}
    assert f16["placement"] == "full"


def test_f16_derived_from_architecture_equals_the_converted_file(tiny_pair_f16) -> None:
    """The architecture path (no file) computes the same text tensor bytes as the converter wrote."""
    from llava_cli.gguf_info import read_gguf

    t, m = read_gguf(tiny_pair_f16.text_path), read_gguf(tiny_pair_f16.mmproj_path)
    arch = memory.architecture_from_gguf(t, m)
    real = memory.sizes_from_gguf(t, m)
    derived = memory.sizes_from_architecture(arch, "F16")
    assert derived.blocks == real.blocks
    assert derived.output == real.output and derived.token_embd == real.token_embd
    assert derived.text == real.text == _summed(tiny_pair_f16.text_path)


def test_q4_k_m_type_choice_matches_llama_cpp(tiny256_checkpoint: Path, tmp_path: Path) -> None:
    """llama.cpp's real Q4_K_M mix (attn_v/ffn_down Q6_K by use_more_bits, output Q6_K) == our prediction."""
    from llava_cli.gguf_info import read_gguf
    from quantize import convert
    from quantize.quantizer import quantize

    f16 = convert(tiny256_checkpoint, tmp_path, outtype="f16")
    for bits in ("q4_k_m", "q6_k", "q8_0"):
        q = quantize(f16.text_path, bits=bits, out=tmp_path)
        info = read_gguf(q.text_path)
        arch = memory.architecture_from_gguf(info)
        real = memory.sizes_from_gguf(info, None)
        derived = memory.sizes_from_architecture(arch, bits)
        assert derived.blocks == real.blocks, bits
        assert (derived.output, derived.token_embd) == (real.output, real.token_embd), bits
        assert real.text == _summed(q.text_path)


def test_checkpoint_dir_uses_its_config(
    tiny_checkpoint: Path, tiny_pair_f16, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint dir is estimated from config.json: its F16 row equals the converted file's header."""
    data = run_json(capsys, "--model", str(tiny_checkpoint), "--gpu-memory", "8GB")
    rows = {e["quant"]: e for e in data["estimates"]}
    assert rows["F16"]["source"] == "architecture"
    assert rows["F16"]["weights"] == _summed(tiny_pair_f16.text_path)
    assert data["architecture"]["n_layer"] == 2


def test_plan_offload_on_real_files(tiny_pair_f16) -> None:
    text, mm = tiny_pair_f16.text_path, tiny_pair_f16.mmproj_path
    none = GPUProbe((), "none", True, HOST)
    plan = memory.plan_offload(text, mm, n_ctx=2048, gpus=none)
    assert (plan.n_gpu_layers, plan.mmproj_on_gpu) == (0, False) and "no GPU" in plan.reason
    big = GPUProbe((GPU(0, "A100", 80 * GiB, 79 * GiB, "nvml"),), "nvml", True, HOST)
    plan = memory.plan_offload(text, mm, n_ctx=2048, gpus=big)
    assert plan.n_gpu_layers == -1 and plan.mmproj_on_gpu and "fit" in plan.reason
    plan = memory.plan_offload(text, mm, n_ctx=2048, gpus=big, mmproj_offload=False)
    assert plan.n_gpu_layers == -1 and not plan.mmproj_on_gpu
    cpu_build = GPUProbe(big.gpus, "nvml", False, HOST)
    plan = memory.plan_offload(text, mm, n_ctx=2048, gpus=cpu_build)
    assert plan.n_gpu_layers == 0 and "no GPU support" in plan.reason
    full_card = GPUProbe((GPU(0, "busy", 8 * GiB, 100 * MiB, "nvml"),), "nvml", True, HOST)
    plan = memory.plan_offload(text, mm, n_ctx=2048, gpus=full_card)
    assert plan.n_gpu_layers == 0 and not plan.mmproj_on_gpu


def test_swapped_pair_is_refused(tiny_pair_f16) -> None:
    from llava_cli.errors import ModelFileError

    with pytest.raises(ModelFileError, match="vision projector"):
        memory.plan_offload(tiny_pair_f16.mmproj_path, tiny_pair_f16.text_path, n_ctx=2048)


def test_missing_mmproj_and_swapped_files(tiny_pair_f16, capsys: pytest.CaptureFixture[str]) -> None:
    text, mm = str(tiny_pair_f16.text_path), str(tiny_pair_f16.mmproj_path)
    assert main(["vram-check", "--model", text, "--mmproj", "nope.gguf"]) == 1
    assert "mmproj file not found: nope.gguf" in capsys.readouterr().err
    assert main(["vram-check", "--model", mm, "--mmproj", text]) == 1
    assert "vision projector (mmproj), not a text model" in capsys.readouterr().err
