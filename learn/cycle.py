"""One learner cycle: curate -> train -> evaluate -> gate -> register -> promote or reject.

    tunewheel learn run [--config FILE]          # one cycle now, prints the report
    from learn.cycle import cycle_runner
    cycle = cycle_runner(settings)("manual")     # a LearnerCycle row; cycle.outcome in OUTCOMES

`run_cycle(learn, db=, dirs=, base_model=, gateway_url=, ...)` takes the `[learn]` section, the
store, the learner's folders and its collaborators as arguments: `train` (default: the recipe in
a child process), `evaluate` (default: EM/F1 of a model served at `gateway_url`) and `converge`
("make serving converge now", called when a promotion waits for a gateway to load the candidate;
the learner never sees the gateway itself). `cycle_runner(settings, ...)` builds those arguments
from the composed settings; `learn run`, `serve --with-learner` and the demo use it. Read top to bottom, a cycle does:
  1. take the database lock `learner` (learn/lock.py): one cycle at a time across processes
  2. curate the turn log + seed files into an immutable snapshot (feedback/snapshot.py), and take
     what the learning policy trains on (`[learn.policy]`, learn/cycle_data.py): the whole snapshot
     from the base model, or, continuing the champion, what is new since its lineage's snapshots
     plus a replay share of them; too little data -> outcome "skipped" with what to do about it
  3. train a LoRA through the policy's stages (sft, kto, dpo) into adapters/<version>, from a fresh
     LoRA or from the champion's adapter; the folder appears only when training finished, and only
     then is it registered as a candidate
  4. score champion (the prod version, or the base model) and candidate on the same held-out
     set through the gateway (`chat@<version>` loads the candidate into the engine unaliased), and
     on the operator's regression set (`learn.regression_file`) when there is one; a champion
     already scored on exactly these items is read back from `<runs>/scores/`, not scored again
  5. gate (learn/gate.py): never promote on a held-out set the operator does not control (the
     cycle trains and reports, and says why); promote through the one promotion path
     (learn/promotion.py: a gateway loads and warms the candidate, then prod moves only if it is
     still on the champion this cycle evaluated; `converge` asks a gateway in this process to do it
     now), or reject. A rollback made while the cycle ran wins: the candidate is not promoted and
     the cycle says so ("rejected")
Any failure (a candidate the engine would not load included) records the cycle as failed with
its error, marks a registered candidate `failed` with that error and leaves production untouched. A
cycle is bounded by `learn.cycle_timeout_s`: training gets what is left of it, and the lock
stops being refreshed past it, so a hung cycle is given up and another learner may start. A
cycle is one `LearnerCycle` row, written as it goes, and a report (`cycle.json` + `cycle.txt`)
under `<runs>/cycle-NNNN/`; the gateway's /metrics reads the rows.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import JSON, Column, Engine, Text, select
from sqlmodel import Field, Session, SQLModel

from feedback.models import utcnow
from feedback.queries import rated_turns
from learn.cycle_data import CycleData, NothingNew, cycle_data, heldout_trust
from learn.evaluate import evaluate as evaluate_served
from learn.evaluate import scored_once
from learn.lock import CycleLock
from learn import promotion
from learn.live import canary_from_cycle
from learn.registry import ChampionMoved
from learn.settings import LearnDirs, LearnSettings
from learn.train import train_in_child

log = logging.getLogger("tunewheel.learn")

OUTCOMES = ("promoted", "canary", "rejected", "skipped", "failed")


class LearnerCycle(SQLModel, table=True):
    """One learner cycle, the one record of it: written when it starts, completed as it goes."""

    __tablename__ = "learner_cycle"
    id: int | None = Field(default=None, primary_key=True)
    started_at: datetime = Field(default_factory=utcnow, index=True)
    finished_at: datetime | None = None
    trigger: str = Field(default="manual", max_length=32)
    outcome: str | None = Field(default=None, max_length=16)
    error: str | None = Field(default=None, sa_column=Column(Text))
    message: str | None = Field(default=None, sa_column=Column(Text))
    snapshot_hash: str | None = Field(default=None, max_length=64)
    train_examples: int | None = None
    heldout_items: int | None = None
    rated_turns: int | None = None
    champion: str | None = Field(default=None, max_length=200)
    version: str | None = Field(default=None, max_length=200)
    champion_scores: dict | None = Field(default=None, sa_column=Column(JSON))
    candidate_scores: dict | None = Field(default=None, sa_column=Column(JSON))
    report_path: str | None = Field(default=None, sa_column=Column(Text))
    # added by migration 0004
    snapshot: str | None = Field(default=None, max_length=64)  # the snapshot's version, snap-<hash prefix>
    gate: dict | None = Field(default=None, sa_column=Column(JSON))  # learn.gate.Decision.to_dict()
    train_metrics: dict | None = Field(default=None, sa_column=Column(JSON))  # TrainResult.metrics
    timings: dict | None = Field(default=None, sa_column=Column(JSON))  # seconds: curate_s, train_s, evaluate_s

    def text(self) -> str:
        """The short human-readable form `tunewheel learn run` prints."""
        lines = [f"learner cycle {self.id if self.id is not None else '-'}: {(self.outcome or 'running').upper()} - {self.message or ''}"]
        if self.snapshot:
            lines.append(f"  snapshot   {self.snapshot}: {self.train_examples} training examples, {self.heldout_items} held-out items")
        data = (self.train_metrics or {}).get("data")
        if data:
            c = data["counts"]
            lines.append(f"  data       start {data['start']}, stages {'+'.join(data['stages'])}: sft {sum(c['sft'].values())} "
                         f"({', '.join(f'{k} {v}' for k, v in sorted(c['sft'].items())) or 'none'}), kto up {c['kto']['up']} / down "
                         f"{c['kto']['down']}, dpo {c['dpo']['pairs']} pairs")
        for stage, why in (self.train_metrics or {}).get("skipped_stages", {}).items():
            lines.append(f"  skipped    {stage}: {why}")
        if self.train_metrics:
            m = self.train_metrics
            t = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in m.items()}
            lines.append(f"  training   {t.get('steps')} steps, {m.get('duration_s', 0):.0f} s, train loss {t.get('train_loss')}, "
                         f"val loss {t.get('val_loss')}, {m.get('tokens_per_s', 0):.0f} tokens/s")
        for role, name, scores in (("champion", self.champion, self.champion_scores), ("candidate", self.version, self.candidate_scores)):
            if scores:
                lines.append(f"  {role:<10} {name}: EM {scores['em']:.3f}  F1 {scores['f1']:.3f}  ({scores['n_turns']} turns)"
                             + (f", scored in {scores['cached_from']} on the same items" if scores.get("cached_from") else ""))
        regression = (self.gate or {}).get("regression")
        for role, name in (("champion", self.champion), ("candidate", self.version)) if regression else ():
            r = regression[role]
            lines.append(f"  regression {role} {name}: EM {r['em']:.3f}  F1 {r['f1']:.3f}  ({r['n_turns']} turns)")
        for reason in (self.gate or {}).get("reasons", []):
            lines.append(f"  gate       {reason}")
        if self.error:
            lines.append(f"  error      {self.error}")
        if self.report_path:
            lines.append(f"  report     {self.report_path}")
        return "\n".join(lines)


class Skip(Exception):
    """The cycle has nothing to do (too little data, no held-out set); not a failure."""


# ---------------------------------------------------------------- the cycle


def run_cycle(learn: LearnSettings, *, db: Engine, dirs: LearnDirs, base_model: str, gateway_url: str,
              api_key: str | None = None, trigger: str = "manual", converge: Callable[[], Any] | None = None,
              train: Callable[..., Any] = train_in_child,
              evaluate: Callable[..., Any] = functools.partial(evaluate_served, progress=False)) -> LearnerCycle:
    """One full cycle, recorded as a `learner_cycle` row (returned). Another cycle holding the lock makes
    this one "skipped" at once, and unrecorded (the running one is the record of that time)."""
    lock = CycleLock(db, max_hold_s=learn.cycle_timeout_s)
    if not lock.acquire():
        return LearnerCycle(trigger=trigger, outcome="skipped", finished_at=utcnow(),
                            message=f"another learner cycle is running ({lock.current_holder()})")
    try:
        with lock.heartbeat():
            run = _Run(learn, db, dirs, base_model, gateway_url, api_key, converge, train, evaluate,
                       deadline=time.monotonic() + learn.cycle_timeout_s)
            return run.record(trigger)
    finally:
        lock.release()


@dataclass
class _Run:
    """The arguments of one `run_cycle`, and its steps in the order they happen."""

    learn: LearnSettings
    db: Engine
    dirs: LearnDirs
    base_model: str
    gateway_url: str
    api_key: str | None
    converge: Callable[[], Any] | None
    train: Callable[..., Any]
    evaluate: Callable[..., Any]
    deadline: float | None = None
    """time.monotonic() past which the cycle is given up (learn.cycle_timeout_s)."""

    def __post_init__(self) -> None:
        from learn.registry import Registry

        self.registry = Registry(self.db)

    def record(self, trigger: str) -> LearnerCycle:
        """Run the steps into a fresh row; whatever happens, the row and the report end up complete."""
        cycle = LearnerCycle(trigger=trigger, rated_turns=rated_turns(self.db), timings={})
        _save(self.db, cycle)
        try:
            self.steps(cycle)
        except Skip as exc:
            cycle.outcome, cycle.message = "skipped", str(exc)
        except Exception as exc:
            log.exception("learner cycle %s failed", cycle.id)
            cycle.outcome, cycle.error = "failed", f"{type(exc).__name__}: {exc}"
            cycle.message = f"failed; production is unchanged (still {cycle.champion or 'as it was'})"
            self.reject_after_failure(cycle)
        cycle.finished_at = utcnow()
        _write_report(self.dirs.runs, cycle)
        _save(self.db, cycle)
        log.info("%s", cycle.text())
        return cycle

    def steps(self, cycle: LearnerCycle) -> None:
        """The cycle proper; raises Skip or any error, filling `cycle` as it goes."""
        champion = self.registry.prod("chat")
        cycle.champion = champion.name if champion else "base"
        snap, items, regression = self.curate(cycle)
        data = self.training_data(cycle, snap, champion)
        start_adapter = champion.path if champion and self.learn.policy.start == "champion" else None
        result = self.train_candidate(cycle, data, parent=champion.name if champion else None, start_adapter=start_adapter)
        with _timed(cycle, "evaluate_s"):
            champ, cand = self.score(items, cycle)
            reg = self.score(regression, cycle) if regression else None
        cycle.champion_scores, cycle.candidate_scores = champ.to_dict(), cand.to_dict()
        trust = heldout_trust(self.learn.heldout_file, snap.manifest)
        self.decide(cycle, champ, cand, result.metrics, regression=reg, trust=trust)

    def score(self, items: list, cycle: LearnerCycle) -> tuple[Any, Any]:
        """(champion, candidate) reports on the same items through the gateway. A version's answers
        are a function of its weights (immutable), the items and the decoding settings (greedy), so a
        champion already scored on exactly these items (as the last cycle's candidate, say) is not
        scored again: its report is read back from `<runs>/scores/` and says so (`cached_from`)."""
        common = dict(url=self.gateway_url, max_tokens=self.learn.eval_max_tokens, concurrency=self.learn.eval_concurrency,
                      api_key=self.api_key)
        champion = f"chat@{cycle.champion}" if cycle.champion != "base" else "base"
        return (self._scored(items, champion, common, cycle),
                self._scored(items, f"chat@{cycle.version}", common, cycle, reuse=False))

    def _scored(self, items: list, model: str, common: dict, cycle: LearnerCycle, *, reuse: bool = True) -> Any:
        return scored_once(self.evaluate, items, self.dirs.scores, model=model, base=self.base_model, reuse=reuse,
                           label=f"cycle {cycle.id}", **common)

    def curate(self, cycle: LearnerCycle):
        """Snapshot the log and seeds: (snapshot, held-out items, regression items). Skip when there is nothing to score on."""
        from learn.evaluate import load_heldout

        with _timed(cycle, "curate_s"):
            snap = _snapshot(self.learn, self.db, self.dirs, self.base_model)
            heldout_file = Path(self.learn.heldout_file) if self.learn.heldout_file else snap.path / "heldout_eval.jsonl"
            items = load_heldout(heldout_file) if heldout_file.is_file() and heldout_file.stat().st_size else []
            regression = load_heldout(self.learn.regression_file) if self.learn.regression_file else []
        cycle.snapshot, cycle.snapshot_hash = snap.version, snap.manifest["hash"]
        cycle.train_examples, cycle.heldout_items = snap.manifest["counts"]["train_total"], len(items)
        _save(self.db, cycle)
        if not items:
            raise Skip(f"no held-out set to score on: snapshot {snap.version} held out no conversations; "
                       f"set learn.heldout_file (learner format or CoQA JSON) or raise learn.heldout_fraction")
        return snap, items, regression

    def training_data(self, cycle: LearnerCycle, snap, champion) -> CycleData:
        """The files the policy trains on; Skip when no stage of the policy has enough rows."""
        policy, minimum = self.learn.policy, self.learn.train.min_examples
        lineage = []
        for version in _lineage(self.registry, champion.name) if champion and policy.start == "champion" else []:
            folder = self.dirs.snapshots / f"snap-{(version.snapshot_hash or '')[:12]}"
            lineage += [folder] if version.snapshot_hash and folder.is_dir() else []
        try:
            data = cycle_data(policy, snap.path, lineage=lineage, out=self.dirs.runs / f"cycle-{cycle.id:04d}" / "data",
                              seed=self.learn.train.seed, champion=champion.name if champion else None)
        except NothingNew as exc:
            raise Skip(str(exc)) from exc
        c = data.counts
        rows = {"sft": sum(c["sft"].values()), "kto": c["kto"]["up"] + c["kto"]["down"] + c["dpo"]["pairs"], "dpo": c["dpo"]["pairs"]}
        if all(rows[stage] < minimum for stage in policy.stages):
            what = " and ".join(f"{stage} {rows[stage]}" for stage in policy.stages)
            raise Skip(f"snapshot {snap.version} has {rows['sft']} training examples ({what} for this policy's stages), fewer "
                       f"than learn.train.min_examples = {minimum}: wait for more rated turns or add learn.seed_files")
        return data

    def train_candidate(self, cycle: LearnerCycle, data: CycleData, *, parent: str | None, start_adapter: str | None):
        """Train into a fresh version folder and register the finished adapter as a candidate."""
        from learn.train_config import run_record

        name = self.registry.new_version_name("chat")
        stages = list(self.learn.policy.stages)
        paths = dict(base_model=self.base_model, out_dir=self.dirs.adapters / name, start_adapter=start_adapter, **data.files)
        with _timed(cycle, "train_s"):
            timeout = None if self.deadline is None else max(1.0, self.deadline - time.monotonic())
            result = self.train(self.learn.train, stages=stages, **paths, timeout=timeout)
        cycle.train_metrics = {**result.metrics, "data": {"start": data.start, "stages": stages, "counts": data.counts}}
        # metrics: written once, at the decision
        self.registry.register(name, kind="chat", path=result.out_dir, parent=parent, snapshot_hash=cycle.snapshot_hash,
                               train_config=run_record(self.learn.train, stages=stages, **paths))
        cycle.version = name
        _save(self.db, cycle)
        return result

    def decide(self, cycle: LearnerCycle, champ, cand, train_metrics: dict, *, regression=None, trust=(True, "")) -> None:
        """Gate, then promote (and converge serving) or reject; the decision goes on the version and the cycle."""
        from learn.gate import decide

        gate = self.learn.gate
        decision = decide(champ, cand, min_f1_gain=gate.min_f1_gain, max_em_drop=gate.max_em_drop, regression=regression,
                          max_regression_drop=gate.max_regression_drop, heldout_trusted=trust[0], heldout_why=trust[1])
        cycle.gate = decision.to_dict()
        metrics = {"train": train_metrics, "heldout": {"champion": cycle.champion_scores, "candidate": cycle.candidate_scores}}
        if regression:
            metrics["regression"] = {"champion": regression[0].to_dict(), "candidate": regression[1].to_dict()}
        if decision.promote and self.learn.promotion == "canary" and canary_from_cycle(self.registry, cycle, self.learn.canary, metrics):
            cycle.outcome, cycle.message = "canary", (f"{cycle.version} (F1 {champ.f1:.3f} -> {cand.f1:.3f}) is the canary beside "
                                                      f"{cycle.champion} until the live test decides")
            return
        if decision.promote and self.learn.promotion == "direct":
            change = self.promote(cycle, metrics)
            if change is not None:
                cycle.outcome, cycle.message = "promoted", f"{change.describe()} (F1 {champ.f1:.3f} -> {cand.f1:.3f})"
                return
        self.registry.reject(cycle.version, cycle.gate, metrics=metrics)
        cycle.outcome = "rejected"
        why = "" if trust[0] else f": the held-out set is not operator-controlled ({trust[1]}), so this cycle only trains and reports"
        cycle.message = cycle.message or f"{cycle.version} not promoted{why or ' by the gate'}; production stays on {cycle.champion}"

    def promote(self, cycle: LearnerCycle, metrics: dict):
        """The one promotion path (learn/promotion.py) against the champion the candidate was scored against:
        a gateway loads and warms it (`converge`: the one in this process, now), then production moves only if
        it is still that champion. None, with the reason in the gate and the message, when it moved meanwhile
        (an operator's rollback wins); PromotionFailed / PromotionTimeout fail the cycle, production unchanged."""
        if self.deadline is not None and time.monotonic() > self.deadline:  # its lock has lapsed: another learner may run
            raise TimeoutError(f"the cycle ran past learn.cycle_timeout_s = {self.learn.cycle_timeout_s:g} s and was given up")
        try:
            return promotion.promote(self.registry, cycle.version, requested_by="learner", converge=self.converge,
                                     expected=None if cycle.champion == "base" else cycle.champion,
                                     wait_s=self.learn.promotion_wait_s, gate=cycle.gate, metrics=metrics)
        except ChampionMoved as exc:
            cycle.gate = {**cycle.gate, "promote": False, "reasons": [*cycle.gate.get("reasons", []), str(exc)]}
            cycle.message = f"{cycle.version} not promoted: {exc}"
            return None

    def reject_after_failure(self, cycle: LearnerCycle) -> None:
        """A registered candidate of a failed cycle is marked `failed` with the error: never servable."""
        if cycle.version is None:
            return
        try:
            v = self.registry.get(cycle.version)
            if v is not None and v.state == "candidate":  # a promotion request may have written its metrics already
                metrics = None if "train" in (v.metrics or {}) else {"train": cycle.train_metrics}
                self.registry.fail(cycle.version, cycle.error, gate=cycle.gate, metrics=metrics)
        except Exception:
            log.exception("could not mark %s failed after the failed cycle", cycle.version)


# ---------------------------------------------------------------- helpers


def _snapshot(learn: LearnSettings, db: Engine, dirs: LearnDirs, base_model: str):
    """Curate the whole log plus the seed files into a snapshot, with the trainer's token limit."""
    from feedback.snapshot import create_snapshot

    return create_snapshot(db, root=dirs.snapshots, config=learn.curation(), seed_files=learn.seed_files,
                           tokenizer=base_model)


def _lineage(registry, name: str) -> list:
    """The version `name` and its ancestors (parent, parent's parent, ...), newest first."""
    found: list = []
    while name and name not in [v.name for v in found] and (version := registry.get(name)) is not None:
        found.append(version)
        name = version.parent
    return found


@contextmanager
def _timed(cycle: LearnerCycle, stage: str):
    """Record the seconds the body takes under `stage` in the cycle's timings."""
    started = time.perf_counter()
    try:
        yield
    finally:
        # a new dict: the JSON column notices reassignment, not changes in place
        cycle.timings = {**(cycle.timings or {}), stage: time.perf_counter() - started}


def _save(db: Engine, cycle: LearnerCycle) -> None:
    with Session(db, expire_on_commit=False) as s:
        s.add(cycle)
        s.commit()


def _write_report(runs: Path, cycle: LearnerCycle) -> None:
    folder = Path(runs) / f"cycle-{cycle.id:04d}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        cycle.report_path = str(folder / "cycle.json")
        (folder / "cycle.json").write_text(cycle.model_dump_json(indent=2) + "\n")
        (folder / "cycle.txt").write_text(cycle.text() + "\n")
    except OSError as exc:
        log.error("could not write the cycle report to %s: %s", folder, exc)


def last_cycle(db: Engine) -> LearnerCycle | None:
    """The most recently started cycle (the scheduler counts new ratings since it)."""
    with Session(db) as s:
        return s.exec(select(LearnerCycle).order_by(LearnerCycle.started_at.desc(), LearnerCycle.id.desc()).limit(1)).scalars().first()


# ---------------------------------------------------------------- assembly


def cycle_runner(settings, *, converge: Callable[[], Any] | None = None, gateway_url: str | None = None,
                 api_key: str | None = None, progress: bool = False) -> Callable[[str], LearnerCycle]:
    """`run(trigger)` -> one cycle, with every argument of `run_cycle` taken from the composed settings.

    `gateway_url` defaults to the configured gateway, `api_key` to TUNEWHEEL_API_KEY; evaluation
    requests time out after `serve.request_timeout_s`, as the gateway's own requests to the engine.
    `progress`: progress bars on stderr, the training child's (steps, loss, tokens/s) and the
    evaluation's (turns): for a person watching (`learn run`, the demo), not for a server's log.
    """
    from feedback.db import make_db

    db = make_db(settings.store_url)
    evaluate = functools.partial(evaluate_served, timeout=settings.serve.request_timeout_s, progress=progress)
    train = functools.partial(train_in_child, progress=progress)

    def run(trigger: str = "manual") -> LearnerCycle:
        return run_cycle(settings.learn, db=db, dirs=settings.learn_dirs, base_model=settings.base_model_path(),
                         gateway_url=gateway_url or settings.gateway_url, api_key=api_key or os.environ.get("TUNEWHEEL_API_KEY"),
                         trigger=trigger, converge=converge, train=train, evaluate=evaluate)

    return run
