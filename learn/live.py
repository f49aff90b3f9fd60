"""Live trials: a canary earns production on real traffic, and a promoted version that users rate
worse rolls itself back.

    from learn.live import LiveTrials
    trials = LiveTrials(registry, settings.learn.canary, base_name=settings.engine.served_name,
                        promote=lambda name, expected, detail: promotion.promote(registry, name, expected=expected, ...))
    trials.check()      # every learn.canary.check_seconds (the learner's scheduler): one decision per trial

Two kinds of trial, both state on the registry's prod pointer (learn/registry.py), so every gateway
replica routes alike and a restarted learner goes on where the last one was:
- canary: with `learn.promotion = "canary"`, a candidate that passed the offline gate answers
  `learn.canary.share` of new conversations beside prod (serve/routing.py picks the arm from a hash
  of the conversation, so a conversation stays on one arm). Both arms are compared on the same
  period of the turn log; learn/canary.py `decide()` says promote (through learn/promotion.py, the
  one path to production), roll back (the candidate is rejected) or continue.
- probation: after any promotion, the new version's figures since it took over are compared with
  its predecessor's last `learn.canary.probation_window` before that; a significant drop rolls
  prod back (the registry's rollback, guarded by compare-and-swap), the end of the window keeps it.

Figures are the turn log's (feedback/queries.py `version_figures`): rated turns and thumbs up,
requests and errors, p95 latency, per version that answered. Each check writes its decisions'
figures to the pointer (`live`: what `adapters list`, the admin API and /metrics show); each
action writes them to the history row of the move and to the version's metrics. A failed check
(database down, no gateway to load a promotion) changes nothing and is retried at the next.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from feedback.queries import version_figures
from learn.canary import ArmFigures, CanaryDecision, CanarySettings, decide
from sqlalchemy import select, update
from sqlmodel import Session

from learn.registry import _key as pointer_key  # the one spelling of a pointer's key ("chat", "restyler-<style>")
from learn.registry import UNCHECKED, AdapterVersion, AliasHistory, AliasPointer, Registry, RegistryError, utcnow

log = logging.getLogger("tunewheel.live")

Promote = Callable[[str, "str | None", dict], object]
"""promote(version, expected prod version, detail): learn/promotion.py's promote, bound by the caller."""


@dataclass(frozen=True)
class LiveOutcome:
    """What one check decided for one trial."""

    key: str
    phase: str  # "canary" | "probation"
    version: str
    baseline: str | None
    action: str  # "promote" | "rollback" | "continue"; for probation "promote" means keep
    rule: str | None
    reasons: list[str]
    error: str | None = None  # the action was decided but could not be carried out (retried at the next check)


class LiveTrials:
    """Checks and acts on every running canary and probation. `base_name`: the engine's name for the
    base model (what the turn log records when no adapter answered). `now`: the clock (tests)."""

    def __init__(self, registry: Registry, settings: CanarySettings, *, base_name: str, promote: Promote,
                 now: Callable[[], datetime] = utcnow):
        self.registry, self.settings, self.base_name = registry, settings, base_name
        self.promote, self.now = promote, now

    def check(self) -> list[LiveOutcome]:
        """One decision per running trial of a chat pointer, acted on; never raises."""
        outcomes = []
        try:
            pointers_ = [p for p in pointers(self.registry.db) if p.kind == "chat" and (p.canary or p.probation)]
        except Exception as exc:
            log.warning("live trials not checked: the registry could not be read (%s)", exc)
            return []
        for pointer in pointers_:
            live: dict = {"checked_at": self.now().isoformat()}
            for phase, run in (("probation", self._probation), ("canary", self._canary)):
                if getattr(pointer, phase) is None:
                    continue
                try:
                    outcome, decision = run(pointer)
                except Exception as exc:  # e.g. the database went away mid-check
                    log.warning("live %s of %s not checked: %s", phase, getattr(pointer, phase), exc)
                    continue
                live[phase] = {"version": outcome.version, "baseline": outcome.baseline, "action": outcome.action,
                               "error": outcome.error, **decision.to_dict()}
                outcomes.append(outcome)
                if outcome.action != "continue" and outcome.error is None:
                    log.info("live %s of %s: %s (%s)", phase, outcome.version, outcome.action, "; ".join(outcome.reasons))
                    if phase == "probation" and outcome.action == "rollback":
                        break  # the rollback moved prod, which ended the canary beside it
            try:
                record_live(self.registry.db, pointer.key, live)
            except Exception as exc:
                log.warning("live figures of %s not recorded: %s", pointer.key, exc)
        return outcomes

    def figures(self, version: str | None, since: datetime, until: datetime | None = None) -> ArmFigures:
        return ArmFigures(**version_figures(self.registry.db, version or self.base_name, since=since, until=until))

    def _canary(self, pointer: AliasPointer) -> tuple[LiveOutcome, CanaryDecision]:
        since = _utc(pointer.canary_since)
        candidate, champion = self.figures(pointer.canary, since), self.figures(pointer.version, since)
        decision = decide(candidate, champion, self.settings, elapsed=self.now() - since)
        detail = _detail("canary", pointer.canary, pointer.version, decision, since)
        error = None
        if decision.action == "promote":
            error = self._act(lambda: self.promote(pointer.canary, pointer.version, detail))
        elif decision.action == "rollback":
            error = self._act(lambda: end_canary(self.registry, pointer.canary, detail))
        if decision.action != "continue" and error is None:
            note_cycle(self.registry.db, pointer.canary, detail)
        return _outcome(pointer, "canary", pointer.canary, pointer.version, decision, error), decision

    def _probation(self, pointer: AliasPointer) -> tuple[LiveOutcome, CanaryDecision]:
        since = _utc(pointer.probation_since)
        window = self.settings.probation_window
        new = self.figures(pointer.probation, since)
        before = self.figures(pointer.probation_baseline, since - window, since)
        decision = decide(new, before, self.settings, elapsed=self.now() - since, probation=True)
        detail = _detail("probation", pointer.probation, pointer.probation_baseline, decision, since)
        error = None
        if decision.action == "rollback":
            error = self._act(lambda: self.registry.rollback(pointer.kind, pointer.style, expected=pointer.probation,
                                                             detail=detail))
        elif decision.action == "promote":
            error = self._act(lambda: end_probation(self.registry, pointer.probation, detail))
        return _outcome(pointer, "probation", pointer.probation, pointer.probation_baseline, decision, error), decision

    @staticmethod
    def _act(action: Callable[[], object]) -> str | None:
        try:
            action()
        except (RegistryError, OSError) as exc:  # prod moved meanwhile, no gateway loaded it, ...: next check
            log.warning("live decision not carried out: %s", exc)
            return str(exc)
        return None


