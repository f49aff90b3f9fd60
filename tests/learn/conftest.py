"""Fixtures of the learn tests: `tiny_model`, a 2-layer random Llama with the SmolLM2 tokenizer (seconds to train)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.learn.chats import save_tiny_llama


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, model_dir) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), model_dir)


@pytest.fixture
def machine_clock(monkeypatch) -> dict:
    """learn/cores.py's view of the machine, set by hand: {"t": monotonic s, "busy": CPU-s all cores were busy,
    "own": this process's CPU-s}."""
    from learn import cores

    clock = {"t": 0.0, "busy": 0.0, "own": 0.0}
    monkeypatch.setattr(cores.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(cores.time, "process_time", lambda: clock["own"])
    monkeypatch.setattr(cores, "machine_busy_s", lambda: clock["busy"])
    return clock
