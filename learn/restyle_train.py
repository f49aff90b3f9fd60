"""Train a restyler adapter and gate it on chat answers: the learner's recipe on (neutral -> styled) pairs.

    outcome = train_restyler(train_config, registry, style="pirate", data_dir=pairs_dir, config=settings.restyle,
                             base_model=settings.base_model_path(), dirs=settings.learn_dirs, gateway_url=url)

Steps: choose epochs from the data size (`schedule`: enough for `restyle.min_steps` optimizer
steps, at most `restyle.max_epochs`, the held-out pairs as the validation set so that early
stopping on validation loss ends it when it stops improving) -> train in a child process (the
learner's `learn.train` recipe; its report.json and loss.png go with the adapter) -> register
a `restyler` candidate -> rewrite the gate's chat answers (learn/restyle_gate.py) with the base
model and with the candidate, same request, through the gateway -> style strength and content
kept -> promote or reject. A failure leaves the style's promoted restyler as it was.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

from learn.restyle_gate import gate, gate_answers, latency_summary, rewrite_all, score
from learn.restyle_style import StyleClassifier, chrf
from learn.settings import LearnDirs, RestyleSettings
from learn.train import TrainResult, train_in_child
from learn.train_config import TrainConfig, TrainError, run_record


@dataclass
class RestyleOutcome:
    style: str
    version: str | None = None
    promoted: bool = False
    base: dict | None = None
    candidate: dict | None = None
    reasons: list[str] = field(default_factory=list)
    latency_s: dict | None = None
    """The candidate's rewrite latency per answer (median, p95, n): what the restyle step adds."""
    train_metrics: dict | None = None
    loss_plot: str | None = None
    error: str | None = None

    def describe(self) -> str:
        if self.error:
            return f"restyler {self.style}: FAILED: {self.error}"
        verdict = "promoted" if self.promoted else "rejected"
        lines = [f"restyler {self.style}: {self.version} {verdict}"]
        if self.train_metrics:
            m = self.train_metrics
            lines.append(f"  trained {m.get('steps')} steps, {m.get('epochs')} epochs, validation loss {m.get('val_loss', 0):.3f}"
                         f"{' (stopped early)' if m.get('early_stopped') else ''}; loss plot {self.loss_plot}")
        lines += [f"  {r}" for r in self.reasons]
        if self.latency_s:
            lines.append(f"  added latency per answer: median {self.latency_s['median']:.1f} s, "
                         f"p95 {self.latency_s['p95']:.1f} s (n={self.latency_s['n']})")
        return "\n".join(lines)


def read_pairs(path: Path) -> list[tuple[str, str, str]]:
    """(system, user, assistant) of each pair of a chat JSONL file."""
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                m = json.loads(line)["messages"]
                rows.append((m[0]["content"], m[1]["content"], m[2]["content"]))
    return rows


def schedule(config: TrainConfig, n_train: int, *, min_steps: int, max_epochs: int, learning_rate: float) -> TrainConfig:
    """`config` with the epochs the data size asks for: at least `min_steps` optimizer steps, at
    most `max_epochs` (early stopping on validation loss may end it sooner). A config that already
    sets max_steps keeps it, and the epochs that reach it."""
    per_epoch = max(1, math.ceil(math.ceil(n_train / config.batch_size) / config.grad_accum))
    want = config.max_steps or min_steps
    epochs = max(1, min(max_epochs, math.ceil(want / per_epoch)))
    # one epoch without improvement may be noise on a small held-out set; two end the run
    return config.model_copy(update={"epochs": epochs, "learning_rate": learning_rate,
                                     "early_stopping_patience": max(config.early_stopping_patience, 2)})


