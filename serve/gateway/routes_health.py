"""Operational routes: liveness, readiness and Prometheus metrics.

    GET /health    200 while the process runs
    GET /ready     200 with alias -> version served once the engine answers; 503 with Retry-After before
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
    return {"status": "ready", "aliases": gateway.router.table.aliases()}


@router.get("/metrics", dependencies=[Depends(metrics_access)])
async def prometheus(gateway: GatewayDep) -> Response:
    # The store is read for each scrape: in a worker thread, off the event loop.
    body, content_type = await asyncio.to_thread(metrics.render, gateway.store_metrics)
    return Response(body, media_type=content_type)
