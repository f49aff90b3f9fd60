"""Operational routes: liveness, readiness and Prometheus metrics.

    GET /health    200 while the process runs
    GET /ready     200 with alias -> version served once the engine answers and every alias's version
                   is loaded in it; 503 with Retry-After before (starting, engine restarted, adapters
                   reloading). An alias that serves a fallback (its target will not load) is ready,
                   and listed under "fallback" with the version it should serve; with several engine
                   replicas (engine.urls), "replicas" gives each one's state (ready, syncing, down)
    GET /metrics   Prometheus text format: the catalog of serve/metrics.py plus the learner's and
                   registry's figures, read from the store for each scrape; behind a key with the
                   `metrics` scope when serve.metrics_need_key
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from serve import metrics
from serve.gateway.deps import GatewayDep, metrics_access
from serve.gateway.protocol import not_ready

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(gateway: GatewayDep) -> dict[str, Any]:
    if not gateway.engine.ready:
        raise not_ready()
    table = gateway.router.table
    waiting = table.unserved()
    if waiting:
        raise not_ready("adapters are loading into the engine: " + ", ".join(f"{a} ({v})" for a, v in sorted(waiting.items())))
    body: dict[str, Any] = {"status": "ready", "aliases": table.aliases()}
    if gateway.engine.probed:  # engine.urls or engine.dns: each replica's state
        body["replicas"] = {r.url: r.state for r in gateway.engine.probed}
    if gateway.reconciler is not None and gateway.reconciler.off_target:
        body["fallback"] = {alias: {"target": target, "serving": table.resolve(alias)}
                            for alias, target in gateway.reconciler.off_target.items()}
    return body


@router.get("/metrics", dependencies=[Depends(metrics_access)])
async def prometheus(gateway: GatewayDep) -> Response:
    # The store is read for each scrape: in a worker thread, off the event loop.
    body, content_type = await asyncio.to_thread(metrics.render, gateway.store_metrics)
    return Response(body, media_type=content_type)
