"""The learner cycle's bookkeeping, with training and evaluation replaced by fakes (seconds, no engine).

    pytest tests/learn/test_cycle.py

What a user would notice: a promotion moves prod and records the decision; a rejection and
every failure (training crash, evaluation error) leave production where it was, record the
cycle with its error and never leave a candidate looking servable; too little data is a
"skipped" cycle with a message; the database lock stops a second, overlapping cycle. The real
train -> serve -> promote path on the engine is tests/e2e/test_loop.py.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from sqlmodel import Session, select

import feedback.check
import learn.evaluate
import learn.train
from feedback.db import make_db
from learn.cycle import CycleLock, LearnerCycle, run_cycle
from learn.evaluate import EvalReport
from learn.registry import Registry
from learn.train import TrainError, TrainResult
from serve.settings import load_settings

STORY = "Read the story and extract answers for the questions.\nStory: Ann has a red kite. She flies it on Sunday."


def _chat(i: int) -> dict:
    return {"messages": [{"role": "system", "content": STORY}, {"role": "user", "content": f"What colour is kite {i}?"},
                         {"role": "assistant", "content": "red"}]}


@pytest.fixture
def setup(tmp_path, monkeypatch):
    seeds = tmp_path / "seed.jsonl"
    seeds.write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(12)))
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"id": "h1", "source": "synth", "story": "Bo has a cat.",
                                   "turns": [{"question": "Who has a cat?", "answers": ["Bo"]}]}) + "\n")
    model = tmp_path / "model"  # training is faked; the recipe only checks that the folder is a model
    model.mkdir()
    (model / "config.json").write_text("{}")
    settings = load_settings(None, data_dir=tmp_path / "data", engine={"model": str(model)},
                             learn={"seed_files": [str(seeds)], "heldout_file": str(heldout)})
    monkeypatch.setattr(feedback.check, "load_token_counter", lambda _path: lambda batch: [10 for _ in batch])
    db = make_db(settings.store_url)
    return settings, db, Registry(db)


def fake_train(config, timeout=None) -> TrainResult:
    out = Path(config.out_dir)
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text("{}")
    return TrainResult(out_dir=out, metrics={"steps": 3, "duration_s": 1.0, "train_loss": 1.0, "val_loss": 1.1, "tokens_per_s": 100})


def fake_scores(scores: dict[str, tuple[float, float]], calls: list | None = None):
    def evaluate(settings, *, model, data, url=None, api_key=None, predictions_out=None, progress=True):
        if calls is not None:
            calls.append(model)
        em, f1 = scores["candidate" if model.startswith("chat@") and not model.endswith(scores.get("champ", "-")) else "champion"]
        return EvalReport(model=model, n_turns=len(data), em=em, f1=f1)

    return evaluate


def cycles(db) -> list[LearnerCycle]:
    with Session(db) as s:
        return list(s.exec(select(LearnerCycle).order_by(LearnerCycle.id)))


def test_better_candidate_is_promoted_and_recorded(setup, monkeypatch):
    settings, db, registry = setup
    calls: list[str] = []
    monkeypatch.setattr(learn.train, "train_in_child", fake_train)
    monkeypatch.setattr(learn.evaluate, "evaluate", fake_scores({"champion": (0.2, 0.4), "candidate": (0.6, 0.9)}, calls))

    report = run_cycle(settings, db=db)

    assert report.outcome == "promoted", report.text()
    assert registry.prod("chat").name == report.version
    assert calls == ["base", f"chat@{report.version}"]  # champion (base: nothing promoted yet) then candidate
    version = registry.get(report.version)
    assert version.gate["promote"] is True and version.snapshot_hash == report.snapshot_hash
    assert report.train_examples == 12 and report.heldout_items == 1
    [row] = cycles(db)
    assert row.outcome == "promoted" and row.version == report.version and row.finished_at is not None
    text = Path(report.report_path).with_name("cycle.txt").read_text()
    assert "PROMOTED" in text and "F1" in text


def test_worse_candidate_is_rejected_and_prod_stays(setup, monkeypatch):
    settings, db, registry = setup
    monkeypatch.setattr(learn.train, "train_in_child", fake_train)
    monkeypatch.setattr(learn.evaluate, "evaluate", fake_scores({"champion": (0.2, 0.4), "candidate": (0.6, 0.9)}))
    first = run_cycle(settings, db=db)
    monkeypatch.setattr(learn.evaluate, "evaluate", fake_scores({"champion": (0.6, 0.9), "candidate": (0.5, 0.8), "champ": first.version}))
    second = run_cycle(settings, db=db)

    assert second.outcome == "rejected"
    assert second.champion == first.version
    assert registry.prod("chat").name == first.version
    assert registry.get(second.version).state == "rejected"
    assert registry.get(second.version).parent == first.version


def test_training_failure_is_recorded_and_production_untouched(setup, monkeypatch):
    settings, db, registry = setup
    monkeypatch.setattr(learn.train, "train_in_child", fake_train)
    monkeypatch.setattr(learn.evaluate, "evaluate", fake_scores({"champion": (0.2, 0.4), "candidate": (0.6, 0.9)}))
    prod = run_cycle(settings, db=db).version

    def crash(config, timeout=None):
        raise TrainError("training child was killed by SIGKILL (out of memory, or killed)")

    monkeypatch.setattr(learn.train, "train_in_child", crash)
    report = run_cycle(settings, db=db)

    assert report.outcome == "failed" and "SIGKILL" in report.error
    assert registry.prod("chat").name == prod
    assert [v.name for v in registry.list("chat")] == [prod]  # nothing half-made was registered
    assert cycles(db)[-1].outcome == "failed" and "SIGKILL" in cycles(db)[-1].error


def test_evaluation_failure_rejects_the_registered_candidate(setup, monkeypatch):
    settings, db, registry = setup
    monkeypatch.setattr(learn.train, "train_in_child", fake_train)

    def unreachable(settings, **kw):
        raise learn.evaluate.EvalError("http://127.0.0.1:8000 is unreachable")

    monkeypatch.setattr(learn.evaluate, "evaluate", unreachable)
    report = run_cycle(settings, db=db)

    assert report.outcome == "failed" and "unreachable" in report.error
    assert registry.prod("chat") is None
    assert registry.get(report.version).state == "rejected"
    assert "unreachable" in registry.get(report.version).error


def test_too_small_snapshot_is_skipped_with_a_clear_message(setup, monkeypatch):
    settings, db, registry = setup
    settings.learn.train.min_examples = 50
    monkeypatch.setattr(learn.train, "train_in_child", lambda *a, **k: pytest.fail("must not train"))
    report = run_cycle(settings, db=db)
    assert report.outcome == "skipped"
    assert "12 training examples" in report.message and "min_examples" in report.message
    assert registry.list("chat") == []


def test_lock_is_exclusive_and_a_dead_holders_lock_expires(setup):
    _, db, _ = setup
    first, second = CycleLock(db), CycleLock(db)
    assert first.acquire() and not second.acquire()
    first.release()
    assert second.acquire()
    stale = CycleLock(db, ttl_s=-1)  # a lease that has already expired, as if its holder died
    second.release()
    assert stale.acquire()
    assert CycleLock(db).acquire()


def test_two_overlapping_cycles_one_runs_the_other_skips(setup, monkeypatch):
    settings, db, registry = setup
    started, release = threading.Event(), threading.Event()

    def slow_train(config, timeout=None):
        started.set()
        release.wait(30)
        return fake_train(config)

    monkeypatch.setattr(learn.train, "train_in_child", slow_train)
    monkeypatch.setattr(learn.evaluate, "evaluate", fake_scores({"champion": (0.2, 0.4), "candidate": (0.6, 0.9)}))
    results = {}
    t = threading.Thread(target=lambda: results.setdefault("first", run_cycle(settings, db=make_db(settings.store_url))))
    t.start()
    assert started.wait(30)
    results["second"] = run_cycle(settings, db=make_db(settings.store_url))
    release.set()
    t.join(30)

    assert results["second"].outcome == "skipped" and "another learner cycle is running" in results["second"].message
    assert results["first"].outcome == "promoted"
    assert len(registry.list("chat")) == 1
