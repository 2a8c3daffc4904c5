"""Prompt templates: ``{filename}``, ``{stem}``, ``{parent}`` and ``{existing}`` (the image's old sidecar caption),
checked once before the batch starts and rendered verbatim per image."""

from __future__ import annotations

import os
import string
from dataclasses import dataclass
from pathlib import Path

from llava_cli import reading
from llava_cli.captioning.records import sidecar_path
from llava_cli.errors import InputNotFoundError, UsageError

TEMPLATE_FIELDS = ("filename", "stem", "parent", "existing")


@dataclass(frozen=True)
class Template:
    """A prompt (or prefix/suffix) with ``{filename}``, ``{stem}``, ``{parent}``, ``{existing}`` fields."""

    source: str
    parts: tuple[tuple[str, str | None], ...]

    @property
    def fields(self) -> set[str]:
        return {name for _, name in self.parts if name}

    def render(self, values: dict[str, str]) -> str:
        # Values are inserted verbatim: braces in a file name or an existing caption are never re-interpreted.
        return "".join(literal + (values[name] if name else "") for literal, name in self.parts)


def parse_template(text: str, *, what: str = "--prompt") -> Template:
    """Check `text` for unknown fields once, before the batch starts, so a typo fails fast."""
    known = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
    text = reading.repair_text(text)[0]  # the text policy; the CLI has already said so in a note
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise UsageError(
            f"bad {what} template: {exc}", hint=f"fields are {known}; write {{{{ and }}}} for literal braces"
        ) from exc
    parts = []
    for literal, name, spec, conversion in parsed:
        if name is not None and (name not in TEMPLATE_FIELDS or spec or conversion):
            raise UsageError(
                f"unknown field {{{name}}} in {what}",
                hint=f"fields are {known}; write {{{{ and }}}} for literal braces",
            )
        parts.append((literal, name or None))
    return Template(text, tuple(parts))


def read_existing(image: str | Path) -> str:
    """The text of the image's existing sidecar, or "" if there is none.

    Read like any input (llava_cli/reading.py): a sidecar that is a FIFO or device, or longer than the prompt
    limit, is an `LlavaError` (that image's error record); bytes that are not UTF-8 become U+FFFD."""
    target = sidecar_path(image)
    if not os.path.lexists(target):
        return ""
    try:
        data = reading.read_file(target, reading.TEXT, what="a caption file", error=UsageError)
    except InputNotFoundError:  # a dangling symlink, or removed since
        return ""
    return reading.decode_text(data)[0].strip()


def template_values(image: str, existing: str = "") -> dict[str, str]:
    """The fields of one image. Names are shown as people read them (`reading.display_name`: undecodable bytes as
    ``\\xNN``), so a prompt is always valid text, whatever bytes the file name holds."""
    p = Path(image)
    show = reading.display_name
    return {"filename": show(p.name), "stem": show(p.stem), "parent": show(p.parent.name), "existing": existing}
