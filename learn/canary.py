"""Live canary and probation: promote, roll back or keep collecting, from the live figures of two arms.

    from learn.canary import ArmFigures, CanarySettings, decide
    s = CanarySettings()                                     # [learn.canary]
    cand = ArmFigures(ratings=812, ups=463, requests=9100, errors=12, p95_latency_s=2.1)
    champ = ArmFigures(ratings=7304, ups=3851, requests=81000, errors=90, p95_latency_s=1.9)
    d = decide(cand, champ, s, elapsed=timedelta(days=2))   # canary beside the champion
    d.action, d.reasons, d.statistic, d.to_dict()           # "promote" | "rollback" | "continue"
    decide(new, predecessor_last_window, s, elapsed=..., probation=True)   # after a promotion

A pure function of counts: no I/O, no clock. Call it after every rating (or every minute); act on
the first answer that is not "continue". Figures are cumulative since the canary (or probation)
began; the champion's must cover the same period, so both arms see the same days and load.

The test (primary metric: the up-rate of rated turns). Let d = candidate up-rate - baseline
up-rate. Two one-sided mixture sequential probability ratio tests (mSPRT; Robbins 1970, Johari et
al. 2017 "Always valid inference", Howard et al. 2021 "Time-uniform confidence sequences") on the
normal approximation of d, each mixing the alternative over a half-normal prior:
- "worse": H0 d >= 0 against d < 0. Its e-value is a nonnegative supermartingale under H0, so by
  Ville's inequality it ever reaches 1/alpha with probability <= alpha, however often one looks:
  rolling back a candidate that is as good as the champion (an A/A test) happens at most alpha.
- "not worse": H0 d <= -margin against d > -margin; reaching 1/alpha promotes. A candidate worse
  by more than the margin is promoted early with probability <= alpha.
Equivalently: an always-valid (1 - 2 alpha) interval for d; roll back when it lies below 0, promote
when it lies above -margin. The variance of d is estimated from the counts, so the guarantee holds
as the normal approximation does: no decision before `min_ratings` on both arms, and the bench
measures the A/A rate (about half of alpha, since real streams overshoot the boundary). At `max_ratings` (candidate arm) or `max_duration`, `at_max` decides:
the candidate already passed the offline gate, so the default promotes on "no evidence of harm".

Guards, checked from `min_requests` on, before the primary test and independently of it: the
error ratio, by the same one-sided test against "candidate errors <= baseline errors +
max_error_increase" (the slack keeps an equal candidate from tripping it, so it adds almost
nothing to the A/A false-rollback rate); latency, a plain threshold on the p95 ratio (an SLO, not
a statistical question; the default allows for a LoRA adapter answering about half as fast as
the base model on CPU, see DESIGN.md).

Probation (`probation=True`) compares a newly promoted version with its predecessor's last window
(frozen: only the new arm grows). The same e-values apply; with a frozen window Ville's argument
no longer covers the predecessor's share of the noise, but that window caps the information the
test can gather, and the A/A rate stays below alpha on simulated streams (bench/canary.py, the
probation rows; tests/learn/test_canary.py). A significant drop rolls back; "not worse" or the end of the window (duration
`probation_window` or `max_ratings`) ends probation with "promote", meaning "keep". Unlike the
concurrent canary, this is a before/after comparison: a change of traffic between the windows
looks like a change of the model.

Assumption: ratings are independent. Assignment is sticky per conversation and turns of one
conversation are correlated, so count one vote per conversation (say its latest rating) or accept
error rates somewhat above alpha. bench/canary.py measures the rates on simulated streams.

Library: scipy (maintained, already the numeric base of the field) provides the normal log-CDF
(`scipy.special.log_ndtr`, accurate far in the tails where the e-values live) and the root finder
that turns e-values into an interval (`scipy.optimize.brentq`). What is written here is the
mixture e-value itself, five lines of closed form: statsmodels has no sequential tests;
spotify-confidence does group-sequential bounds that need the look schedule and sample size fixed
in advance and bring pandas; confseq has these boundaries but its last release was in early 2023
and it builds a C++ extension. scipy is imported inside the functions: the gateway imports this
module's settings and should start fast.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, Field, model_validator

Action = Literal["promote", "rollback", "continue"]
CONTINUE, PROMOTE, ROLLBACK = 0, 1, 2
ACTIONS: tuple[Action, ...] = ("continue", "promote", "rollback")

# Standard deviation of the mixing prior on d: the test reaches a decision fastest for differences
# around this size (5 points of up-rate) and still decides smaller or larger ones, later.
TAU = 0.05


class CanarySettings(BaseModel):
    share: float = Field(0.1, gt=0.0, lt=1.0, description="Share of new conversations answered by the canary (sticky per conversation).")
    alpha: float = Field(0.05, gt=0.0, le=0.2, description="Largest chance of a wrong early decision: rolling back a candidate as good as the champion (the A/A false-rollback rate), or promoting one worse by more than `margin`.")
    min_ratings: int = Field(200, ge=20, description="Rated turns each arm needs before the up-rate test may decide.")
    max_ratings: int = Field(5000, ge=1, description="The canary (or probation) ends when the candidate arm has this many rated turns; `at_max` decides.")
    max_duration: timedelta = Field(timedelta(days=14), description="The canary ends after this long (ISO 8601 like 'P14D', or seconds); `at_max` decides.")
    margin: float = Field(0.02, ge=0.0, lt=1.0, description="Non-inferiority margin on the up-rate: promote early once the candidate is shown to be no more than this much worse (0.02 = 2 points).")
    at_max: Literal["promote", "rollback"] = Field("promote", description="At max_ratings or max_duration without a significant difference: promote (it passed the offline gate and shows no harm) or roll back.")
    min_requests: int = Field(100, ge=1, description="Requests each arm needs before the error and latency guards are checked.")
    max_error_increase: float = Field(0.02, gt=0.0, lt=1.0, description="Roll back once the candidate's error ratio is significantly above the baseline's plus this (0.02 = 2 points).")
    max_p95_ratio: float = Field(3.0, gt=1.0, description="Roll back when the candidate's p95 latency exceeds the baseline's times this (a LoRA adapter may answer about half as fast as the base model on CPU).")
    probation_window: timedelta = Field(timedelta(days=3), description="After any promotion, compare the new version with its predecessor's last window of this length, for this long.")
    check_seconds: float = Field(30.0, gt=0, description="How often the learner's scheduler checks the running canary and probation (learn/live.py).")

    @model_validator(mode="after")
    def _min_below_max(self) -> CanarySettings:
        if self.min_ratings > self.max_ratings:
            raise ValueError(f"min_ratings ({self.min_ratings}) is above max_ratings ({self.max_ratings}): lower min_ratings or raise max_ratings")
        return self


@dataclass(frozen=True)
class ArmFigures:
    """One arm's live figures over the window being compared."""

    ratings: int
    """Rated turns (thumbs up or down)."""
    ups: int
    """Of which thumbs up."""
    requests: int = 0
    """Requests answered or failed (the error guard's denominator)."""
    errors: int = 0
    """Of which failed."""
    p95_latency_s: float | None = None
    """95th percentile of request latency; None skips the latency guard."""

    def __post_init__(self) -> None:
        if not (0 <= self.ups <= self.ratings and 0 <= self.errors <= self.requests):
            raise ValueError(f"need 0 <= ups <= ratings and 0 <= errors <= requests, got {self}")

    @classmethod
    def from_latencies(cls, *, ratings: int, ups: int, errors: int, latencies_s: Any) -> ArmFigures:
        """Figures from raw per-request latencies (one per request, failed ones included)."""
        lat = np.asarray(latencies_s, dtype=float)
        p95 = float(np.percentile(lat, 95)) if lat.size else None
        return cls(ratings=ratings, ups=ups, requests=int(lat.size), errors=errors, p95_latency_s=p95)

    @property
    def up_rate(self) -> float | None:
        return self.ups / self.ratings if self.ratings else None