def live_trials(settings, *, converge: Callable[[], object] | None = None) -> LiveTrials:
    """LiveTrials from the composed settings: promotions through learn/promotion.py, loaded by a gateway
    (`converge`: the one in this process, now), as the learner's own promotions are."""
    from feedback.db import make_db
    from learn import promotion

    registry = Registry(make_db(settings.store_url))

    def promote(name: str, expected: str | None, detail: dict):
        return promotion.promote(registry, name, expected=expected, requested_by="canary", converge=converge,
                                 wait_s=settings.learn.promotion_wait_s, max_rank=settings.lora_capacity_for(promotion.served_rank(registry)),
                                 detail=detail)

    return LiveTrials(registry, settings.learn.canary, base_name=settings.engine.served_name, promote=promote)


def _detail(phase: str, version: str, baseline: str | None, decision: CanaryDecision, since: datetime) -> dict:
    return {"phase": phase, "version": version, "baseline": baseline or "base", "since": since.isoformat(),
            **decision.to_dict()}


def _outcome(pointer: AliasPointer, phase: str, version: str, baseline: str | None, decision: CanaryDecision,
             error: str | None) -> LiveOutcome:
    return LiveOutcome(pointer.key, phase, version, baseline, decision.action, decision.rule, decision.reasons, error)


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)


# ---------------------------------------------------------------- the registry's side: state on the pointer


def start_canary(registry: Registry, name: str, *, share: float, expected: str | None | object = UNCHECKED,
                 gate: dict | None = None, metrics: dict | None = None) -> None:
    """Make the candidate `name` the canary of its (kind, style), beside prod (while prod is still
    `expected`): the gateways load it and route it `share` of new conversations until a check
    promotes it (learn/promotion.py) or rolls it back (`end_canary`)."""
    if not 0 < share < 1:
        raise RegistryError(f"a canary's share must be between 0 and 1, got {share}")
    version = registry.get(name)
    if version is None:
        raise RegistryError(f"no adapter version named {name}")
    with registry.locked(version.kind, version.style) as (s, pointer):
        registry.check_expected(pointer, expected)
        version = registry.promotable(s, pointer, name)
        if version.state != "candidate":
            raise RegistryError(f"only candidates can be a canary; {name} is {version.state}")
        if pointer.canary is not None:
            raise RegistryError(f"{pointer.canary} is already the canary of {pointer.key} (since {pointer.canary_since:%Y-%m-%d %H:%M} "
                                "UTC); one canary at a time: wait for its decision or roll it back")
        registry.note(version, gate=gate, metrics=metrics)
        pointer.canary, pointer.canary_share, pointer.canary_since = name, share, utcnow()
        s.add(AliasHistory(key=pointer.key, action="canary", version=name, previous=pointer.version, detail={"share": share}))
        s.add(pointer)
        s.commit()


def canary_from_cycle(registry: Registry, cycle, settings: CanarySettings, metrics: dict) -> bool:
    """learn.promotion = "canary": a learner cycle's candidate that passed the gate becomes the canary beside the
    champion it was scored against; False, with the reason on the cycle, when it cannot (prod moved, a canary runs).
    The gateways' reconcilers load it within seconds and route its share."""
    try:
        start_canary(registry, cycle.version, share=settings.share, gate=cycle.gate, metrics=metrics,
                     expected=None if cycle.champion == "base" else cycle.champion)
    except RegistryError as exc:
        cycle.gate = {**cycle.gate, "promote": False, "reasons": [*cycle.gate.get("reasons", []), str(exc)]}
        cycle.message = f"{cycle.version} not made the canary: {exc}"
        return False
    return True


