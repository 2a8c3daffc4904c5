"""The CPU-variant guard (llava_cli/cpu_kernels.py) and `llava doctor`, against this machine's real CPU and OS."""

from __future__ import annotations

import json
import platform
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llava_cli import cpu_kernels as ck
from llava_cli.cli.app import main
from llava_cli.runtime import ggml

ALL = list(ck.X86_VARIANTS)
# A CPU like this project's reference VM (Xeon with AVX-512 and AMX), as /proc/cpuinfo would list it.
FULL = frozenset(ck.SCORE_WEIGHTS)

x86_linux = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64", reason="XCR0/arch_prctl probes are x86-64 Linux"
)


def test_ggml_scores_as_cpu_feats_cpp() -> None:
    # cpu-feats.cpp: score = 1 + FMA 1 + F16C 2 + SSE42 4 + BMI2 8 + AVX 16 + AVX2 32 (+ AVX512 128 ...)
    assert ck.variant_score("haswell", FULL) == 64
    assert ck.variant_score("sapphirerapids", FULL) == 1 + 63 + 128 + 256 + 512 + 1024 + 2048
    assert ck.variant_score("skylakex", FULL - {"AVX512"}) == 0


def test_guard_keeps_advertised_but_os_disabled_variants_out() -> None:
    # ggml's own choice reads CPUID only: the AMX variant.
    assert ck.choose_variant(ALL, FULL, allow_amx=True) == "sapphirerapids"
    # The OS saves only YMM state (AVX-512 off in XCR0) and refuses AMX: no AVX-512 variant may be chosen.
    ymm_only = ck.usable_features(FULL, ck.OsSupport(xcr0=0b111, amx_permitted=False))
    assert "AVX512" not in ymm_only and "AMX_INT8" not in ymm_only
    assert ck.choose_variant(ALL, ymm_only, allow_amx=True) == "alderlake"  # AVX2 + AVX_VNNI
    # AVX-512 enabled, AMX permission refused: the best non-AMX level.
    no_amx = ck.usable_features(FULL, ck.OsSupport(xcr0=ck.XCR0_AMX, amx_permitted=False))
    assert ck.choose_variant(ALL, no_amx, allow_amx=True) == "zen4"
    # Everything enabled: AMX only when asked for (its extra buffer crashes on K-quants, see choose_variant).
    everything = ck.usable_features(FULL, ck.OsSupport(xcr0=ck.XCR0_AMX, amx_permitted=True))
    assert ck.choose_variant(ALL, everything, allow_amx=True) == "sapphirerapids"
    assert ck.choose_variant(ALL, everything) == "zen4"
    # XCR0 unreadable: nothing that needs saved vector state.
    assert ck.choose_variant(ALL, ck.usable_features(FULL, ck.OsSupport(None, None))) == "sse42"
    # Only what is installed can be chosen.
    assert ck.choose_variant(["x64", "haswell"], no_amx) == "haswell"


# ldtilecfg [rdi]; tilezero tmm0; tilerelease; ret -- touches AMX tile data, which Linux only lets a process use
# after arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
AMX_CHILD = r"""
import ctypes, mmap, sys
if sys.argv[1] == "grant":
    assert ctypes.CDLL(None).syscall(158, 0x1023, 18) == 0
buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
buf.write(bytes.fromhex("c4e2784907c4e27b49c0c4e27849c0c3"))
cfg = (ctypes.c_uint8 * 64)()
cfg[0], cfg[16], cfg[48] = 1, 64, 16  # palette 1; tmm0: 64 bytes x 16 rows
ctypes.CFUNCTYPE(None, ctypes.c_void_p)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))(ctypes.addressof(cfg))
"""


@x86_linux
def test_advertised_but_disabled_amx_is_sigill_and_the_probe_sees_it() -> None:
    if "AMX_INT8" not in ck.advertised_features():
        pytest.skip("this CPU does not advertise AMX")
    os_support = ck.probe_os_support()
    granted = subprocess.run([sys.executable, "-c", AMX_CHILD, "grant"], capture_output=True)
    refused = subprocess.run([sys.executable, "-c", AMX_CHILD, "none"], capture_output=True)
    # The advertised-but-disabled case, for real: CPUID says AMX, the process has no permission -> SIGILL.
    assert refused.returncode == -signal.SIGILL
    assert (granted.returncode == 0) == bool(os_support.amx_permitted)
    refused_os = ck.OsSupport(xcr0=os_support.xcr0, amx_permitted=False)
    assert ck.choose_variant(ALL, ck.usable_features(ck.advertised_features(), refused_os), allow_amx=True) != (
        "sapphirerapids"
    )


