"""Downloads from the Hugging Face Hub into its standard cache (shared with transformers, llama-cpp-python...).

Everything goes through huggingface_hub (``hf_hub_download``): the cache layout (``models--owner--name/blobs``,
``snapshots/<commit>``, ``refs/main``), ETags, redirects and the Range-resume of a dropped connection are its own.
What this module adds:

* the environment is read **at call time** (``HF_HUB_OFFLINE``, ``HF_ENDPOINT``, ``HF_HUB_CACHE``/``HF_HOME``)
  and passed explicitly, because huggingface_hub snapshots those variables once, at import;
* one progress callback ``on_progress(completed, total)`` over all the files of a request;
* every failure becomes a one-line `HubError` saying what is missing and the command that fixes it.

Resuming: a transfer whose connection drops is resumed in-process by huggingface_hub's ``http_get`` (a ``Range``
request for the rest, up to 5 times without progress). Across processes (Ctrl-C, a crash, a reboot) huggingface_hub
>= 1.0 starts over, so `_fetch_blob` keeps a persistent partial file and resumes it on the next run; files already
complete are never fetched again.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import errors as hf_errors

from llava_cli.catalog import HubFile
from llava_cli.errors import HubError, LlavaError, OutputError

ProgressFn = Callable[[int, int], None]

DEFAULT_ENDPOINT = "https://huggingface.co"
# What a checkpoint download fetches: config, weights, tokenizer and image preprocessor (no .bin/.pt duplicates).
CHECKPOINT_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "*.txt")


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set to a true value, read now, not at import."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def cache_dir() -> Path:
    """The hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def cached_file(file: HubFile) -> Path | None:
    """The file's path in the hub cache if it is there (no network), else None."""
    found = huggingface_hub.try_to_load_from_cache(
        file.repo, file.file, cache_dir=str(cache_dir()), revision=file.revision
    )
    return Path(found) if isinstance(found, str) else None


@dataclass
class _Tally:
    """Cumulative progress over several files, fed by huggingface_hub's per-file progress bar."""

    on_progress: ProgressFn | None
    total: int = 0
    done: int = 0  # bytes of the files finished, plus the current file's progress

    def add(self, n: int) -> None:
        self.done += n
        if self.on_progress is not None:
            self.on_progress(self.done, max(self.total, self.done))

    def bar_class(self) -> type:
        tally = self

        class _Bar:
            """The minimal tqdm interface huggingface_hub's http_get uses (a non-tqdm class gets plain kwargs)."""

            def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **kwargs: Any) -> None:
                if initial:
                    tally.add(initial)

            def __enter__(self) -> _Bar:
                return self

            def __exit__(self, *exc: object) -> None:
                pass

            def update(self, n: float | None = 1) -> None:
                tally.add(int(n or 0))

            def update_transfer(self, n: float | None = 1) -> None:
                pass

            def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
                pass

            def set_transfer_postfix_str(self, *args: Any, **kwargs: Any) -> None:
                pass

            def refresh(self) -> None:
                pass

            def close(self) -> None:
                pass

        return _Bar


