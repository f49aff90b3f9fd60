"""Gateway replicas and the adapter versions each one uses: a version leaves a shared engine only
when no replica leases it any more.

    leases = ReplicaLeases(db, engine_url="http://vllm:8000")     # one per gateway process
    leases.beat({"chat-v0003", "chat-v0002"})                     # every reconcile pass: alive, using these
    leases.others_using("chat-v0002")                             # ["gw-b:12:ab12cd34"]: not yet
    leases.leave()                                                # at shutdown

Several gateway replicas on one engine (the Kubernetes manifests ship two) swap their aliases on
their own, and each drains its own requests off an old version before unloading it; without
this table one replica's unload cut off the other's requests still running on that version.
Each replica has a row (migration 0006) with its engine, its heartbeat and the versions it uses
(aliased, pinned and recently used, or with requests in flight). A replica whose heartbeat is
older than `ttl_s` has died and leases nothing. The reconciler (serve/reconcile.py) unloads a
version only when `others_using()` is empty, and tries again on a later pass otherwise, so the
replica that lets go of a version last is the one that unloads it.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import JSON, Column, Engine, delete, select
from sqlmodel import Field, Session, SQLModel

from learn.registry import utcnow

REPLICA_TTL_S = 30.0  # ten reconcile passes (3 s each) without a heartbeat: that replica is gone
FORGET_AFTER_S = 86400.0  # rows of replicas dead this long are deleted


class ServingReplica(SQLModel, table=True):
    """One gateway replica: its engine, its last heartbeat and the adapter versions it uses."""

    __tablename__ = "serving_replica"
    id: str = Field(primary_key=True, max_length=200)
    engine_url: str = Field(max_length=500, index=True)
    versions: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    started_at: datetime = Field(default_factory=utcnow)
    heartbeat_at: datetime = Field(default_factory=utcnow)


class ReplicaLeases:
    """This replica's row, and the leases of the other live replicas on the same engine."""

    def __init__(self, db: Engine, *, engine_url: str, ttl_s: float = REPLICA_TTL_S, replica_id: str | None = None):
        self.db = db
        self.engine_url = engine_url.rstrip("/")
        self.ttl = timedelta(seconds=ttl_s)
        self.id = replica_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def beat(self, versions: Iterable[str]) -> None:
        """Alive now, using `versions` (engine model names; the base model need not be listed)."""
        now = utcnow()
        with Session(self.db) as s:
            row = s.get(ServingReplica, self.id) or ServingReplica(id=self.id, engine_url=self.engine_url, started_at=now)
            row.versions, row.heartbeat_at = sorted(set(versions)), now
            s.add(row)
            s.execute(delete(ServingReplica).where(ServingReplica.heartbeat_at < now - timedelta(seconds=FORGET_AFTER_S)))
            s.commit()

    def others_using(self, version: str) -> list[str]:
        """Live replicas on this engine, other than this one, that use `version`."""
        return [r.id for r in self.replicas() if r.id != self.id and version in r.versions]

    def replicas(self) -> list[ServingReplica]:
        """Live replicas on this engine (this one included once it has beaten)."""
        with Session(self.db) as s:
            q = select(ServingReplica).where(ServingReplica.engine_url == self.engine_url,
                                             ServingReplica.heartbeat_at >= utcnow() - self.ttl)
            return list(s.execute(q).scalars())

    def leave(self) -> None:
        """This replica stops: it leases nothing any more."""
        with Session(self.db) as s:
            s.execute(delete(ServingReplica).where(ServingReplica.id == self.id))
            s.commit()

    def describe(self) -> list[dict[str, Any]]:
        """The live replicas on this engine as JSON (the admin list shows them)."""
        return [{"id": r.id, "versions": r.versions, "heartbeat_at": r.heartbeat_at.isoformat()} for r in self.replicas()]
