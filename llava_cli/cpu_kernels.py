"""Which ggml CPU kernels this install runs, what the CPU and the OS allow, and which CPU variant is safe to load.

Two facts from the llama.cpp that llama-cpp-python 0.3.36 vendors (docs/speed.md has the details):

* ``ggml_cpu_has_avx512()`` and friends answer what the CPU backend was *compiled* with (``#if defined(__AVX512F__)``),
  not what the CPU can do; the CPU backend registry reports the same list through ``ggml_backend_get_features``.
* A build with ``GGML_BACKEND_DL=ON GGML_CPU_ALL_VARIANTS=ON`` ships one ``libggml-cpu-<variant>.so`` per instruction
  set level, and ``ggml_backend_load_all`` keeps the one with the highest ``ggml_backend_score``. That score
  (``ggml-cpu/arch/x86/cpu-feats.cpp``) reads CPUID bits only ("FIXME: this does not check for OS support"): a CPU
  that advertises AVX-512 or AMX under an OS or hypervisor that does not enable its register state gets a variant
  that dies with SIGILL. :func:`choose_variant` is the guard: it scores the same way, but over the features that are
  advertised *and* enabled (XCR0 read with ``xgetbv``; AMX also needs the per-process permission Linux grants through
  ``arch_prctl``), and :func:`load_cpu_backend` loads that file before ``llama_backend_init`` could pick another.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

# ggml's x86 CPU variants and the instruction sets each is compiled for (ggml/src/CMakeLists.txt,
# GGML_CPU_ALL_VARIANTS, in llama-cpp-python 0.3.36's vendor/llama.cpp).
X86_VARIANTS: dict[str, tuple[str, ...]] = {
    "x64": (),
    "sse42": ("SSE42",),
    "sandybridge": ("SSE42", "AVX"),
    "ivybridge": ("SSE42", "AVX", "F16C"),
    "piledriver": ("SSE42", "AVX", "F16C", "FMA"),
    "haswell": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2"),
    "skylakex": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512"),
    "cannonlake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI"),
    "cascadelake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VNNI"),
    "icelake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI"),
    "cooperlake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VNNI", "AVX512_BF16"),
    "zen4": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"),
    "alderlake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX_VNNI"),
    "sapphirerapids": (
        *("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"),
        *("AMX_TILE", "AMX_INT8"),
    ),
}

# ggml_backend_cpu_x86_score's weight per feature (cpu-feats.cpp); a variant scores 1 + the sum of its features'
# weights when the CPU has all of them, else 0. AMX_TILE has no weight of its own there.
SCORE_WEIGHTS: dict[str, int] = {
    "FMA": 1,
    "F16C": 1 << 1,
    "SSE42": 1 << 2,
    "BMI2": 1 << 3,
    "AVX": 1 << 4,
    "AVX2": 1 << 5,
    "AVX_VNNI": 1 << 6,
    "AVX512": 1 << 7,
    "AVX512_VBMI": 1 << 8,
    "AVX512_BF16": 1 << 9,
    "AVX512_VNNI": 1 << 10,
    "AMX_INT8": 1 << 11,
    "AMX_TILE": 0,
}

AMX = frozenset({"AMX_TILE", "AMX_INT8"})  # never built (cmake_args) nor chosen by default (choose_variant)

# /proc/cpuinfo flag(s) -> ggml feature. ggml's AVX512 needs F, CD, VL, DQ and BW together (cpu-feats.cpp).
_FLAGS: dict[str, tuple[str, ...]] = {
    "SSE42": ("sse4_2",),
    "AVX": ("avx",),
    "F16C": ("f16c",),
    "FMA": ("fma",),
    "AVX2": ("avx2",),
    "BMI2": ("bmi2",),
    "AVX_VNNI": ("avx_vnni",),
    "AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "AVX512_VBMI": ("avx512vbmi",),
    "AVX512_VNNI": ("avx512_vnni",),
    "AVX512_BF16": ("avx512_bf16",),
    "AMX_TILE": ("amx_tile",),
    "AMX_INT8": ("amx_int8",),
}

# XCR0 bits the OS sets when it saves a register file on context switch (Intel SDM vol. 1, 13.1).
XCR0_YMM = 0b110  # SSE + AVX (upper halves of YMM)
XCR0_ZMM = XCR0_YMM | 0b1110_0000  # + opmask, ZMM_Hi256, Hi16_ZMM
XCR0_AMX = XCR0_ZMM | (1 << 17) | (1 << 18)  # + XTILECFG, XTILEDATA
_NEEDS_XCR0: dict[str, int] = {
    "AVX": XCR0_YMM,
    "F16C": XCR0_YMM,
    "FMA": XCR0_YMM,
    "AVX2": XCR0_YMM,
    "AVX_VNNI": XCR0_YMM,
    "AVX512": XCR0_ZMM,
    "AVX512_VBMI": XCR0_ZMM,
    "AVX512_VNNI": XCR0_ZMM,
    "AVX512_BF16": XCR0_ZMM,
    "AMX_TILE": XCR0_AMX,
    "AMX_INT8": XCR0_AMX,
}

# Run in a child process: executing our own machine code or asking the kernel for AMX must never take the caller
# down. xgetbv(0): `xor ecx,ecx; xgetbv; shl rdx,32; or rax,rdx; ret`. arch_prctl(ARCH_REQ_XCOMP_PERM = 0x1023,
# XFEATURE_XTILEDATA = 18) is what ggml's amx.cpp asks before its AMX buffer type is used; SYS_arch_prctl is 158.
_PROBE = r"""
import ctypes, json, mmap, platform
out = {"xcr0": None, "amx_permitted": None}
if platform.machine() in ("x86_64", "AMD64"):
    code = bytes.fromhex("31c90f01d048c1e2204809d0c3")
    try:
        buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        buf.write(code)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        out["xcr0"] = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)()
    except (OSError, ValueError, TypeError):
        pass
    if platform.system() == "Linux":
        libc = ctypes.CDLL(None, use_errno=True)
        out["amx_permitted"] = libc.syscall(158, 0x1023, 18) == 0
