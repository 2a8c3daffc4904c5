"""The memory planner: GPU probes (fake NVML / fake nvidia-smi at the GPU boundary), sizes checked against
figures the code did not produce (published file sizes, llama.cpp's own log, buffers llama.cpp reports when it
loads a model here), and the recommendation policy of llava_cli/memory/placement.py."""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from llava_cli import memory
from llava_cli.cpu_kernels import GPU_REINSTALL
from llava_cli.errors import UsageError
from llava_cli.memory import gpu as gpu_mod
from llava_cli.memory.gpu import GPU, GiB, GPUProbe, HostMemory, MiB

A7 = memory.Architecture(n_layer=32, n_embd=4096, n_head=32, n_head_kv=32, n_ff=11008, n_vocab=32000)
A13 = memory.Architecture(n_layer=40, n_embd=5120, n_head=40, n_head_kv=40, n_ff=13824, n_vocab=32000)
HOST = HostMemory(total=64 * GiB, available=60 * GiB)

# (name, total MiB, free MiB) as nvidia-smi prints them for typical cards with a desktop running
CARDS = {
    8: ("NVIDIA GeForce RTX 3070", 8192, 7400),
    12: ("NVIDIA GeForce RTX 3060", 12288, 11600),
    24: ("NVIDIA GeForce RTX 4090", 24564, 23400),
    80: ("NVIDIA A100-SXM4-80GB", 81920, 81000),
}


# ------------------------------------------------------------------------------------------------ fakes


class FakeNVMLError(Exception):
    pass


def fake_nvml(cards: list[tuple[str, int, int]] | None, *, init_error: bool = False) -> SimpleNamespace:
    """A stand-in for the pynvml module: what NVML would report for these (name, total MiB, free MiB)."""
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if init_error:
            raise FakeNVMLError("NVML Shared Library Not Found")

    return SimpleNamespace(
        calls=calls,
        nvmlInit=init,
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: len(cards or []),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: (cards or [])[h][0].encode(),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(
            total=(cards or [])[h][1] * MiB, free=(cards or [])[h][2] * MiB, used=0
        ),
    )


