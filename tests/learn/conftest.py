"""Fixtures of the learn tests: `tiny_model`, a 2-layer random Llama with the SmolLM2 tokenizer (seconds to train)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.learn.chats import save_tiny_llama


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, model_dir) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), model_dir)
