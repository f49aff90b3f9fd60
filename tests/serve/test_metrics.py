"""The learner's cycle reports reach the metric catalog through `observe_cycle`."""

from learn.cycle import LearnerCycle
from serve.metrics import CYCLES, DATASET_SIZE, EVAL_SCORE, PROMOTIONS, observe_cycle


def test_observe_cycle_exports_a_promotion():
    before = CYCLES.labels(outcome="promoted")._value.get()
    promotions = PROMOTIONS.labels(kind="chat")._value.get()
    report = LearnerCycle(outcome="promoted", train_examples=40, heldout_items=5,
                         champion_scores={"em": 0.1, "f1": 0.2}, candidate_scores={"em": 0.5, "f1": 0.6},
                         train_metrics={"duration_s": 12.0})
    observe_cycle(report)
    assert CYCLES.labels(outcome="promoted")._value.get() == before + 1
    assert PROMOTIONS.labels(kind="chat")._value.get() == promotions + 1
    assert EVAL_SCORE.labels(role="candidate", metric="f1")._value.get() == 0.6
    assert DATASET_SIZE.labels(split="train")._value.get() == 40


def test_observe_cycle_failed_cycle_counts_no_promotion():
    promotions = PROMOTIONS.labels(kind="chat")._value.get()
    observe_cycle(LearnerCycle(outcome="failed", error="boom"))
    assert PROMOTIONS.labels(kind="chat")._value.get() == promotions