def install_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stdout: str, *, code: int = 0) -> Path:
    """Put a fake `nvidia-smi` first on PATH that prints `stdout` and exits with `code`."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = "--query-gpu=name,memory.total,memory.free" ] || {{ echo "bad args $*" >&2; exit 64; }}\n'
        f"cat <<'EOF'\n{stdout}EOF\nexit {code}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return script


def smi_lines(*cards: tuple[str, int, int]) -> str:
    return "".join(f"{n}, {t}, {f}\n" for n, t, f in cards)


@pytest.fixture
def no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_mod, "_import_pynvml", lambda: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.fixture
def fixed_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_mod, "host_memory", lambda: HOST)


def report(arch: memory.Architecture, probe: GPUProbe, n_ctx: int = 4096, **kw: object) -> memory.ModelReport:
    return memory.report_for_architecture("m", arch, n_ctx=n_ctx, gpus=probe, **kw)


# ------------------------------------------------------------------------------------------------ probes


@pytest.mark.usefixtures("fixed_host")
def test_nvml_is_read_first_and_shut_down(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml([CARDS[24]])
    monkeypatch.setattr(gpu_mod, "_import_pynvml", lambda: nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    p = gpu_mod.probe(offload_supported=True)
    assert p.source == "nvml"
    assert [(g.name, g.total, g.free) for g in p.gpus] == [("NVIDIA GeForce RTX 4090", 24564 * MiB, 23400 * MiB)]
    assert nvml.calls == ["init", "shutdown"]


@pytest.mark.usefixtures("fixed_host")
def test_nvml_failure_falls_back_to_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_mod, "_import_pynvml", lambda: fake_nvml(None, init_error=True))
    install_smi(tmp_path, monkeypatch, smi_lines(CARDS[12]))
    p = gpu_mod.probe(offload_supported=True)
    assert p.source == "nvidia-smi"
    assert p.gpus[0].free == 11600 * MiB
    assert any("NVML unavailable" in n for n in p.notes)


@pytest.mark.usefixtures("no_nvml", "fixed_host")
def test_two_gpus_listed_and_the_larger_one_planned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_smi(tmp_path, monkeypatch, smi_lines(CARDS[8], CARDS[24]))
    p = gpu_mod.probe(offload_supported=True)
    assert [g.index for g in p.gpus] == [0, 1]
    r = report(A13, p)
    assert r.recommended is not None
    assert r.recommended.device.startswith("GPU 1 ")
    assert r.recommended.quant == "Q8_0" and r.recommended.placement == "full"


@pytest.mark.usefixtures("no_nvml", "fixed_host")
def test_cuda_visible_devices_hides_and_renumbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_smi(tmp_path, monkeypatch, smi_lines(CARDS[8], CARDS[24]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    p = gpu_mod.probe(offload_supported=True)
    assert [(g.index, g.name) for g in p.gpus] == [(0, CARDS[24][0])]


@pytest.mark.usefixtures("no_nvml", "fixed_host")
@pytest.mark.parametrize(
    ("stdout", "code", "why"),
    [
        ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", 9, "exit 9"),
        ("No devices were found\n", 6, "exit 6"),
        ("\x00\x01garbage without commas\n", 0, "cannot read"),
        ("NVIDIA GeForce RTX 3060, [N/A], [N/A]\n", 0, "cannot read"),
        ("GPU, 8192, 9000\n", 0, "cannot read"),  # more free than total
        ("", 0, "lists no usable GPU"),
    ],
)
def test_failing_nvidia_smi_means_no_gpu_and_a_cpu_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stdout: str, code: int, why: str
) -> None:
    install_smi(tmp_path, monkeypatch, stdout, code=code)
    p = gpu_mod.probe(offload_supported=True)
    assert p.gpus == () and p.source == "none"
    assert any(why in n for n in p.notes), p.notes
    r = report(A7, p)
    assert r.recommended is not None and r.recommended.device == "CPU"
    assert r.recommended.quant == "Q8_0"  # 60 GiB of RAM: best quality, and Q8_0 beats F16 at equal quality
    assert "no GPU found" in " ".join(r.hints)


@pytest.mark.usefixtures("no_nvml", "fixed_host")
def test_no_nvidia_smi_at_all(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty dir: nothing named nvidia-smi
    p = gpu_mod.probe(offload_supported=True)
    assert p.gpus == () and any("not found on PATH" in n for n in p.notes)


def test_cpu_only_build_plans_for_the_gpu_found_and_says_it_cannot_use_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The person asked about their card: the table and the recommendation are for it, plus one line saying
    this build cannot use it yet, with the reinstall command."""
    monkeypatch.setattr(gpu_mod, "_import_pynvml", lambda: fake_nvml([CARDS[24]]))
    monkeypatch.setattr(gpu_mod, "host_memory", lambda: HOST)
    monkeypatch.setattr(gpu_mod, "gpu_offload_supported", lambda: False)
    p = gpu_mod.probe()
    assert p.gpus and not p.offload_supported
    r = report(A7, p)
    assert r.recommended is not None and r.recommended.device.startswith("GPU 0 ")
    assert r.recommended.placement == "full" and r.recommended.quant == "Q8_0"
    assert "cannot use the GPU yet" in r.build_note and GPU_REINSTALL in r.build_note
    assert "\n" not in r.build_note
    # --n-gpu-layers auto on the same machine offloads nothing: this build cannot.


def test_the_real_probe_never_crashes_here() -> None:
    p = gpu_mod.probe()
    assert p.host.total > 0 and p.source in ("nvml", "nvidia-smi", "none")


# ------------------------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12GB", 12 * GiB),
        ("12 gb", 12 * GiB),
        ("11.5GiB", int(11.5 * GiB)),
        ("8000MiB", 8000 * MiB),
        ("24G", 24 * GiB),
        ("16", 16 * GiB),
        ("1T", 1024 * GiB),
        ("1048576B", 1048576),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert gpu_mod.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "12XB", "-3GB", "0GB", "GB"])
def test_parse_size_refuses_garbage(text: str) -> None:
    with pytest.raises(UsageError, match="--gpu-memory"):
        gpu_mod.parse_size(text)


def _published_digits(x: float) -> float:
    """Half a unit of the last digit a size was published with (4.08 -> 0.005, 26.0 -> 0.05)."""
    text = repr(x)
    decimals = len(text.split(".")[1]) if "." in text else 0
    return 0.5 * 10.0**-decimals


