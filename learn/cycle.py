"""One learner cycle: curate -> train -> evaluate -> gate -> register -> promote or reject.

    tunewheel learn run [--config FILE]          # one cycle now, prints the report
    from learn.cycle import run_cycle
    report = run_cycle(settings)                 # CycleReport; report.outcome in OUTCOMES

Read top to bottom, `run_cycle` does:
  1. take the database lock `learner` (one cycle at a time across every process and replica;
     a crashed holder's lock lapses after LOCK_TTL_S, a live holder refreshes it)
  2. curate the turn log + seed files into an immutable snapshot (feedback/snapshot.py);
     too few training examples -> outcome "skipped" with what to do about it
  3. train a LoRA in a child process (learn/train.py) into adapters/<version>; the folder
     appears only when training finished, and only then is it registered as a candidate
  4. score champion (the prod version, or the base model) and candidate on the same held-out
     set through the gateway (`chat@<version>` loads the candidate into the engine unaliased)
  5. gate (learn/gate.py); promote in the registry and reconcile the serving side, or reject
Any failure records the cycle as failed with its error, rejects a registered candidate with
that error and leaves production untouched. Every cycle is a `learner_cycle` row, a report
(`cycle.json` + `cycle.txt`) under `<runs_dir>/cycle-NNNN/`, and learner metrics.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import JSON, Column, Engine, Text, delete, insert, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel

from feedback.models import utcnow
from feedback.queries import rated_turns

log = logging.getLogger("tunewheel.learn")

OUTCOMES = ("promoted", "rejected", "skipped", "failed")
LOCK_TTL_S = 900.0


class LearnerLock(SQLModel, table=True):
    __tablename__ = "learner_lock"
    name: str = Field(primary_key=True, max_length=64)
    holder: str = Field(max_length=200)
    acquired_at: datetime
    expires_at: datetime


class LearnerCycle(SQLModel, table=True):
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


class CycleLock:
    """A lease row in `learner_lock`: atomic on SQLite and Postgres, expires if its holder dies."""

    def __init__(self, db: Engine, name: str = "learner", ttl_s: float = LOCK_TTL_S):
        self.db, self.name, self.ttl = db, name, timedelta(seconds=ttl_s)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()

    def acquire(self) -> bool:
        table = LearnerLock.__table__
        now = utcnow()
        values = {"holder": self.holder, "acquired_at": now, "expires_at": now + self.ttl}
        with self.db.begin() as conn:  # take over an expired lease ...
            stale = conn.execute(update(table).where(table.c.name == self.name, table.c.expires_at < now).values(**values))
            if stale.rowcount == 1:
                return True
        try:  # ... or create the lease; a concurrent creator makes this fail
            with self.db.begin() as conn:
                conn.execute(insert(table).values(name=self.name, **values))
            return True
        except IntegrityError:
            return False

    def current_holder(self) -> str | None:
        with Session(self.db) as s:
            row = s.get(LearnerLock, self.name)
            return f"{row.holder} since {row.acquired_at:%Y-%m-%d %H:%M:%S} UTC" if row else None

    def refresh(self) -> bool:
        table = LearnerLock.__table__
        with self.db.begin() as conn:
            r = conn.execute(update(table).where(table.c.name == self.name, table.c.holder == self.holder)
                             .values(expires_at=utcnow() + self.ttl))
            return r.rowcount == 1

    def release(self) -> None:
        self._stop.set()
        table = LearnerLock.__table__
        with self.db.begin() as conn:
            conn.execute(delete(table).where(table.c.name == self.name, table.c.holder == self.holder))

    @contextmanager
    def heartbeat(self, every_s: float = 60.0):
        """Refresh the lease while the body runs (training takes longer than the TTL)."""

        def beat() -> None:
            while not self._stop.wait(every_s):
                if not self.refresh():
                    log.error("learner lock %s was lost (expired and taken over?)", self.name)

        thread = threading.Thread(target=beat, name="learner-lock", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()


class Skip(Exception):
    """The cycle has nothing to do (too little data, another cycle running); not a failure."""


@dataclass
class CycleReport:
    outcome: str = "failed"
    message: str = ""
    id: int | None = None
    trigger: str = "manual"
    started_at: str = ""
    finished_at: str = ""
    snapshot: str | None = None
    snapshot_hash: str | None = None
    train_examples: int | None = None
    heldout_items: int | None = None
    champion: str | None = None
    version: str | None = None
    champion_scores: dict | None = None
    candidate_scores: dict | None = None
    gate: dict | None = None
    train: dict | None = None
    error: str | None = None
    report_path: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        """The short human-readable form `tunewheel learn run` prints."""
        lines = [f"learner cycle {self.id if self.id is not None else '-'}: {self.outcome.upper()} - {self.message}"]
        if self.snapshot:
            lines.append(f"  snapshot   {self.snapshot}: {self.train_examples} training examples, {self.heldout_items} held-out items")
        if self.train:
            t = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in self.train.items()}
            lines.append(f"  training   {t.get('steps')} steps, {self.train.get('duration_s', 0):.0f} s, train loss {t.get('train_loss')}, "
                         f"val loss {t.get('val_loss')}, {self.train.get('tokens_per_s', 0):.0f} tokens/s")
        for role, name, scores in (("champion", self.champion, self.champion_scores), ("candidate", self.version, self.candidate_scores)):
            if scores:
                lines.append(f"  {role:<10} {name}: EM {scores['em']:.3f}  F1 {scores['f1']:.3f}  ({scores['n_turns']} turns)")
        for reason in (self.gate or {}).get("reasons", []):
            lines.append(f"  gate       {reason}")
        if self.error:
            lines.append(f"  error      {self.error}")
        if self.report_path:
            lines.append(f"  report     {self.report_path}")
        return "\n".join(lines)


def run_cycle(settings, *, gateway_url: str | None = None, reconcile: Callable[[], Any] | None = None,
              trigger: str = "manual", api_key: str | None = None, db: Engine | None = None,
              observe: Callable[[CycleReport], Any] | None = None) -> CycleReport:
    """One full cycle. `reconcile`: called after a promotion so serving converges at once (gateways
    poll the registry anyway). `api_key`: bearer key for the gateway when it requires one
    (default: the environment variable TUNEWHEEL_API_KEY). `observe`: called with the finished
    report (serve.metrics.observe_cycle exports it to Prometheus; learn does not import serve)."""
    from feedback.db import make_db

    db = db or make_db(settings.store_url)
    api_key = api_key or os.environ.get("TUNEWHEEL_API_KEY")
    lock = CycleLock(db)
    if not lock.acquire():
        report = CycleReport(outcome="skipped", trigger=trigger, message=f"another learner cycle is running ({lock.current_holder()})")
        if observe is not None:
            observe(report)
        return report
    try:
        with lock.heartbeat():
            report = _run_locked(settings, db, gateway_url or settings.gateway_url, reconcile, trigger, api_key)
    finally:
        lock.release()
    if observe is not None:
        observe(report)
    return report


def _run_locked(settings, db: Engine, gateway_url: str, reconcile, trigger: str, api_key: str | None) -> CycleReport:
    from learn.registry import Registry

    registry = Registry(db)
    report = CycleReport(trigger=trigger, started_at=utcnow().isoformat(timespec="seconds"))
    with Session(db) as s:
        row = LearnerCycle(trigger=trigger, rated_turns=rated_turns(db))
        s.add(row)
        s.commit()
        report.id = row.id
    try:
        _steps(settings, registry, report, gateway_url, reconcile, api_key)
    except Skip as exc:
        report.outcome, report.message = "skipped", str(exc)
    except Exception as exc:
        log.exception("learner cycle %s failed", report.id)
        report.outcome, report.error = "failed", f"{type(exc).__name__}: {exc}"
        report.message = f"failed; production is unchanged (still {report.champion or 'as it was'})"
        _reject_after_failure(registry, report)
    report.finished_at = utcnow().isoformat(timespec="seconds")
    _write_report(settings, report)
    _finish_row(db, report)
    log.info("%s", report.text())
    return report


def _steps(settings, registry, report: CycleReport, gateway_url: str, reconcile, api_key: str | None) -> None:
    """The cycle proper; raises Skip or any error, filling `report` as it goes."""
    from feedback.snapshot import create_snapshot
    from learn.evaluate import evaluate, load_heldout
    from learn.gate import decide
    from learn.train import TrainConfig, train_in_child

    champion = registry.prod("chat")
    report.champion = champion.name if champion else "base"
    champion_model = f"chat@{champion.name}" if champion else "base"

    t0 = time.perf_counter()
    snap = create_snapshot(registry.db, root=settings.datasets_dir / "snapshots", config=settings.curation(),
                           seed_files=settings.seed_files, tokenizer=settings.base_model_path())
    counts = snap.manifest["counts"]
    heldout_file = Path(settings.learn.heldout_file) if settings.learn.heldout_file else snap.path / "heldout_eval.jsonl"
    items = load_heldout(heldout_file) if heldout_file.is_file() and heldout_file.stat().st_size else []
    report.snapshot, report.snapshot_hash = snap.version, snap.manifest["hash"]
    report.train_examples, report.heldout_items = counts["train_total"], len(items)
    report.timings["curate_s"] = time.perf_counter() - t0
    minimum = settings.learn.train.min_examples
    if report.train_examples < minimum:
        raise Skip(f"snapshot {snap.version} has {report.train_examples} training examples, fewer than "
                   f"learn.train.min_examples = {minimum}: wait for more up-rated turns or add learn.seed_files")
    if not items:
        raise Skip(f"no held-out set to score on: snapshot {snap.version} held out no conversations; "
                   f"set learn.heldout_file (learner format or CoQA JSON) or raise learn.heldout_fraction")

    name = registry.new_version_name("chat")
    out_dir = settings.adapters_dir / name
    config = TrainConfig.from_settings(settings.learn.train, base_model=settings.base_model_path(),
                                       train_file=snap.path / "train.jsonl", out_dir=out_dir)
    t0 = time.perf_counter()
    result = train_in_child(config)
    report.timings["train_s"] = time.perf_counter() - t0
    report.train = result.metrics
    registry.register(name, kind="chat", path=result.out_dir, parent=champion.name if champion else None,
                      snapshot_hash=report.snapshot_hash, train_config=asdict(config))  # metrics: written once, at the decision
    report.version = name

    t0 = time.perf_counter()
    kw = dict(data=items, url=gateway_url, api_key=api_key, progress=False)
    champ = evaluate(settings, model=champion_model, **kw)
    cand = evaluate(settings, model=f"chat@{name}", **kw)
    report.timings["evaluate_s"] = time.perf_counter() - t0
    report.champion_scores, report.candidate_scores = champ.to_dict(), cand.to_dict()

    gate = settings.learn.gate
    decision = decide(champ, cand, min_f1_gain=gate.min_f1_gain, max_em_drop=gate.max_em_drop)
    report.gate = decision.to_dict()
    metrics = {"train": result.metrics, "heldout": {"champion": report.champion_scores, "candidate": report.candidate_scores}}
    if decision.promote:
        change = registry.promote(name, gate=report.gate, metrics=metrics)
        report.outcome, report.message = "promoted", f"{change.describe()} (F1 {champ.f1:.3f} -> {cand.f1:.3f})"
        if reconcile is not None:
            try:
                reconcile()
            except Exception as exc:  # the gateway's own poll converges within seconds anyway
                log.warning("reconcile after promotion failed (gateways will converge on their next poll): %s", exc)
    else:
        registry.reject(name, report.gate, metrics=metrics)
        report.outcome = "rejected"
        report.message = f"{name} rejected by the gate; production stays on {report.champion}"


def _reject_after_failure(registry, report: CycleReport) -> None:
    if report.version is None:
        return
    try:
        v = registry.get(report.version)
        if v is not None and v.state == "candidate":
            registry.reject(report.version, report.gate, metrics={"train": report.train}, error=report.error)
    except Exception:
        log.exception("could not mark %s rejected after the failed cycle", report.version)


def _finish_row(db: Engine, report: CycleReport) -> None:
    with Session(db) as s:
        row = s.get(LearnerCycle, report.id)
        row.finished_at = utcnow()
        for key in ("outcome", "error", "message", "snapshot_hash", "train_examples", "heldout_items", "champion",
                    "version", "champion_scores", "candidate_scores", "report_path"):
            setattr(row, key, getattr(report, key))
        s.add(row)
        s.commit()


def _write_report(settings, report: CycleReport) -> None:
    folder = Path(settings.runs_dir) / f"cycle-{report.id:04d}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        report.report_path = str(folder / "cycle.json")
        (folder / "cycle.json").write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
        (folder / "cycle.txt").write_text(report.text() + "\n")
    except OSError as exc:
        log.error("could not write the cycle report to %s: %s", folder, exc)



def last_cycle(db: Engine) -> LearnerCycle | None:
    """The most recently started cycle (the scheduler counts new ratings since it)."""
    from sqlalchemy import select

    with Session(db) as s:
        return s.exec(select(LearnerCycle).order_by(LearnerCycle.started_at.desc(), LearnerCycle.id.desc()).limit(1)).scalars().first()
