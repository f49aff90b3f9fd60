"""The promotion test, on the real vLLM engine through a real gateway.

    PYTHONPATH=$PWD flock /tmp/tunewheel-engine.lock pytest -m engine tests/serve/test_promotion_engine.py

A broken adapter (weights that are not a safetensors file) promoted through each of the three
paths - the admin route, `tunewheel adapters promote` (another "process": the CLI hands the load
to the gateway and waits), and a learner cycle (training faked, the rest real) - leaves
production on the last good version: the registry's prod pointer does not move, `chat` keeps
being answered by the good version, and every fallback is counted in /metrics. An adapter whose
LoRA rank the engine cannot hold is refused before anything is loaded. A rollback an operator
makes while the learner trains is not overridden by the cycle. The same logic with the engine
faked: tests/learn/test_promotion.py, tests/serve/test_reconcile.py,
tests/serve/gateway/test_serving_faults.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from learn.cycle import run_cycle
from learn.evaluate import EvalReport
from learn.train import TrainResult
from serve.gateway.app import converger
from serve.settings import hash_key

pytestmark = pytest.mark.engine

ADMIN = "promotion-test-admin"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def good_lora(model_dir, tmp_path_factory) -> Path:
    """A real (randomly initialised) rank-8 peft LoRA for the base model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("lora") / "good"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])).save_pretrained(str(out))
    return out


def broken_copy(good: Path, out: Path) -> Path:
    shutil.copytree(good, out)
    (out / "adapter_model.safetensors").write_bytes(b"these are not the weights you are looking for")
    return out


def register(gw, folder: Path) -> str:
    name = gw.registry.new_version_name("chat")
    shutil.copytree(folder, gw.settings.adapters_dir / name)
    gw.registry.register(name, kind="chat", path=gw.settings.adapters_dir / name)
    return name


def served_by(gw) -> str:
    r = httpx.post(f"{gw.url}/v1/chat/completions", headers=HEADERS, timeout=300, trust_env=False,
                   json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    return r.headers["x-tunewheel-adapter"]


def fallbacks(gw) -> float:
    text = httpx.get(f"{gw.url}/metrics", headers=HEADERS, trust_env=False).text
    line = next(line for line in text.splitlines() if line.startswith('tunewheel_promotion_fallbacks_total{kind="chat"}'))
    return float(line.split()[-1])


@pytest.fixture
def gw(make_gateway, model_dir, tmp_path):
    seeds = tmp_path / "seed.jsonl"
    seeds.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Colour of kite {i}?"},
                                                      {"role": "assistant", "content": "red"}]}) + "\n" for i in range(12)))
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"id": "h1", "source": "synth", "story": "Bo has a cat.",
                                   "turns": [{"question": "Who has a cat?", "answers": ["Bo"]}]}) + "\n")
    gw = make_gateway(data_dir=tmp_path / "data", serve={"admin_keys": [hash_key(ADMIN)]},
                      engine={"model": str(model_dir)}, learn={"seed_files": [str(seeds)], "heldout_file": str(heldout),
                                                               "promotion_wait_s": 60})
    yield gw
    models = httpx.get(f"{gw.settings.engine.url}/v1/models", trust_env=False).json()["data"]
    for m in models:  # leave the shared engine as we found it
        if m["id"].startswith("chat-v") and str(gw.settings.data_dir) in (m.get("root") or ""):
            httpx.post(f"{gw.settings.engine.url}/v1/unload_lora_adapter", json={"lora_name": m["id"]}, trust_env=False)