@pytest.mark.parametrize("model_id", ["llava-1.5-7b", "llava-1.5-13b", "bakllava-1"])
def test_architecture_sizes_match_the_published_files(model_id: str) -> None:
    """Every published text GGUF in models.toml (sizes from the repos' file listings, cited there) against
    the bytes our per-tensor type rules predict from the architecture alone: equal within the rounding of the
    published figure plus 2 MB for the header (vocabulary strings). The mmproj is not compared: those files
    were written by llama.cpp's older converter (F16 position embeddings), ours keeps them F32."""
    from llava_cli.catalog import load_catalog

    entry = load_catalog().get(model_id)
    assert entry.architecture is not None and entry.gguf
    arch = memory.architecture_from_catalog(entry.architecture)
    for bits, published in entry.gguf.items():
        assert published.size_gb is not None
        ours = memory.sizes_from_architecture(arch, bits).text / 1e9
        assert published.size_gb - _published_digits(published.size_gb) - 0.002 <= ours, (bits, ours)
        assert ours <= published.size_gb + _published_digits(published.size_gb), (bits, ours)


def test_7b_q4_k_m_matches_llama_cpp_log() -> None:
    # llama.cpp PR #3436 (github.com/ggerganov/llama.cpp/pull/3436) logged "3.80 GiB (4.84 BPW)" for LLaVA-1.5-7B
    # Q4_K_M, with per-block sizes 108.6..123.8 MiB.
    s = memory.sizes_from_architecture(A7, "Q4_K_M")
    assert s.text / GiB == pytest.approx(3.80, abs=0.005)
    assert s.bpw == pytest.approx(4.84, abs=0.005)
    assert min(s.blocks) / MiB == pytest.approx(108.6, abs=0.1)
    assert max(s.blocks) / MiB == pytest.approx(123.8, abs=0.1)
    assert s.output / MiB == pytest.approx(103, abs=0.5)


def test_cpu_vision_weights_count_f16_twice() -> None:
    # The CPU vision encoder widens F16 matmul weights to F32 (runtime/vision.py): the published 7B mmproj (624 MB,
    # F16 matmuls and patch embedding, F32 rest) takes ~1.2 GB of RAM on the CPU, its file size on a GPU.
    s = memory.sizes_from_architecture(A7, "Q4_K_M")
    assert s.mmproj / 1e6 == pytest.approx(624, rel=0.01)
    assert 0.95 * s.mmproj < s.mmproj_f16 < s.mmproj and s.mmproj_cpu == s.mmproj + s.mmproj_f16
    cpu = memory.estimate(s, A7, n_ctx=2048, gpus=None)
    assert cpu.cpu_total - memory.cpu_peak_bytes(replace(s, mmproj_f16=0), A7, 2048) == s.mmproj_f16
    gpu = memory.estimate(s, A7, n_ctx=2048, gpus=card(24))
    assert gpu.mmproj_on_gpu and gpu.total < cpu.cpu_total  # on the GPU the file's size counts, not the widened one


def test_70b_rule_and_q8_0_pin_are_shared_with_the_quantizer() -> None:
    """One module holds llama.cpp's type rules: a Llama-2-70B-shaped model gets Q5_K attn_v at Q4_K_M (llama.cpp's
    70B rule), and a Q8_0 row length that 32 does not divide is pinned to F16 (the quantizer's tt_override)."""
    from llava_cli import quants

    a70 = memory.Architecture(n_layer=80, n_embd=8192, n_head=64, n_head_kv=8, n_ff=28672, n_vocab=32000)
    types = quants.predict_types(
        memory.sizes.text_tensors(a70), quants.TEXT_TYPES["q4_k_m"], n_layer=80, is_70b=quants.is_70b(80, 64, 8)
    )
    assert {types[f"blk.{i}.attn_v.weight"].name for i in range(80)} == {"Q5_K", "Q6_K"}
    odd = [("blk.0.attn_q.weight", (40, 40), quants.GGMLType.F16)]
    assert quants.predict_types(odd, quants.TEXT_TYPES["q8_0"], n_layer=1)["blk.0.attn_q.weight"].name == "F16"


