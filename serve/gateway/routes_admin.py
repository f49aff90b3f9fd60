"""Admin routes of the gateway: the adapter registry over HTTP, behind an admin key.

    GET  /admin/adapters[?kind=chat]                 versions, states, lineage, what each alias serves, the live
                                                     canary and probation with their figures, replicas
    POST /admin/adapters/{version}/promote[?expected=chat-v0002|base]   load + warm it, make it prod, swap the alias
    POST /admin/adapters/rollback?kind=chat[&style]  move prod back to the previous version
    POST /admin/reload                               reconcile engine and aliases with the registry now

    curl -X POST -H "Authorization: Bearer $ADMIN_KEY" localhost:8000/admin/adapters/chat-v0003/promote

The routes are thin: the registry (learn/registry.py) owns states and the prod pointer, the
reconciler (serve/reconcile.py) owns the engine. A promotion takes the one promotion path
(learn/promotion.py) with the reconciler's load: the version is loaded and warmed in the
engine *before* the registry moves, then the pointer moves only if prod is still `expected`
(default: whatever prod is when the request arrives). A broken adapter, a LoRA rank the engine
cannot hold, or prod moved meanwhile is refused with 409 saying so, and production stays on the
last good version (a failed load is counted in tunewheel_promotion_fallbacks_total). A gateway
without a registry answers 503.
Promotions and rollbacks are counted from the registry's history (serve/metrics.py), whoever
made them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, HTTPException

from learn import promotion
from learn.registry import UNCHECKED, RegistryError
from serve.gateway.deps import GatewayDep, require_admin
from serve.gateway.state import GatewayState

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


def version_public(v) -> dict[str, Any]:
    """An AdapterVersion as JSON: everything an operator needs to judge it."""
    keys = ("name", "kind", "style", "state", "parent", "path", "snapshot_hash", "metrics", "gate", "error", "created_at")
    out = {k: getattr(v, k, None) for k in keys}
    if out["created_at"] is not None:
        out["created_at"] = out["created_at"].isoformat()
    return out


def _parts(gateway: GatewayState):
    if gateway.registry is None or gateway.reconciler is None:
        raise HTTPException(503, "the adapter registry is not available in this gateway")
    return gateway.registry, gateway.reconciler


@router.get("/adapters")
async def list_adapters(gateway: GatewayDep, kind: str | None = None) -> dict[str, Any]:
    registry, reconciler = _parts(gateway)
    versions = await asyncio.to_thread(registry.list, kind)
    replicas = await asyncio.to_thread(reconciler.leases.describe) if reconciler.leases else []
    trials = await asyncio.to_thread(live_trials, registry)
    return {"adapters": [version_public(v) for v in versions], "aliases": gateway.router.table.aliases(),
            "canaries": {alias: {"version": v, "share": share} for alias, (v, share) in gateway.router.table.canaries.items()},
            "trials": trials, "fallback": dict(reconciler.off_target), "replicas": replicas}


def live_trials(registry) -> dict[str, Any]:
    """Per prod pointer with a running canary or probation: its state and the learner's last check (learn/live.py)."""
    from learn.live import describe, pointers

    out = {}
    for p in pointers(registry.db):
        if p.canary or p.probation:
            out[p.key] = {"prod": p.version, "canary": p.canary, "canary_share": p.canary_share,
                          "canary_since": p.canary_since and p.canary_since.isoformat(), "probation": p.probation,
                          "probation_since": p.probation_since and p.probation_since.isoformat(),
                          "probation_baseline": p.probation_baseline, "last_check": p.live, "summary": describe(p)}
    return out


@router.post("/adapters/{version}/promote")
async def promote(gateway: GatewayDep, version: str, expected: str | None = None) -> dict[str, Any]:
    """`expected`: the prod version this promotion replaces (`base`: the base model); 409 when prod is elsewhere."""
    registry, reconciler = _parts(gateway)
    if await asyncio.to_thread(registry.get, version) is None:
        raise HTTPException(404, f"no adapter version {version!r}; see GET /admin/adapters")
    loop = asyncio.get_running_loop()

    def load(v) -> None:  # runs in the promotion's worker thread; the engine calls run on the gateway's loop
        asyncio.run_coroutine_threadsafe(reconciler.load(v.name, v.path), loop).result()

    try:
        change = await asyncio.to_thread(
            promotion.promote, registry, version, requested_by="admin", load=load, max_rank=gateway.settings.lora_capacity,
            expected=UNCHECKED if expected is None else (None if expected == "base" else expected))
    except RegistryError as exc:
        reconciler.discard(version)  # loaded for nothing (prod moved meanwhile): it leaves the engine again
        raise HTTPException(409, f"{exc}; production was not changed") from exc
    served = await reconciler.reconcile()
    return {"change": change.describe(), "previous": change.previous, "prod": version, "aliases": served}


@router.post("/adapters/rollback")
async def rollback(gateway: GatewayDep, kind: str = "chat", style: str | None = None) -> dict[str, Any]:
    registry, reconciler = _parts(gateway)
    try:
        change = await asyncio.to_thread(registry.rollback, kind, style)
    except RegistryError as exc:
        raise HTTPException(409, str(exc)) from exc
    served = await reconciler.reconcile()
    return {"change": change.describe(), "previous": change.previous, "prod": change.current, "aliases": served}


@router.post("/reload")
async def reload(gateway: GatewayDep) -> dict[str, Any]:
    _, reconciler = _parts(gateway)
    served = await reconciler.reconcile()
    return {"aliases": served, "last_error": reconciler.last_error}