def learner(gw, train, **kw):
    """A learner cycle in this process: real curation, registry and promotion; training and scores faked."""
    def better(data, *, model, **_):
        return EvalReport(model=model, n_turns=len(data), em=0.9 if model.endswith(candidate[0]) else 0.1,
                          f1=0.9 if model.endswith(candidate[0]) else 0.1)

    candidate = []

    def trained(config, *, base_model, out_dir, timeout=None, **data):  # data: the stage files, stages, start_adapter
        candidate.append(Path(out_dir).name)
        train(Path(out_dir))
        return TrainResult(out_dir=Path(out_dir), metrics={"steps": 1, "duration_s": 0.1})

    return run_cycle(gw.settings.learn, db=gw.db, dirs=gw.settings.learn_dirs, base_model=gw.settings.base_model_path(),
                     gateway_url=gw.url, train=trained, evaluate=better, **kw)


def test_a_broken_adapter_through_each_path_leaves_the_last_good_version_serving(gw, good_lora, tmp_path, monkeypatch):
    from serve.cli import app

    good = register(gw, good_lora)
    admin = httpx.Client(base_url=gw.url, headers=HEADERS, timeout=300, trust_env=False)
    assert admin.post(f"/admin/adapters/{good}/promote").status_code == 200
    assert served_by(gw) == good and fallbacks(gw) == 0

    # 1. the admin route: load refused by the engine -> 409, prod unchanged
    bad = register(gw, broken_copy(good_lora, tmp_path / "bad-admin"))
    r = admin.post(f"/admin/adapters/{bad}/promote")
    assert r.status_code == 409 and f"production stays on {good}" in r.text, r.text
    assert gw.registry.prod().name == good and served_by(gw) == good and fallbacks(gw) == 1

    # 2. the CLI: the gateway's reconciler loads it, the engine refuses, the command says so
    monkeypatch.setenv("TUNEWHEEL_DATA_DIR", str(gw.settings.data_dir))
    bad = register(gw, broken_copy(good_lora, tmp_path / "bad-cli"))
    result = CliRunner().invoke(app, ["adapters", "promote", bad, "--wait", "60"])
    assert result.exit_code == 1 and f"production stays on {good}" in result.output, result.output
    assert gw.registry.prod().name == good and served_by(gw) == good and fallbacks(gw) == 2

    # ... and a rank the engine cannot hold is refused before anything is loaded
    wide = tmp_path / "wide"
    shutil.copytree(good_lora, wide)
    config = json.loads((wide / "adapter_config.json").read_text())
    (wide / "adapter_config.json").write_text(json.dumps({**config, "r": 4 * gw.settings.lora_capacity}))
    wide_name = register(gw, wide)
    result = CliRunner().invoke(app, ["adapters", "promote", wide_name])
    assert result.exit_code == 1 and f"the engine holds at most rank {gw.settings.lora_capacity}" in result.output

    # 3. the learner: its candidate passes the gate, the engine refuses it, the cycle fails, prod stays
    cycle = learner(gw, lambda out: broken_copy(good_lora, out), converge=converger(gw.app))
    assert cycle.outcome == "failed" and f"production stays on {good}" in cycle.error, cycle.text()
    assert gw.registry.prod().name == good and gw.registry.get(good).state == "promoted"
    assert served_by(gw) == good and fallbacks(gw) == 3
    admin.close()


def test_a_rollback_made_while_the_learner_trains_is_not_overridden(gw, good_lora):
    v1, v2 = register(gw, good_lora), register(gw, good_lora)
    admin = httpx.Client(base_url=gw.url, headers=HEADERS, timeout=300, trust_env=False)
    for v in (v1, v2):
        assert admin.post(f"/admin/adapters/{v}/promote").status_code == 200

    def train_while_an_operator_rolls_back(out: Path) -> None:
        shutil.copytree(good_lora, out)
        assert admin.post("/admin/adapters/rollback").json()["prod"] == v1

    cycle = learner(gw, train_while_an_operator_rolls_back, converge=converger(gw.app))
    assert cycle.champion == v2 and cycle.outcome == "rejected", cycle.text()
    assert f"production of chat is {v1}, not {v2}" in cycle.message
    assert gw.registry.prod().name == v1 and gw.registry.get(cycle.version).state == "rejected"
    assert served_by(gw) == v1
    admin.close()
