"""`llava caption`: caption a folder of images with the model loaded once; resumable, shardable."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from llava_cli import captioning, reading
from llava_cli.cli.options import (
    BitsOpt,
    CtxOpt,
    ImageFitOpt,
    MmprojOpt,
    ModelOpt,
    NGpuLayersOpt,
    NoMmprojOffloadOpt,
    QuietOpt,
    ThreadsOpt,
)
from llava_cli.cli.progress import stderr
from llava_cli.cli.run import MaxImageMbOpt, SeedOpt, SystemOpt, TemperatureOpt, TopPOpt, VerboseOpt
from llava_cli.errors import UsageError

HELP = f"""Caption many images with one model load: folders, globs or list files in; JSONL, CSV or .txt sidecars out.

The output is resumable: run the same command again after Ctrl-C, a crash or a killed job and it skips the
images that already have a caption (and repairs a half-written last line). Images that cannot be read are
recorded with their error and skipped; the batch goes on.

Prompt, --prefix and --suffix may use {{filename}}, {{stem}}, {{parent}} (the folder's name) and {{existing}} (the
text of the image's current .txt sidecar); write {{{{ and }}}} for literal braces.

Exit codes: {captioning.EXIT_OK} all captioned (or already done); {captioning.EXIT_SOME_FAILED} finished, but some
images failed (see their records); 2 bad arguments; 1 other errors; {captioning.EXIT_INTERRUPTED} interrupted.

Examples:

  llava caption photos/ --recursive --out captions.jsonl

  llava caption 'shoot/**/*.jpg' --format csv --out captions.csv --model llava-1.5-13b --bits q6_k

  llava caption photos/ --sidecar --prefix "photo of sks, " --prompt "Describe {{filename}} in one sentence."

  llava caption todo.txt --out refined.jsonl --prompt "Improve this caption: {{existing}}"

  find /data -name '*.jpg' -print0 | llava caption - --out captions.jsonl

  # A Slurm job array of 8 tasks, each captioning a disjoint 1/8 of the images into its own file:
  #SBATCH --array=1-8
  llava caption /data/images --recursive --shard $SLURM_ARRAY_TASK_ID/8 --out captions.$SLURM_ARRAY_TASK_ID.jsonl
  # afterwards: cat captions.*.jsonl > captions.jsonl

  # On a Ray cluster (RAY_ADDRESS, else a local one started for the run): 8 replicas, one GPU each:
  llava caption /data/images -r --out captions.jsonl --ray --ray-workers 8 --ray-gpus-per-worker 1 -ngl all
"""

InputsArg = Annotated[
    list[str],
    typer.Argument(
        help="Folders, image files, glob patterns (quote them: 'photos/**/*.jpg') or text files listing one image "
        "path per line (relative to the list file), or - to read such a list from stdin (lines, or NUL-separated "
        "as find -print0 writes). Example: photos/ extra.jpg list.txt",
        show_default=False,
    ),
]
PromptOpt = Annotated[
    str | None,
    typer.Option(
        "--prompt",
        "-p",
        help=f"The question asked about each image (default: {captioning.DEFAULT_PROMPT!r}). "
        'Example: --prompt "Describe {filename} for a blind reader."',
        show_default=False,
    ),
]
PromptFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--prompt-file",
        help="Read the prompt from a UTF-8 text file (for long prompts; - reads stdin). "
        "Example: --prompt-file prompt.txt",
        show_default=False,
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help=f"The output file: JSONL (default, {captioning.DEFAULT_OUT!r}) or CSV if it ends in .csv. "
        "Appended to and resumed from. Example: --out captions.jsonl",
        show_default=False,
    ),
]
SidecarOpt = Annotated[
    bool,
    typer.Option(
        "--sidecar",
        help="Write each caption to a .txt next to its image (cat.jpg → cat.txt); images with a .txt are skipped. "
        "With --out too, both are written and --out decides what is done. Example: --sidecar",
    ),
]
FormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format",
        "-f",
        help="jsonl, csv, or txt (= --sidecar). Default: from the --out extension, else jsonl. Example: --format csv",
        show_default=False,
    ),
]
RecursiveOpt = Annotated[
    bool, typer.Option("--recursive", "-r", help="Also caption images in subfolders of folder INPUTs. Example: -r")
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Start the output afresh and caption every image again (without it, done images are skipped). "
        "Example: --overwrite",
    ),
]
PrefixOpt = Annotated[
    str,
    typer.Option(
        "--prefix",
        help='Text put before each caption (templated). Example: --prefix "photo of sks, "',
        show_default=False,
    ),
]
SuffixOpt = Annotated[
    str,
    typer.Option(
        "--suffix", help='Text put after each caption (templated). Example: --suffix " ({parent})"', show_default=False
    ),
]
ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--shard",
        help="Caption only shard K of N (1 ≤ K ≤ N), chosen by a stable hash of each path: N processes or machines "
        "with K = 1..N caption disjoint shares that together are the whole set. Give each its own --out. "
        "Example: --shard 3/8",
        show_default=False,
    ),
]
ParallelOpt = Annotated[
    int | None,
    typer.Option(
        "--parallel",
        "-P",
        min=1,
        help="Images captioned at once: they share the model, and their tokens are decoded together (each takes "
        "--ctx positions of KV cache). Default: 4, measured fastest on CPU (docs/runtime.md); 1 = one at a time. "
        "Records are still written in input order. Example: --parallel 8",
        show_default=False,
    ),
]
CaptionMaxTokensOpt = Annotated[
    int, typer.Option("--max-tokens", "-n", min=1, help="Stop each caption after this many tokens. Example: -n 64")
]

RayOpt = Annotated[
    bool,
    typer.Option(
        "--ray",
        help="Run on Ray Data: tasks decode, --ray-workers model replicas caption, this process writes the same "
        "resumable --out. Uses the cluster at RAY_ADDRESS, else starts a local one for the run. Needs "
        '`pip install "llava-cli[ray]"`. Example: --ray --ray-workers 4',
    ),
]
RayWorkersOpt = Annotated[
    int,
    typer.Option(
        "--ray-workers", min=1, help="Model replicas (Ray actors), each loads the model once. Example: --ray-workers 8"
    ),
]
RayGpusOpt = Annotated[
    float,
    typer.Option(
        "--ray-gpus-per-worker",
        min=0.0,
        help="GPUs each replica reserves (0.5: two replicas share a GPU); combine with -ngl all. "
        "Example: --ray-gpus-per-worker 1",
    ),
]
RayCpusOpt = Annotated[
    float,
    typer.Option(
        "--ray-cpus-per-worker",
        min=0.01,
        help="CPUs each replica reserves; also its llama.cpp threads unless --threads is given. "
        "Example: --ray-cpus-per-worker 4",
    ),
]


class _RateColumn(ProgressColumn):
    """images/min and tokens/s, from the task's fields."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        if elapsed <= 0 or not task.completed:
            return Text("– img/min", style="progress.data.speed")
        per_min = 60.0 * task.completed / elapsed
        tokens_s = task.fields.get("tokens", 0) / max(task.fields.get("model_seconds", 0.0), 1e-9)
        return Text(f"{per_min:.1f} img/min  {tokens_s:.1f} tok/s", style="progress.data.speed")


def _summary_line(summary: captioning.CaptionSummary) -> str:
    where = f" → {summary.out}" if summary.out else " → .txt sidecars"
    rate = f", {summary.images_per_minute:.1f} images/min" if summary.done + summary.failed else ""
    head = "interrupted" if summary.interrupted else "finished"
    return (
        f"{head}: {summary.done} captioned, {summary.skipped} skipped (already done), {summary.failed} failed "
        f"of {summary.total} in {summary.seconds:.1f}s{rate}{where}"
    )


def caption_command(
    inputs: InputsArg,
    prompt: PromptOpt = None,
    prompt_file: PromptFileOpt = None,
    out: OutOpt = None,
    sidecar: SidecarOpt = False,
    format: FormatOpt = None,
    recursive: RecursiveOpt = False,
    overwrite: OverwriteOpt = False,
    prefix: PrefixOpt = "",
    suffix: SuffixOpt = "",
    shard: ShardOpt = None,
    max_tokens: CaptionMaxTokensOpt = 128,
    model: ModelOpt = None,
    mmproj: MmprojOpt = None,
    bits: BitsOpt = None,
    ctx: CtxOpt = 2048,
    threads: ThreadsOpt = None,
    n_gpu_layers: NGpuLayersOpt = "0",
    no_mmproj_offload: NoMmprojOffloadOpt = False,
    image_fit: ImageFitOpt = "pad",
    parallel: ParallelOpt = None,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 0.95,
    seed: SeedOpt = None,
    system: SystemOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
    ray: RayOpt = False,
    ray_workers: RayWorkersOpt = 1,
    ray_gpus_per_worker: RayGpusOpt = 0.0,
    ray_cpus_per_worker: RayCpusOpt = 1.0,
    max_image_mb: MaxImageMbOpt = None,
) -> None:
    if prompt is not None and prompt_file is not None:
        raise UsageError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        source = reading.STDIN if str(prompt_file) == reading.STDIN else prompt_file.expanduser()
        if source == reading.STDIN and reading.STDIN in inputs:
            raise UsageError("the prompt and the list of images cannot both come from stdin (-)")
        prompt = reading.read_text(source, what="prompt file").strip()
        if not prompt:
            raise UsageError(f"prompt file {reading.display_name(prompt_file)} is empty")

    def note(value: str, what: str) -> str:
        return reading.repair_with_note(value, what, lambda m: stderr.print(f"note: {m}", markup=False))

    prompt = note(prompt, "the prompt") if prompt is not None else None
    prefix, suffix = note(prefix, "--prefix"), note(suffix, "--suffix")
    system = note(system, "--system") if system is not None else None
    max_image_bytes = reading.IMAGE.bytes(max_image_mb)

    console: Console = stderr
    progress = Progress(
        TextColumn("[bold]captioning"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=quiet,
    )
    task = progress.add_task("captioning", total=None, tokens=0, model_seconds=0.0)
    started_bar = False

    def on_progress(completed: int, total: int) -> None:
        nonlocal started_bar
        if not started_bar:
            started_bar = True
            progress.start()
            progress.reset(task, total=total)  # the clock starts now, not during the model load
        progress.update(task, completed=completed, total=total)

    def on_record(record: captioning.CaptionRecord) -> None:
        fields = progress.tasks[task].fields
        progress.update(
            task, tokens=fields["tokens"] + record.tokens, model_seconds=fields["model_seconds"] + record.seconds
        )
        if record.error:
            console.print(f"[red]failed:[/] {record.error}", markup=True, highlight=False)

    def on_note(message: str) -> None:
        console.print(f"note: {message}", markup=False, highlight=False)

    def on_parallel(n: int) -> None:
        if not quiet:
            how = "one image at a time" if n == 1 else f"{n} images at a time"
            console.print(f"note: captioning {how} (--parallel {n})", markup=False, highlight=False)

    run: Callable[..., captioning.CaptionSummary] = captioning.caption
    extra: dict[str, Any] = {}
    if ray:
        from llava_cli.captioning import ray_data

        run = ray_data.caption_ray
        extra["ray"] = ray_data.RayOptions(
            workers=ray_workers, gpus_per_worker=ray_gpus_per_worker, cpus_per_worker=ray_cpus_per_worker
        )
    elif (ray_workers, ray_gpus_per_worker, ray_cpus_per_worker) != (1, 0.0, 1.0):
        raise UsageError("--ray-workers, --ray-gpus-per-worker and --ray-cpus-per-worker need --ray")

    t0 = time.monotonic()
    try:
        summary = run(
            inputs,
            model=model,
            mmproj=mmproj,
            bits=bits,
            ctx=ctx,
            threads=threads,
            n_gpu_layers=n_gpu_layers,
            mmproj_offload=not no_mmproj_offload,
            image_fit=image_fit,
            parallel=parallel,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            system=system,
            verbose=verbose,
            on_note=on_note,
            on_parallel=on_parallel,
            out=out,
            sidecar=sidecar,
            format=format,
            recursive=recursive,
            overwrite=overwrite,
            prompt=prompt if prompt is not None else captioning.DEFAULT_PROMPT,
            prefix=prefix,
            suffix=suffix,
            shard=shard,
            max_image_bytes=max_image_bytes,
            on_progress=on_progress,
            on_record=on_record,
            **extra,
        )
    finally:
        if started_bar:
            progress.stop()
    summary.seconds = summary.seconds or time.monotonic() - t0
    style = "red" if summary.failed or summary.interrupted else "green"
    console.print(f"[{style}]{_summary_line(summary)}[/]", markup=True, highlight=False)
    # Exceptions, not typer.Exit or KeyboardInterrupt: in main()'s non-standalone mode Typer turns those into a
    # return value that is not used as the exit code; our errors go through the boundary with their exit codes.
    if summary.interrupted:
        raise captioning.BatchInterrupted("interrupted", hint="run the same command again to caption the rest")
    if summary.failed:
        where = f"the error field of their records in {summary.out}" if summary.out else "the messages above"
        raise captioning.SomeImagesFailed(
            f"{summary.failed} of {summary.done + summary.failed} images could not be captioned",
            hint=f"see {where}; fix or remove them and run the same command again to retry only those",
        )


def register(app: typer.Typer) -> None:
    """Add `llava caption` to the app."""
    app.command("caption", help=HELP, no_args_is_help=True)(caption_command)