def end_canary(registry: Registry, name: str, detail: dict) -> None:
    """Roll the canary `name` back: it stops answering and is rejected; `detail` (the decision and its
    figures) goes on the history row and into its metrics."""
    version = registry.get(name)
    if version is None:
        raise RegistryError(f"no adapter version named {name}")
    with registry.locked(version.kind, version.style) as (s, pointer):
        if pointer.canary != name:
            raise RegistryError(f"{name} is not the canary of {pointer.key} (the canary is {pointer.canary or 'none'})")
        version = s.get(AdapterVersion, name)
        version.state = "rejected"
        version.error = "rolled back by the live canary: " + "; ".join(detail.get("reasons", [])[-2:])
        registry.note(version, gate=None, metrics={"canary": detail})
        registry.stop_canary(s, pointer, detail)
        s.commit()


def end_probation(registry: Registry, name: str, detail: dict) -> None:
    """The probation of `name` passed (no significant drop): recorded, and no longer watched."""
    version = registry.get(name)
    with registry.locked(version.kind, version.style) as (s, pointer):
        if pointer.probation != name:
            raise RegistryError(f"{name} is not on probation in {pointer.key}")
        registry.note(s.get(AdapterVersion, name), gate=None, metrics={"probation": detail})
        s.add(AliasHistory(key=pointer.key, action="keep", version=name, previous=pointer.probation_baseline, detail=detail))
        pointer.probation = pointer.probation_since = pointer.probation_baseline = None
        s.add(pointer)
        s.commit()


def note_cycle(db, version: str, detail: dict) -> None:
    """The canary's decision in the report of the learner cycle that made it the canary: its row (gate["live"],
    the message) and its cycle.json / cycle.txt. Best effort: the registry history holds it anyway."""
    from learn.cycle import LearnerCycle

    try:
        with Session(db, expire_on_commit=False) as s:
            cycle = s.execute(select(LearnerCycle).where(LearnerCycle.version == version, LearnerCycle.outcome == "canary")
                              .order_by(LearnerCycle.id.desc())).scalars().first()
            if cycle is None:
                return
            cycle.gate = {**(cycle.gate or {}), "live": detail}
            verdict = "promoted" if detail["action"] == "promote" else "rolled back"
            cycle.message = f"{cycle.message}; live canary: {verdict} ({detail.get('rule')}: {'; '.join(detail.get('reasons', [])[-1:])})"
            s.add(cycle)
            s.commit()
        if cycle.report_path:
            folder = Path(cycle.report_path).parent
            (folder / "cycle.json").write_text(cycle.model_dump_json(indent=2) + "\n")
            (folder / "cycle.txt").write_text(cycle.text() + "\n")
    except Exception as exc:
        log.warning("the canary decision on %s did not reach its cycle report: %s", version, exc)


def pointers(db) -> list[AliasPointer]:
    """Every prod pointer with its trials and their last check (`live`)."""
    with Session(db) as s:
        return list(s.execute(select(AliasPointer).order_by(AliasPointer.key)).scalars())


def record_live(db, key: str, live: dict) -> None:
    """The last check of a pointer's trials, for `adapters list`, the admin API and /metrics."""
    with Session(db) as s:
        s.execute(update(AliasPointer).where(AliasPointer.key == key).values(live=live))
        s.commit()


def describe(pointer: AliasPointer) -> list[str]:
    """One line per running trial of `pointer`, with its last check: for `adapters list` and the admin API."""
    lines = []
    for phase in ("canary", "probation"):
        version = getattr(pointer, phase)
        if version is None:
            continue
        since = getattr(pointer, f"{phase}_since")
        what = (f"canary {version}: {100 * (pointer.canary_share or 0):.0f}% of new conversations beside {pointer.version or 'base'}"
                if phase == "canary" else f"probation of {version} against {pointer.probation_baseline or 'base'}'s last window")
        check = ((pointer.live or {}).get(phase) or {})
        reasons = check.get("reasons") or ["not checked yet (the learner's scheduler checks every learn.canary.check_seconds)"]
        lines.append(f"{what}, since {since:%Y-%m-%d %H:%M} UTC; last check: {check.get('action', 'none')}: {'; '.join(reasons)}")
    return lines


def canary_of(registry: Registry, kind: str = "chat", style: str | None = None) -> tuple[AdapterVersion, float] | None:
    """The canary version of (kind, style) and the share of conversations it answers, or None."""
    with Session(registry.db) as s:
        pointer = s.get(AliasPointer, pointer_key(kind, style))
        if pointer is None or pointer.canary is None:
            return None
        version = s.get(AdapterVersion, pointer.canary)
        return (version, pointer.canary_share or 0.0) if version is not None else None