def test_kv_and_compute_reproduce_the_fitted_buffers() -> None:
    """The fit, not a validation: the eight buffer sizes llama.cpp reported for LLaVA-1.5-7B/13B (CPU backend,
    n_ubatch 512) that compute_buffer_bytes was fitted to. The KV figures are llama.cpp's llama_kv_cache log."""
    assert memory.kv_cache_bytes(A7, 4096) == 2048 * MiB
    assert memory.kv_cache_bytes(A13, 2048) == 1600 * MiB
    reported = {
        (A7, 2048, False): 188,
        (A7, 4096, False): 320,
        (A13, 2048, False): 234,
        (A13, 4096, False): 398,
        (A7, 2048, True): 98,
        (A7, 4096, True): 100,
        (A13, 2048, True): 123,
        (A13, 4096, True): 125,
    }
    for (arch, ctx, fa), mib in reported.items():
        got = memory.compute_buffer_bytes(arch, ctx, n_ubatch=memory.N_UBATCH_GPU, flash_attn=fa) / MiB
        assert got == pytest.approx(mib, abs=1.0), (arch.n_layer, ctx, fa)


def _llama_reported_buffers(text: Path, n_ctx: int, n_seq: int, flash_attn: bool) -> tuple[float, float]:
    """(KV MiB, CPU compute buffer MiB) as llama.cpp logs them when it creates a context for ``text``."""
    import ctypes
    import re

    import llama_cpp

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def log(level: int, msg: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(msg.decode(errors="replace"))

    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    try:
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        model = llama_cpp.llama_model_load_from_file(str(text).encode(), mp)
        cp = llama_cpp.llama_context_default_params()
        # The runtime's batch sizes on the CPU, which the planner's CPU terms assume.
        cp.n_ctx, cp.n_seq_max, cp.n_batch, cp.n_ubatch = n_ctx, n_seq, memory.N_BATCH, memory.N_UBATCH_CPU
        cp.kv_unified = True
        cp.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        lines.clear()
        ctx = llama_cpp.llama_init_from_model(model, cp)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    finally:
        llama_cpp.llama_log_set(ctypes.cast(None, llama_cpp.llama_log_callback), ctypes.c_void_p(0))
    log_text = "".join(lines)
    kv = re.search(r"llama_kv_cache: size =\s+([\d.]+) MiB", log_text)
    compute = re.search(r"CPU compute buffer size =\s+([\d.]+) MiB", log_text)
    assert kv and compute, log_text[-2000:]
    return float(kv.group(1)), float(compute.group(1))


@pytest.mark.parametrize(
    ("n_ctx", "parallel", "flash_attn"),
    [(1024, 1, False), (2048, 1, False), (2048, 1, True), (512, 4, False), (1024, 2, True)],
)
def test_kv_and_compute_against_what_llama_cpp_reports(
    tiny256_checkpoint: Path, tmp_path: Path, n_ctx: int, parallel: int, flash_attn: bool
) -> None:
    """Held out from the fit: a model of another shape, loaded by the real llama.cpp here. The KV cache is
    exact, parallel sequences included (llama.cpp gives each of n_seq_max sequences n_ctx / n_seq cells); the
    compute buffer is within 1.5 MiB (the formula's FFN term is a little high with flash attention)."""
    from llava_cli.gguf_info import read_gguf
    from quantize.converter import convert

    pair = convert(tiny256_checkpoint, tmp_path, outtype="f16")
    arch = memory.architecture_from_gguf(read_gguf(pair.text_path))
    kv_mib, compute_mib = _llama_reported_buffers(pair.text_path, n_ctx * parallel, parallel, flash_attn)
    assert memory.kv_cache_bytes(arch, n_ctx, parallel=parallel) / MiB == pytest.approx(kv_mib, abs=0.01)
    ours = memory.compute_buffer_bytes(
        arch, n_ctx, n_ubatch=memory.N_UBATCH_CPU, flash_attn=flash_attn, parallel=parallel
    )
    ours /= MiB
    assert compute_mib - 1.5 <= ours <= compute_mib * 1.25 + 1.5, (ours, compute_mib)


# ------------------------------------------------------------------------------------------------ plans


def card(gb: int) -> GPUProbe:
    name, total, free = CARDS[gb]
    return GPUProbe((GPU(0, name, total * MiB, free * MiB, "nvml"),), "nvml", True, HOST)


@pytest.mark.parametrize("free_mib", [5800, 7400, 11600, 15500, 23400])
def test_partial_plans_fill_the_budget_and_no_more(free_mib: int) -> None:
    """For every card size and quantization: what a partial plan puts on the GPU (output layer, the top blocks
    with their KV, the partial-offload graph, the vision encoder when on the GPU) fits the budget, and one more
    block would not, so the plan is the most layers that fit."""
    from llava_cli.memory.buffers import ollama_graph_bytes

    g = GPUProbe((GPU(0, "x", free_mib * MiB + 500 * MiB, free_mib * MiB, "nvml"),), "nvml", True, HOST)
    for arch in (A7, A13):
        for q in memory.QUANTS:
            s = memory.sizes_from_architecture(arch, q)
            e = memory.estimate(s, arch, n_ctx=4096, gpus=g, margin=1024 * MiB)
            if e.placement != "partial":
                continue
            blocks = e.n_gpu_layers - 1
            kv_l = memory.kv_cache_bytes(arch, 4096, n_layers=1)
            on_gpu = s.output + ollama_graph_bytes(arch, 4096, partial=True)
            on_gpu += (s.mmproj + memory.CLIP_COMPUTE_GPU) if e.mmproj_on_gpu else 0
            on_gpu += sum(s.blocks[arch.n_layer - blocks :]) + blocks * kv_l
            assert on_gpu <= e.budget, (free_mib, arch.n_layer, q)
            assert on_gpu + s.blocks[arch.n_layer - blocks - 1] + kv_l > e.budget, (free_mib, arch.n_layer, q)


@pytest.mark.parametrize(
    ("gb", "arch", "quant", "placement"),
    [
        (8, A7, "Q4_K_M", "partial"),  # 7.2 GiB need at 4K > 8 GB card's budget
        (12, A7, "Q8_0", "full"),
        (24, A7, "Q8_0", "full"),  # F16 fits too, but Q8_0 has the same quality at half the size
        (80, A7, "Q8_0", "full"),
        (8, A13, "Q4_K_M", "partial"),
        (12, A13, "Q4_K_M", "partial"),  # the case: most layers on the card beats a larger quant spilling
        (24, A13, "Q8_0", "full"),
        (80, A13, "Q8_0", "full"),
    ],
)
def test_recommendation_per_card(gb: int, arch: memory.Architecture, quant: str, placement: str) -> None:
    r = report(arch, card(gb))
    assert r.recommended is not None
    assert (r.recommended.quant, r.recommended.placement) == (quant, placement)
    if placement == "partial":
        assert 0 < r.recommended.n_gpu_layers < arch.n_layer + 1
        assert "partial" not in r.recommendation or "of" in r.recommendation
    else:
        assert f"({arch.n_layer + 1}/{arch.n_layer + 1})" in r.recommendation


def test_80gb_card_fits_13b_f16_and_small_ctx_hint_on_12gb() -> None:
    r = report(A13, card(80))
    assert {e.quant: e.placement for e in r.estimates} == dict.fromkeys(memory.QUANTS, "full")
    r12 = report(A13, card(12))
    assert any("--ctx 2048" in h for h in r12.hints)
    assert report(A13, card(12), n_ctx=2048).recommended.placement == "full"  # type: ignore[union-attr]


def test_12gb_card_13b_prefers_most_layers_then_quality() -> None:
    r = report(A13, card(12))
    layers = {e.quant: e.n_gpu_layers for e in r.estimates}
    assert all(e.placement == "partial" for e in r.estimates)
    assert layers["Q4_K_M"] > layers["Q6_K"] > layers["Q8_0"] > layers["F16"]
    assert r.recommended is not None and r.recommended.quant == "Q4_K_M"


def test_equal_layers_then_quality_then_the_smaller_file() -> None:
    """The policy as a key: most layers, then quality, then the smaller file: F16 never beats Q8_0."""
    r = report(A7, card(80))
    assert {e.placement for e in r.estimates} == {"full"}
    assert r.recommended is not None and r.recommended.quant == "Q8_0"
    r = report(A7, card(80), published={"F16": {"quality": 100.0}, "Q8_0": {"quality": 99.0}})
    assert r.recommended is not None and r.recommended.quant == "F16"  # measured better: then it wins


def test_small_gpu_with_little_ram_fits_nothing_like_the_same_machine_without_gpu() -> None:
    """The old planner told a 2 GiB GPU + 2 GiB RAM machine "Q8_0" for the 13B (a GPU estimate counted RAM as
    unlimited) while the same machine without the GPU got "nothing fits"."""
    host = HostMemory(total=4 * GiB, available=2 * GiB)
    with_gpu = GPUProbe((GPU(0, "small", 2 * GiB, 2 * GiB, "nvml"),), "nvml", True, host)
    without = GPUProbe((), "none", True, host)
    for p in (with_gpu, without):
        r = report(A13, p)
        assert r.recommended is None and "nothing fits" in r.recommendation
        assert all(not e.fits for e in r.estimates)


def test_tiny_gpu_keeps_text_on_cpu_but_may_take_the_vision_encoder() -> None:
    g = GPUProbe((GPU(0, "tiny", 2 * GiB, 2 * GiB, "nvml"),), "nvml", True, HOST)
    e = memory.estimate(memory.sizes_from_architecture(A13, "Q4_K_M"), A13, n_ctx=4096, gpus=g)
    assert e.placement == "cpu" and e.n_gpu_layers == 0 and e.on_gpu
    assert e.ram_needed > memory.sizes_from_architecture(A13, "Q4_K_M").text
    # 2 GiB - 450 MiB context - 512 MiB margin leaves room for the 0.6 GiB mmproj + CLIP compute
    assert e.mmproj_on_gpu


def test_no_mmproj_offload_keeps_vision_on_cpu() -> None:
    e = memory.estimate(
        memory.sizes_from_architecture(A7, "Q4_K_M"), A7, n_ctx=4096, gpus=card(24), mmproj_offload=False
    )
    assert e.placement == "full" and not e.mmproj_on_gpu


def test_parallel_sequences_multiply_the_kv_cache_and_the_attention_span() -> None:
    one = memory.estimate(memory.sizes_from_architecture(A7, "Q4_K_M"), A7, n_ctx=2048, gpus=card(24))
    four = memory.estimate(memory.sizes_from_architecture(A7, "Q4_K_M"), A7, n_ctx=2048, gpus=card(24), parallel=4)
    assert four.kv_cache == 4 * one.kv_cache == 4 * 2048 * 32 * 4096 * 2 * 2
    # One unified KV stream (the runtime's): without flash attention (the GPU plan's assumption for "auto") the KQ
    # scores (and the F32 mask) span all four slots' cells: 3 x 2048 more per ubatch row, per head and once more.
    assert four.compute - one.compute == 3 * 2048 * memory.N_UBATCH_GPU * (A7.n_head + 1) * 4
    assert four.total - one.total == 3 * one.kv_cache + four.compute - one.compute
    # On a 12 GB card four 4K sequences of the 7B no longer fit fully at Q8_0.
    assert report(A7, card(12), parallel=4).recommended.placement != "full"  # type: ignore[union-attr]
    with pytest.raises(UsageError, match="--parallel"):
        memory.estimate(memory.sizes_from_architecture(A7, "Q4_K_M"), A7, gpus=card(24), parallel=0)


def test_nothing_fits_anywhere() -> None:
    small = GPUProbe((), "none", True, HostMemory(total=4 * GiB, available=2 * GiB))
    r = report(A13, small)
    assert r.recommended is None
    assert "nothing fits" in r.recommendation
    assert all(e.placement == "no" for e in r.estimates)


def test_gpu_memory_flag_plans_for_an_absent_card() -> None:
    p = gpu_mod.probe(gpu_memory="24GB", offload_supported=True)
    assert p.source == "--gpu-memory" and p.offload_supported
    assert p.gpus[0].free == 24 * GiB
    r = report(A13, p)
    assert r.recommended is not None and r.recommended.placement == "full"


def test_small_card_margin_is_8_percent_or_512_mib() -> None:
    assert memory.gpu_margin(GPU(0, "x", 4 * GiB, 4 * GiB, "nvml")) == 512 * MiB
    assert memory.gpu_margin(GPU(0, "x", 7 * GiB, 7 * GiB, "nvml")) == int(0.08 * 7 * GiB)
    assert memory.gpu_margin(GPU(0, "x", 24 * GiB, 24 * GiB, "nvml")) == 1024 * MiB
