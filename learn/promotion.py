"""Promotion: the one path from an adapter version to production, for the learner, the CLI and the admin route.

    from learn.promotion import promote
    change = promote(registry, "chat-v0004", expected="chat-v0003", requested_by="cli", max_rank=16)
    change = promote(registry, name, expected=prod_now, requested_by="admin", load=load_and_warm)   # in a gateway

Every promotion is one `promotion` row (migration 0006) and three steps:
  1. request: the version may be promoted (registered, not rejected or failed, its folder there,
     its LoRA rank within the engine's `max_rank`) and prod is still on `expected`, the version
     the caller decided against (None: the base model). Otherwise a RegistryError says why and
     nothing changes.
  2. load + warm it in the engine. A caller inside a gateway passes `load` (the admin route:
     the reconciler's). Any other process (the learner, `tunewheel adapters promote`) leaves the
     row `pending`: the gateways' reconcilers (serve/reconcile.py) claim it, exactly one replica
     loads it, and `converge` asks a gateway in this process to do so at once. The caller waits
     up to `wait_s` for the outcome.
  3. finish: the compare-and-swap, inside the pointer's lock (learn/registry.py): prod moves to
     the version only while it is still on the version the request saw.

Outcomes, in the row's `state`: `promoted`; `fell_back`, the engine would not load it, so prod
stays on the last good version (PromotionFailed, with the engine's reason; /metrics counts these
as `tunewheel_promotion_fallbacks_total` and the TunewheelPromotionFellBack alert fires);
`superseded`, prod moved meanwhile (ChampionMoved: a rollback made while the learner trained is
never overridden); `cancelled`, the caller stopped waiting (PromotionTimeout), so nothing happens
behind its back later; `expired`, past its deadline with no gateway to finish it. Restyler
versions load when a request first needs them (maybe on an engine of their own), so their
promotion is the compare-and-swap alone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Column, Text, func, select, update
from sqlmodel import Field, Session, SQLModel

from learn.registry import (
    AdapterVersion,
    AliasPointer,
    Change,
    ChampionMoved,
    Registry,
    RegistryError,
    VersionNotFound,
    utcnow,
)

log = logging.getLogger("tunewheel.promotion")

PENDING = "pending"
STATES = (PENDING, "promoted", "fell_back", "superseded", "cancelled", "expired")
DEFAULT_WAIT_S = 300.0


class Promotion(SQLModel, table=True):
    """One promotion request and how it ended: the record of every fallback."""

    __tablename__ = "promotion"
    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(max_length=200, index=True)
    kind: str = Field(max_length=16)
    style: str | None = Field(default=None, max_length=200)
    version: str = Field(max_length=200)
    expected: str | None = Field(default=None, max_length=200)
    """Prod when the request was made (None: the base model): the compare of the compare-and-swap."""
    state: str = Field(default=PENDING, max_length=16, index=True)
    requested_by: str = Field(max_length=64)
    claimed_by: str | None = Field(default=None, max_length=200)
    """The gateway replica that loads it; None while any may claim it."""
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = Field(default_factory=utcnow)
    deadline: datetime
    finished_at: datetime | None = None
    detail: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    """Why it was asked for (a live canary's decision with its figures); goes on the history row."""


class PromotionFailed(RegistryError):
    """The engine would not load the version; production stays on the last good one."""


class PromotionTimeout(RegistryError):
    """No gateway finished the promotion in time; it was called off and production is unchanged."""


class RankTooLarge(RegistryError):
    """The adapter's LoRA rank is more than the engine can hold."""


def adapter_rank(path: str | Path) -> int | None:
    """The LoRA rank of an adapter folder: `r` in its adapter_config.json (or the largest of `rank_pattern`)."""
    try:
        config = json.loads((Path(path) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    ranks = [r for r in [config.get("r"), *(config.get("rank_pattern") or {}).values()] if isinstance(r, int)]
    return max(ranks) if ranks else None


def served_rank(registry: Registry) -> int | None:
    """The largest LoRA rank among the adapters a gateway may serve from `registry`: each alias's promoted
    version, its canary, the version on probation and the one it replaced, and the last good versions a
    rollback (or a version that will not load) falls back to. None when there are none."""
    with Session(registry.db) as s:
        pointers = list(s.execute(select(AliasPointer)).scalars())
    names = {n for p in pointers for n in (p.version, p.canary, p.probation, p.probation_baseline) if n}
    names |= {v.name for p in pointers for v in registry.last_good(p.kind, p.style)}
    ranks = [adapter_rank(v.path) for n in names if (v := registry.get(n)) is not None]
    return max((r for r in ranks if r), default=None)


def check_rank(name: str, path: str | Path, max_rank: int | None) -> None:
    """RankTooLarge, with what to change, when the adapter at `path` needs more than `max_rank`."""
    rank = adapter_rank(path)
    if max_rank is None or rank is None or rank <= max_rank:
        return
    raise RankTooLarge(
        f"{name} has LoRA rank {rank} but the engine holds at most rank {max_rank} (vLLM --max-lora-rank: "
        f"engine.max_lora_rank, by default the smallest size that holds learn.train.rank and the ranks already "
        f"served): set engine.max_lora_rank >= {rank} and restart the engine, or train with learn.train.rank <= {max_rank}")


# ---------------------------------------------------------------- the path


def promote(registry: Registry, name: str, *, expected: str | None | object, requested_by: str,
            load: Callable[[AdapterVersion], Any] | None = None, converge: Callable[[], Any] | None = None,
            wait_s: float = DEFAULT_WAIT_S, max_rank: int | None = None, gate: dict | None = None,
            metrics: dict | None = None, detail: dict | None = None) -> Change:
    """Request, load + warm, compare-and-swap (see the module docstring); the Change once prod moved.

    `expected`: the prod version the caller decided against (None: the base model). `load(version)`:
    loads and warms it in the engine, raising when it cannot (callers inside a gateway); without it
    a gateway's reconciler does that, `converge()` (when given) asks one in this process to start
    now, and this waits up to `wait_s`. `max_rank`: the engine's LoRA capacity (Settings.lora_capacity).
    `detail`: why (a live decision), kept on the history row of the move. Raises RegistryError (refused, nothing changed), PromotionFailed, ChampionMoved or PromotionTimeout."""
    here = load is not None
    row = request(registry, name, expected=expected, requested_by=requested_by, max_rank=max_rank, wait_s=wait_s,
                  claimed_by=f"{requested_by}@{socket.gethostname()}:{os.getpid()}" if here else None,
                  gate=gate, metrics=metrics, detail=detail)
    if row.kind != "chat":  # restylers load on first use
        return finish(registry, row.id)
    if not here:
        return wait(registry, row.id, wait_s=wait_s, converge=converge)
    try:
        load(registry.get(name))
    except Exception as exc:
        finish(registry, row.id, error=str(exc) or type(exc).__name__)  # raises PromotionFailed
    return finish(registry, row.id)


def request(registry: Registry, name: str, *, expected: str | None | object, requested_by: str,
            max_rank: int | None = None, claimed_by: str | None = None, wait_s: float = DEFAULT_WAIT_S,
            gate: dict | None = None, metrics: dict | None = None, detail: dict | None = None) -> Promotion:
    """Step 1: check and record the request (`pending`); the gate decision and metrics go on the version now."""
    v = registry.get(name)
    if v is None:
        raise VersionNotFound(f"no adapter version named {name}; `tunewheel adapters list` shows them")
    with registry.locked(v.kind, v.style) as (s, pointer):
        registry.check_expected(pointer, expected)
        version = registry.promotable(s, pointer, name)
        check_rank(name, version.path, max_rank)
        _expire(s)
        busy = s.execute(select(Promotion).where(Promotion.key == pointer.key, Promotion.state == PENDING)).scalars().first()
        if busy is not None:
            raise RegistryError(f"a promotion of {busy.version} (by {busy.requested_by}, {busy.created_at:%H:%M:%S} UTC) is "
                                f"still under way; wait for it, or until it expires at {busy.deadline:%H:%M:%S} UTC")
        registry.note(version, gate=gate, metrics=metrics)
        row = Promotion(key=pointer.key, kind=version.kind, style=version.style, version=name, expected=pointer.version,
                        requested_by=requested_by, claimed_by=claimed_by, deadline=utcnow() + timedelta(seconds=wait_s),
                        detail=detail)
        s.add(row)
        s.commit()
        log.info("promotion %s requested by %s: %s -> %s", row.id, requested_by, row.expected or "base", name)
        return row


def finish(registry: Registry, promotion_id: int, *, error: str | None = None) -> Change:
    """Step 3: with `error` (the load failed) record the fallback and raise PromotionFailed; else the
    compare-and-swap. Raises ChampionMoved when prod moved, RegistryError when the row is no longer pending."""
    row = get(registry, promotion_id)
    with registry.locked(row.kind, row.style) as (s, pointer):
        row = s.execute(select(Promotion).where(Promotion.id == promotion_id).with_for_update()).scalar_one()
        if row.state != PENDING:
            raise RegistryError(f"promotion {row.id} of {row.version} is already {row.state}: {row.error or 'done'}")
        row.finished_at = utcnow()
        if error is not None:
            row.state = "fell_back"
            row.error = (f"the engine would not load {row.version}, so production stays on {pointer.version or 'the base model'}"
                         f": {error}")
            s.commit()
            log.error("promotion %s fell back: %s", row.id, row.error)
            raise PromotionFailed(row.error)
        try:
            change = registry.flip(s, pointer, row.version, expected=row.expected,
                                   detail={**(row.detail or {}), "requested_by": row.requested_by})
        except RegistryError as exc:  # raised before the flip changed anything
            row.state, row.error = ("superseded" if isinstance(exc, ChampionMoved) else "fell_back"), str(exc)
            s.commit()
            log.warning("promotion %s %s: %s", row.id, row.state, row.error)
            return outcome(row)
        row.state = "promoted"
        s.commit()
        log.info("promotion %s: %s", row.id, change.describe())
        return change


def claim(registry: Registry, replica: str, kind: str = "chat") -> list[tuple[Promotion, AdapterVersion]]:
    """Pending promotions of `kind` that no replica has taken, now `replica`'s to load and finish (one
    replica each: an atomic UPDATE takes it); overdue ones are expired on the way."""
    with Session(registry.db, expire_on_commit=False) as s:
        if s.execute(select(Promotion.id).where(Promotion.state == PENDING).limit(1)).first() is None:
            return []  # the usual case, read-only: no write lock taken every pass
        _expire(s)
        s.commit()
        ids = s.execute(select(Promotion.id).where(Promotion.state == PENDING, Promotion.kind == kind,
                                                   Promotion.claimed_by.is_(None)).order_by(Promotion.id)).scalars().all()
        taken = []
        for promotion_id in ids:
            r = s.execute(update(Promotion).where(Promotion.id == promotion_id, Promotion.state == PENDING,
                                                  Promotion.claimed_by.is_(None)).values(claimed_by=replica))
            s.commit()
            if r.rowcount == 1:
                row = s.get(Promotion, promotion_id)
                version = s.get(AdapterVersion, row.version)
                if version is not None:
                    taken.append((row, version))
        return taken


def _expire(s: Session) -> None:
    """Close pending promotions past their deadline (their requester has given up on them)."""
    now = utcnow()
    s.execute(update(Promotion).where(Promotion.state == PENDING, Promotion.deadline < now)
              .values(state="expired", finished_at=now, error="no gateway loaded it before its deadline; production is unchanged"))


def cancel(registry: Registry, promotion_id: int, why: str) -> Promotion:
    """Call a pending promotion off (its requester stopped waiting); the row as it stands after."""
    row = get(registry, promotion_id)
    with registry.locked(row.kind, row.style) as (s, _):
        s.execute(update(Promotion).where(Promotion.id == promotion_id, Promotion.state == PENDING)
                  .values(state="cancelled", error=why, finished_at=utcnow()))
        s.commit()
    return get(registry, promotion_id)


def get(registry: Registry, promotion_id: int) -> Promotion:
    with Session(registry.db, expire_on_commit=False) as s:
        row = s.get(Promotion, promotion_id)
        if row is None:
            raise RegistryError(f"no promotion {promotion_id}")
        return row


def wait(registry: Registry, promotion_id: int, *, wait_s: float, converge: Callable[[], Any] | None = None,
         poll_s: float = 0.25) -> Change:
    """Step 2 done elsewhere: wait until a gateway has finished the promotion; called off after `wait_s`."""
    if converge is not None:
        try:
            converge()
        except Exception as exc:  # the gateways' periodic pass claims it anyway
            log.warning("could not ask the gateway in this process to load the promotion now: %s", exc)
    deadline = time.monotonic() + wait_s
    while (row := get(registry, promotion_id)).state == PENDING:
        if time.monotonic() >= deadline:
            row = cancel(registry, promotion_id, f"no gateway loaded {row.version} within {wait_s:g} s (is a gateway "
                                                 "running on this store?); production is unchanged")
            break
        time.sleep(poll_s)
    return outcome(row)


def outcome(row: Promotion) -> Change:
    """The Change of a promoted row; the matching error for any other finished one."""
    if row.state == "promoted":
        return Change(row.kind, row.style, row.expected, row.version)
    error = {"fell_back": PromotionFailed, "superseded": ChampionMoved}.get(row.state, PromotionTimeout)
    raise error(row.error or f"promotion {row.id} of {row.version} is {row.state}")


def fallbacks(session: Session) -> dict[str, int]:
    """Kind -> promotions that fell back (the engine would not load the version), ever."""
    rows = session.execute(select(Promotion.kind, func.count()).where(Promotion.state == "fell_back").group_by(Promotion.kind))
    return {kind: n for kind, n in rows}

