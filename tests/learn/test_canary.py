"""The canary's decision rule as a user of it sees it: wins promote, losses and broken candidates roll
back, thin evidence waits, probation undoes a drop, and an A/A canary rarely rolls back.

    pytest tests/learn/test_canary.py
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
from pydantic import ValidationError

from learn.canary import (
    PROMOTE,
    ROLLBACK,
    ArmFigures,
    ArmPaths,
    CanarySettings,
    always_valid_interval,
    decide,
    decide_paths,
)

S = CanarySettings()
DAY = timedelta(days=1)


def arm(ratings: int, up_rate: float, requests: int = 0, error_rate: float = 0.0, p95: float | None = None) -> ArmFigures:
    return ArmFigures(ratings=ratings, ups=round(ratings * up_rate), requests=requests,
                      errors=round(requests * error_rate), p95_latency_s=p95)


def test_a_clearly_better_candidate_is_promoted():
    d = decide(arm(1000, 0.60), arm(9000, 0.50), S, elapsed=DAY)
    assert (d.action, d.rule) == ("promote", "not_worse")
    assert any("significantly better" in r for r in d.reasons)
    assert d.statistic["evidence_not_worse"] >= d.statistic["threshold"]
    assert 0 < d.statistic["interval_low"] < 0.10 < d.statistic["interval_high"]


def test_a_clearly_worse_candidate_is_rolled_back():
    d = decide(arm(1000, 0.40), arm(9000, 0.50), S, elapsed=DAY)
    assert (d.action, d.rule) == ("rollback", "worse")
    assert any("significantly worse" in r for r in d.reasons)
    assert d.statistic["interval_high"] < 0


def test_too_few_ratings_keep_collecting_however_large_the_gap():
    d = decide(arm(150, 0.10), arm(9000, 0.90), S, elapsed=DAY)
    assert (d.action, d.rule) == ("continue", None)
    assert any("too few ratings" in r and "150" in r for r in d.reasons)


def test_a_small_difference_keeps_collecting_before_the_maximum():
    d = decide(arm(800, 0.51), arm(7200, 0.50), S, elapsed=DAY)
    assert d.action == "continue"
    assert any("no significant difference yet" in r for r in d.reasons)
    assert any("maximum not reached" in r for r in d.reasons)


@pytest.mark.parametrize(("at_max", "action"), [("promote", "promote"), ("rollback", "rollback")])
def test_the_maximum_without_a_difference_follows_the_at_max_setting(at_max, action):
    s = CanarySettings(at_max=at_max)
    by_ratings = decide(arm(5000, 0.50), arm(45000, 0.505), s, elapsed=DAY)
    by_time = decide(arm(900, 0.50), arm(8100, 0.50), s, elapsed=timedelta(days=15))
    for d in (by_ratings, by_time):
        assert (d.action, d.rule) == (action, "max")
        assert any("maximum reached" in r and "without a significant difference" in r for r in d.reasons)


def test_a_candidate_that_fails_many_requests_is_rolled_back_before_any_rating():
    d = decide(arm(0, 0.0, requests=200, error_rate=0.30), arm(0, 0.0, requests=2000, error_rate=0.01), S, elapsed=DAY)
    assert (d.action, d.rule) == ("rollback", "errors")
    assert any("error ratio 60/200" in r for r in d.reasons)


def test_an_error_ratio_within_the_allowed_increase_does_not_roll_back():
    d = decide(arm(300, 0.5, requests=5000, error_rate=0.02), arm(2700, 0.5, requests=45000, error_rate=0.01), S, elapsed=DAY)
    assert d.action == "continue"


def test_the_latency_guard_fires_on_a_much_slower_candidate_only():
    fast, slow = arm(300, 0.5, requests=500, p95=3.5), arm(300, 0.5, requests=500, p95=8.0)
    champion = arm(2700, 0.5, requests=4500, p95=2.0)
    assert decide(fast, champion, S, elapsed=DAY).action == "continue"
    d = decide(slow, champion, S, elapsed=DAY)
    assert (d.action, d.rule) == ("rollback", "latency")
    assert any("p95 latency 8.00 s" in r for r in d.reasons)
    too_early = arm(300, 0.5, requests=50, p95=8.0)
    assert decide(too_early, champion, S, elapsed=DAY).action == "continue"


def test_probation_rolls_back_a_drop_against_the_predecessors_window():
    d = decide(arm(600, 0.42), arm(2000, 0.55), S, elapsed=DAY, probation=True)
    assert d.action == "rollback"
    assert any("new version" in r and "significantly worse" in r for r in d.reasons)
    assert any("predecessor" in r for r in d.reasons)


def test_probation_keeps_the_version_at_the_end_of_its_window_whatever_at_max_says():
    s = CanarySettings(at_max="rollback", probation_window=timedelta(days=3))
    d = decide(arm(900, 0.54), arm(2000, 0.55), s, elapsed=timedelta(days=3), probation=True)
    assert d.action == "promote"
    assert any("keep the version" in r for r in d.reasons)
    assert decide(arm(900, 0.54), arm(2000, 0.55), s, elapsed=timedelta(days=2), probation=True).action == "continue"


def streams(rng, runs: int, share: float, looks: int, p_cand=0.5, p_champ=0.5, p_err: float = 0.02):
    """Every event is one request and one rating, sent to the canary with probability `share`
    (up-rates per run may differ: pass a (runs, 1) array). Cumulative counts after every event."""
    to_canary = rng.random((runs, looks)) < share
    up = rng.random((runs, looks)) < np.where(to_canary, p_cand, p_champ)
    err = rng.random((runs, looks)) < p_err
    c_n, b_n = np.cumsum(to_canary, axis=1), np.cumsum(~to_canary, axis=1)
    c_up, b_up = np.cumsum(to_canary & up, axis=1), np.cumsum(~to_canary & up, axis=1)
    c_err, b_err = np.cumsum(to_canary & err, axis=1), np.cumsum(~to_canary & err, axis=1)
    return ArmPaths(c_n, c_up, c_n, c_err), ArmPaths(b_n, b_up, b_n, b_err)


def test_an_aa_canary_looking_after_every_rating_rolls_back_at_most_alpha_of_the_time():
    s = CanarySettings(share=0.5, min_ratings=50, max_ratings=600, min_requests=50)
    rng = np.random.default_rng(14)
    cand, champ = streams(rng, runs=2000, share=s.share, looks=1300)
    out = decide_paths(cand, champ, s)
    rate = float(np.mean(out.action == ROLLBACK))
    assert rate <= s.alpha
    assert np.mean(out.action == PROMOTE) > 0.9  # and most equal candidates do get in


def test_an_aa_probation_against_a_frozen_window_rolls_back_at_most_alpha_of_the_time():
    s = CanarySettings(min_ratings=50, max_ratings=1500)
    rng = np.random.default_rng(9)
    runs, looks, window = 2000, 1500, 500
    new = ArmPaths(np.broadcast_to(np.arange(1, looks + 1), (runs, looks)), np.cumsum(rng.random((runs, looks)) < 0.7, axis=1))
    old = ArmPaths(np.full((runs, looks), window), np.broadcast_to(rng.binomial(window, 0.7, (runs, 1)), (runs, looks)))
    assert float(np.mean(decide_paths(new, old, s, probation=True).action == ROLLBACK)) <= s.alpha


def test_decide_and_decide_paths_take_the_same_decision_at_every_look():
    rng = np.random.default_rng(3)
    s = CanarySettings(min_ratings=30, max_ratings=400, max_error_increase=0.05)
    runs = 60
    p_cand, p_err = rng.uniform(0.4, 0.8, (runs, 1)), 0.04
    cand, champ = streams(rng, runs=runs, share=0.5, looks=900, p_cand=p_cand, p_champ=0.6, p_err=p_err)
    out = decide_paths(cand, champ, s)
    assert {1, 2} <= set(out.action.tolist())  # promotions and rollbacks both occur
    for run in range(runs):
        for look in {int(out.look[run]), max(int(out.look[run]) - 1, 0)}:  # the deciding look and the one before
            figures = [ArmFigures(*(int(x[run, look]) for x in paths)) for paths in (cand, champ)]
            expected = ("continue", "promote", "rollback")[out.action[run]] if look == out.look[run] else "continue"
            assert decide(*figures, s, elapsed=DAY).action == expected


@pytest.mark.parametrize(("cand", "champ"), [((400, 0.45), (3600, 0.50)), ((2000, 0.49), (18000, 0.50)), ((700, 0.58), (6300, 0.55))])
def test_the_reported_interval_says_the_same_as_the_decision(cand, champ):
    d = decide(arm(*cand), arm(*champ), S, elapsed=DAY)
    lo, hi = always_valid_interval(arm(*cand), arm(*champ), S.alpha)
    assert (hi < 0) == (d.action == "rollback")
    assert (lo > -S.margin) == (d.action == "promote")


def test_settings_defaults_are_described_and_inconsistent_ones_are_refused():
    assert all(f.description for f in CanarySettings.model_fields.values())
    assert CanarySettings.model_validate({"max_duration": "P7D"}).max_duration == timedelta(days=7)
    with pytest.raises(ValidationError, match="min_ratings"):
        CanarySettings(min_ratings=600, max_ratings=500)
    with pytest.raises(ValidationError):
        CanarySettings(share=1.0)


def test_figures_refuse_impossible_counts_and_compute_a_p95_from_latencies():
    with pytest.raises(ValueError, match="ups <= ratings"):
        ArmFigures(ratings=3, ups=4)
    f = ArmFigures.from_latencies(ratings=10, ups=6, errors=1, latencies_s=np.arange(1, 101) / 100)
    assert f.requests == 100 and f.p95_latency_s == pytest.approx(0.9505)
