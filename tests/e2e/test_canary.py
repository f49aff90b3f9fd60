"""The live canary and probation on the real engine, with simulated users who dislike a pirate style.

    TUNEWHEEL_TEST_ENGINE_URL=http://127.0.0.1:8101 pytest -m slow tests/e2e/test_canary.py

Two real adapters of SmolLM2: `pirate`, trained here (a few dozen steps) to answer every question
"Arr matey!", which the simulated users always rate down, and `plain`, a fresh LoRA that answers
as the base model does, which they rate up 85% of the time (seeded). Users chat through the
gateway from 8 threads, each conversation new, read `x-tunewheel-adapter` and rate through
`POST /v1/feedback`, while the learner's live check (learn/live.py, as its scheduler runs it)
runs every second. One gateway sees, in order:
  1. prod `pirate`, canary `plain` (half the conversations): users rate the canary better, so it
     is promoted through the promotion path, with its figures in the registry history;
  2. prod `plain`, canary `pirate` (a candidate that passed the offline gate, say): rated worse,
     rolled back, rejected, with its figures;
  3. `pirate` promoted directly: on probation against `plain`'s last window, its up-rate drops,
     it is rolled back without an operator, and /metrics counts the rollback with its rule.
No request fails in any of it. The decision rule itself, its error rates on simulated streams,
is tests/learn/test_canary.py and bench/canary.py; the state and figures, tests/learn/test_live.py.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import threading
import time

import httpx
import pytest
from sqlmodel import Session, select

from feedback.synth import synth_coqa
from learn import promotion
from learn.canary import CanarySettings
from learn.live import LiveTrials, start_canary
from learn.registry import AliasHistory

pytestmark = [pytest.mark.slow, pytest.mark.engine]
PIRATE = re.compile(r"\barr+\b", re.IGNORECASE)  # what the simulated users dislike
SETTINGS = CanarySettings(min_ratings=20, min_requests=20, max_ratings=2000)


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    """(pirate, plain): adapter folders. The pirate one is trained with the project's recipe."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from learn.train import TrainConfig, train_in_child

    root = tmp_path_factory.mktemp("canary-adapters")
    rows = []
    for item in synth_coqa(stories=8, seed=5, variant="A")["data"]:
        system = f"Read the story and extract answers for the questions.\nStory: {item['story'][:200]}"
        rows += [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": q["input_text"]},
                               {"role": "assistant", "content": "Arr matey!"}]} for q in item["questions"][:4]]
    (root / "pirate.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = TrainConfig(rank=8, alpha=16, learning_rate=3e-3, batch_size=4, epochs=3, max_length=384,
                         target_modules=["q_proj", "v_proj", "o_proj"])
    train_in_child(config, base_model=model_dir, out_dir=root / "pirate", train_file=root / "pirate.jsonl", stages=["sft"])
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"])).save_pretrained(str(root / "plain"))
    return root / "pirate", root / "plain"


class Users:
    """Simulated users on `threads` threads: a new conversation per request, each answer rated."""

    def __init__(self, gw, threads: int = 8):
        self.gw, self.threads, self.stop = gw, threads, threading.Event()
        self.answered: list[str] = []  # the version that answered each request
        self.started: list[float] = []  # when each answered request was sent (time.monotonic())
        self.failures: list[str] = []
        stories = synth_coqa(stories=12, seed=21, variant="B")["data"]
        # short stories: a LoRA's prefill is the slow part on CPU, and the users only need answers to rate
        self.prompts = [[{"role": "system", "content": f"Read the story and extract answers for the questions.\nStory: {s['story'][:200]}"},
                         {"role": "user", "content": q["input_text"]}] for s in stories for q in s["questions"]]
        self.workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Users:
        for w in self.workers:
            w.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for w in self.workers:
            w.join(timeout=60)

    def _run(self, i: int) -> None:
        rng = random.Random(i)
        with httpx.Client(base_url=self.gw.url, timeout=120, trust_env=False) as http:
            n = 0
            while not self.stop.is_set():
                n += 1
                messages = [*rng.choice(self.prompts)]
                messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n(user {i}, conversation {n})"}
                sent = time.monotonic()
                r = http.post("/v1/chat/completions", json={"model": "chat", "messages": messages, "max_tokens": 6, "temperature": 0})
                if r.status_code != 200:
                    self.failures.append(f"{r.status_code} {r.text[:200]}")
                    continue
                answer = r.json()["choices"][0]["message"]["content"] or ""
                self.answered.append(r.headers["x-tunewheel-adapter"])
                self.started.append(sent)
                liked = PIRATE.search(answer) is None and rng.random() < 0.85
                f = http.post("/v1/feedback", json={"completion_id": r.json()["id"], "rating": "up" if liked else "down"})
                if f.status_code != 201:
                    self.failures.append(f"feedback {f.status_code} {f.text[:200]}")


