"""The memory planner: GPU probes (fake NVML / fake nvidia-smi at the GPU boundary), exact sizes, plans."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from llava_cli import gpu as gpu_mod
from llava_cli import memory
from llava_cli.errors import UsageError
from llava_cli.gpu import GPU, GiB, GPUProbe, HostMemory, MiB

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


def report(arch: memory.Architecture, probe: GPUProbe, n_ctx: int = 4096) -> memory.ModelReport:
    return memory.report_for_architecture("m", arch, n_ctx=n_ctx, gpus=probe)


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


def test_cpu_only_build_plans_for_the_cpu_even_with_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_mod, "_import_pynvml", lambda: fake_nvml([CARDS[24]]))
    monkeypatch.setattr(gpu_mod, "host_memory", lambda: HOST)
    monkeypatch.setattr(gpu_mod, "gpu_offload_supported", lambda: False)
    p = gpu_mod.probe()
    assert p.gpus and not p.usable_gpus
    r = report(A7, p)
    assert r.recommended is not None and r.recommended.device == "CPU" and r.recommended.n_gpu_layers == 0
    assert any("pip install" in h and "GGML_CUDA" in h for h in r.hints)


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


def test_published_13b_weights_reproduced_within_5_percent() -> None:
    """DESIGN.md's table (7.9 / 11.1 / 13.6 / 26.7 GB) vs llama.cpp's exact tensor maths (MEMORY.md §0.2)."""
    exact = {"Q4_K_M": 7.87, "Q6_K": 10.68, "Q8_0": 13.83, "F16": 26.03}
    published = {"Q4_K_M": 7.9, "Q6_K": 11.1, "Q8_0": 13.6, "F16": 26.7}
    for q in memory.QUANTS:
        gb = memory.sizes_from_architecture(A13, q).text / 1e9
        assert gb == pytest.approx(exact[q], abs=0.005)
        assert abs(gb / published[q] - 1) < 0.05, (q, gb)


def test_7b_q4_k_m_matches_llama_cpp_log() -> None:
    # llama.cpp PR #3436 logged "3.80 GiB (4.84 BPW)" for LLaVA-1.5-7B Q4_K_M; blocks 108.6..123.8 MiB
    s = memory.sizes_from_architecture(A7, "Q4_K_M")
    assert s.text / GiB == pytest.approx(3.80, abs=0.005)
    assert s.bpw == pytest.approx(4.84, abs=0.005)
    assert min(s.blocks) / MiB == pytest.approx(108.6, abs=0.1)
    assert max(s.blocks) / MiB == pytest.approx(123.8, abs=0.1)
    assert s.output / MiB == pytest.approx(103, abs=0.5)


def test_kv_and_compute_reproduce_measured_buffers() -> None:
    assert memory.kv_cache_bytes(A7, 4096) == 2048 * MiB
    assert memory.kv_cache_bytes(A13, 2048) == 1600 * MiB
    # llama.cpp's compute buffer, measured (MEMORY.md §2), CPU backend, n_ubatch 512
    measured = {
        (A7, 2048, False): 188,
        (A7, 4096, False): 320,
        (A13, 2048, False): 234,
        (A13, 4096, False): 398,
        (A7, 2048, True): 98,
        (A7, 4096, True): 100,
        (A13, 2048, True): 123,
        (A13, 4096, True): 125,
    }
    for (arch, ctx, fa), mib in measured.items():
        got = memory.compute_buffer_bytes(arch, ctx, flash_attn=fa) / MiB
        assert got == pytest.approx(mib, abs=1.0), (arch.n_layer, ctx, fa)


# ------------------------------------------------------------------------------------------------ plans


def card(gb: int) -> GPUProbe:
    name, total, free = CARDS[gb]
    return GPUProbe((GPU(0, name, total * MiB, free * MiB, "nvml"),), "nvml", True, HOST)


def test_n_gpu_layers_table_of_memory_md() -> None:
    """MEMORY.md §3's layer table (1 GiB margin, 4K context, output-first -ngl)."""
    rows = {
        5800: [18, 15, 12, 7, 12, 10, 8, 5],
        7400: [27, 22, 18, 11, 18, 15, 12, 7],
        11600: [33, 33, 33, 20, 35, 28, 23, 13],
        15500: [33, 33, 33, 29, 41, 39, 32, 19],
        23400: [33, 33, 33, 33, 41, 41, 41, 30],
    }
    for free, expected in rows.items():
        g = GPUProbe((GPU(0, "x", free * MiB + 500 * MiB, free * MiB, "nvml"),), "nvml", True, HOST)
        got = [
            memory.estimate(memory.sizes_from_architecture(a, q), a, n_ctx=4096, gpus=g, margin=1024 * MiB).n_gpu_layers
            for a in (A7, A13)
            for q in memory.QUANTS
        ]
        assert got == expected, free


@pytest.mark.parametrize(
    ("gb", "arch", "quant", "placement"),
    [
        (8, A7, "Q4_K_M", "partial"),  # 7.2 GiB need at 4K > 8 GB card's budget
        (12, A7, "Q8_0", "full"),
        (24, A7, "Q8_0", "full"),  # F16 fits too, but Q8_0 has the same quality at half the size
        (80, A7, "Q8_0", "full"),
        (8, A13, "Q4_K_M", "partial"),
        (12, A13, "Q4_K_M", "partial"),  # 13B Q4_K_M needs 11.8 GiB at 4K: not on a 12 GB card
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


def test_tiny_gpu_keeps_text_on_cpu_but_may_take_the_vision_encoder() -> None:
    g = GPUProbe((GPU(0, "tiny", 2 * GiB, 2 * GiB, "nvml"),), "nvml", True, HOST)
    e = memory.estimate(memory.sizes_from_architecture(A13, "Q4_K_M"), A13, n_ctx=4096, gpus=g)
    assert e.placement == "no" and e.n_gpu_layers == 0
    # 2 GiB - 450 MiB context - 512 MiB margin leaves room for the 0.6 GiB mmproj + CLIP compute
    assert e.mmproj_on_gpu


def test_no_mmproj_offload_keeps_vision_on_cpu() -> None:
    e = memory.estimate(
        memory.sizes_from_architecture(A7, "Q4_K_M"), A7, n_ctx=4096, gpus=card(24), mmproj_offload=False
    )
    assert e.placement == "full" and not e.mmproj_on_gpu


def test_nothing_fits_anywhere() -> None:
    small = GPUProbe((), "none", True, HostMemory(total=4 * GiB, available=2 * GiB))
    r = report(A13, small)
    assert r.recommended is None
    assert "nothing fits" in r.recommendation
    assert all(e.placement == "no" for e in r.estimates)


def test_gpu_memory_flag_plans_for_an_absent_card() -> None:
    p = gpu_mod.probe(gpu_memory="24GB")
    assert p.source == "--gpu-memory" and p.offload_supported
    assert p.gpus[0].free == 24 * GiB
    r = report(A13, p)
    assert r.recommended is not None and r.recommended.placement == "full"


def test_small_card_margin_is_8_percent_or_512_mib() -> None:
    assert memory.gpu_margin(GPU(0, "x", 4 * GiB, 4 * GiB, "nvml")) == 512 * MiB
    assert memory.gpu_margin(GPU(0, "x", 7 * GiB, 7 * GiB, "nvml")) == int(0.08 * 7 * GiB)
    assert memory.gpu_margin(GPU(0, "x", 24 * GiB, 24 * GiB, "nvml")) == 1024 * MiB
