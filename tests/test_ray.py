"""`llava caption --ray` and `caption_dataset` on a real local Ray cluster with the converter's tiny model: the
same captions as the local path, one record per image, corrupt images recorded, a killed actor's batch retried and
written once, SIGKILL of the driver then a re-run losing and duplicating nothing, and no cluster left behind.

One cluster per module (`cluster`) for the in-process tests; the CLI tests start their own, as users do."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from llava_cli import captioning as cap
from llava_cli.cli.app import main
from tests.test_cli_caption import ROOT, make_images, model_args, spawn, wait_for_records

ray = pytest.importorskip("ray")
ray_data = pytest.importorskip("llava_cli.captioning.ray_data")

pytestmark = pytest.mark.slow

CORRUPT = b"\x89PNG\r\n\x1a\n" + b"\0" * 40  # a PNG signature and nothing after it


def load(pair) -> dict:
    return {"model": str(pair.text_path), "mmproj": str(pair.mmproj_path), "ctx": 1024, "threads": 1}


def by_path(path: Path) -> dict[str, dict]:
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    out = {r["path"]: r for r in recs}
    assert len(out) == len(recs), "an image has two records"
    return out


@pytest.fixture(scope="module")
def cluster():
    """A local cluster for the module (small and quiet: 2 CPUs, no dashboard, a 150 MB object store); yields its
    address. On exit, every process it started must be gone."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with ray_data.ray_session(num_cpus=2, object_store_memory=150 * 2**20) as started:
        assert started
        procs = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        assert {"gcs_server", "raylet"} <= {p.name() for p in procs}
        yield ray.get_runtime_context().gcs_address
    _assert_gone(procs)


@pytest.fixture
def pics(tmp_path: Path) -> Path:
    folder = tmp_path / "pics"
    make_images(folder, 7)
    (folder / "broken.png").write_bytes(CORRUPT)
    return folder


def test_workers_import_this_checkout(cluster) -> None:
    @ray.remote(num_cpus=0.1)
    def where() -> str:
        import llava_cli

        return llava_cli.__file__

    assert Path(ray.get(where.remote())).resolve().is_relative_to(ROOT)


def test_same_records_as_the_local_path(cluster, tiny_pair_f16, pics: Path, tmp_path: Path) -> None:
    local = cap.caption([pics], out=tmp_path / "local.jsonl", max_tokens=6, **load(tiny_pair_f16))
    seen: list[str] = []
    summary = ray_data.caption_ray(
        [pics],
        out=tmp_path / "ray.jsonl",
        max_tokens=6,
        ray=ray_data.RayOptions(workers=2, cpus_per_worker=0.5, batch_size=2),
        on_record=lambda r: seen.append(r.path),
        **load(tiny_pair_f16),
    )
    assert (summary.done, summary.failed, summary.exit_code) == (local.done, local.failed, cap.EXIT_SOME_FAILED)
    assert (summary.done, summary.failed) == (7, 1)
    a, b = by_path(tmp_path / "local.jsonl"), by_path(tmp_path / "ray.jsonl")
    assert sorted(a) == sorted(b) == sorted(seen)
    assert len({r["caption"] for r in a.values() if r["caption"]}) > 1  # the comparison below can fail
    for path, rec in a.items():
        other = b[path]
        assert (other["caption"], other["tokens"], other["error"], other["prompt"], other["model"]) == (
            rec["caption"],
            rec["tokens"],
            rec["error"],
            rec["prompt"],
            rec["model"],
        )
    broken = b[str(pics / "broken.png")]
    assert broken["caption"] is None and "broken.png" in broken["error"]
    # The resume filter: the captioned images again, nothing to do (Ray is not even reached).
    good = [p for p in a if a[p]["error"] is None]
    again = ray_data.caption_ray(good, out=tmp_path / "ray.jsonl", ray=ray_data.RayOptions(workers=64))
    assert (again.skipped, again.done, again.failed) == (7, 0, 0)
    assert by_path(tmp_path / "ray.jsonl") == b


