"""The metric catalog: every Prometheus metric tunewheel exports is defined here, once.

    metrics.REQUESTS.labels(alias="chat", version="base", status="ok").inc()
    body, content_type = metrics.render(StoreMetrics(db))     # the gateway's GET /metrics

The gateway's own figures (requests, latency, tokens, engine, turn log, ratings) are
prometheus-client metrics in this process. The learner's and the registry's are read from the
store at scrape time by `StoreMetrics`, because cycles and promotions happen in other
processes. Labels stay low-cardinality: aliases, adapter versions, statuses, ratings,
outcomes. Never ids or free text. With several gateway workers set PROMETHEUS_MULTIPROC_DIR
and the exposition in `render()` aggregates the workers' files (prometheus-client
multiprocess mode).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlmodel import Session

from learn.cycle import OUTCOMES, LearnerCycle
from learn.promotion import fallbacks
from learn.registry import KINDS, AliasHistory, AliasPointer

log = logging.getLogger("tunewheel.metrics")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)

# --- serving ---------------------------------------------------------------------------
REQUESTS = Counter("tunewheel_requests_total", "Chat completion requests answered", ["alias", "version", "status"])
LATENCY = Histogram("tunewheel_request_latency_seconds", "End-to-end chat completion latency", ["alias", "version"], buckets=LATENCY_BUCKETS)
TTFT = Histogram("tunewheel_time_to_first_token_seconds", "Time to first token", ["alias", "version"], buckets=LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("tunewheel_prompt_tokens_total", "Prompt tokens", ["alias", "version"])
COMPLETION_TOKENS = Counter("tunewheel_completion_tokens_total", "Completion tokens", ["alias", "version"])
IN_FLIGHT = Gauge("tunewheel_requests_in_flight", "Chat completion requests in flight", ["alias"], multiprocess_mode="livesum")
ENGINE_UP = Gauge("tunewheel_engine_up", "1 when the engine answers its health check", multiprocess_mode="max")
ENGINE_REPLICAS = Gauge("tunewheel_engine_replicas", "Engine replicas behind the gateway (engine.urls) by state: "
                        "ready, syncing (adapters being loaded after a restart), down", ["state"], multiprocess_mode="max")
ENGINE_RESTARTS = Counter("tunewheel_engine_restarts_total", "Times the engine child was restarted")
RESTYLE_LATENCY = Histogram("tunewheel_restyle_latency_seconds", "Latency the restyle step adds to an answer "
                            "(the restyler's rewrite, after the raw answer is whole)", ["style", "status"],
                            buckets=LATENCY_BUCKETS)
LOOP_LAG = Histogram("tunewheel_event_loop_lag_seconds", "How late the gateway's event loop ran a 0.1 s timer: "
                     "the time every request, /health included, waited on something holding the loop",
                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
ACTIVE_VERSION = Gauge("tunewheel_active_version_info", "1 for the version each alias resolves to", ["alias", "version"], multiprocess_mode="max")
ALIAS_FALLBACK = Gauge("tunewheel_alias_fallback", "1 while an alias serves another version than its target, which will not load",
                       ["alias"], multiprocess_mode="max")

# --- turn log ---------------------------------------------------------------------------
LOG_PENDING = Gauge("tunewheel_log_pending_writes", "Turns waiting to be written", multiprocess_mode="livesum")
LOG_ERRORS = Counter("tunewheel_log_write_errors_total", "Turn-log write failures (each retried)")
LOG_SPOOL_BYTES = Gauge("tunewheel_log_spool_bytes", "Bytes of answered turns in the spool, not yet in the database",
                        multiprocess_mode="livesum")
LOG_SPOOL_CAPACITY = Gauge("tunewheel_log_spool_capacity_bytes", "Spool bytes at which new chat requests get 503",
                           multiprocess_mode="livesum")
LOG_QUARANTINED = Counter("tunewheel_log_quarantined_turns_total",
                          "Turns the database refused for their content, and unreadable spool records, kept in quarantine")

# --- feedback ---------------------------------------------------------------------------
FEEDBACK = Counter("tunewheel_feedback_total", "Ratings received", ["version", "rating"])

# --- learner and registry: read from the store at scrape time (StoreMetrics below) ------
SCORE_ROLES = ("candidate", "champion")
SPLITS = ("train", "heldout")
LOOKBACK_CYCLES = 1000  # how far back a gauge looks for the last cycle that measured it
LIVE_PHASES = ("canary", "probation")
LIVE_RULES = ("worse", "not_worse", "errors", "latency", "max")


class StoreMetrics(Collector):
    """The learner's and the registry's figures, read from the store whenever /metrics is scraped.

        body, content_type = render(StoreMetrics(db))        # what the gateway's /metrics does

    The learner runs in other processes (`tunewheel learn schedule`, another replica) and so do
    promotions (`tunewheel adapters promote`, the admin route), so the store is the one place
    that knows them all: cycles by outcome and the end of the last one (`learner_cycle`), the
    eval scores, dataset sizes and training time of the last cycle that measured them,
    promotions and rollbacks
    by kind (`alias_history`, the kind from `alias_pointer`), promotions that fell back because the
    engine would not load the version (`promotion`, learn/promotion.py). Every label set exists at 0
    before the first event, so alerts see the series and increase() counts the first one.
    Counters here are counts of rows, so they never go down; several gateway replicas export
    the same values (aggregate them with max, not sum). A store that cannot be read leaves
    these series out of that scrape rather than failing the gateway's own.
    """

    def __init__(self, db):
        self.db = db

    def describe(self) -> list[Metric]:
        return list(_families({}).values())

    def collect(self) -> Iterator[Metric]:
        try:
            figures = read_store_figures(self.db)
        except Exception as exc:  # e.g. the database is down: keep the rest of the scrape
            log.warning("learner metrics left out of this scrape: the store could not be read (%s)", exc)
            return
        yield from _families(figures).values()


def read_store_figures(db) -> dict[str, Any]:
    """The figures StoreMetrics exports, as plain values (one short read-only session)."""
    c = LearnerCycle
    with Session(db) as s:
        ended = s.execute(select(c.outcome, func.count(), func.max(c.finished_at))
                          .where(c.outcome.is_not(None)).group_by(c.outcome)).all()
        moves = s.execute(select(AliasPointer.kind, AliasHistory.action, func.count())
                          .join(AliasPointer, AliasPointer.key == AliasHistory.key)
                          .group_by(AliasPointer.kind, AliasHistory.action)).all()
        fell_back = fallbacks(s)
        chat = s.get(AliasPointer, "chat")
        decided = s.execute(select(AliasHistory.action, AliasHistory.detail)
                            .where(AliasHistory.action.in_(("promote", "rollback", "canary_end", "keep")))).all()
        newest = select(c).order_by(c.id.desc()).limit(LOOKBACK_CYCLES)
        sizes = s.execute(newest.where(c.train_examples.is_not(None))).scalars().first()
        trained = next((cy for cy in s.execute(newest.where(c.version.is_not(None))).scalars() if cy.train_metrics), None)
        # JSON columns hold a JSON null rather than SQL NULL, so the scores are found by reading.
        scored = s.execute(newest.where(c.outcome.in_(("promoted", "canary", "rejected", "failed")))).scalars()
        scores: dict[str, dict] = {}
        for cycle in scored:
            for role in SCORE_ROLES:
                if role not in scores and getattr(cycle, f"{role}_scores"):
                    scores[role] = getattr(cycle, f"{role}_scores")
            if len(scores) == len(SCORE_ROLES):
                break
    train = trained.train_metrics if trained is not None else {}
    return {
        "cycles": {outcome: n for outcome, n, _ in ended},
        "last_cycle": {outcome: _unix(at) for outcome, _, at in ended if at is not None},
        "scores": scores,
        "sizes": {"train": sizes.train_examples, "heldout": sizes.heldout_items} if sizes is not None else {},
        "train_seconds": train.get("duration_s"),
        "moves": {(kind, action): n for kind, action, n in moves},
        "fallbacks": fell_back,
        "live": _live_figures(chat, decided),
    }


def _live_figures(chat: AliasPointer | None, decided) -> dict[str, Any]:
    """The chat pointer's trials as their last check saw them, and every live decision acted on, by rule."""
    decisions: dict[tuple[str, str, str], int] = {}
    for action, detail in decided:
        if isinstance(detail, dict) and detail.get("phase") in LIVE_PHASES and detail.get("action") in ("promote", "rollback"):
            key = (detail["phase"], "keep" if action == "keep" else detail["action"], detail.get("rule") or "max")
            decisions[key] = decisions.get(key, 0) + 1
    live = (chat.live or {}) if chat is not None else {}
    return {"share": (chat.canary_share or 0.0) if chat is not None and chat.canary else 0.0,
            "running": {phase: live.get(phase) for phase in LIVE_PHASES if chat is not None and getattr(chat, phase)},
            "decisions": decisions}