class ArmPaths(NamedTuple):
    """Cumulative figures of one arm along simulated streams: arrays of shape (runs, looks)."""

    ratings: np.ndarray
    ups: np.ndarray
    requests: np.ndarray | None = None
    errors: np.ndarray | None = None


@dataclass(frozen=True)
class CanaryDecision:
    action: Action
    rule: Literal["latency", "errors", "worse", "not_worse", "max"] | None
    """Which rule decided (a short label for metrics and alerts); None while continuing."""
    reasons: list[str]
    statistic: dict[str, float | None]
    """Up-rates, their difference and its always-valid interval, the e-values and their threshold."""
    candidate: dict[str, Any]
    baseline: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def log_evidence_below(n_x, k_x, n_y, k_y, shift):
    """Log e-value for "rate_x - rate_y < shift" against H0 "rate_x - rate_y >= shift" (arrays work).

    Half-normal mixture (scale TAU) of Gaussian likelihood ratios in information time I = 1/Var(d),
    with Var(d) estimated from smoothed rates so that 0 or n ups does not give zero variance.
    """
    from scipy.special import log_ndtr

    n_x, n_y = np.maximum(n_x, 1).astype(float), np.maximum(n_y, 1).astype(float)
    px, py = (k_x + 1.0) / (n_x + 2.0), (k_y + 1.0) / (n_y + 2.0)
    info = 1.0 / (px * (1.0 - px) / n_x + py * (1.0 - py) / n_y)
    s = info * (k_x / n_x - k_y / n_y - shift)
    a = 1.0 / TAU**2 + info
    return math.log(2.0) - 0.5 * np.log1p(TAU**2 * info) + log_ndtr(-s / np.sqrt(a)) + s * s / (2.0 * a)


