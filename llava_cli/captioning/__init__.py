"""Batch captioning: find images, split them into shards, caption them with a model loaded once, and write one
record per image to a resumable JSONL/CSV log and/or ``.txt`` sidecars.

The modules, in the order data flows: `inputs` (discovery, shards) → `templates` (the prompt per image) → `batch`
(the loop: prefetch, Ctrl-C, summary) → `records` (the journal, sidecars) under `lock` (one writer per log);
`model` plugs the real engine into the loop. This package's namespace is the public Python API::

    from llava_cli.captioning import caption
    summary = caption(["photos/"], model="llava-1.5-7b", recursive=True, out="captions.jsonl")
"""

from llava_cli.captioning.batch import (
    DEFAULT_OUT,
    DEFAULT_PREFETCH,
    DEFAULT_PROMPT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    BatchInterrupted,
    Captioner,
    CaptionSummary,
    SomeImagesFailed,
    caption_batch,
    resolve_outputs,
)
from llava_cli.captioning.inputs import discover_images, parse_shard, select_shard, shard_index
from llava_cli.captioning.lock import output_lock
from llava_cli.captioning.model import DEFAULT_PARALLEL, EngineCaptioner, RuntimeCaptioner, caption
from llava_cli.captioning.records import COLUMNS, FORMATS, CaptionRecord, read_log, sidecar_path
from llava_cli.captioning.templates import TEMPLATE_FIELDS, parse_template, template_values

__all__ = [
    "COLUMNS",
    "DEFAULT_OUT",
    "DEFAULT_PARALLEL",
    "DEFAULT_PREFETCH",
    "DEFAULT_PROMPT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_SOME_FAILED",
    "FORMATS",
    "TEMPLATE_FIELDS",
    "BatchInterrupted",
    "CaptionRecord",
    "CaptionSummary",
    "Captioner",
    "EngineCaptioner",
    "RuntimeCaptioner",
    "SomeImagesFailed",
    "caption",
    "caption_batch",
    "discover_images",
    "output_lock",
    "parse_shard",
    "parse_template",
    "read_log",
    "resolve_outputs",
    "select_shard",
    "shard_index",
    "sidecar_path",
    "template_values",
]
