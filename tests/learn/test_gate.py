"""The promotion gate as a table: champion and candidate scores, thresholds, decision.

    pytest tests/learn/test_gate.py
"""

from __future__ import annotations

import pytest

from learn.evaluate import EvalReport
from learn.gate import decide


def report(em: float, f1: float, n: int = 100, model: str = "m") -> dict:
    return {"model": model, "em": em, "f1": f1, "n_turns": n}


# (champion em, f1), (candidate em, f1), min_f1_gain, max_em_drop, promote
TABLE = [
    ((0.20, 0.40), (0.60, 0.90), 0.01, 0.0, True),  # clear win
    ((0.20, 0.40), (0.20, 0.41), 0.01, 0.0, True),  # gain exactly the threshold
    ((0.20, 0.56), (0.20, 0.57), 0.01, 0.0, True),  # 0.57 - 0.56 is 0.00999... in floats: still exactly the threshold
    ((0.20, 0.40), (0.20, 0.405), 0.01, 0.0, False),  # gain below the threshold
    ((0.20, 0.40), (0.20, 0.40), 0.0, 0.0, True),  # no gain required, no drop allowed, tie
    ((0.20, 0.40), (0.15, 0.60), 0.01, 0.0, False),  # F1 up but EM fell
    ((0.20, 0.40), (0.15, 0.60), 0.01, 0.05, True),  # ... within the allowed EM drop
    ((0.20, 0.40), (0.14, 0.60), 0.01, 0.05, False),  # ... beyond it
    ((0.50, 0.70), (0.60, 0.65), 0.01, 0.0, False),  # EM up, F1 down
    ((0.50, 0.70), (0.40, 0.60), -1.0, 1.0, True),  # thresholds that accept anything
]


@pytest.mark.parametrize(("champ", "cand", "min_gain", "max_drop", "promote"), TABLE)
def test_gate_table(champ, cand, min_gain, max_drop, promote):
    d = decide(report(*champ), report(*cand), min_f1_gain=min_gain, max_em_drop=max_drop)
    assert d.promote is promote
    assert len(d.reasons) == 2
    assert d.deltas["f1"] == pytest.approx(cand[1] - champ[1])
    assert d.deltas["em"] == pytest.approx(cand[0] - champ[0])


def test_reasons_name_the_failed_check():
    d = decide(report(0.5, 0.5), report(0.3, 0.9), min_f1_gain=0.01, max_em_drop=0.1)
    assert not d.promote
    assert any("EM" in r and "falls more" in r for r in d.reasons)
    assert any("F1" in r and "meets" in r for r in d.reasons)


def test_different_held_out_sets_never_promote():
    d = decide(report(0.1, 0.1, n=100), report(0.9, 0.9, n=80), min_f1_gain=0.01, max_em_drop=0.0)
    assert not d.promote
    assert any("same held-out set" in r for r in d.reasons)


def test_empty_evaluation_never_promotes():
    d = decide(report(0.0, 0.0, n=0), report(0.0, 0.0, n=0), min_f1_gain=-1.0, max_em_drop=1.0)
    assert not d.promote


def test_accepts_eval_reports_and_stores_both_score_sets():
    champ = EvalReport(model="base", n_turns=10, em=0.1, f1=0.3, per_source={"race": {"em": 0.1, "f1": 0.3, "n": 10}})
    cand = EvalReport(model="chat@chat-v0001", n_turns=10, em=0.5, f1=0.8)
    d = decide(champ, cand, min_f1_gain=0.05, max_em_drop=0.0).to_dict()
    assert d["promote"] is True
    assert d["champion"]["model"] == "base" and d["champion"]["f1"] == 0.3
    assert d["candidate"]["model"] == "chat@chat-v0001" and d["candidate"]["em"] == 0.5
    assert d["thresholds"] == {"min_f1_gain": 0.05, "max_em_drop": 0.0}


def test_report_without_scores_is_an_error():
    with pytest.raises(ValueError, match="lacks"):
        decide({"em": 0.1}, report(0.1, 0.1), min_f1_gain=0.0, max_em_drop=0.0)


# (champion regression F1, candidate regression F1, max_regression_drop, promote): held-out F1 0.40 -> 0.60 throughout
REGRESSION = [
    (0.70, 0.70, 0.02, True),  # no change
    (0.70, 0.69, 0.02, True),  # within the allowed drop
    (0.70, 0.68, 0.02, True),  # exactly the allowed drop
    (0.70, 0.60, 0.02, False),  # forgot: refused even though the held-out set improved
    (0.70, 0.60, 0.20, True),  # a tolerant operator
]


@pytest.mark.parametrize(("champ_f1", "cand_f1", "max_drop", "promote"), REGRESSION)
def test_regression_set_refuses_a_candidate_that_forgot(champ_f1, cand_f1, max_drop, promote):
    d = decide(report(0.2, 0.4), report(0.2, 0.6), min_f1_gain=0.01, max_em_drop=0.0,
               regression=(report(0.5, champ_f1, n=30), report(0.5, cand_f1, n=30)), max_regression_drop=max_drop)
    assert d.promote is promote
    assert any("regression set F1" in r and ("forgot" in r) is (not promote) for r in d.reasons)
    assert d.regression["champion"]["f1"] == champ_f1 and d.deltas["regression_f1"] == pytest.approx(cand_f1 - champ_f1)
    assert d.thresholds["max_regression_drop"] == max_drop


def test_regression_sets_of_different_sizes_never_promote():
    d = decide(report(0.2, 0.4), report(0.2, 0.6), min_f1_gain=0.01, max_em_drop=0.0,
               regression=(report(0.5, 0.7, n=30), report(0.5, 0.9, n=20)), max_regression_drop=0.1)
    assert not d.promote


def test_a_held_out_set_the_operator_does_not_control_never_promotes():
    d = decide(report(0.2, 0.4), report(0.9, 0.95), min_f1_gain=0.01, max_em_drop=0.0,
               heldout_trusted=False, heldout_why="split from the log by conversation id")
    assert not d.promote
    assert "not operator-controlled (split from the log by conversation id)" in d.reasons[0] and "learn.heldout_file" in d.reasons[0]
    assert d.to_dict()["heldout"] == {"trusted": False, "why": "split from the log by conversation id"}
