"""Settings owned by the learn package: `[learn]` (with `[learn.train]`, `[learn.gate]`,
`[learn.schedule]`) and `[restyle]`.

    [learn]
    heldout_file = "heldout.json"          # the operator's held-out set (learner format or CoQA JSON)
    [learn.train]                          # learn/train_config.py: TrainConfig, one docstring per key
    rank = 16
    [learn.gate]
    min_f1_gain = 0.01
    [learn.policy]                         # the stages of a cycle and where training starts
    stages = ["sft", "kto"]
    start = "base"

The top-level settings (serve/settings.py) compose these sections with the others. Functions of
this package take the section they need and explicit paths (`LearnDirs`), never the whole
settings object.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from feedback.curate import CurationConfig
from learn.canary import CanarySettings
from learn.train_config import TrainConfig

log = logging.getLogger("tunewheel.learn")
_warned_metrics_port = False


class GateSettings(BaseModel):
    min_f1_gain: float = Field(0.01, description="Promote only when candidate F1 - champion F1 >= this.")
    max_em_drop: float = Field(0.0, description="... and champion EM - candidate EM <= this.")
    max_regression_drop: float = Field(0.02, description="... and, when learn.regression_file is set, champion F1 - candidate F1 "
                                                         "on that set <= this.")


STAGE_ORDER = ("sft", "kto", "dpo")


class PolicySettings(BaseModel):
    """`[learn.policy]`: what a cycle trains, and from where."""

    stages: list[Literal["sft", "kto", "dpo"]] = Field(default_factory=lambda: ["sft", "kto"], description=(
        "Training stages of a cycle, in this order: sft (up-rated answers and corrections as targets), kto (thumbs "
        "up/down, unpaired), dpo (pairs: a correction over the answer it corrects). A stage without enough data is "
        "skipped and the report says why. Default sft then kto: the best of bench/preference.py's variants."))
    start: Literal["base", "champion"] = Field("base", description=(
        "base: a fresh LoRA on the base model, trained on the whole snapshot. champion: continue the promoted "
        "adapter (its lineage) on what is new since its snapshot, plus a replay share of earlier snapshots."))
    replay_share: float = Field(0.25, description="With start = champion: the share of the SFT training set drawn from "
                                                  "the snapshots the champion's lineage was trained on, against forgetting.")

    @model_validator(mode="after")
    def _check(self) -> PolicySettings:
        if not self.stages:
            raise ValueError("learn.policy.stages is empty: choose some of sft, kto, dpo")
        order = [STAGE_ORDER.index(s) for s in self.stages]
        if order != sorted(set(order)):
            raise ValueError(f"learn.policy.stages must name each stage once, in the order sft, kto, dpo; got {self.stages}")
        if not 0 <= self.replay_share < 1:
            raise ValueError(f"learn.policy.replay_share must be in [0, 1), got {self.replay_share}")
        return self


class ScheduleSettings(BaseModel):
    cron: str | None = Field(None, description="Crontab expression for cycles, e.g. '0 3 * * *'.")
    interval_minutes: float | None = Field(None, description="Run a cycle every N minutes (used when cron is unset).")
    min_new_ratings: int | None = Field(None, description="Also run when this many new rated turns arrived since the last cycle.")
    check_seconds: float = Field(60.0, description="How often the new-ratings trigger is checked.")


class LearnSettings(BaseModel):
    train: TrainConfig = Field(default_factory=TrainConfig)
    gate: GateSettings = Field(default_factory=GateSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)
    canary: CanarySettings = Field(default_factory=CanarySettings)
    promotion: Literal["direct", "canary"] = Field("direct", description=(
        "What a candidate that passes the gate becomes: direct, production at once; canary, the alias's canary, "
        "answering learn.canary.share of new conversations until the live test promotes or rolls it back "
        "(learn/live.py). Either way a promoted version is on probation for learn.canary.probation_window."))
    heldout_fraction: float = Field(0.1, description="Share of conversations held out by curation.")
    heldout_file: str | None = Field(None, description="Fixed held-out eval file (learner format or CoQA JSON); default: the snapshot's "
                                                       "held-out split. Promotion needs an operator-controlled held-out set: this file, "
                                                       "or a log-derived one the snapshot marks trusted.")
    regression_file: str | None = Field(None, description="Operator regression set (any held-out format): the gate scores champion and "
                                                          "candidate on it too and refuses a drop over gate.max_regression_drop.")
    seed_files: list[str] = Field(default_factory=list, description="Operator seed datasets (chat JSONL or CoQA JSON) added to every snapshot's training data.")
    eval_concurrency: int = Field(8, description="Requests in flight during evaluation.")
    eval_max_tokens: int = Field(32, description="max_tokens of evaluation answers.")
    metrics_port: int | None = Field(None, description="Deprecated and ignored: the gateway's /metrics serves the learner's figures, "
                                                       "read from the store. Accepted so that older config files still load.")
    pii_scrub: bool = Field(True, description="Replace e-mail addresses, phone numbers, credit cards, IBANs, IP addresses and "
                                              "national id numbers with placeholders during curation (presidio-analyzer's "
                                              "recognizers; feedback/pii.py). The manifest counts what was replaced.")
    trusted_keys: list[str] = Field(default_factory=list, description="API keys (sha256 hex, as in serve.api_keys) whose "
                                    "conversations the operator trusts to score candidates: with any set, only their "
                                    "conversations are held out of training, and that log-derived held-out set counts as "
                                    "operator-controlled (promotion needs one, or learn.heldout_file).")
    max_share_per_key: float | None = Field(None, gt=0, le=1, description="Most of a snapshot's training rows (each file: SFT, "
                                            "KTO, DPO) one API key may contribute, e.g. 0.2; rows over it are dropped and "
                                            "counted in the manifest. Rows without a key (an open gateway, seed files) are "
                                            "never capped. None: no cap.")
    promotion_wait_s: float = Field(300.0, gt=0, description="How long a promotion (the learner's, `tunewheel adapters "
                                    "promote`) waits for a gateway to load and warm the version before it is called off, "
                                    "production unchanged.")
    cycle_timeout_s: float = Field(6 * 3600.0, gt=0, description="A learner cycle running longer is given up: training gets "
                                   "what is left of it (the child is killed after that), and the learner lock stops being "
                                   "refreshed, so another learner may start.")

    @field_validator("trusted_keys")
    @classmethod
    def _hashed(cls, keys: list[str]) -> list[str]:
        for k in keys:
            if len(k) != 64 or any(c not in "0123456789abcdef" for c in k):
                raise ValueError("trusted_keys are key hashes: sha256 hex, as in serve.api_keys")
        return keys

    @model_validator(mode="after")
    def _deprecated(self) -> LearnSettings:
        global _warned_metrics_port
        if self.metrics_port is not None and not _warned_metrics_port:
            _warned_metrics_port = True  # settings load several times per process: say it once
            log.warning("learn.metrics_port is deprecated and ignored: the learner's metrics are on the gateway's /metrics")
        return self

    def curation(self, max_tokens: int | None = None) -> CurationConfig:
        """How curation turns this learner's logs into data: token limit (default train.max_length; 0: none),
        PII scrubbing, the held-out share and who may shape it, the per-key share cap."""
        limit = self.train.max_length if max_tokens is None else max_tokens
        return CurationConfig(max_tokens=limit or None, pii_scrub=self.pii_scrub, heldout_fraction=self.heldout_fraction,
                              trusted_keys=tuple(self.trusted_keys), max_share_per_key=self.max_share_per_key,
                              operator_heldout=self.heldout_file)


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
    system_prompt: str = Field("Please, rewrite the provided text in your style:",
                               description="System prompt of every restyler pair and restyle request.")
    neutralise_prompt: str = Field("Rewrite the following text as plain, neutral prose. Keep every fact, name and number.",
                                   description="What `restyle build` asks the served model, to de-style each chunk.")
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

    @property
    def scores(self) -> Path:
        """Evaluation reports kept for reuse (learn/evaluate.py `scored_once`): the learner's cycles and the demo's baseline."""
        return self.runs / "scores"
