"""Where llava-cli keeps its own files (converted models, the user catalog)."""

from __future__ import annotations

import os
from pathlib import Path


def user_dir() -> Path:
    """The user directory: ``$LLAVA_HOME`` if set, else ``~/.local/share/llava-cli``. Created on demand."""
    env = os.environ.get("LLAVA_HOME")
    path = Path(env).expanduser() if env else Path.home() / ".local" / "share" / "llava-cli"
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    """Where models converted or built locally (checkpoints converted on the fly, tiny-random) live."""
    path = user_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
