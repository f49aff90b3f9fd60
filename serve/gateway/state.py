"""The gateway's state: one typed object that the lifespan builds and every route receives.

    state = GatewayState(settings=..., auth=..., engine=..., router=..., chat=..., writer=...,
                         registry=None, reconciler=None, store_metrics=StoreMetrics(writer.engine),
                         limits=Limits(settings.serve.limits))
    app.state.gateway = state                # serve/gateway/app.py, once the lifespan has started

    @router.get("/x")
    async def x(gateway: GatewayDep): ...    # serve/gateway/deps.py hands it to a route

Everything a route needs is a field here, typed, so no route reads loose attributes off
`app.state` and a test builds each collaborator through its constructor instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serve.gateway.auth import Auth
from serve.gateway.chat import ChatService
from serve.gateway.limits import Limits
from serve.pool import EnginePool
from serve.metrics import StoreMetrics
from serve.reconcile import Reconciler
from serve.routing import Router
from serve.settings import Settings


@dataclass(frozen=True)
class GatewayState:
    settings: Settings
    auth: Auth
    engine: EnginePool
    """serve/pool.py: the engine replicas (one, for one engine) with `.ready`, `.probed` and their states."""
    router: Router
    chat: ChatService
    writer: Any
    """The started feedback TurnWriter; `writer.engine` is the database."""
    registry: Any
    """learn.registry.Registry, or None: no reconciler, restyle or admin routes."""
    reconciler: Reconciler | None
    store_metrics: StoreMetrics
    """The learner's and registry's figures, read from the store at scrape time."""
    limits: Limits
    """`[serve.limits]`: request checks, per-key token buckets, requests in flight."""

    @property
    def db(self):
        return self.writer.engine