print(json.dumps(out))
"""


@dataclass(frozen=True)
class OsSupport:
    """What the OS enables for user processes: XCR0 (None: could not be read) and AMX's per-process permission."""

    xcr0: int | None
    amx_permitted: bool | None


def advertised_features(cpuinfo: str | None = None) -> frozenset[str]:
    """ggml feature names whose CPUID flags the kernel lists in /proc/cpuinfo (empty off Linux/x86)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return frozenset(feat for feat, need in _FLAGS.items() if all(f in flags for f in need))


def probe_os_support(timeout: float = 20.0) -> OsSupport:
    """Read XCR0 and ask for AMX permission in a child process (a fault there is an answer, not a crash here)."""
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout)
        data = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        data = {}
    return OsSupport(xcr0=data.get("xcr0"), amx_permitted=data.get("amx_permitted"))


def usable_features(advertised: Iterable[str], os_support: OsSupport) -> frozenset[str]:
    """The advertised features whose register state the OS enables. An unreadable XCR0 keeps nothing that needs
    one (the baseline SSE4.2 level stays); AMX also needs the permission grant."""
    out = set()
    for feat in advertised:
        need = _NEEDS_XCR0.get(feat, 0)
        if need and (os_support.xcr0 is None or os_support.xcr0 & need != need):
            continue
        if feat in AMX and not os_support.amx_permitted:
            continue
        out.add(feat)
    return frozenset(out)


def variant_score(variant: str, features: Iterable[str]) -> int:
    """ggml_backend_cpu_x86_score for `variant` on a CPU with `features`: 0 when one is missing."""
    have = set(features)
    need = X86_VARIANTS[variant]
    if not all(f in have for f in need):
        return 0
    return 1 + sum(SCORE_WEIGHTS[f] for f in need)


def choose_variant(available: Iterable[str], features: Iterable[str], allow_amx: bool = False) -> str | None:
    """The highest-scoring variant among `available` that `features` can run (None if none can).

    AMX variants are left out unless `allow_amx`: their AMX extra buffer type (ggml-cpu/amx/) crashes in
    ggml_backend_amx_mul_mat on K-quant models on this project's reference machine (issue 16) and upstream
    (llama.cpp issue 20824), and the AVX512_BF16/VNNI variant below it runs every other kernel the same way."""
    feats = frozenset(features)
    best, best_score = None, 0
    for name in available:
        if name not in X86_VARIANTS or (not allow_amx and AMX & set(X86_VARIANTS[name])):
            continue
        score = variant_score(name, feats)
        if score > best_score:
            best, best_score = name, score
    return best


def variant_files(folder: Path) -> dict[str, Path]:
    """``libggml-cpu-<variant>.so`` files in `folder`, by variant name."""
    prefix, suffix = "libggml-cpu-", ".so"
    return {
        p.name[len(prefix) : -len(suffix)]: p
        for p in sorted(folder.glob(f"{prefix}*{suffix}"))
        if p.name[len(prefix) : -len(suffix)] in X86_VARIANTS
    }


def backend_folders() -> list[Path]:
    """Where a llama-cpp-python build puts ggml's libraries: ``llama_cpp/lib``, and for dynamic backends also the
    install prefix's ``bin`` (ggml installs MODULE backends to CMAKE_INSTALL_BINDIR, which scikit-build-core roots
    at site-packages)."""
    import llama_cpp

    pkg = Path(llama_cpp.__file__).parent
    return [pkg / "lib", pkg.parent / "bin"]


def load_cpu_backend(allow_amx: bool | None = None) -> Path | None:
    """In a build with dynamic CPU variants, load the safe best one (:func:`choose_variant`) into ggml's registry.

    Call before anything runs ``llama_backend_init`` (llama_cpp.Llama does): that function only calls
    ``ggml_backend_load_all`` (CPUID-only scoring) while the registry is empty. ``LLAVA_CPU_VARIANT=<name>``
    forces a variant; ``LLAVA_CPU_AMX=1`` lets AMX variants compete. Returns the loaded file, or None for a build
    with a single linked-in CPU backend (the README's) or when the registry was filled already."""
    files: dict[str, Path] = {}
    for folder in backend_folders():
        files = files or variant_files(folder)
    if not files:
        return None
    lib_dir = backend_folders()[0]
    ggml = ctypes.CDLL(str(lib_dir / "libggml.so"))
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    if ggml.ggml_backend_reg_count():
        return None
    forced = os.environ.get("LLAVA_CPU_VARIANT")
    if allow_amx is None:
        allow_amx = os.environ.get("LLAVA_CPU_AMX") == "1"
    name = forced if forced in files else None
    if name is None:
        name = choose_variant(files, usable_features(advertised_features(), probe_os_support()), allow_amx)
    if name is None:
        return None  # nothing safe: leave the choice to ggml (x64 has score 1 and always loads)
    if not ggml.ggml_backend_load(str(files[name]).encode()):
        return None
    return files[name]


# ------------------------------------------------------------------------------------------------ install


# The README's install and every "reinstall" hint: llama.cpp compiled for this machine's CPU (see install_args).
# `python -m llava_cli.cpu_kernels` works from a checkout before the install (stdlib only) and after it.
CPU_FLAGS = "$(python -m llava_cli.cpu_kernels)"
LLAMA_CPP = "llama-cpp-python==0.3.36"
CPU_REINSTALL = f'CMAKE_ARGS="{CPU_FLAGS}" pip install --force-reinstall --no-cache-dir {LLAMA_CPP}'
GPU_REINSTALL = f'CMAKE_ARGS="-DGGML_CUDA=on {CPU_FLAGS}" pip install --force-reinstall --no-cache-dir {LLAMA_CPP}'

# ggml's CMake option for each feature it scores (ggml/CMakeLists.txt, "instruction set specific").
_CMAKE_OPTION: dict[str, str] = {
    "SSE42": "GGML_SSE42",
    "AVX": "GGML_AVX",
    "F16C": "GGML_F16C",
    "FMA": "GGML_FMA",
    "AVX2": "GGML_AVX2",
    "BMI2": "GGML_BMI2",
    "AVX_VNNI": "GGML_AVX_VNNI",
    "AVX512": "GGML_AVX512",
    "AVX512_VBMI": "GGML_AVX512_VBMI",
    "AVX512_VNNI": "GGML_AVX512_VNNI",
    "AVX512_BF16": "GGML_AVX512_BF16",
}


def cmake_args(usable: Iterable[str]) -> list[str]:
    """llama.cpp build flags for the instruction sets this CPU advertises *and* its OS enables (the install's probe).

    Every level is named ON or OFF (ggml turns AVX2 and friends on by default when GGML_NATIVE is off), never
    ``-march=native``: GCC's native would also compile ggml's AMX kernels, whose extra buffer type is the path that
    crashes (see :func:`choose_variant`), and the AMX options stay OFF for the same reason."""
    have = frozenset(usable)
    return (
        ["-DGGML_NATIVE=OFF"]
        + [f"-D{opt}={'ON' if feat in have else 'OFF'}" for feat, opt in _CMAKE_OPTION.items()]
        + [
            "-DGGML_AMX_TILE=OFF",
            "-DGGML_AMX_INT8=OFF",
            "-DGGML_AMX_BF16=OFF",
        ]
    )


def install_args() -> tuple[str, str]:
    """(CMAKE_ARGS for this machine, a one-line note saying why). Off x86-64 Linux: no flags, llama.cpp's defaults
    (native on ARM, where the AMX trap does not exist)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64") or platform.system() != "Linux":
        return "", f"llava-cli: {platform.system()}/{platform.machine()}: llama.cpp's default CPU flags"
    usable = usable_features(advertised_features(), probe_os_support())
    level = choose_variant(X86_VARIANTS, usable) or "x64"
    order = list(SCORE_WEIGHTS)
    shown = ", ".join(sorted((f for f in usable if f in _CMAKE_OPTION), key=order.index)) or "none"
    return " ".join(cmake_args(usable)), f"llava-cli: llama.cpp kernels for this CPU ({level} level: {shown}; no AMX)"


# ------------------------------------------------------------------------------------------------ report


@dataclass
class KernelReport:
    """What `llava doctor` shows about the CPU kernels."""

    library: str  # the libggml-cpu*.so in this process
    compiled: list[str]  # features the loaded CPU backend was compiled with (ggml_backend_get_features)
    level: str  # the ggml variant those features amount to (haswell = AVX2, zen4 = AVX-512 with BF16/VNNI, ...)
    advertised: list[str]  # CPUID, as /proc/cpuinfo lists it
    usable: list[str]  # advertised and enabled by the OS
    unused: list[str]  # usable but not compiled in: what a reinstall for this CPU would add
    unsafe: list[str]  # compiled in but not usable: this build may die with SIGILL
    xcr0: int | None
    amx_permitted: bool | None
    variants: dict[str, str] = field(default_factory=dict)  # variant files found -> "safe choice" / "ggml's choice"
    notes: list[str] = field(default_factory=list)  # why these kernels, and what would be faster or safer

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def loaded_cpu_library() -> str:
    """Path of the libggml-cpu*.so mapped into this process ('' if none), from /proc/self/maps."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return ""
    for line in maps.splitlines():
        path = line.split()[-1] if line.split() else ""
        if "/libggml-cpu" in path:
            return path
    return ""


def kernel_report(compiled: Iterable[str], os_support: OsSupport | None = None) -> KernelReport:
    """Compare the CPU backend's compiled features with what this CPU and OS allow.

    `compiled`: the loaded backend's feature names (llava_cli/runtime/ggml.py: cpu_backend_features)."""
    os_support = os_support or probe_os_support()
    adv = advertised_features()
    usable = usable_features(adv, os_support)
    comp = [f for f in compiled if f in SCORE_WEIGHTS]  # the x86 levels ggml scores (not SSE3, OPENMP, REPACK...)
    variants: dict[str, str] = {}
    for folder in backend_folders():
        files = variant_files(folder)
        if files:
            safe = choose_variant(files, usable)
            ggml_pick = choose_variant(files, adv, allow_amx=True)
            for name in files:
                tags = [t for t, pick in (("safe choice", safe), ("ggml's own choice", ggml_pick)) if pick == name]
                variants[name] = ", ".join(tags)
            break
    order = list(SCORE_WEIGHTS)
    report = KernelReport(
        library=loaded_cpu_library(),
        compiled=comp,
        level=choose_variant(X86_VARIANTS, set(comp) | ({"SSE42"} if "AVX" in comp else set()), True) or "x64",
        advertised=sorted(adv, key=order.index),
        usable=sorted(usable, key=order.index),
        # SSE4.2 is implied by an AVX build (ggml lists no SSE42 feature for it); not a missed level. AMX is left
        # out on purpose (cmake_args), so a reinstall would not add it: a note says so instead.
        unused=sorted(usable - set(comp) - AMX - ({"SSE42"} if "AVX" in comp else set()), key=order.index),
        unsafe=sorted(set(comp) - usable, key=order.index),
        xcr0=os_support.xcr0,
        amx_permitted=os_support.amx_permitted,
        variants=variants,
    )
    report.notes = _notes(report)
    return report


def _notes(r: KernelReport) -> list[str]:
    notes = []
    if r.variants:
        picked = Path(r.library).name
        notes.append(f"dynamic CPU variants: {picked} loaded (the best the CPU and the OS can run)")
        ggml_pick = [n for n, tag in r.variants.items() if "ggml's own choice" in tag and "safe" not in tag]
        if ggml_pick:
            notes.append(
                f"ggml's CPUID-only scoring would load {ggml_pick[0]}, which this CPU/OS cannot run safely "
                "(llava_cli/cpu_kernels.py keeps it out)"
            )
    else:
        notes.append("one CPU backend compiled in: its instruction sets were fixed by CMAKE_ARGS at install time")
    if r.unsafe:
        notes.append(
            f"compiled with {', '.join(r.unsafe)}, which this CPU or OS does not enable: expect 'Illegal "
            f"instruction'; reinstall llama.cpp for this CPU: {CPU_REINSTALL}"
        )
    if r.unused:
        notes.append(f"the CPU also runs {', '.join(r.unused)}, which this build does not use: {CPU_REINSTALL}")
    if not r.unsafe and not r.unused:
        notes.append("this build uses every instruction set level the install picks for this CPU")
    if AMX & set(r.usable) and not AMX & set(r.compiled):
        notes.append(
            "AMX is enabled here but left out on purpose: ggml's AMX buffer type crashes on K-quant models "
            "(docs/speed.md)"
        )
    if r.xcr0 is None:
        notes.append("could not read XCR0 (xgetbv): wide instruction sets are treated as not enabled")
    return notes


def inspect() -> KernelReport:
    """The report for this process: loads the safe CPU variant first in a dynamic-variant build."""
    from llava_cli.runtime import ggml

    load_cpu_backend()
    features = ggml.cpu_backend_features()
    if not features:  # dynamic build where nothing safe was found: let llama.cpp load what it picks
        import llama_cpp

        llama_cpp.llama_backend_init()
        features = ggml.cpu_backend_features()
    return kernel_report(feature_names(features))


def feature_names(features: Mapping[str, str]) -> list[str]:
    """Names of the features a backend reports as on ("1")."""
    return [k for k, v in features.items() if v not in ("0", "")]


if __name__ == "__main__":  # CMAKE_ARGS="$(python -m llava_cli.cpu_kernels)" pip install ...
    args, why = install_args()
    print(why, file=sys.stderr)
    print(args)
