"""The whole loop on the real engine: chat -> rate -> learner cycle (real training) -> hot-swap -> chat.

    TUNEWHEEL_TEST_ENGINE_URL=http://127.0.0.1:8101 pytest -m slow tests/e2e/test_loop.py

A deliberately tiny cycle (16 seed conversations, 2 optimizer steps, rank 8, one held-out
story from the other generator) so that it takes a minute or two on a CPU: what it checks
is that every stage hands the next one something real. The gate is opened wide (any F1 is
enough) because two steps of training are not expected to beat the base model; the gate's
own logic is tested in tests/learn/test_gate.py.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from sqlmodel import Session, select

from feedback.synth import synth_coqa


@pytest.mark.slow
@pytest.mark.engine
def test_one_real_cycle_promotes_an_adapter_that_then_answers(make_gateway, engine_url, model_dir, tmp_path):
    from learn.cycle import LearnerCycle, run_cycle

    seed, heldout = tmp_path / "seed.json", tmp_path / "heldout.json"
    seed.write_text(json.dumps(synth_coqa(stories=16, seed=0, variant="A")))
    heldout.write_text(json.dumps(synth_coqa(stories=1, seed=1, variant="B")))
    gw = make_gateway(
        engine={"model": str(model_dir)},
        learn={"seed_files": [str(seed)], "heldout_file": str(heldout), "eval_max_tokens": 16,
               "train": {"max_steps": 2, "rank": 8, "alpha": 16, "max_length": 256, "batch_size": 4},
               "gate": {"min_f1_gain": -1.0, "max_em_drop": 1.0}},
    )
    client = gw.client()
    messages = [{"role": "system", "content": "Read the story and extract answers for the questions.\nStory: Ann has a red kite."},
                {"role": "user", "content": "What colour is Ann's kite?"}]
    reply = client.chat.completions.create(model="chat", messages=messages, max_tokens=8, temperature=0)
    gw.writer.flush()
    assert httpx.post(f"{gw.url}/v1/feedback", json={"completion_id": reply.id, "rating": "up"}, trust_env=False).status_code == 201

    report = run_cycle(gw.settings, gateway_url=gw.url)
    try:
        assert report.outcome == "promoted", report.text()
        assert report.train_examples >= 16 and report.heldout_items == 1
        assert report.champion == "base" and report.champion_scores["n_turns"] == report.candidate_scores["n_turns"] > 0
        version = gw.registry.get(report.version)
        assert version.state == "promoted" and (gw.settings.adapters_dir / report.version / "adapter_config.json").is_file()
        assert version.gate["promote"] is True and version.metrics["heldout"]["candidate"]["f1"] == report.candidate_scores["f1"]
        with Session(gw.db) as s:
            [row] = s.exec(select(LearnerCycle)).all()
        assert row.outcome == "promoted" and row.version == report.version

        deadline = time.monotonic() + 120  # the gateway's reconciler picks the promotion up from the registry
        while gw.router.table.resolve("chat") != report.version and time.monotonic() < deadline:
            time.sleep(0.5)
        raw = client.chat.completions.with_raw_response.create(model="chat", messages=messages, max_tokens=8, temperature=0)
        assert raw.headers["x-tunewheel-adapter"] == report.version
    finally:
        if report.version:
            httpx.post(f"{engine_url}/v1/unload_lora_adapter", json={"lora_name": report.version}, trust_env=False)