@x86_linux
def test_xcr0_probe_matches_what_the_kernel_lists() -> None:
    os_support = ck.probe_os_support()
    assert os_support.xcr0 is not None and os_support.xcr0 & 0b11 == 0b11  # x87 + SSE: always on in 64-bit mode
    adv = ck.advertised_features()
    if "AVX2" in adv:
        assert os_support.xcr0 & ck.XCR0_YMM == ck.XCR0_YMM
    if "AVX512" in adv:
        assert os_support.xcr0 & ck.XCR0_ZMM == ck.XCR0_ZMM


def test_doctor_reports_the_loaded_backend(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    compiled = ck.feature_names(ggml.cpu_backend_features())
    assert data["compiled"] == [f for f in compiled if f in ck.SCORE_WEIGHTS]
    assert "libggml-cpu" in data["library"]
    assert set(data["unused"]) <= set(data["usable"]) <= set(data["advertised"])
    assert data["notes"]
    if "AVX512" in data["usable"] and "AVX512" not in data["compiled"]:
        assert "AVX512" in data["unused"]
    # AMX is never suggested: the install leaves it out on purpose, so a reinstall would not add it.
    assert not ck.AMX & set(data["unused"])
    if ck.AMX & set(data["usable"]) and not ck.AMX & set(data["compiled"]):
        assert any("AMX is enabled here but left out on purpose" in n for n in data["notes"])


def test_variant_files_and_the_single_backend_build(tmp_path: Path) -> None:
    for name in ("libggml-cpu-haswell.so", "libggml-cpu-zen4.so", "libggml-cpu.so", "libggml-cpu-unknown.so"):
        (tmp_path / name).write_bytes(b"")
    assert list(ck.variant_files(tmp_path)) == ["haswell", "zen4"]
    # The installed build links one CPU backend in (README flags): nothing to choose, nothing loaded.
    if not any(ck.variant_files(folder) for folder in ck.backend_folders()):
        assert ck.load_cpu_backend() is None


def _flags(args: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("-D").split("=") for a in args)


def test_install_flags_leave_out_what_the_os_does_not_enable() -> None:
    # The advertised-but-disabled case at install time: the CPU lists AVX-512 and AMX, the OS saves only YMM state.
    ymm_only = _flags(ck.cmake_args(ck.usable_features(FULL, ck.OsSupport(xcr0=0b111, amx_permitted=False))))
    assert ymm_only["GGML_NATIVE"] == "OFF"  # never -march=native: it would compile ggml's AMX kernels too
    assert ymm_only["GGML_AVX2"] == ymm_only["GGML_FMA"] == ymm_only["GGML_AVX_VNNI"] == "ON"
    assert ymm_only["GGML_AVX512"] == ymm_only["GGML_AVX512_BF16"] == "OFF"
    # Everything enabled: every AVX-512 level ggml has, AMX still off (its extra buffer crashes on K-quants).
    every = _flags(ck.cmake_args(ck.usable_features(FULL, ck.OsSupport(xcr0=ck.XCR0_AMX, amx_permitted=True))))
    assert all(every[f"GGML_{f}"] == "ON" for f in ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"))
    assert every["GGML_AMX_TILE"] == every["GGML_AMX_INT8"] == every["GGML_AMX_BF16"] == "OFF"
    # XCR0 unreadable: no level that needs saved vector state (explicitly OFF: ggml turns AVX2 on by default).
    none = _flags(ck.cmake_args(ck.usable_features(FULL, ck.OsSupport(None, None))))
    assert none["GGML_AVX"] == none["GGML_AVX2"] == "OFF" and none["GGML_SSE42"] == "ON"


@x86_linux
def test_the_install_probe_runs_before_install_and_matches_this_machine() -> None:
    # What the README's install runs, from the checkout, with nothing but the standard library on the path.
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-S", "-m", "llava_cli.cpu_kernels"], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    expected = ck.cmake_args(ck.usable_features(ck.advertised_features(), ck.probe_os_support()))
    assert proc.stdout.split() == expected
    assert proc.stderr.startswith("llava-cli: llama.cpp kernels for this CPU (") and proc.stderr.count("\n") == 1


def test_readme_and_ci_install_with_the_probe() -> None:
    root = Path(__file__).resolve().parents[1]
    for text in (root.joinpath("README.md").read_text(), root.joinpath(".ci", "run").read_text()):
        assert f'CMAKE_ARGS="{ck.CPU_FLAGS}" pip install --no-cache-dir' in text
