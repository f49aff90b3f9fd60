"""The adapter registry: immutable versions, their state and lineage, the `prod` pointer, rollback.

    from feedback.db import make_db
    from learn.registry import Registry
    reg = Registry(make_db(settings.store_url))
    name = reg.new_version_name("chat")                 # "chat-v0001", never handed out twice
    reg.register(name, kind="chat", path=out_dir, parent="chat-v0000", snapshot_hash=h, train_config=cfg)
    reg.promote(name, expected="chat-v0000", gate=decision.to_dict())   # the flip alone; or reg.reject(name, gate)
    reg.prod("chat"); reg.rollback("chat"); reg.last_good("chat")

Serving callers (the learner, `tunewheel adapters promote`, the admin route) never call `promote`
directly: they go through learn/promotion.py, which loads and warms the version in the engine
first and only then flips the pointer here.

A version's identity (name, kind, style, path, parent, snapshot hash, training config,
creation time) never changes after `register`; its gate decision and error are written
once, and its metrics only grow (training metrics at register, held-out scores at the
gate). States: candidate -> promoted | rejected (by the gate) | failed (its cycle broke before
a decision; `error` says how); promoted -> retired when another version is promoted or when it
is rolled back; a retired version can be promoted again, a rejected or failed one never.
There is at most one promoted version per (kind, style): the one the pointer names.

The pointer of a (kind, style) is one `AliasPointer` row, moved inside one transaction that
first locks that row (SELECT ... FOR UPDATE on Postgres, the database write lock on
SQLite), so concurrent promotions serialize. Every move appends an `AliasHistory` row;
rollback replays that history as a stack (promote pushes, rollback pops) and goes back to
the version below the top, or to the base model when there is none; `last_good()` lists what a
rollback would reach, which is what serving falls back to when prod will not load. A promotion
is a compare-and-swap: `expected` names the prod version the caller decided against, and when
the pointer has moved since (an operator's rollback while the learner trained) it refuses with
ChampionMoved. The gateway's reconciler reads `prod()` and converges the engine on it. Every
method opens its own short session, so the registry is safe to share between threads and
request handlers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Column, Engine, Text, event, inspect, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel

KINDS = ("chat", "restyler")
STATES = ("candidate", "promoted", "rejected", "failed", "retired")
_STYLE = re.compile(r"^[a-z0-9][a-z0-9_]*$")
_IMMUTABLE = ("name", "kind", "style", "path", "parent", "snapshot_hash", "train_config", "created_at")
_WRITE_ONCE = ("metrics", "gate", "error")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class RegistryError(ValueError):
    """A registry operation that is not allowed; the message says what to do instead."""


class VersionNotFound(RegistryError, LookupError):
    pass


class AdapterMissing(RegistryError, FileNotFoundError):
    pass


class ChampionMoved(RegistryError):
    """Production is not on the version a promotion was decided against: the compare-and-swap refused."""


UNCHECKED = object()  # `expected` of a promotion that does not compare (tests, setup code)


class AdapterVersion(SQLModel, table=True):
    name: str = Field(primary_key=True, max_length=200)
    kind: str = Field(max_length=16, index=True)
    style: str | None = Field(default=None, max_length=200)
    path: str = Field(sa_column=Column(Text, nullable=False))
    state: str = Field(default="candidate", max_length=16)
    parent: str | None = Field(default=None, max_length=200)
    snapshot_hash: str | None = Field(default=None, max_length=128)
    train_config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    metrics: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    gate: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = Field(default_factory=utcnow)


class AliasPointer(SQLModel, table=True):
    """The `prod` pointer of one (kind, style), and the last version number handed out for it."""

    key: str = Field(primary_key=True, max_length=200)
    kind: str = Field(max_length=16)
    style: str | None = Field(default=None, max_length=200)
    version: str | None = Field(default=None, max_length=200)
    last_seq: int = 0
    updated_at: datetime = Field(default_factory=utcnow)
    # live trials (migration 0007, learn/live.py): the canary beside prod, the probation of the last promoted
    canary: str | None = Field(default=None, max_length=200)
    canary_share: float | None = None
    canary_since: datetime | None = None
    probation: str | None = Field(default=None, max_length=200)
    probation_since: datetime | None = None
    probation_baseline: str | None = Field(default=None, max_length=200)  # what it replaced (None: the base model)
    live: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))  # the last check's figures


class AliasHistory(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(max_length=200, index=True)
    action: str = Field(max_length=16)  # promote | rollback (prod's stack), canary, canary_end, keep (probation passed)
    version: str | None = Field(default=None, max_length=200)
    previous: str | None = Field(default=None, max_length=200)
    created_at: datetime = Field(default_factory=utcnow)
    detail: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))  # who and why: a live decision


@event.listens_for(AdapterVersion, "before_update")
def _keep_versions_immutable(mapper, connection, target: AdapterVersion) -> None:
    state = inspect(target)
    for col in _IMMUTABLE:
        if state.attrs[col].history.has_changes():
            raise RegistryError(f"version {target.name} is immutable: its {col} cannot change; register a new version")
    for col in _WRITE_ONCE:
        history = state.attrs[col].history
        old = history.deleted[0] if history.deleted else None
        if not history.has_changes() or old in (None, {}):
            continue
        if col == "metrics" and all((target.metrics or {}).get(k, object()) == v for k, v in old.items()):
            continue  # metrics only grow: training metrics at register, held-out scores after the gate
        raise RegistryError(f"version {target.name} already has its {col}; it is written once")


def _add_metrics(version: AdapterVersion, metrics: dict | None) -> None:
    old = version.metrics or {}
    clash = sorted(k for k in (metrics or {}) if k in old and old[k] != metrics[k])
    if clash:
        raise RegistryError(f"version {version.name} already has metrics {', '.join(clash)}; metrics are only ever added")
    if metrics:
        version.metrics = {**old, **metrics}


@dataclass(frozen=True)
class Change:
    """What a promotion or rollback did to a pointer (None means the base model)."""

    kind: str
    style: str | None
    previous: str | None
    current: str | None

    def describe(self) -> str:
        key = _key(self.kind, self.style)
        return f"{key}: prod {self.previous or 'base'} -> {self.current or 'base'}"


def _key(kind: str, style: str | None) -> str:
    if kind not in KINDS:
        raise RegistryError(f"unknown adapter kind {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "chat":
        if style is not None:
            raise RegistryError("chat adapters have no style; pass --style only with --kind restyler")
        return "chat"
    if not style or not _STYLE.match(style):
        raise RegistryError(f"restyler adapters need a style of lowercase letters, digits and underscores, got {style!r}")
    return f"restyler-{style}"


class Registry:
    def __init__(self, db: Engine):
        self.db = db

    def _session(self) -> Session:
        return Session(self.db, expire_on_commit=False)

    def _locked_pointer(self, session: Session, kind: str, style: str | None) -> AliasPointer:
        """The pointer row of (kind, style), created if absent and locked until the session commits."""
        key = _key(kind, style)
        with self._session() as s:  # create it in its own transaction; a concurrent creator wins harmlessly
            if s.get(AliasPointer, key) is None:
                s.add(AliasPointer(key=key, kind=kind, style=style))
                try:
                    s.commit()
                except IntegrityError:
                    s.rollback()
        if self.db.dialect.name == "sqlite":
            # A write first takes SQLite's database lock, so the reads below see the latest state.
            session.execute(update(AliasPointer).where(AliasPointer.key == key).values(key=key))
        return session.execute(select(AliasPointer).where(AliasPointer.key == key).with_for_update()).scalar_one()

    def new_version_name(self, kind: str = "chat", style: str | None = None) -> str:
        """The next unused version name, e.g. chat-v0001 or restyler-pirate-v0001; reserved at once."""
        with self._session() as s:
            pointer = self._locked_pointer(s, kind, style)
            prefix = f"{pointer.key}-v"
            taken = s.execute(select(AdapterVersion.name).where(AdapterVersion.name.startswith(prefix))).scalars().all()
            seqs = [int(n[len(prefix) :]) for n in taken if n[len(prefix) :].isdigit()]
            pointer.last_seq = max([pointer.last_seq, *seqs]) + 1
            name = f"{prefix}{pointer.last_seq:04d}"
            s.add(pointer)
            s.commit()
            return name

    def register(
        self,
        name: str,
        *,
        kind: str = "chat",
        path: str | Path,
        style: str | None = None,
        parent: str | None = None,
        snapshot_hash: str | None = None,
        train_config: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> AdapterVersion:
        """Record a finished adapter folder as a candidate version; a name is registered once."""
        key = _key(kind, style)
        if not name.startswith(f"{key}-v"):
            raise RegistryError(f"version name {name!r} does not belong to {key}; get one from new_version_name({kind!r}, {style!r})")
        if not Path(path).is_dir():
            raise AdapterMissing(f"adapter folder {path} does not exist; register a version only after its training finished")
        with self._session() as s:
            if s.get(AdapterVersion, name) is not None:
                raise RegistryError(f"version {name} is already registered; versions are immutable, get a new name")
            if parent is not None and s.get(AdapterVersion, parent) is None:
                raise VersionNotFound(f"parent version {parent} is not registered")
            version = AdapterVersion(
                name=name, kind=kind, style=style, path=str(Path(path).resolve()), parent=parent,
                snapshot_hash=snapshot_hash, train_config=train_config or {}, metrics=metrics,
            )
            s.add(version)
            s.commit()
            return version

    def get(self, name: str) -> AdapterVersion | None:
        with self._session() as s:
            return s.get(AdapterVersion, name)

    def list(self, kind: str | None = None, style: str | None = None, *, state: str | None = None,
             limit: int | None = None) -> list[AdapterVersion]:
        """Versions, newest first (the first `limit`); filtered by kind, style and state when given."""
        with self._session() as s:
            q = select(AdapterVersion)
            for column, value in ((AdapterVersion.kind, kind), (AdapterVersion.style, style), (AdapterVersion.state, state)):
                q = q if value is None else q.where(column == value)
            q = q.order_by(AdapterVersion.created_at.desc(), AdapterVersion.name.desc()).limit(limit)
            return list(s.execute(q).scalars())

    def prod(self, kind: str = "chat", style: str | None = None) -> AdapterVersion | None:
        """The promoted version of (kind, style), or None when the base model serves."""
        with self._session() as s:
            pointer = s.get(AliasPointer, _key(kind, style))
            return s.get(AdapterVersion, pointer.version) if pointer and pointer.version else None

    def history(self, kind: str = "chat", style: str | None = None) -> list[AliasHistory]:
        with self._session() as s:
            q = select(AliasHistory).where(AliasHistory.key == _key(kind, style)).order_by(AliasHistory.id)
            return list(s.execute(q).scalars())

    def _version(self, s: Session, name: str) -> AdapterVersion:
        version = s.get(AdapterVersion, name)
        if version is None:
            raise VersionNotFound(f"no adapter version named {name}; `tunewheel adapters list` shows them")
        return version

    def _kind_style(self, name: str) -> tuple[str, str | None]:
        with self._session() as s:
            version = self._version(s, name)
            return version.kind, version.style

    @staticmethod
    def _check_folder(version: AdapterVersion, current: str | None) -> None:
        if not Path(version.path).is_dir():
            raise AdapterMissing(
                f"the adapter folder of {version.name} ({version.path}) has vanished; restore it or promote another "
                f"version. Production stays on {current or 'the base model'}."
            )

    @contextmanager
    def locked(self, kind: str, style: str | None) -> Iterator[tuple[Session, AliasPointer]]:
        """A session holding the lock of the (kind, style) pointer until the block ends; commit inside it."""
        with self._session() as s:
            yield s, self._locked_pointer(s, kind, style)

    def promote(self, name: str, *, expected: str | None | object = UNCHECKED, gate: dict | None = None,
                metrics: dict | None = None) -> Change:
        """Make `name` the prod version of its (kind, style); the previous one is retired. This is the flip
        alone: serving callers go through learn/promotion.py, which loads the version into the engine first.
        `expected`: the prod version the caller decided against (None: the base model); ChampionMoved when
        prod is elsewhere now."""
        with self.locked(*self._kind_style(name)) as (s, pointer):
            change = self.flip(s, pointer, name, expected=expected, gate=gate, metrics=metrics)
            s.commit()
            return change

    def promotable(self, s: Session, pointer: AliasPointer, name: str) -> AdapterVersion:
        """`name`, when it may become prod of `pointer`; RegistryError saying why not otherwise."""
        version = self._version(s, name)
        if version.state == "promoted" or pointer.version == name:
            raise RegistryError(f"{name} is already in production")
        if version.state in ("rejected", "failed"):
            raise RegistryError(f"{name} was {version.state} ({version.error or 'by the gate'}); train a new candidate instead")
        self._check_folder(version, pointer.version)
        return version

    @staticmethod
    def note(version: AdapterVersion, *, gate: dict | None, metrics: dict | None) -> None:
        """Put a promotion's gate decision (written once) and metrics (only added) on `version`; the caller commits."""
        if gate is not None and not version.gate:
            version.gate = gate
        _add_metrics(version, metrics)

    @staticmethod
    def check_expected(pointer: AliasPointer, expected: str | None | object) -> None:
        """The compare of compare-and-swap: ChampionMoved unless prod is still `expected`."""
        if expected is not UNCHECKED and pointer.version != expected:
            raise ChampionMoved(
                f"production of {pointer.key} is {pointer.version or 'the base model'}, not {expected or 'the base model'} "
                f"as this promotion expected: it moved meanwhile (a rollback or another promotion), which wins")

    def flip(self, s: Session, pointer: AliasPointer, name: str, *, expected: str | None | object = UNCHECKED,
             gate: dict | None = None, metrics: dict | None = None, detail: dict | None = None) -> Change:
        """The checks and the move of `promote` in a session that holds the pointer's lock (`locked`); not committed.
        The promoted version goes on probation; a canary of another version stops (its champion changed)."""
        self.check_expected(pointer, expected)
        version = self.promotable(s, pointer, name)
        previous = pointer.version
        if previous is not None:
            self._version(s, previous).state = "retired"
        version.state = "promoted"
        self.note(version, gate=gate, metrics=metrics)
        if pointer.canary is not None and pointer.canary != name:
            self.stop_canary(s, pointer, {"reason": f"prod moved to {name} during the canary"})
        self._move(s, pointer, "promote", name, detail)
        pointer.canary = pointer.canary_share = pointer.canary_since = None
        pointer.probation, pointer.probation_since, pointer.probation_baseline = name, utcnow(), previous
        return Change(version.kind, version.style, previous, name)

    @staticmethod
    def stop_canary(s: Session, pointer: AliasPointer, detail: dict) -> None:
        """End `pointer`'s canary (history `canary_end` with `detail`); the caller holds the lock and commits."""
        s.add(AliasHistory(key=pointer.key, action="canary_end", version=pointer.canary, previous=pointer.version, detail=detail))
        pointer.canary = pointer.canary_share = pointer.canary_since = None
        s.add(pointer)

    def reject(self, name: str, gate: dict | None = None, *, metrics: dict | None = None, error: str | None = None) -> AdapterVersion:
        """Mark a candidate rejected, keeping the gate decision (and the error of a failed evaluation)."""
        return self._close(name, "rejected", gate=gate, metrics=metrics, error=error)

    def fail(self, name: str, error: str, *, gate: dict | None = None, metrics: dict | None = None) -> AdapterVersion:
        """Mark a candidate failed: its cycle broke before it was judged (`error` says how); never servable."""
        return self._close(name, "failed", gate=gate, metrics=metrics, error=error)

    def _close(self, name: str, state: str, *, gate: dict | None, metrics: dict | None, error: str | None) -> AdapterVersion:
        with self._session() as s:
            self._locked_pointer(s, *self._kind_style(name))  # no promotion of it can slip in between
            version = self._version(s, name)
            if version.state != "candidate":
                raise RegistryError(f"only candidates can be {state}; {name} is {version.state}")
            version.state = state
            if gate is not None and not version.gate:  # a promotion request may have written it already
                version.gate = gate
            _add_metrics(version, metrics)
            if error is not None:
                version.error = error
            s.commit()
            return version

    def rollback(self, kind: str = "chat", style: str | None = None, *, expected: str | None | object = UNCHECKED,
                 detail: dict | None = None) -> Change:
        """Move prod back to the version promoted before the current one (or to the base model).
        `expected`: only while prod is this version (learn/live.py's probation); `detail`: why, for the history."""
        with self.locked(kind, style) as (s, pointer):
            self.check_expected(pointer, expected)
            stack = self._stack(s, pointer.key)
            if pointer.version is None or len(stack) < 2:
                raise RegistryError(f"nothing to roll back: {pointer.key} is served by the base model")
            current, target = stack[-1], stack[-2]
            if target is not None:
                self._check_folder(self._version(s, target), current)
                self._version(s, target).state = "promoted"
            self._version(s, current).state = "retired"
            if pointer.canary is not None:
                self.stop_canary(s, pointer, {"reason": f"prod rolled back to {target or 'the base model'} during the canary"})
            self._move(s, pointer, "rollback", target, detail)
            pointer.probation = pointer.probation_since = pointer.probation_baseline = None
            s.commit()
            return Change(kind, style, current, target)

    def last_good(self, kind: str = "chat", style: str | None = None, limit: int = 3) -> list[AdapterVersion]:
        """The versions a rollback would go back to, newest first (at most `limit`): what serving falls
        back to when the prod version will not load. The base model is not among them."""
        with self._session() as s:
            below = [v for v in reversed(self._stack(s, _key(kind, style))[:-1]) if v is not None]
            versions = [s.get(AdapterVersion, name) for name in dict.fromkeys(below)]
            return [v for v in versions if v is not None and v.state not in ("rejected", "failed")][:limit]

    @staticmethod
    def _stack(s: Session, key: str) -> list[str | None]:
        """The pointer's history replayed as a stack (promote pushes, rollback pops); [None] is the base model."""
        stack: list[str | None] = [None]
        for e in s.execute(select(AliasHistory).where(AliasHistory.key == key).order_by(AliasHistory.id)).scalars():
            if e.action == "promote":
                stack.append(e.version)
            elif e.action == "rollback" and len(stack) > 1:
                stack.pop()
        return stack

    @staticmethod
    def _move(s: Session, pointer: AliasPointer, action: str, version: str | None, detail: dict | None = None) -> None:
        s.add(AliasHistory(key=pointer.key, action=action, version=version, previous=pointer.version, detail=detail))
        pointer.version = version
        pointer.updated_at = utcnow()
        s.add(pointer)
