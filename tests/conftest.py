"""Shared test setup: every test gets its own user dir and hub cache, never the real ones in ~."""

from __future__ import annotations

import pytest

# Session-scoped synthetic checkpoints and the GGUF files converted from them.
pytest_plugins = ["tests.model_fixtures"]


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path_factory.mktemp("llava_home")
    monkeypatch.setenv("LLAVA_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hf" / "hub"))
    # No test reaches the real hub: hub tests point HF_ENDPOINT at a local server themselves.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LLAVA_DEBUG", raising=False)