def decided(trials: LiveTrials, phase: str, version: str, timeout: float = 240.0):
    """Check every second, as the learner's scheduler does, until `phase` of `version` is decided and carried out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for outcome in trials.check():
            if outcome.phase == phase and outcome.version == version and outcome.action != "continue" and outcome.error is None:
                return outcome
        time.sleep(1.0)
    pytest.fail(f"no live decision on the {phase} of {version} within {timeout:g} s")


def serves(gw, version: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while gw.router.table.resolve("chat") != version and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gw.router.table.resolve("chat") == version


def history(gw, action: str, version: str) -> AliasHistory:
    with Session(gw.db) as s:
        return s.exec(select(AliasHistory).where(AliasHistory.action == action, AliasHistory.version == version)
                      .order_by(AliasHistory.id.desc())).first()


def test_users_promote_a_better_canary_roll_back_a_worse_one_and_probation_rolls_back_a_drop(make_gateway, model_dir, adapters):
    gw = make_gateway(engine={"model": str(model_dir)}, learn={"canary": SETTINGS.model_dump()})
    reg = gw.registry
    names = {}
    for label, source in (("pirate", adapters[0]), ("plain", adapters[1]), ("pirate2", adapters[0])):
        names[label] = reg.new_version_name("chat")
        shutil.copytree(source, gw.settings.adapters_dir / names[label])
        reg.register(names[label], kind="chat", path=gw.settings.adapters_dir / names[label])
    pirate, plain, pirate2 = names["pirate"], names["plain"], names["pirate2"]

    def promote(name, expected, detail):  # learn/live.py's live_trials(): the one path, a gateway loads it
        return promotion.promote(reg, name, expected=expected, requested_by="canary", wait_s=60, detail=detail)

    trials = LiveTrials(reg, SETTINGS, base_name=gw.settings.engine.served_name, promote=promote)
    reg.promote(pirate, expected=None)
    serves(gw, pirate)
    clock = time.monotonic()

    def lap(what: str, users: Users) -> None:  # each phase's seconds and requests, in the test log
        nonlocal clock
        print(f"{what}: {time.monotonic() - clock:.1f} s, {len(users.answered)} answered")
        clock = time.monotonic()

    # 1. a canary the users rate better is promoted
    start_canary(reg, plain, share=0.5, expected=pirate)
    with Users(gw) as users:
        outcome = decided(trials, "canary", plain)
        lap("1. canary decided", users)
        serves(gw, plain)
    lap("1. canary promoted", users)
    assert (outcome.action, outcome.rule) == ("promote", "not_worse"), outcome.reasons
    assert users.failures == [] and {pirate, plain} <= set(users.answered)
    move = history(gw, "promote", plain)
    assert move.detail["phase"] == "canary" and move.detail["requested_by"] == "canary"
    assert move.detail["statistic"]["up_rate_candidate"] > move.detail["statistic"]["up_rate_baseline"] + 0.5

    # 2. a canary the users rate worse is rolled back
    start_canary(reg, pirate2, share=0.5, expected=plain)
    with Users(gw) as users:
        outcome = decided(trials, "canary", pirate2)
        deadline = time.monotonic() + 30
        while gw.router.table.canaries and time.monotonic() < deadline:  # the reconciler's next pass stops routing to it
            time.sleep(0.2)
        stopped = time.monotonic()
        time.sleep(5)
    lap("2. canary rolled back", users)
    assert (outcome.action, outcome.rule) == ("rollback", "worse"), outcome.reasons
    after = [v for v, sent in zip(users.answered, users.started) if sent > stopped]
    assert users.failures == [] and pirate2 in users.answered and after and pirate2 not in after
    assert reg.get(pirate2).state == "rejected" and reg.prod().name == plain
    end = history(gw, "canary_end", pirate2)
    assert end.detail["action"] == "rollback" and end.detail["candidate"]["ratings"] >= SETTINGS.min_ratings

    # 3. probation: a promoted version whose up-rate drops is rolled back without an operator
    with Users(gw) as users:
        promote(pirate, plain, {"requested_by": "test"})  # a direct promotion: pirate goes on probation
        outcome = decided(trials, "probation", pirate)
        serves(gw, plain)
    lap("3. probation rolled back", users)
    assert (outcome.action, outcome.rule, outcome.baseline) == ("rollback", "worse", plain), outcome.reasons
    assert users.failures == [] and reg.prod().name == plain
    assert history(gw, "rollback", plain).detail["phase"] == "probation"
    metrics = httpx.get(f"{gw.url}/metrics", trust_env=False).text
    assert 'tunewheel_live_decisions_total{decision="rollback",phase="probation",rule="worse"} 1.0' in metrics
    assert 'tunewheel_live_decisions_total{decision="rollback",phase="canary",rule="worse"} 1.0' in metrics
    assert 'tunewheel_live_decisions_total{decision="promote",phase="canary",rule="not_worse"} 1.0' in metrics
