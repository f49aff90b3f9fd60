"""The metric catalog: every Prometheus metric tunewheel exports is defined here, once.

Labels stay low-cardinality: aliases, adapter versions, statuses, ratings, outcomes. Never
ids or free text. With several gateway workers set PROMETHEUS_MULTIPROC_DIR and the
exposition in `render()` aggregates the workers' files (prometheus-client multiprocess mode).
"""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client import REGISTRY

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)

# --- serving ---------------------------------------------------------------------------
REQUESTS = Counter("tunewheel_requests_total", "Chat completion requests answered", ["alias", "version", "status"])
LATENCY = Histogram("tunewheel_request_latency_seconds", "End-to-end chat completion latency", ["alias", "version"], buckets=LATENCY_BUCKETS)
TTFT = Histogram("tunewheel_time_to_first_token_seconds", "Time to first token", ["alias", "version"], buckets=LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("tunewheel_prompt_tokens_total", "Prompt tokens", ["alias", "version"])
COMPLETION_TOKENS = Counter("tunewheel_completion_tokens_total", "Completion tokens", ["alias", "version"])
IN_FLIGHT = Gauge("tunewheel_requests_in_flight", "Chat completion requests in flight", ["alias"], multiprocess_mode="livesum")
ENGINE_UP = Gauge("tunewheel_engine_up", "1 when the engine answers its health check", multiprocess_mode="max")
ENGINE_RESTARTS = Counter("tunewheel_engine_restarts_total", "Times the engine child was restarted")
ACTIVE_VERSION = Gauge("tunewheel_active_version_info", "1 for the version each alias resolves to", ["alias", "version"], multiprocess_mode="max")

# --- turn log ---------------------------------------------------------------------------
LOG_PENDING = Gauge("tunewheel_log_pending_writes", "Turns waiting to be written", multiprocess_mode="livesum")
LOG_ERRORS = Counter("tunewheel_log_write_errors_total", "Turn-log write failures (each retried)")

# --- feedback ---------------------------------------------------------------------------
FEEDBACK = Counter("tunewheel_feedback_total", "Ratings received", ["version", "rating"])

# --- learner ----------------------------------------------------------------------------
CYCLES = Counter("tunewheel_learner_cycles_total", "Learner cycles by outcome", ["outcome"])
LAST_CYCLE = Gauge("tunewheel_learner_last_cycle_timestamp_seconds", "Unix time the last cycle ended", ["outcome"], multiprocess_mode="max")
EVAL_SCORE = Gauge("tunewheel_learner_eval_score", "Held-out score of the last cycle", ["role", "metric"], multiprocess_mode="max")
TRAIN_SECONDS = Gauge("tunewheel_learner_training_duration_seconds", "Training time of the last cycle", multiprocess_mode="max")
DATASET_SIZE = Gauge("tunewheel_learner_dataset_examples", "Examples in the last snapshot", ["split"], multiprocess_mode="max")
PROMOTIONS = Counter("tunewheel_promotions_total", "Adapter promotions", ["kind"])
ROLLBACKS = Counter("tunewheel_rollbacks_total", "Adapter rollbacks", ["kind"])

# The learner's label sets exist at 0 before the first cycle, so dashboards and alerts see the
# series and increase() counts the first event (outcomes as learn/cycle.py OUTCOMES).
for _outcome in ("promoted", "rejected", "skipped", "failed"):
    CYCLES.labels(outcome=_outcome)
    LAST_CYCLE.labels(outcome=_outcome)
for _role in ("candidate", "champion"):
    for _metric in ("em", "f1"):
        EVAL_SCORE.labels(role=_role, metric=_metric)
for _split in ("train", "heldout"):
    DATASET_SIZE.labels(split=_split)
for _kind in ("chat", "restyler"):
    PROMOTIONS.labels(kind=_kind)
    ROLLBACKS.labels(kind=_kind)


def observe_cycle(report) -> None:
    """Export a finished learner cycle (learn.cycle.LearnerCycle) to the learner's metrics."""
    CYCLES.labels(outcome=report.outcome).inc()
    LAST_CYCLE.labels(outcome=report.outcome).set(time.time())
    if report.train_examples is not None:
        DATASET_SIZE.labels(split="train").set(report.train_examples)
    if report.heldout_items is not None:
        DATASET_SIZE.labels(split="heldout").set(report.heldout_items)
    if report.train_metrics:
        TRAIN_SECONDS.set(report.train_metrics.get("duration_s") or (report.timings or {}).get("train_s", 0.0))
    for role, scores in (("champion", report.champion_scores), ("candidate", report.candidate_scores)):
        if scores:
            EVAL_SCORE.labels(role=role, metric="em").set(scores["em"])
            EVAL_SCORE.labels(role=role, metric="f1").set(scores["f1"])
    if report.outcome == "promoted":
        PROMOTIONS.labels(kind="chat").inc()


def render() -> tuple[bytes, str]:
    """The exposition body and its content type, aggregated across workers when multiprocess."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
