"""Settings owned by the learn package: `[learn]` (with `[learn.train]`, `[learn.gate]`,
`[learn.schedule]`) and `[restyle]`.

    [learn]
    heldout_file = "heldout.json"          # the operator's held-out set (learner format or CoQA JSON)
    [learn.train]                          # learn/train_config.py: TrainConfig, one docstring per key
    rank = 16
    [learn.gate]
    min_f1_gain = 0.01

The top-level settings (serve/settings.py) compose these sections with the others. Functions of
this package take the section they need and explicit paths (`LearnDirs`), never the whole
settings object.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from feedback.curate import CurationConfig
from learn.train_config import TrainConfig

log = logging.getLogger("tunewheel.learn")
_warned_metrics_port = False


class GateSettings(BaseModel):
    min_f1_gain: float = Field(0.01, description="Promote only when candidate F1 - champion F1 >= this.")
    max_em_drop: float = Field(0.0, description="... and champion EM - candidate EM <= this.")


class ScheduleSettings(BaseModel):
    cron: str | None = Field(None, description="Crontab expression for cycles, e.g. '0 3 * * *'.")
    interval_minutes: float | None = Field(None, description="Run a cycle every N minutes (used when cron is unset).")
    min_new_ratings: int | None = Field(None, description="Also run when this many new rated turns arrived since the last cycle.")
    check_seconds: float = Field(60.0, description="How often the new-ratings trigger is checked.")


class LearnSettings(BaseModel):
    train: TrainConfig = Field(default_factory=TrainConfig)
    gate: GateSettings = Field(default_factory=GateSettings)
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)
    heldout_fraction: float = Field(0.1, description="Share of conversations held out by curation.")
    heldout_file: str | None = Field(None, description="Fixed held-out eval file (learner format or CoQA JSON); default: the snapshot's held-out split.")
    seed_files: list[str] = Field(default_factory=list, description="Operator seed datasets (chat JSONL or CoQA JSON) added to every snapshot's training data.")
    eval_concurrency: int = Field(8, description="Requests in flight during evaluation.")
    eval_max_tokens: int = Field(32, description="max_tokens of evaluation answers.")
    metrics_port: int | None = Field(None, description="Deprecated and ignored: the gateway's /metrics serves the learner's figures, "
                                                       "read from the store. Accepted so that older config files still load.")
    pii_scrub: bool = Field(True, description="Replace e-mails, phone and card numbers with placeholders during curation.")

    @model_validator(mode="after")
    def _deprecated(self) -> LearnSettings:
        global _warned_metrics_port
        if self.metrics_port is not None and not _warned_metrics_port:
            _warned_metrics_port = True  # settings load several times per process: say it once
            log.warning("learn.metrics_port is deprecated and ignored: the learner's metrics are on the gateway's /metrics")
        return self

    def curation(self, max_tokens: int | None = None) -> CurationConfig:
        """How curation turns this learner's logs into data: token limit (default train.max_length; 0: none),
        PII scrubbing and the held-out share."""
        limit = self.train.max_length if max_tokens is None else max_tokens
        return CurationConfig(max_tokens=limit or None, pii_scrub=self.pii_scrub, heldout_fraction=self.heldout_fraction)


class RestyleGateSettings(BaseModel):
    """`[restyle.gate]`: when a restyler is promoted, judged on chat answers (learn/restyle_gate.py)."""

    min_style_gain: float = Field(0.5, description="Promote only when the share of rewrites the style classifier calls "
                                                   "in-style is at least this much above the base model's (0-1).")
    min_content_chrf: float = Field(50.0, description="... and the rewrites' chrF against the raw answers is at least this (0-100).")
    min_facts_kept: float = Field(0.75, description="... and at least this share of rewrites keeps every name and number (0-1).")
    answers: int = Field(12, ge=1, description="Chat answers the gate scores on: logged answers, topped up with the "
                                               "served model's answers to a fixed set of varied prompts.")
    answer_max_tokens: int = Field(96, ge=8, description="max_tokens of the served model's answers to those prompts.")


class RestyleSettings(BaseModel):
    system_prompt: str = Field("Please, rewrite the provided text in your style:", description="The restyler's system prompt, in training and serving.")
    neutralise_prompt: str = Field("Rewrite the following text as plain, neutral prose. Keep every fact, name and number.",
                                   description="The de-styler's system prompt (`restyle build`).")
    fallback: Literal["error", "raw"] = Field("error", description="On restyler failure: answer with an error, or the raw answer marked as unstyled.")
    engine_url: str | None = Field(None, description="A separate engine for restylers.")
    max_tokens_ratio: float = Field(1.5, gt=0, description="A rewrite may have this many times the raw answer's tokens ...")
    max_tokens_extra: int = Field(48, ge=0, description="... plus this many, for the style's own words (opening, signature).")
    frequency_penalty: float = Field(0.2, ge=-2, le=2, description="OpenAI frequency_penalty of rewrites: counts only the "
                                     "rewrite's own tokens, so it stops a looping opening without penalising copied names and numbers.")
    learning_rate: float = Field(1e-3, gt=0, lt=1, description="Peak learning rate of restyler training (`restyle train`; "
                                 "the other training settings are [learn.train]'s).")
    min_steps: int = Field(30, ge=1, description="Restyler training runs enough epochs for at least this many optimizer steps ...")
    max_epochs: int = Field(8, ge=1, description="... and at most this many epochs; validation loss on the held-out pairs stops it early.")
    gate: RestyleGateSettings = Field(default_factory=RestyleGateSettings)


@dataclass(frozen=True)
class LearnDirs:
    """Where the learner keeps what it makes, under the data dir."""

    adapters: Path
    """One folder per adapter version (never overwritten)."""
    datasets: Path
    """Snapshots (`snapshots/snap-*`), restyle pairs, imported data."""
    runs: Path
    """Cycle and evaluation reports."""

    @classmethod
    def under(cls, data_dir: Path) -> LearnDirs:
        data_dir = Path(data_dir)
        return cls(adapters=data_dir / "adapters", datasets=data_dir / "datasets", runs=data_dir / "runs")

    @property
    def snapshots(self) -> Path:
        return self.datasets / "snapshots"