def _families(f: dict[str, Any]) -> dict[str, Metric]:
    """The exported families from `read_store_figures` output; {} gives every series at 0."""
    cycles = CounterMetricFamily("tunewheel_learner_cycles", "Learner cycles by outcome", labels=["outcome"])
    last = GaugeMetricFamily("tunewheel_learner_last_cycle_timestamp_seconds", "Unix time the last cycle ended",
                             labels=["outcome"])
    for outcome in OUTCOMES:
        cycles.add_metric([outcome], f.get("cycles", {}).get(outcome, 0))
        last.add_metric([outcome], f.get("last_cycle", {}).get(outcome, 0))
    score = GaugeMetricFamily("tunewheel_learner_eval_score", "Held-out score of the last cycle", labels=["role", "metric"])
    for role in SCORE_ROLES:
        for metric in ("em", "f1"):
            score.add_metric([role, metric], (f.get("scores", {}).get(role) or {}).get(metric, 0))
    size = GaugeMetricFamily("tunewheel_learner_dataset_examples", "Examples in the last snapshot", labels=["split"])
    for split in SPLITS:
        size.add_metric([split], f.get("sizes", {}).get(split) or 0)
    seconds = GaugeMetricFamily("tunewheel_learner_training_duration_seconds", "Training time of the last cycle",
                                value=f.get("train_seconds") or 0)
    promotions = CounterMetricFamily("tunewheel_promotions", "Adapter promotions", labels=["kind"])
    rollbacks = CounterMetricFamily("tunewheel_rollbacks", "Adapter rollbacks", labels=["kind"])
    fell_back = CounterMetricFamily("tunewheel_promotion_fallbacks", "Promotions that fell back: the engine would not "
                                    "load the version, so production stayed on the last good one", labels=["kind"])
    for kind in KINDS:
        promotions.add_metric([kind], f.get("moves", {}).get((kind, "promote"), 0))
        rollbacks.add_metric([kind], f.get("moves", {}).get((kind, "rollback"), 0))
        fell_back.add_metric([kind], f.get("fallbacks", {}).get(kind, 0))
    live = _live_families(f.get("live", {}))
    return {m.name: m for m in (cycles, last, score, size, seconds, promotions, rollbacks, fell_back, *live)}


