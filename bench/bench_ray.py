"""What Ray costs and where it would saturate, on this machine, in one run:

  1. images/min of `caption_ray` (Ray Data: decode tasks + an actor pool) vs `captioning.caption` (the local loop,
     the anchor) for the same photos, model, threads and greedy decoding. Two rates each: end to end (Ray's
     cluster start, actor start and model load included) and steady state (first record to last);
  2. the driver's record-writing rate: records/s its write path absorbs, (a) `commit_record` into a `RecordLog`
     alone, and (b) the full driver loop `ray_data.absorb` fed pre-made records streamed from a Ray Dataset through
     an actor pool (the same `iter_batches` path the real job uses, with no model). Past that rate a bigger cluster
     only queues records at the driver.

Prints tables; no asserts. Run it on a quiet machine (it starts its own local Ray cluster):

    nice -n 5 python bench/bench_ray.py                  # 32 photos 640x480, tiny synthetic model
    python bench/bench_ray.py --images 64 --max-tokens 16 --records 50000
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

from bench.bench_caption import make_photos  # noqa: E402


def tiny_model(work: Path) -> dict:
    from quantize import convert
    from quantize.synthetic import make_checkpoint

    pair = convert(make_checkpoint(work / "ckpt" / "tiny-llava"), work / "gguf", outtype="f16")
    return {"model": str(pair.text_path), "mmproj": str(pair.mmproj_path), "ctx": 1024}


def timed_run(fn, out: Path, **kw) -> dict:
    """Run a captioning function; record when each record arrived, for the steady-state rate."""
    stamps: list[float] = []
    t0 = time.perf_counter()
    summary = fn(out=out, overwrite=True, on_record=lambda r: stamps.append(time.perf_counter()), **kw)
    wall = time.perf_counter() - t0
    n = summary.done + summary.failed
    steady = 60.0 * (n - 1) / (stamps[-1] - stamps[0]) if n > 1 and stamps[-1] > stamps[0] else float("nan")
    return {"n": n, "wall": wall, "e2e": 60.0 * n / wall, "steady": steady, "first": stamps[0] - t0}


def bench_captioning(args: argparse.Namespace, work: Path) -> None:
    from llava_cli.captioning import caption
    from llava_cli.captioning.ray_data import RayOptions, caption_ray

    photos = work / "photos"
    make_photos(photos, args.images, 0.0, (640, 480))
    model = tiny_model(work)
    common = {"max_tokens": args.max_tokens, "temperature": 0.0, **model}
    configs = [
        ("local loop, 2 threads (anchor)", caption, {"threads": 2}),
        ("ray, 1 replica x 2 CPUs", caption_ray, {"threads": 2, "ray": RayOptions(workers=1, cpus_per_worker=2)}),
        ("ray, 2 replicas x 1 CPU", caption_ray, {"threads": 1, "ray": RayOptions(workers=2, cpus_per_worker=1)}),
    ]
    rows: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    for _ in range(args.repeat):  # interleaved: this shared machine drifts
        for name, fn, kw in configs:
            rows[name].append(timed_run(fn, work / "out.jsonl", inputs=[photos], **common, **kw))
    anchor = statistics.median(r["steady"] for r in rows[configs[0][0]])
    anchor_e2e = statistics.median(r["e2e"] for r in rows[configs[0][0]])
    what = f"{args.images} photos 640x480, tiny synthetic model, --max-tokens {args.max_tokens}"
    print(f"\n{what}, median of {args.repeat}")
    print(f"load average at start: {os.getloadavg()[0]:.1f} (2-core machine)\n")
    print(f"{'path':34} {'wall s':>7} {'1st rec s':>9} {'img/min e2e':>11} {'img/min steady':>14}", end="")
    print(f" {'steady vs local':>15}")
    for name, _, _ in configs:
        r = rows[name]
        wall, first = statistics.median(x["wall"] for x in r), statistics.median(x["first"] for x in r)
        e2e, steady = statistics.median(x["e2e"] for x in r), statistics.median(x["steady"] for x in r)
        print(f"{name:34} {wall:7.2f} {first:9.2f} {e2e:11.1f} {steady:14.1f} {steady / anchor:14.2f}x")
    local_s = 60.0 / anchor
    for name, _, _ in configs[1:]:
        steady = statistics.median(x["steady"] for x in rows[name])
        e2e = statistics.median(x["e2e"] for x in rows[name])
        print(
            f"  {name}: steady-state cost per image {1000 * (60.0 / steady - local_s):+.0f} ms vs local "
            f"({1000 * local_s:.0f} ms/img); end to end {e2e / anchor_e2e:.2f}x local"
        )


def bench_driver(args: argparse.Namespace, work: Path) -> None:
    import ray

    from llava_cli.captioning.batch import CaptionSummary
    from llava_cli.captioning.ray_data import absorb, import_ray, ray_session
    from llava_cli.captioning.records import CaptionRecord, RecordLog

    n = args.records
    caption = "A red bicycle leaning against a white brick wall next to a green door, on a sunny afternoon."

    def record(i: int) -> CaptionRecord:
        path = f"/data/images/shard{i % 97:03d}/img{i:08d}.jpg"
        return CaptionRecord(path, caption, "Describe this image in one sentence.", "llava-1.5-7b", "q4_k_m", 1.2, 24)

    records = [record(i) for i in range(n)]
    print(f"\ndriver record-writing rate, {n} records of ~{len(records[0].to_json())} bytes (JSONL)\n")

    # (a) the writer alone: the floor cost of a record.
    from llava_cli.captioning.batch import commit_record

    log = RecordLog(work / "a.jsonl", "jsonl")
    summary = CaptionSummary()
    t0 = time.perf_counter()
    for r in records:
        commit_record(r, log, False, summary)
    log.close()
    a = n / (time.perf_counter() - t0)

    # (b) the real driver loop, fed by Ray: pre-made records through an actor pool, streamed back by iter_batches.
    class Passthrough:
        def __call__(self, batch: dict) -> dict:
            return batch

    with ray_session(num_cpus=2):
        ray_mod = import_ray()
        rows = [r.__dict__ for r in records]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, n // 1000))
        ds = ds.map_batches(Passthrough, batch_size=args.batch, compute=ray_mod.data.ActorPoolStrategy(size=2))
        ds = ds.materialize()  # produce first: the loop below measures the driver, not the producers
        log = RecordLog(work / "b.jsonl", "jsonl")
        summary = CaptionSummary()
        wanted = {os.path.abspath(r.path) for r in records}
        t0 = time.perf_counter()
        written = absorb(ds.iter_batches(batch_size=None, batch_format="pyarrow"), wanted, log, False, summary)
        b = len(written) / (time.perf_counter() - t0)
        log.close()
    print(f"{'driver path':58} {'records/s':>10}")
    print(f"{'(a) commit_record -> RecordLog (one write() each)':58} {a:10.0f}")
    print(f"{'(b) Ray iter_batches -> absorb (dedupe) -> RecordLog':58} {b:10.0f}")


def bench_decode(work: Path) -> None:
    """The decoding task's CPU cost per image (`load_image`), and what it ships to a replica (RGB bytes)."""
    from llava_cli.images import load_image

    print(f"\n{'decode (one core, load_image)':34} {'ms/img':>8} {'img/s/core':>10} {'RGB MB':>7}")
    for w, h in ((640, 480), (1600, 1200), (4000, 3000)):
        folder = work / f"dec{w}"
        path = make_photos(folder, 1, 0.0, (w, h))[0]
        reps = max(3, int(2e8 // (w * h)))
        t0 = time.process_time()
        for _ in range(reps):
            rgb = load_image(path).rgb_bytes()
        ms = 1000 * (time.process_time() - t0) / reps
        print(f"{f'{w}x{h} JPEG':34} {ms:8.1f} {1000 / ms:10.1f} {len(rgb) / 1e6:7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=4, help="records per actor call in the driver bench")
    parser.add_argument("--skip-captioning", action="store_true")
    parser.add_argument("--skip-driver", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        work = Path(tmp)
        if not args.skip_captioning:
            bench_captioning(args, work)
        bench_decode(work)
        if not args.skip_driver:
            bench_driver(args, work)


if __name__ == "__main__":
    main()
