"""Prompt templates: ``{filename}``, ``{stem}``, ``{parent}`` and ``{existing}`` (the image's old sidecar caption),
checked once before the batch starts and rendered verbatim per image."""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from llava_cli.captioning.records import sidecar_path
from llava_cli.errors import UsageError

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
    """The text of the image's existing sidecar, or "" if there is none."""
    try:
        return sidecar_path(image).read_text(encoding="utf-8", errors="replace").strip()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return ""


def template_values(image: str, existing: str = "") -> dict[str, str]:
    p = Path(image)
    return {"filename": p.name, "stem": p.stem, "parent": p.parent.name, "existing": existing}
