"""engine.prompt_lookup: speculative decoding by prompt lookup (vLLM's ngram proposer) for rewrites that copy their prompt.

    pytest tests/serve/test_prompt_lookup.py              # fast: the engine's command line
    pytest tests/serve/test_prompt_lookup.py -m engine    # also a real vLLM child with it on
"""

from __future__ import annotations

import json

import httpx
import pytest

from serve.engine import EngineManager
from serve.engine_child import engine_command, free_port
from serve.settings import ConfigError, load_settings
from tests.fixtures.engine import engine_settings


def test_prompt_lookup_turns_on_vllm_ngram_speculation(tmp_path):
    assert "--speculative-config" not in engine_command(load_settings(None, data_dir=tmp_path), "cpu")  # off by default
    cmd = engine_command(load_settings(None, data_dir=tmp_path, engine={"prompt_lookup": 3}), "cpu")
    assert json.loads(cmd[cmd.index("--speculative-config") + 1]) == {
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 4, "prompt_lookup_max": 4}
    with pytest.raises(ConfigError, match="engine.prompt_lookup"):
        load_settings(None, engine={"prompt_lookup": -1})


@pytest.mark.engine
async def test_prompt_lookup_engine_accepts_drafts_and_answers_as_the_plain_engine(model_dir, engine_url):
    """A real vLLM child with engine.prompt_lookup: asked to repeat a text (as a restyler copies the answer it
    rewrites), it gives the same greedy answer as the session's plain engine, and its own counters show that
    drafted tokens were accepted, so speculation ran."""
    text = ("Ada lived near the harbour. In 1921 Ada bought 12 boats, and every morning Ada walked to the harbour "
            "to look after them. Neighbours said the boats were the finest around.")
    body = {"model": "base", "temperature": 0, "max_tokens": 48,
            "messages": [{"role": "user", "content": f"Repeat this text word for word:\n\n{text}"}]}
    manager = EngineManager(engine_settings(port=free_port(), prompt_lookup=4))
    await manager.start()
    try:
        async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
            plain = (await client.post(f"{engine_url}/v1/chat/completions", json=body)).json()
            drafted = (await client.post(f"{manager.url}/v1/chat/completions", json=body)).json()
            metrics = (await client.get(f"{manager.url}/metrics")).text
    finally:
        await manager.stop()
    assert drafted["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    accepted = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                if line.startswith("vllm:spec_decode_num_accepted_tokens_total")]
    assert accepted and sum(accepted) > 0, "the engine accepted no drafted token"
