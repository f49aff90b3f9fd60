"""The learner cycle's bookkeeping, with training and evaluation handed in as fakes (seconds, no engine).

    pytest tests/learn/test_cycle.py

What a user would notice: a promotion moves prod, records the decision and asks serving to
converge; a rejection and every failure (training crash, evaluation error) leave production where
it was, record the cycle with its error and never leave a candidate looking servable; too little
data is a "skipped" cycle with a message; the database lock stops a second, overlapping cycle.
The cycle's one record is its `learner_cycle` row (and the report written from it). The real
train -> serve -> promote path on the engine is tests/e2e/test_loop.py.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from sqlmodel import Session, select

from feedback.db import make_db
from learn.cycle import LearnerCycle, cycle_runner, run_cycle
from learn.evaluate import EvalError, EvalReport
from learn.lock import CycleLock
from learn.registry import Registry
from learn.train import TrainError, TrainResult
from tests.learn.fake_gateway import FakeGateway
from serve.settings import load_settings

STORY = "Read the story and extract answers for the questions.\nStory: Ann has a red kite. She flies it on Sunday."
URL = "http://gateway.test"


def _chat(i: int) -> dict:
    return {"messages": [{"role": "system", "content": STORY}, {"role": "user", "content": f"What colour is kite {i}?"},
                         {"role": "assistant", "content": "red"}]}


@pytest.fixture
def setup(tmp_path, model_dir):
    seeds = tmp_path / "seed.jsonl"
    seeds.write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(12)))
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"id": "h1", "source": "synth", "story": "Bo has a cat.",
                                   "turns": [{"question": "Who has a cat?", "answers": ["Bo"]}]}) + "\n")
    # training is faked; curation counts tokens with the real tokenizer
    settings = load_settings(None, data_dir=tmp_path / "data", engine={"model": str(model_dir)},
                             learn={"seed_files": [str(seeds)], "heldout_file": str(heldout)})
    db = make_db(settings.store_url)
    return settings, db, Registry(db)


def cycle(settings, db, **collaborators) -> LearnerCycle:
    """`run_cycle` with the settings' section and folders; `collaborators`: train, evaluate, converge
    (default: a fake gateway that loads the promoted candidate, as the gateway in the learner's process would)."""
    collaborators.setdefault("converge", FakeGateway(Registry(db)))
    return run_cycle(settings.learn, db=db, dirs=settings.learn_dirs, base_model=settings.base_model_path(),
                     gateway_url=URL, **collaborators)


def fake_train(config, *, base_model, out_dir, stages=("sft",), start_adapter=None, timeout=None, **files) -> TrainResult:
    out = Path(out_dir)
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text("{}")
    return TrainResult(out_dir=out, metrics={"steps": 3, "duration_s": 1.0, "train_loss": 1.0, "val_loss": 1.1, "tokens_per_s": 100})


def fake_scores(scores: dict[str, tuple[float, float]], calls: list | None = None):
    def evaluate(data, *, model, url, max_tokens, concurrency, api_key=None, timeout=600, predictions_out=None, progress=True):
        if calls is not None:
            calls.append(model)
        em, f1 = scores["candidate" if model.startswith("chat@") and not model.endswith(scores.get("champ", "-")) else "champion"]
        return EvalReport(model=model, n_turns=len(data), em=em, f1=f1)

    return evaluate


BETTER = fake_scores({"champion": (0.2, 0.4), "candidate": (0.6, 0.9)})


def cycles(db) -> list[LearnerCycle]:
    with Session(db) as s:
        return list(s.exec(select(LearnerCycle).order_by(LearnerCycle.id)))


def test_better_candidate_is_promoted_recorded_and_served(setup):
    settings, db, registry = setup
    calls: list[str] = []
    gateway = FakeGateway(registry)
    report = cycle(settings, db, train=fake_train, evaluate=fake_scores({"champion": (0.2, 0.4), "candidate": (0.6, 0.9)}, calls),
                   converge=gateway)

    assert report.outcome == "promoted", report.text()
    assert registry.prod("chat").name == report.version
    assert gateway.loaded == [report.version]  # serving loaded it before prod moved
    assert calls == ["base", f"chat@{report.version}"]  # champion (base: nothing promoted yet) then candidate
    version = registry.get(report.version)
    assert version.gate["promote"] is True and version.snapshot_hash == report.snapshot_hash
    assert version.train_config["rank"] == settings.learn.train.rank
    assert version.train_config["base_model"] == settings.base_model_path()
    assert report.train_examples == 12 and report.heldout_items == 1
    [row] = cycles(db)  # the returned cycle is the row
    assert row.model_dump() == report.model_dump()
    assert row.outcome == "promoted" and row.finished_at is not None and row.snapshot.startswith("snap-")
    assert row.gate["promote"] is True and row.train_metrics["steps"] == 3
    assert set(row.timings) == {"curate_s", "train_s", "evaluate_s"}
    text = Path(report.report_path).with_name("cycle.txt").read_text()
    assert "PROMOTED" in text and "F1" in text and "3 steps" in text
    assert json.loads(Path(report.report_path).read_text())["version"] == report.version


def test_worse_candidate_is_rejected_and_prod_stays(setup):
    settings, db, registry = setup
    first = cycle(settings, db, train=fake_train, evaluate=BETTER)
    converged = []
    second = cycle(settings, db, train=fake_train, converge=lambda: converged.append(1),
                   evaluate=fake_scores({"champion": (0.6, 0.9), "candidate": (0.5, 0.8), "champ": first.version}))

    assert second.outcome == "rejected" and converged == []
    assert second.champion == first.version
    assert registry.prod("chat").name == first.version
    assert registry.get(second.version).state == "rejected"
    assert registry.get(second.version).parent == first.version
    assert cycles(db)[-1].gate["promote"] is False


def test_a_champion_scored_on_the_same_items_is_not_scored_again(setup, tmp_path):
    settings, db, registry = setup
    calls: list[str] = []
    first = cycle(settings, db, train=fake_train, evaluate=fake_scores({"champion": (0.2, 0.4), "candidate": (0.6, 0.9)}, calls))
    assert calls == ["base", f"chat@{first.version}"]
    calls.clear()
    second = cycle(settings, db, train=fake_train,
                   evaluate=fake_scores({"champion": (0.1, 0.1), "candidate": (0.7, 0.95), "champ": first.version}, calls))
    assert calls == [f"chat@{second.version}"]  # the champion's scores are those it got as the first cycle's candidate
    assert second.champion_scores["f1"] == 0.9 and second.champion_scores["cached_from"] == f"cycle {first.id}"
    assert second.outcome == "promoted" and "scored in cycle 1 on the same items" in second.text()

    # other items: every model is scored again
    Path(settings.learn.heldout_file).write_text(json.dumps({"id": "h2", "source": "synth", "story": "Al has a dog.",
                                                            "turns": [{"question": "Who has a dog?", "answers": ["Al"]}]}) + "\n")
    calls.clear()
    third = cycle(settings, db, train=fake_train, evaluate=fake_scores({"champion": (0.6, 0.9), "candidate": (0.7, 0.97),
                                                                      "champ": second.version}, calls))
    assert calls == [f"chat@{second.version}", f"chat@{third.version}"]
    assert third.champion_scores.get("cached_from") is None


def test_the_demos_baseline_is_cycle_ones_champion_score_not_scored_again(setup, monkeypatch):
    """`make demo` scores the base model before any user arrives (serve/demo.py); cycle 1 reads it back."""
    import learn.evaluate
    from serve.demo import BASELINE_LABEL, heldout_scores

    settings, db, _ = setup
    calls: list[str] = []
    monkeypatch.setattr(learn.evaluate, "evaluate", fake_scores({"champion": (0.2, 0.4), "candidate": (0.6, 0.9)}, calls))
    before = heldout_scores(settings, URL, Path(settings.learn.heldout_file))
    assert calls == ["base"] and before["f1"] == 0.4
    first = cycle(settings, db, train=fake_train, evaluate=fake_scores({"champion": (0.1, 0.1), "candidate": (0.6, 0.9)}, calls))
    assert calls == ["base", f"chat@{first.version}"]
    assert first.champion_scores["f1"] == 0.4 and first.champion_scores["cached_from"] == BASELINE_LABEL
    assert "scored in step 2 of the demo on the same items" in first.text()


def test_training_failure_is_recorded_and_production_untouched(setup):
    settings, db, registry = setup
    prod = cycle(settings, db, train=fake_train, evaluate=BETTER).version

    def crash(config, **paths):
        raise TrainError("training child was killed by SIGKILL (out of memory, or killed)")

    report = cycle(settings, db, train=crash, evaluate=BETTER)

    assert report.outcome == "failed" and "SIGKILL" in report.error
    assert registry.prod("chat").name == prod
    assert [v.name for v in registry.list("chat")] == [prod]  # nothing half-made was registered
    assert cycles(db)[-1].outcome == "failed" and "SIGKILL" in cycles(db)[-1].error


def test_evaluation_failure_marks_the_registered_candidate_failed(setup):
    settings, db, registry = setup

    def unreachable(data, **kw):
        raise EvalError(f"{URL} is unreachable")

    report = cycle(settings, db, train=fake_train, evaluate=unreachable)

    assert report.outcome == "failed" and "unreachable" in report.error
    assert registry.prod("chat") is None
    assert registry.get(report.version).state == "failed"
    assert "unreachable" in registry.get(report.version).error


def test_a_failing_converge_leaves_the_load_to_the_gateways_poll(setup):
    settings, db, registry = setup

    def down():
        raise ConnectionError("gateway gone")

    with FakeGateway(registry):  # another gateway process, polling the registry
        report = cycle(settings, db, train=fake_train, evaluate=BETTER, converge=down)
    assert report.outcome == "promoted" and registry.prod("chat").name == report.version


def test_too_small_snapshot_is_skipped_with_a_clear_message(setup):
    settings, db, registry = setup
    settings.learn.train.min_examples = 50
    report = cycle(settings, db, train=lambda *a, **k: pytest.fail("must not train"), evaluate=BETTER)
    assert report.outcome == "skipped"
    assert "12 training examples" in report.message and "min_examples" in report.message
    assert registry.list("chat") == []
    assert cycles(db)[-1].outcome == "skipped" and cycles(db)[-1].train_examples == 12


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


def test_two_overlapping_cycles_one_runs_the_other_skips(setup):
    settings, db, registry = setup
    started, release = threading.Event(), threading.Event()

    def slow_train(config, **paths):
        started.set()
        release.wait(30)
        return fake_train(config, **paths)

    results = {}
    t = threading.Thread(target=lambda: results.setdefault(
        "first", cycle(settings, make_db(settings.store_url), train=slow_train, evaluate=BETTER)))
    t.start()
    assert started.wait(30)
    results["second"] = cycle(settings, make_db(settings.store_url), train=slow_train, evaluate=BETTER)
    release.set()
    t.join(30)

    assert results["second"].outcome == "skipped" and "another learner cycle is running" in results["second"].message
    assert results["first"].outcome == "promoted"
    assert len(registry.list("chat")) == 1
    assert len(cycles(db)) == 1  # the skipped one is not a cycle of its own


def test_cycle_runner_builds_the_cycle_from_the_composed_settings(setup, monkeypatch):
    settings, db, registry = setup
    monkeypatch.setenv("TUNEWHEEL_API_KEY", "k-123")
    seen = {}

    def record(learn, **kw):
        seen.update(kw, learn=learn)
        return LearnerCycle(trigger=kw["trigger"], outcome="skipped")

    monkeypatch.setattr("learn.cycle.run_cycle", record)  # the runner's own wiring is what is under test here
    converge = lambda: None  # noqa: E731
    assert cycle_runner(settings, converge=converge)("schedule").trigger == "schedule"
    assert seen["learn"] is settings.learn and seen["dirs"] == settings.learn_dirs
    assert seen["base_model"] == settings.base_model_path() and seen["gateway_url"] == settings.gateway_url
    assert seen["api_key"] == "k-123" and seen["converge"] is converge
    assert seen["evaluate"].keywords == {"timeout": settings.serve.request_timeout_s, "progress": False}
    assert seen["train"].keywords == {"progress": False}  # progress bars only for a person watching (learn run, demo)
    cycle_runner(settings, gateway_url=URL, api_key="other")("cli")
    assert seen["gateway_url"] == URL and seen["api_key"] == "other"


def test_with_canary_promotion_a_passing_candidate_becomes_the_canary_not_prod(setup):
    from learn.live import canary_of, pointers

    settings, db, registry = setup
    settings.learn.promotion = "canary"
    gateway = FakeGateway(registry)
    report = cycle(settings, db, train=fake_train, evaluate=BETTER, converge=gateway)
    assert report.outcome == "canary" and "is the canary beside base" in report.message, report.text()
    version, share = canary_of(registry)
    assert (version.name, share, version.state) == (report.version, settings.learn.canary.share, "candidate")
    assert registry.prod("chat") is None and gateway.loaded == []  # production is untouched until users decide
    assert version.gate["promote"] is True and version.metrics["heldout"]["candidate"]["f1"] == 0.9
    second = cycle(settings, db, train=fake_train, evaluate=BETTER, converge=gateway)  # one canary at a time
    assert second.outcome == "rejected" and "already the canary" in second.message
    assert pointers(db)[0].canary == report.version

    from learn.canary import CanarySettings
    from learn.live import LiveTrials
    from tests.learn.test_live import answered

    answered(registry, "base", n=40, up_rate=0.2)
    answered(registry, report.version, n=40, up_rate=0.9)
    trials = LiveTrials(registry, CanarySettings(min_ratings=20), base_name="base",
                        promote=lambda name, expected, detail: registry.promote(name, expected=expected))
    assert [(o.phase, o.action) for o in trials.check()] == [("canary", "promote")]
    [first, _] = cycles(db)  # the decision reaches the report of the cycle that made the canary
    assert first.gate["live"]["action"] == "promote" and "live canary: promoted (not_worse" in first.message
    assert "live canary: promoted" in Path(first.report_path).with_name("cycle.txt").read_text()