def _flags(c: ArmPaths, b: ArmPaths, s: CanarySettings, at_limit) -> dict[str, Any]:
    """Which rules fire at each look; shared by `decide` (scalars) and `decide_paths` (arrays)."""
    threshold = math.log(1.0 / s.alpha)
    enough = (c.ratings >= s.min_ratings) & (b.ratings >= s.min_ratings)
    log_worse = log_evidence_below(c.ratings, c.ups, b.ratings, b.ups, 0.0)
    log_not_worse = log_evidence_below(b.ratings, b.ups, c.ratings, c.ups, s.margin)
    flags = {
        "worse": enough & (log_worse >= threshold),
        "not_worse": enough & (log_not_worse >= threshold),
        "at_max": (c.ratings >= s.max_ratings) | at_limit,
        "errors": np.zeros(np.shape(c.ratings), dtype=bool),
        "log_worse": log_worse,
        "log_not_worse": log_not_worse,
        "enough": enough,
    }
    if c.requests is not None and b.requests is not None:
        # the baseline in the "x" slot: evidence that baseline errors - candidate errors < -slack
        log_err = log_evidence_below(b.requests, b.errors, c.requests, c.errors, -s.max_error_increase)
        seen = (c.requests >= s.min_requests) & (b.requests >= s.min_requests)
        flags["errors"] = seen & (log_err >= threshold)
        flags["log_errors"] = log_err
    return flags


def _action(flags: dict[str, Any], guard, at_max_code: int):
    """Rollback by a guard or "worse" first (safety wins ties), then promote, then the maximum."""
    return np.select(
        [guard | flags["errors"], flags["worse"], flags["not_worse"], flags["at_max"]],
        [ROLLBACK, ROLLBACK, PROMOTE, at_max_code],
        CONTINUE,
    )


def _at_max_code(s: CanarySettings, probation: bool) -> int:
    # probation ends by keeping the version: it is already in production and showed no drop
    return PROMOTE if probation or s.at_max == "promote" else ROLLBACK


class PathOutcome(NamedTuple):
    action: np.ndarray
    """Per run: CONTINUE, PROMOTE or ROLLBACK (the codes of this module)."""
    look: np.ndarray
    """Per run: the index of the look that decided (the last look when none did)."""
    by_max: np.ndarray
    """Per run: decided only because the maximum was reached, without a significant difference."""


def decide_paths(candidate: ArmPaths, baseline: ArmPaths, s: CanarySettings, *, probation: bool = False) -> PathOutcome:
    """The rule of `decide` along simulated streams (no latency, no clock): where and how each run
    ended. For benches and tests; arrays of shape (runs, looks)."""
    flags = _flags(candidate, baseline, s, False)
    codes = _action(flags, False, _at_max_code(s, probation))
    fired = codes != CONTINUE
    first = np.where(fired.any(axis=1), fired.argmax(axis=1), codes.shape[1] - 1)
    rows = np.arange(codes.shape[0])
    significant = flags["worse"] | flags["not_worse"] | flags["errors"]
    by_max = flags["at_max"][rows, first] & ~significant[rows, first]
    return PathOutcome(codes[rows, first], first, by_max)


def always_valid_interval(candidate: ArmFigures, baseline: ArmFigures, alpha: float) -> tuple[float, float]:
    """The (1 - 2 alpha) interval for d that the decisions amount to: its upper end is below 0 exactly
    when "worse" fires, its lower end above -margin exactly when "not worse" fires."""
    from scipy.optimize import brentq

    c, b = candidate, baseline
    d = c.ups / max(c.ratings, 1) - b.ups / max(b.ratings, 1)
    target = math.log(1.0 / alpha)

    def crossing(n_x, k_x, n_y, k_y, start):
        # evidence for "x - y < shift" grows with shift; find where it reaches 1/alpha
        f = lambda shift: float(log_evidence_below(n_x, k_x, n_y, k_y, shift)) - target  # noqa: E731
        return brentq(f, start, start + 2.0) if f(start + 2.0) > 0 else math.inf

    upper = crossing(c.ratings, c.ups, b.ratings, b.ups, d)
    lower = -crossing(b.ratings, b.ups, c.ratings, c.ups, -d)
    return max(lower, -1.0), min(upper, 1.0)