def test_caption_dataset_of_bytes(cluster, tiny_pair_f16, pics: Path, tmp_path: Path) -> None:
    local = cap.caption([pics], out=tmp_path / "local.jsonl", max_tokens=6, **load(tiny_pair_f16))
    assert local.done == 7
    ds = ray.data.read_binary_files(str(pics), include_paths=True)
    records = ray_data.caption_dataset(ds, max_tokens=6, ray=ray_data.RayOptions(batch_size=3), **load(tiny_pair_f16))
    rows = {Path(r["path"]).name: r for r in records.take_all()}
    expected = {Path(p).name: r for p, r in by_path(tmp_path / "local.jsonl").items()}
    assert sorted(rows) == sorted(expected)
    assert all(rows[name]["caption"] == expected[name]["caption"] for name in expected)
    assert rows["broken.png"]["error"] and rows["broken.png"]["caption"] is None
    # The docs' example: straight to JSON files.
    records.write_json(str(tmp_path / "json"))
    written = [json.loads(line) for f in (tmp_path / "json").glob("*.json") for line in f.read_text().splitlines()]
    assert sorted(Path(r["path"]).name for r in written) == sorted(expected)


def _replica_pids() -> list[psutil.Process]:
    procs = psutil.process_iter(["cmdline"])
    return [p for p in procs if "CaptionReplica" in " ".join(p.info["cmdline"] or [])]


def test_killed_actor_batch_is_retried_and_written_once(cluster, tiny_pair_f16, tmp_path: Path) -> None:
    make_images(tmp_path / "many", 16)
    out = tmp_path / "out.jsonl"
    killed: list[int] = []

    def kill_one_replica() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            if out.exists() and out.read_bytes().count(b"\n") >= 3:
                for p in _replica_pids():
                    p.send_signal(signal.SIGKILL)
                    killed.append(p.pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_replica)
    killer.start()
    summary = ray_data.caption_ray(
        [tmp_path / "many"],
        out=out,
        max_tokens=12,
        ray=ray_data.RayOptions(workers=1, batch_size=4),
        handle_sigint=False,
        **load(tiny_pair_f16),
    )
    killer.join()
    assert killed, "the replica was never seen running"
    assert (summary.done, summary.failed) == (16, 0)
    assert len(by_path(out)) == 16  # by_path fails on a second record of any image


def test_without_ray_one_line_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    make_images(tmp_path / "p", 1)
    code = main(["caption", str(tmp_path / "p"), "--ray", "--out", str(tmp_path / "o.jsonl"), "--model", "x"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == 'error: --ray needs Ray Data, which is not installed: pip install "llava-cli[ray]"'
    assert not (tmp_path / "o.jsonl").exists()


def test_ray_flags_need_ray(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_images(tmp_path / "p", 1)
    assert main(["caption", str(tmp_path / "p"), "--ray-workers", "4"]) == 2
    assert "need --ray" in capsys.readouterr().err


def _cluster_processes(pid: int) -> list[psutil.Process]:
    """The driver's descendants: the local cluster it started (gcs_server, raylet, agents, workers) + its watchdog."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _assert_gone(procs: list[psutil.Process], timeout: float = 20) -> None:
    gone, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"


def test_sigkill_then_rerun_loses_and_duplicates_nothing(cluster, tiny_pair_f16, tmp_path: Path) -> None:
    make_images(tmp_path / "pics", 12)
    out = tmp_path / "captions.jsonl"
    args = [str(tmp_path / "pics"), "--out", str(out), "-n", "12", "--ray", *model_args(tiny_pair_f16)]

    # First run: a local cluster of its own (whatever the caller's environment), killed mid-run.
    proc = spawn(args, {"RAY_ADDRESS": ""})
    wait_for_records(out, 2, proc, timeout=120)
    procs = _cluster_processes(proc.pid)
    assert {"gcs_server", "raylet"} <= {p.name() for p in procs}  # it started its own cluster
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _assert_gone(procs)  # even after SIGKILL: the watchdog removes the cluster
    first = by_path(out)
    assert 2 <= len(first) < 12

    # Re-run on an existing cluster (RAY_ADDRESS): it finishes the rest and leaves that cluster running.
    proc = spawn(args, {"RAY_ADDRESS": cluster})
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert f"{len(first)} skipped" in err
    final = by_path(out)  # fails on a duplicate
    assert len(final) == 12 and all(r["error"] is None and r["caption"] for r in final.values())
    assert all(final[p]["caption"] == first[p]["caption"] for p in first)
    assert ray.get(ray.remote(lambda: 1).options(num_cpus=0.1).remote()) == 1  # the module's cluster is still up