def _transport_error_types() -> tuple[type[BaseException], ...]:
    """The HTTP client's transport errors (huggingface_hub 2.x uses httpx2, 1.x httpx)."""
    types: list[type[BaseException]] = []
    for name in ("httpx2", "httpx"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        types.append(module.TransportError)
    return tuple(types)


def hub_error(exc: BaseException, what: str, fix: str) -> LlavaError:
    """Turn a huggingface_hub / network exception while getting `what` into a one-line HubError.

    `fix` is the command that would get the file once the problem is gone (e.g. ``llava pull llava-1.5-7b``).
    """
    where = endpoint()
    if isinstance(exc, hf_errors.OfflineModeIsEnabled) or (
        isinstance(exc, hf_errors.LocalEntryNotFoundError) and is_offline()
    ):
        return HubError(
            f"{what} is not in the hub cache ({cache_dir()}) and HF_HUB_OFFLINE=1 forbids downloading it",
            hint=f"when online, run: HF_HUB_OFFLINE=0 {fix}",
        )
    if isinstance(exc, hf_errors.GatedRepoError):
        return HubError(
            f"{what}: the repo is gated on {where}", hint="accept its terms on the website, `hf auth login`"
        )
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return HubError(
            f"{what}: repository not found on {where} (or private)",
            hint="check the repo id in the catalog (`llava models`), or log in with `hf auth login`",
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return HubError(f"{what}: revision not found on {where}", hint="check the revision in the catalog entry")
    if isinstance(exc, hf_errors.RemoteEntryNotFoundError):
        return HubError(f"{what}: file not found on {where}", hint="check the file name in the catalog entry")
    if isinstance(exc, (hf_errors.LocalEntryNotFoundError, *_transport_error_types())):
        return HubError(
            f"cannot reach the model hub at {where} to download {what}, and it is not in the hub cache",
            hint=f"check the network (and HF_ENDPOINT), then run: {fix}",
        )
    if isinstance(exc, hf_errors.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return HubError(f"the model hub at {where} answered HTTP {status} for {what}", hint=f"try again later: {fix}")
    if isinstance(exc, OSError) and getattr(exc, "errno", None) == 28:
        return OutputError(f"disk full while downloading {what} into {cache_dir()}", hint="free some space")
    return HubError(f"download of {what} failed: {exc}", hint=f"run the same command again: {fix}")


def _describe(file: HubFile) -> str:
    return f"{file.repo}/{file.file}"


def download_files(
    files: Sequence[HubFile],
    *,
    fix: str,
    on_progress: ProgressFn | None = None,
    download: bool = True,
) -> list[Path]:
    """Make sure each file is in the hub cache (downloading what is missing) and return their local paths.

    ``download=False`` (or ``HF_HUB_OFFLINE=1``) only looks in the cache. `fix` is the command quoted in errors.
    """
    offline = is_offline() or not download
    paths: list[Path | None] = [cached_file(f) if offline else None for f in files]
    if offline:
        for file, path in zip(files, paths, strict=True):
            if path is None:
                if not download and not is_offline():
                    raise HubError(f"{_describe(file)} is not downloaded yet", hint=f"run: {fix}")
                raise hub_error(hf_errors.OfflineModeIsEnabled("offline"), _describe(file), fix)
        return [p for p in paths if p is not None]

    tally = _Tally(on_progress)
    cache = str(cache_dir())
    where = endpoint()
    # Metadata first (one HEAD per file not yet cached) so the progress total covers every file from the start.
    metas: list[Any] = []
    for file in files:
        if cached_file(file) is not None:
            metas.append(None)
            continue
        try:
            metas.append(
                huggingface_hub.get_hf_file_metadata(
                    huggingface_hub.hf_hub_url(file.repo, file.file, revision=file.revision, endpoint=where),
                    endpoint=where,
                )
            )
        except Exception as exc:
            if isinstance(exc, (hf_errors.OfflineModeIsEnabled, hf_errors.HfHubHTTPError, *_transport_error_types())):
                raise hub_error(exc, _describe(file), fix) from exc
            raise
    tally.total = sum((m.size or 0) for m in metas if m is not None)

    out: list[Path] = []
    for file, meta in zip(files, metas, strict=True):
        start = tally.done
        try:
            if meta is not None:
                _fetch_blob(file, meta, Path(cache), where, tally)
            local = huggingface_hub.hf_hub_download(
                file.repo,
                file.file,
                revision=file.revision,
                cache_dir=cache,
                endpoint=where,
                tqdm_class=tally.bar_class(),
            )
        except HubError:
            raise
        except (hf_errors.EntryNotFoundError, hf_errors.HfHubHTTPError, hf_errors.OfflineModeIsEnabled) as exc:
            raise hub_error(exc, _describe(file), fix) from exc
        except OSError as exc:  # consistency check after a truncated body, disk full...
            raise hub_error(exc, _describe(file), fix) from exc
        except Exception as exc:
            if isinstance(exc, _transport_error_types()):
                raise hub_error(exc, _describe(file), fix) from exc
            raise
        # Settle the tally on the file's real size (a cached file reports nothing; a retried range may overlap).
        tally.done = start + ((meta.size or 0) if meta is not None else 0)
        tally.add(0)
        out.append(Path(local))
    return out


def partial_dir() -> Path:
    """Where interrupted downloads wait to be resumed (inside the hub cache: same disk as the blobs)."""
    return cache_dir() / ".llava-partial"


def _fetch_blob(file: HubFile, meta: Any, cache: Path, where: str, tally: _Tally) -> None:
    """Download a file's blob into the hub cache through a *persistent* partial file, so that a download
    interrupted by Ctrl-C, a crash or a lost connection resumes where it stopped on the next run.

    huggingface_hub (>= 1.0) deletes its temporary file on any failure and starts over; for multi-GB GGUFs we keep
    ``<cache>/.llava-partial/<repo>--<etag>`` instead, resume it with a ``Range`` request (huggingface_hub's own
    ``http_get``), check the SHA-256 the Hub gives as an LFS file's ETag, and move it to ``blobs/<etag>``;
    ``hf_hub_download`` then only adds the snapshot symlink and ref. Xet-stored files are left to huggingface_hub
    (its Xet client has its own chunk cache).
    """
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    if meta.xet_file_data is not None or not meta.etag or not meta.size:
        return
    storage = cache / ("models--" + file.repo.replace("/", "--"))
    blob = storage / "blobs" / meta.etag
    if blob.exists():
        return
    partial_dir().mkdir(parents=True, exist_ok=True)
    partial = partial_dir() / f"{storage.name}--{meta.etag}"
    have = partial.stat().st_size if partial.exists() else 0
    if have > meta.size:  # not ours to resume
        partial.unlink()
        have = 0
    same_origin = meta.location.startswith(where + "/")
    # The token may only go to the Hub itself, never to the CDN a redirect points at.
    headers = build_hf_headers() if same_origin else {}
    with open(partial, "ab") as fh:
        http_get(
            meta.location,
            fh,
            resume_size=have,
            headers=headers,
            expected_size=meta.size,
            displayed_filename=file.file,
            tqdm_class=tally.bar_class(),
        )
    if re.fullmatch(r"[0-9a-f]{64}", meta.etag):  # an LFS file: its ETag is the content's SHA-256
        digest = hashlib.sha256()
        with open(partial, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
        if digest.hexdigest() != meta.etag:
            partial.unlink()
            raise HubError(
                f"{_describe(file)} was corrupt after download (SHA-256 mismatch); the partial file was removed",
                hint="run the same command again",
            )
    blob.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, blob)


def download_checkpoint(
    repo: str,
    *,
    fix: str,
    revision: str = "main",
    on_progress: ProgressFn | None = None,
    download: bool = True,
) -> Path:
    """Fetch a llava-hf checkpoint (config, safetensors, tokenizer) into the hub cache; return its snapshot dir."""
    where = endpoint()
    cache = str(cache_dir())
    what = f"checkpoint {repo}"
    if is_offline() or not download:
        try:
            return Path(
                huggingface_hub.snapshot_download(
                    repo,
                    revision=revision,
                    cache_dir=cache,
                    allow_patterns=list(CHECKPOINT_PATTERNS),
                    local_files_only=True,
                )
            )
        except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, FileNotFoundError) as exc:
            if not download and not is_offline():
                raise HubError(f"{what} is not downloaded yet", hint=f"run: {fix}") from exc
            raise hub_error(hf_errors.OfflineModeIsEnabled("offline"), what, fix) from exc
    try:
        info = huggingface_hub.HfApi(endpoint=where).model_info(repo, revision=revision)
    except Exception as exc:
        if isinstance(exc, (hf_errors.HfHubHTTPError, hf_errors.OfflineModeIsEnabled, *_transport_error_types())):
            raise hub_error(exc, what, fix) from exc
        raise
    names = sorted(s.rfilename for s in info.siblings or [] if _wanted(s.rfilename))
    if "config.json" not in names:
        raise HubError(f"{what} has no config.json on {where}: not a Hugging Face checkpoint")
    # By revision (not the commit just listed) so huggingface_hub records refs/<revision> for offline use later.
    files = [HubFile(repo, name, revision) for name in names]
    paths = download_files(files, fix=fix, on_progress=on_progress)
    return paths[0].parent  # the snapshot dir: only top-level files are fetched


def _wanted(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return "/" not in name and any(fnmatch.fnmatch(base, p) for p in CHECKPOINT_PATTERNS)