def decide(candidate: ArmFigures, baseline: ArmFigures, s: CanarySettings, *, elapsed: timedelta, probation: bool = False) -> CanaryDecision:
    """Promote, roll back or continue, with the test statistic and one reason per rule that spoke.

    `baseline` is the champion's figures over the same period (canary) or the predecessor's last
    window (probation). `elapsed` is the time since the canary or probation began."""
    limit = s.probation_window if probation else s.max_duration
    c = ArmPaths(candidate.ratings, candidate.ups, candidate.requests, candidate.errors)
    b = ArmPaths(baseline.ratings, baseline.ups, baseline.requests, baseline.errors)
    flags = _flags(c, b, s, elapsed >= limit)
    slow = _too_slow(candidate, baseline, s)
    action = ACTIONS[int(_action(flags, slow, _at_max_code(s, probation)))]
    lo, hi = always_valid_interval(candidate, baseline, s.alpha)
    statistic = {
        "up_rate_candidate": candidate.up_rate,
        "up_rate_baseline": baseline.up_rate,
        "difference": None if None in (candidate.up_rate, baseline.up_rate) else candidate.up_rate - baseline.up_rate,
        "interval_low": lo,
        "interval_high": hi,
        "evidence_worse": _e(flags["log_worse"]),
        "evidence_not_worse": _e(flags["log_not_worse"]),
        "evidence_errors": _e(flags.get("log_errors", -np.inf)),
        "threshold": 1.0 / s.alpha,
    }
    reasons = _reasons(candidate, baseline, s, flags, slow, statistic, elapsed, limit, action, probation)
    return CanaryDecision(action, _rule(flags, slow, action), reasons, statistic, asdict(candidate), asdict(baseline))


def _rule(flags: dict[str, Any], slow: bool, action: Action) -> str | None:
    if action == "continue":
        return None
    fired = {"latency": slow, "errors": flags["errors"], "worse": flags["worse"], "not_worse": flags["not_worse"]}
    return next((name for name, hit in fired.items() if bool(hit)), "max")


def _too_slow(c: ArmFigures, b: ArmFigures, s: CanarySettings) -> bool:
    if c.p95_latency_s is None or b.p95_latency_s is None or min(c.requests, b.requests) < s.min_requests:
        return False
    return c.p95_latency_s > s.max_p95_ratio * b.p95_latency_s


def _reasons(c, b, s, flags, slow, st, elapsed, limit, action, probation) -> list[str]:
    """Plain words: what the figures say, then the rule that decided (or what is still missing)."""
    cand, base = ("the new version", "its predecessor") if probation else ("the candidate", "the champion")
    pts = lambda x: f"{100 * x:+.1f} points"  # noqa: E731
    out = []
    if c.ratings and b.ratings:
        out.append(
            f"up-rate {st['up_rate_candidate']:.3f} ({c.ratings} ratings) vs {st['up_rate_baseline']:.3f} ({b.ratings}) for {base}: "
            f"{pts(st['difference'])}, always-valid {1 - 2 * s.alpha:.0%} interval {pts(st['interval_low'])} to {pts(st['interval_high'])}"
        )
    if slow:
        out.append(f"p95 latency {c.p95_latency_s:.2f} s is more than {s.max_p95_ratio:g} x {base}'s {b.p95_latency_s:.2f} s")
    if bool(flags["errors"]):
        out.append(
            f"error ratio {c.errors}/{c.requests} is significantly above {base}'s {b.errors}/{b.requests} "
            f"plus the allowed {pts(s.max_error_increase)} (evidence {st['evidence_errors']:.3g} >= {st['threshold']:g})"
        )
    if not bool(flags["enough"]):
        out.append(f"too few ratings to judge the up-rate: each arm needs {s.min_ratings}, {cand} has {c.ratings} and {base} {b.ratings}")
    elif bool(flags["worse"]):
        out.append(f"{cand} is rated significantly worse (evidence {st['evidence_worse']:.3g} >= {st['threshold']:g})")
    elif bool(flags["not_worse"]):
        shown = "rated significantly better" if st["interval_low"] > 0 else f"shown to be no more than {pts(s.margin)[1:]} worse"
        out.append(f"{cand} is {shown} (evidence {st['evidence_not_worse']:.3g} >= {st['threshold']:g})")
    else:
        out.append(f"no significant difference yet (evidence worse {st['evidence_worse']:.3g}, not worse {st['evidence_not_worse']:.3g}; either needs {st['threshold']:g})")
    end = "probation" if probation else "canary"
    progress = f"{c.ratings}/{s.max_ratings} ratings, {_days(elapsed)}/{_days(limit)}"
    if action == "continue":
        out.append(f"{end} maximum not reached: {progress}")
    elif bool(flags["at_max"]) and not (slow or flags["errors"] or flags["worse"] or flags["not_worse"]):
        then = "keep the version" if probation else f"{s.at_max} (setting at_max)"
        out.append(f"{end} maximum reached ({progress}) without a significant difference: {then}")
    return out


def _e(log_e) -> float:
    # capped so that the figures stay finite in JSON (the registry history, the cycle report)
    return float(np.exp(min(float(log_e), 690.0)))


def _days(t: timedelta) -> str:
    return f"{t.total_seconds() / 86400:.1f} days"
