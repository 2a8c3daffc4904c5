"""llama.cpp's quantizer in a child process: ``llama_model_quantize`` through llama-cpp-python.

It runs in a child for three reasons:

* progress: llama.cpp logs one ``[  i/  n] tensor-name ...`` line per tensor through its log callback; the child
  forwards the log to a pipe and the parent turns those lines into ``on_progress(i, n)``;
* Ctrl-C: the C call cannot be interrupted from Python, but a child process can be killed;
* safety: a crash inside llama.cpp (an abort, a SIGILL from a bad build) becomes a one-line error, not a dead CLI.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

import gguf

from llava_cli.cpu_kernels import CPU_REINSTALL
from llava_cli.errors import ModelFileError, OutputError
from llava_cli.quants import QuantType

ProgressFn = Callable[[int, int], None]

_LOG_TENSOR = re.compile(rb"\[\s*(\d+)/\s*(\d+)\]")
_LOG_FAILED = re.compile(rb"failed to quantize: ([^\n]*)")


def size_text(n: float) -> str:
    """``1.5 GiB``, ``312.0 MiB``: sizes in messages."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this worker when `llava quantize` dies (kill -9 included), so llama.cpp does not
    go on writing a temp file for minutes. Linux only (prctl PR_SET_PDEATHSIG); elsewhere the worker finishes."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.getppid() != parent_pid:  # the parent was already gone before prctl took effect
        os._exit(1)


def worker_main() -> None:
    """Entry point of the child: quantize argv[1]'s JSON job, log to stdout, exit with llama.cpp's status."""
    job = json.loads(sys.argv[1])
    _die_with_parent(job["parent"])
    import llama_cpp  # imported here: the parent never loads libllama just to quantize

    out = sys.stdout.buffer

    @llama_cpp.llama_log_callback
    def _log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        out.write(text)
        out.flush()

    llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = job["ftype"]
    params.nthread = job["nthread"]
    kv = job["kv"]
    overrides = (llama_cpp.llama_model_kv_override * (len(kv) + 1))()  # zeroed last entry ends the list
    for slot, (key, value) in zip(overrides, kv.items(), strict=False):
        slot.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
        slot.key = key.encode()
        slot.value.val_str = value.encode()[:127]
    params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    pins = job["f16_tensors"]
    if pins:
        tt = (llama_cpp.llama_model_tensor_override * (len(pins) + 1))()
        for slot, name in zip(tt, pins, strict=False):
            slot.pattern = f"^{re.escape(name)}$".encode()
            slot.type = int(gguf.GGMLQuantizationType.F16)
        params.tt_overrides = ctypes.cast(tt, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    rc = llama_cpp.llama_model_quantize(job["src"].encode(), job["dst"].encode(), ctypes.byref(params))
    out.flush()
    os._exit(int(rc))  # skip interpreter teardown: nothing left to flush, and it is faster


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def run_llama_quantize(
    src: Path,
    dst: Path,
    qtype: QuantType,
    *,
    kv: dict[str, str],
    f16_tensors: list[str],
    on_progress: ProgressFn | None,
    final: Path | None = None,
) -> None:
    """Run llama_model_quantize(src -> dst) in a child process; raise a one-line error if it fails.

    `final` is the name `dst` will be renamed to, for messages (dst itself is a hidden temporary name).
    """
    job = {
        "parent": os.getpid(),
        "src": str(src),
        "dst": str(dst),
        "ftype": int(qtype.ftype),
        "nthread": cpu_count(),
        "kv": kv,
        "f16_tensors": f16_tensors,
    }
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-c", "from quantize.llama_worker import worker_main; worker_main()", json.dumps(job)]
    # A new session: Ctrl-C in the terminal reaches only us, and we decide to kill the child.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
    )
    tail: deque[bytes] = deque(maxlen=40)
    try:
        assert proc.stdout is not None
        buf = b""
        while chunk := os.read(proc.stdout.fileno(), 65536):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                tail.append(line)
                m = _LOG_TENSOR.search(line)
                if m and on_progress is not None:
                    on_progress(int(m.group(1)), int(m.group(2)))
        if buf:
            tail.append(buf)
        rc = proc.wait()
    except BaseException:
        # Ctrl-C or an error in a progress callback: stop llama.cpp now; atomic_path removes the partial file.
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        raise
    if rc == 0:
        return
    log = b"\n".join(tail)
    failed = _LOG_FAILED.search(log)
    if rc < 0:
        try:
            sig = signal.Signals(-rc).name
        except ValueError:
            sig = f"signal {-rc}"
        why = f"llama.cpp crashed ({sig})"
        hint = (
            f"an illegal instruction means llama-cpp-python was built for another CPU: {CPU_REINSTALL}"
            if sig == "SIGILL"
            else "set LLAVA_DEBUG=1 and run again to see llama.cpp's log"
        )
    else:
        why = failed.group(1).decode(errors="replace").strip() if failed else "llama_model_quantize failed"
        hint = None
    if os.environ.get("LLAVA_DEBUG") == "1":
        sys.stderr.write(log.decode(errors="replace") + "\n")
    if "iostream error" in why or "No space" in why:
        free = shutil.disk_usage(dst.parent).free
        raise OutputError(
            f"could not write {final or dst}: disk full ({size_text(free)} free)",
            hint="free some space or choose another --out",
        )
    raise ModelFileError(f"quantizing {src.name} to {qtype.label} failed: {why}", hint=hint)
