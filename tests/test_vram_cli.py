"""`llava vram-check` end to end through the CLI boundary (main()), with fake GPUs at the probe boundary,
and the planner on real converted GGUF headers."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from llava_cli import memory
from llava_cli.cli.app import main
from llava_cli.memory import gpu as gpu_mod
from llava_cli.memory.gpu import GPU, GiB, GPUProbe, HostMemory, MiB
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


def test_cpu_only_build_plans_for_the_card_and_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    install_smi(tmp_path, monkeypatch, smi_lines(CARDS[24]))
    monkeypatch.setattr(gpu_mod, "gpu_offload_supported", lambda: False)
    code = main(["vram-check", "--model", "llava-1.5-7b"])
    out = capsys.readouterr().out
    assert code == 0
    assert "recommended: Q8_0 fully on GPU 0 (NVIDIA GeForce RTX 4090)" in out
    lines = [ln for ln in out.splitlines() if "cannot use the GPU yet" in ln]
    # The terminal may wrap the hint; its words are what counts.
    assert len(lines) == 1 and 'CMAKE_ARGS="-DGGML_CUDA=on $(python -m llava_cli.cpu_kernels)"' in " ".join(out.split())
    data = run_json(capsys, "--model", "llava-1.5-7b")
    assert data["recommended"] == "Q8_0" and data["recommended_n_gpu_layers"] == 33
    assert "pip install" in data["build_note"]


def test_parallel_multiplies_the_kv_cache(capsys: pytest.CaptureFixture[str]) -> None:
    one = run_json(capsys, "--model", "llava-1.5-7b", "--gpu-memory", "24GB", "--ctx", "2048")
    four = run_json(capsys, "--model", "llava-1.5-7b", "--gpu-memory", "24GB", "--ctx", "2048", "--parallel", "4")
    assert four["parallel"] == 4
    for a, b in zip(one["estimates"], four["estimates"], strict=True):
        assert b["kv_cache"] == 4 * a["kv_cache"]
    assert main(["vram-check", "--model", "llava-1.5-7b", "--parallel", "0"]) == 2


def test_no_mmproj_offload_reaches_every_path(tiny_pair_f16, capsys: pytest.CaptureFixture[str]) -> None:
    """--no-mmproj-offload is honoured for catalog ids, .gguf files and checkpoints alike (it was dropped for
    catalog entries planned from their local files)."""
    text, mm = str(tiny_pair_f16.text_path), str(tiny_pair_f16.mmproj_path)
    for model in (["--model", "llava-1.5-7b"], ["--model", text, "--mmproj", mm]):
        on = run_json(capsys, *model, "--gpu-memory", "80GB")
        off = run_json(capsys, *model, "--gpu-memory", "80GB", "--no-mmproj-offload")
        assert on["recommended_mmproj_on_gpu"] is True and off["recommended_mmproj_on_gpu"] is False


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--model", "nope.gguf"], 1, "nope.gguf: no such file"),
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
    assert main(["vram-check", "--model", str(tmp_path)]) == 1
    assert "has no config.json: not a Hugging Face checkpoint directory" in capsys.readouterr().err


def test_ctx_below_minimum_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["vram-check", "--model", "llava-1.5-7b", "--ctx", "10"]) == 2


def test_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["vram-check", "--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--model", "--mmproj", "--ctx", "--gpu-memory", "--no-mmproj-offload", "--parallel", "--json"):
        assert opt in out
    # The policy is stated where people look for it.
    assert "fit fully" in out and "most layers on the GPU" in out and "no GPU" in out


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
    from quantize.converter import convert
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
    assert "nope.gguf: no such file" in capsys.readouterr().err
    assert main(["vram-check", "--model", mm, "--mmproj", text]) == 1
    assert "vision projector (mmproj), not a text model" in capsys.readouterr().err


# ------------------------------------------------------------------ GPU selection (fakes at the GPU boundary)


def test_auto_offload_probes_the_gpus_and_plans_for_the_freest(tiny_pair_f16, monkeypatch: pytest.MonkeyPatch) -> None:
    """--n-gpu-layers auto's planner as the runtime calls it (no probe passed in): a fake NVML with two cards,
    the busy one first. The plan goes to the card with room, all layers and the vision encoder on it."""
    from tests.test_memory import fake_nvml

    text, mm = tiny_pair_f16.text_path, tiny_pair_f16.mmproj_path
    nvml = fake_nvml([("busy", 8192, 300), CARDS[24]])
    monkeypatch.setattr(gpu_mod, "_import_pynvml", lambda: nvml)
    plan = memory.plan_offload(text, mm, n_ctx=2048)
    assert (plan.n_gpu_layers, plan.mmproj_on_gpu) == (-1, True)
    assert plan.estimate is not None and plan.estimate.device == f"GPU 1 ({CARDS[24][0]})"
    assert nvml.calls == ["init", "shutdown"]
    # CUDA_VISIBLE_DEVICES=0 leaves only the busy card: nothing fits, text and vision stay on the CPU.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    plan = memory.plan_offload(text, mm, n_ctx=2048)
    assert (plan.n_gpu_layers, plan.mmproj_on_gpu) == (0, False)
    # A CPU-only build (this machine's) never offloads, whatever the card.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(gpu_mod, "gpu_offload_supported", lambda: False)
    plan = memory.plan_offload(text, mm, n_ctx=2048)
    assert (plan.n_gpu_layers, plan.mmproj_on_gpu) == (0, False) and "no GPU support" in plan.reason


def test_auto_offload_accepts_flash_attn_auto_and_parallel(tiny_pair_f16) -> None:
    """flash_attn reaches the planner as the runtime has it: True, False or None ("auto", planned as off on the
    GPU, the larger buffer). parallel sequences each add a KV slot."""
    text, mm = tiny_pair_f16.text_path, tiny_pair_f16.mmproj_path
    big = GPUProbe((GPU(0, "A100", 80 * GiB, 79 * GiB, "nvml"),), "nvml", True, HOST)
    plans = {fa: memory.plan_offload(text, mm, n_ctx=2048, gpus=big, flash_attn=fa) for fa in (None, False, True)}
    assert {p.n_gpu_layers for p in plans.values()} == {-1}
    est = {fa: p.estimate for fa, p in plans.items()}
    assert est[None] is not None and est[False] is not None and est[True] is not None
    assert est[None].compute == est[False].compute >= est[True].compute
    four = memory.plan_offload(text, mm, n_ctx=2048, gpus=big, parallel=4).estimate
    assert four is not None and four.kv_cache == 4 * est[None].kv_cache


@pytest.mark.gpu
def test_gpu_smoke_auto_plan_loads_on_the_gpu(tiny_pair_f16, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a GPU and a GPU build exist: the planner's layers load on the card and the model decodes."""
    import llama_cpp

    monkeypatch.undo()  # the real NVML, RAM and build, not this module's fixed machine
    if not llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python build has no GPU support (CPU wheel)")
    probe = gpu_mod.probe()
    if not probe.gpus:
        pytest.skip("no GPU found: " + "; ".join(probe.notes))
    plan = memory.plan_offload(tiny_pair_f16.text_path, tiny_pair_f16.mmproj_path, n_ctx=2048, gpus=probe)
    assert plan.n_gpu_layers == -1, plan.reason  # a 1 MB model fits any card
    llm = llama_cpp.Llama(str(tiny_pair_f16.text_path), n_gpu_layers=plan.n_gpu_layers, n_ctx=512, verbose=False)
    try:
        out = llm("USER: hello ASSISTANT:", max_tokens=4, temperature=0.0)
        assert out["usage"]["completion_tokens"] >= 1
    finally:
        llm.close()