def _live_families(live: dict[str, Any]) -> list[Metric]:
    """The canary's and probation's figures (learn/live.py): 0 while none runs, so the series always exist."""
    share = GaugeMetricFamily("tunewheel_canary_share", "Share of new conversations the chat canary answers (0: no canary)",
                              value=live.get("share", 0.0))
    ratings = GaugeMetricFamily("tunewheel_live_ratings", "Rated turns per arm of a running trial, at its last check",
                                labels=["phase", "arm"])
    up_rate = GaugeMetricFamily("tunewheel_live_up_rate", "Thumbs-up rate per arm of a running trial, at its last check",
                                labels=["phase", "arm"])
    evidence = GaugeMetricFamily("tunewheel_live_evidence", "E-values of a running trial's tests (decides at 1/alpha)",
                                 labels=["phase", "test"])
    decisions = CounterMetricFamily("tunewheel_live_decisions", "Live decisions acted on: canary promoted or rolled back, "
                                    "probation kept or rolled back, by the rule that decided", labels=["phase", "decision", "rule"])
    for phase in LIVE_PHASES:
        d = (live.get("running") or {}).get(phase) or {}
        stat = d.get("statistic") or {}
        for arm, who in (("candidate", "candidate"), ("baseline", "baseline")):
            ratings.add_metric([phase, arm], (d.get(who) or {}).get("ratings", 0))
            up_rate.add_metric([phase, arm], stat.get(f"up_rate_{arm}") or 0.0)
        for test in ("worse", "not_worse", "errors"):
            evidence.add_metric([phase, test], min(stat.get(f"evidence_{test}") or 0.0, 1e300))
        for decision in (("promote", "rollback") if phase == "canary" else ("keep", "rollback")):
            for rule in LIVE_RULES:
                decisions.add_metric([phase, decision, rule], (live.get("decisions") or {}).get((phase, decision, rule), 0))
    return [share, ratings, up_rate, evidence, decisions]


def _unix(at: datetime) -> float:
    return (at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)).timestamp()


def render(*collectors: Collector) -> tuple[bytes, str]:
    """The exposition body and its content type: the catalog (aggregated across workers when
    multiprocess) followed by `collectors` (the gateway passes its StoreMetrics). Blocking when a
    collector reads the store: call it from a worker thread."""
    registry: Collector = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry) + b"".join(generate_latest(c) for c in collectors), CONTENT_TYPE_LATEST
