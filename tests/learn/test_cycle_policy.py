"""The learning policy in a cycle, with training and evaluation handed in as fakes (seconds, no engine).

    pytest tests/learn/test_cycle_policy.py

What an operator would notice: the configured stages and starting point reach the trainer; continuing
the champion trains on what is new since its lineage's snapshots plus a replay share of them (and
skips when nothing is new); a candidate that drops on the regression set is refused; a cycle whose
held-out set the operator does not control trains and reports but never promotes, and says why; a
production change during the cycle (a rollback) is never overridden by the cycle's promotion.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from feedback.db import make_db
from feedback.models import TurnCreate
from feedback.queries import record_feedback
from learn.cycle import run_cycle
from learn.cycle_data import heldout_trust
from learn.evaluate import EvalReport
from learn.registry import Registry
from learn.train import TrainResult
from serve.settings import load_settings
from tests.feedback.turns import write
from tests.learn.fake_gateway import FakeGateway

STORY = "Read the story and extract answers for the questions.\nStory: Ann has a red kite. She flies it on Sunday."
URL = "http://gateway.test"


def chats(path: Path, n: int, first: int = 0) -> Path:
    rows = [{"messages": [{"role": "system", "content": STORY}, {"role": "user", "content": f"What colour is kite {i}?"},
                          {"role": "assistant", "content": "red"}]} for i in range(first, first + n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def heldout(path: Path, prefix: str) -> Path:
    path.write_text(json.dumps({"id": f"{prefix}1", "source": "synth", "story": "Bo has a cat.",
                                "turns": [{"question": "Who has a cat?", "answers": ["Bo"]}]}) + "\n")
    return path


@pytest.fixture
def make(tmp_path, model_dir):
    """settings, db and registry for one learner; `learn` overrides the [learn] section."""

    def build(**learn):
        learn = {"seed_files": [str(chats(tmp_path / "seed.jsonl", 12))], "heldout_file": str(heldout(tmp_path / "heldout.jsonl", "h")),
                 **learn}
        settings = load_settings(None, data_dir=tmp_path / "data", engine={"model": str(model_dir)}, learn=learn)
        db = make_db(settings.store_url)
        return settings, db, Registry(db)

    return build


class Trainer:
    """A fake `train`: records its arguments and what its SFT file held, writes an adapter folder."""

    def __init__(self, during=None):
        self.calls: list[dict] = []
        self.during = during

    def __call__(self, config, *, base_model, out_dir, stages=("sft",), start_adapter=None, timeout=None, **files) -> TrainResult:
        rows = [json.loads(line) for line in Path(files["train_file"]).read_text().splitlines()] if files.get("train_file") else []
        self.calls.append({"stages": list(stages), "start_adapter": start_adapter, "files": files, "rows": rows})
        if self.during:
            self.during()
        out = Path(out_dir)
        out.mkdir(parents=True)
        (out / "adapter_config.json").write_text("{}")
        return TrainResult(out_dir=out, metrics={"steps": 3, "duration_s": 1.0, "train_loss": 1.0, "val_loss": 1.1, "tokens_per_s": 100,
                                                 "skipped_stages": {"dpo": "0 preference pairs"}})


def scores(heldout=((0.2, 0.4), (0.6, 0.9)), regression=((0.5, 0.7), (0.5, 0.7)), calls=None):
    """A fake `evaluate`: (em, f1) of (champion, candidate) on the held-out items, and on the regression items (ids r*)."""

    def evaluate(data, *, model, url, max_tokens, concurrency, api_key=None, timeout=600, predictions_out=None, progress=True):
        table = regression if data[0].id.startswith("r") else heldout
        if calls is not None:
            calls.append((model, "regression" if data[0].id.startswith("r") else "heldout"))
        em, f1 = table[1] if model.startswith("chat@") and model.split("@")[1] not in champions else table[0]
        return EvalReport(model=model, n_turns=len(data), em=em, f1=f1)

    champions: set[str] = set()
    evaluate.champions = champions
    return evaluate


def cycle(settings, db, train, evaluate, **kw):
    kw.setdefault("converge", FakeGateway(Registry(db)))  # the promotion path waits for a gateway to load the candidate
    return run_cycle(settings.learn, db=db, dirs=settings.learn_dirs, base_model=settings.base_model_path(), gateway_url=URL,
                     train=train, evaluate=evaluate, **kw)


def test_stages_of_the_policy_reach_the_trainer_and_the_report(make):
    settings, db, _ = make(policy={"stages": ["sft", "kto", "dpo"]})
    train = Trainer()
    report = cycle(settings, db, train, scores())
    assert report.outcome == "promoted", report.text()
    [call] = train.calls
    assert call["stages"] == ["sft", "kto", "dpo"] and call["start_adapter"] is None
    assert {"train_file", "preference_file", "pair_file"} <= set(call["files"])
    data = report.train_metrics["data"]
    assert data["start"] == "base" and data["counts"]["sft"] == {"seed": 12}
    assert "stages sft+kto+dpo" in report.text() and "skipped    dpo: 0 preference pairs" in report.text()


def test_without_an_operator_controlled_heldout_set_the_cycle_trains_and_reports_but_does_not_promote(make):
    settings, db, registry = make(heldout_file=None, heldout_fraction=0.999)  # every logged conversation is held out
    turns = [TurnCreate(id=f"t{i}", alias="chat", adapter_version="base", answer="red",
                        request_messages=[{"role": "system", "content": STORY}, {"role": "user", "content": f"Colour {i}?"}])
             for i in range(3)]
    write(db, *turns)
    from sqlmodel import Session

    with Session(db) as s:
        for t in turns:  # a caller's own up-ratings shape this held-out set
            record_feedback(s, turn_id=t.id, rating="up", comment=None, key_hash=None, admin=False)
    calls: list = []
    train = Trainer()
    report = cycle(settings, db, train, scores(calls=calls))

    assert len(train.calls) == 1 and report.heldout_items >= 1  # it trained, and scored on the log's held-out set
    assert calls == [("base", "heldout"), (f"chat@{report.version}", "heldout")]
    assert report.outcome == "rejected" and registry.prod("chat") is None
    assert "not operator-controlled" in report.message and "only trains and reports" in report.message
    assert report.gate["heldout"]["trusted"] is False and report.gate["promote"] is False
    assert any("learn.heldout_file" in r for r in report.gate["reasons"])
    assert registry.get(report.version).state == "rejected"


def test_heldout_trust_comes_from_the_operator_or_the_manifest():
    assert heldout_trust("heldout.json", {})[0] is True
    assert heldout_trust(None, {"heldout": {"trusted": True, "why": "from trusted keys k1"}}) == (True, "from trusted keys k1")
    assert heldout_trust(None, {"heldout": {"trusted": False, "why": "no trusted keys"}}) == (False, "no trusted keys")
    trusted, why = heldout_trust(None, {})
    assert trusted is False and "any caller" in why


def test_continuing_the_champion_trains_on_new_rows_plus_a_replay_share(make, tmp_path):
    settings, db, registry = make(policy={"start": "champion", "replay_share": 0.25})
    train = Trainer()
    first = cycle(settings, db, train, scores())
    assert first.outcome == "promoted" and train.calls[0]["start_adapter"] is None  # nothing to continue yet
    settings.learn.seed_files.append(str(chats(tmp_path / "more.jsonl", 9, first=100)))
    evaluate = scores()
    evaluate.champions.add(first.version)
    second = cycle(settings, db, train, evaluate)

    call = train.calls[1]
    assert Path(call["start_adapter"]) == Path(registry.get(first.version).path)
    new = [r for r in call["rows"] if (r.get("meta") or {}).get("source") != "replay"]
    replay = [r for r in call["rows"] if (r.get("meta") or {}).get("source") == "replay"]
    assert len(new) == 9 and all("kite 1" in r["messages"][1]["content"] for r in new)  # kites 100-108 only
    assert len(replay) == 3  # 0.25 of the set: 3 / (9 + 3)
    assert all(int(r["messages"][1]["content"].split()[-1][:-1]) < 12 for r in replay)
    assert second.train_metrics["data"]["start"] == f"champion:{first.version}"
    assert registry.get(second.version).parent == first.version
    assert registry.get(second.version).train_config["start_adapter"] == call["start_adapter"]


def test_continuing_the_champion_with_nothing_new_is_skipped(make):
    settings, db, _ = make(policy={"start": "champion"})
    evaluate = scores()
    first = cycle(settings, db, Trainer(), evaluate)
    evaluate.champions.add(first.version)
    train = Trainer()
    second = cycle(settings, db, train, evaluate)
    assert second.outcome == "skipped" and "nothing" in second.message and train.calls == []


def test_a_candidate_that_drops_on_the_regression_set_is_refused(make, tmp_path):
    regression = heldout(tmp_path / "regression.jsonl", "r")
    settings, db, registry = make(regression_file=str(regression), gate={"max_regression_drop": 0.05})
    calls: list = []
    report = cycle(settings, db, Trainer(), scores(regression=((0.5, 0.8), (0.3, 0.6)), calls=calls))

    assert report.outcome == "rejected" and registry.prod("chat") is None
    assert sorted(calls) == sorted([("base", "heldout"), (f"chat@{report.version}", "heldout"),
                                    ("base", "regression"), (f"chat@{report.version}", "regression")])
    assert report.gate["regression"]["candidate"]["f1"] == 0.6 and any("forgot" in r for r in report.gate["reasons"])
    assert "regression candidate" in report.text()
    kept = cycle(settings, db, Trainer(), scores(regression=((0.5, 0.8), (0.5, 0.78))))
    assert kept.outcome == "promoted"  # within the allowed drop


def test_a_rollback_during_training_is_not_overridden(make):
    settings, db, registry = make()
    first = cycle(settings, db, Trainer(), scores())
    evaluate = scores(heldout=((0.6, 0.9), (0.7, 0.95)))  # the champion's (0.6, 0.9) are read back from the first cycle
    evaluate.champions.add(first.version)
    second = cycle(settings, db, Trainer(during=lambda: registry.rollback("chat")), evaluate)  # the operator rolls back mid-cycle

    assert second.champion == first.version and second.outcome == "rejected"
    assert "moved meanwhile" in second.message and registry.prod("chat") is None
    assert registry.get(second.version).state == "rejected"


def test_a_policy_whose_stages_have_too_little_data_is_skipped(make):
    settings, db, _ = make(policy={"stages": ["dpo"]})
    train = Trainer()
    report = cycle(settings, db, train, scores())
    assert report.outcome == "skipped" and "dpo 0" in report.message and train.calls == []


@pytest.mark.parametrize("policy", [{"stages": []}, {"stages": ["dpo", "sft"]}, {"stages": ["sft", "sft"]}, {"replay_share": 1.0}])
def test_a_bad_policy_fails_when_the_config_loads(policy):
    with pytest.raises(ValueError, match="learn.policy"):
        load_settings(None, learn={"policy": policy})