async def score_candidate(url: str, config: RestyleSettings, version: str, *, classifier: StyleClassifier,
                          heldout: list[tuple[str, str, str]], db: Any = None,
                          api_key: str | None = None) -> tuple[Any, Any, dict]:
    """(base scores, candidate scores, candidate latency) on the gate's chat answers."""
    answers = await gate_answers(url, config, db=db,
                                 exclude=set(classifier.in_style_texts) | set(classifier.out_of_style_texts), api_key=api_key)
    neutral, styled = [p[1] for p in heldout], [p[2] for p in heldout]
    results = {}
    for model in ("base", f"chat@{version}"):
        rewrites, seconds = await rewrite_all(url, config, model, answers, api_key=api_key)
        corpus, _ = await rewrite_all(url, config, model, neutral, api_key=api_key) if heldout else ([], [])
        results[model] = (score(model, answers, rewrites, classifier=classifier,
                                corpus_chrf=chrf(corpus, styled) if heldout else None), seconds)
    return results["base"][0], results[f"chat@{version}"][0], latency_summary(results[f"chat@{version}"][1])


def train_restyler(config: TrainConfig, registry, *, style: str, data_dir: Path, base_model: str, dirs: LearnDirs,
                   gateway_url: str, restyle: RestyleSettings, db: Any = None, api_key: str | None = None,
                   train: Callable[..., TrainResult] = train_in_child) -> RestyleOutcome:
    """Train on the style's pairs under `data_dir` (`config`: [learn.train] with any overrides; the
    epochs come from `schedule` unless `config.max_steps` is set), score, gate; the version goes
    under `dirs.adapters`, its report under `dirs.runs`. `db`: the turn log to sample answers from."""
    outcome = RestyleOutcome(style=style)
    data_dir = Path(data_dir)
    train_file, heldout_file = data_dir / "restyle.train.jsonl", data_dir / "restyle.heldout.jsonl"
    for f in (train_file, heldout_file, data_dir / "classifier.json"):
        if not f.is_file():
            outcome.error = f"{f} does not exist: run `tunewheel restyle build --style {style} --texts PATH` first"
            return outcome
    heldout = read_pairs(heldout_file)
    config = schedule(config, len(read_pairs(train_file)), min_steps=restyle.min_steps, max_epochs=restyle.max_epochs,
                      learning_rate=restyle.learning_rate)
    name = registry.new_version_name("restyler", style)
    outcome.version = name
    paths = dict(base_model=base_model, train_file=train_file, out_dir=dirs.adapters / name, val_file=heldout_file)
    try:
        result = train(config, **paths)
    except TrainError as exc:
        outcome.error = f"training failed, the promoted restyler is unchanged: {exc}"
        return outcome
    report_json = Path(result.out_dir) / "report.json"
    early = json.loads(report_json.read_text()).get("early_stopped") if report_json.is_file() else None
    outcome.train_metrics = {**result.metrics, "early_stopped": early}
    outcome.loss_plot = str(Path(result.out_dir) / "loss.png")
    parent = registry.prod("restyler", style)
    registry.register(name, kind="restyler", style=style, path=result.out_dir, parent=parent.name if parent else None,
                      train_config=run_record(config, **paths), metrics={"train": result.metrics})
    try:
        base, cand, outcome.latency_s = asyncio.run(score_candidate(
            gateway_url, restyle, name, classifier=StyleClassifier.load(data_dir), heldout=heldout, db=db, api_key=api_key))
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        registry.reject(name, error=f"scoring failed: {exc}")
        outcome.error = f"scoring through {gateway_url} failed ({exc}); is `tunewheel serve` running?"
        return outcome
    decision = gate(base, cand, restyle.gate)
    outcome.base, outcome.candidate, outcome.reasons = asdict(base), asdict(cand), decision.reasons
    gate_record = {"promote": decision.promote, "reasons": decision.reasons, "base": outcome.base, "candidate": outcome.candidate}
    if decision.promote:
        registry.promote(name, gate=gate_record, metrics={"gate": outcome.candidate})
        outcome.promoted = True
    else:
        registry.reject(name, gate_record, metrics={"gate": outcome.candidate})
    report = Path(dirs.runs) / f"{name}.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(asdict(outcome), indent=2) + "\n")
    return outcome
