"""The exceptions llava-cli raises on purpose.

Every error a user can cause (a bad file, a missing model, a full disk) is a `LlavaError`. The CLI boundary
(`llava_cli.cli.app.main`) turns it into one line on stderr plus its hint, with a non-zero exit code; the
traceback only shows with ``LLAVA_DEBUG=1``. Errors also subclass the matching builtin so Python callers can
catch them the usual way (``except FileNotFoundError``).
"""

from __future__ import annotations


class LlavaError(Exception):
    """Base class. ``hint`` says what to do about it; ``exit_code`` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(LlavaError, ValueError):
    """A flag or argument has a value we cannot use (unknown --bits, bad --shard...)."""

    exit_code = 2


class InputNotFoundError(LlavaError, FileNotFoundError):
    """A file or directory the user named does not exist."""


class CheckpointError(LlavaError, ValueError):
    """A Hugging Face checkpoint directory is missing pieces, is corrupt, or is of an unsupported kind."""


class ModelFileError(LlavaError, ValueError):
    """A GGUF file is truncated, corrupt, of the wrong kind, or does not match its partner."""


class ImageError(LlavaError, ValueError):
    """An image cannot be read or is not usable (corrupt, truncated, too large)."""


class ContextOverflowError(LlavaError, ValueError):
    """The prompt (text + image tokens) does not fit in the context window."""


class OutputError(LlavaError, OSError):
    """An output cannot be written (unwritable directory, disk full)."""


class HubError(LlavaError, ConnectionError):
    """The model hub cannot be reached, or a file is not on it, or we are offline."""


class GPUError(LlavaError, RuntimeError):
    """A GPU was asked for and cannot be used."""
