"""FastAPI dependencies of the gateway's routes: the app state and the caller, with its scopes.

    @router.post("/v1/feedback")
    async def feedback(request: Request, gateway: GatewayDep, caller: Annotated[Caller, Depends(scoped("feedback"))]): ...
    router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])

The guard middleware (serve/gateway/guard.py) has usually identified the caller of a /v1/ route
already; `caller` reuses that. The dependencies are async on purpose: a sync one would cost a
threadpool hop per request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request

from serve.gateway.auth import Auth, Caller
from serve.gateway.state import GatewayState


async def gateway_state(request: Request) -> GatewayState:
    """The state the lifespan built (serve/gateway/app.py)."""
    return request.app.state.gateway


GatewayDep = Annotated[GatewayState, Depends(gateway_state)]


async def caller(request: Request, gateway: GatewayDep) -> Caller:
    """The caller of an API route; 401 when keys are configured and the request's is missing or wrong."""
    known = getattr(request.state, "caller", None)
    return known if known is not None else gateway.auth.identify(request.headers.get("authorization"))


def scoped(scope: str) -> Callable[..., Awaitable[Caller]]:
    """A dependency: the caller, whose key must hold `scope` (403 otherwise)."""

    async def scoped_caller(request: Request, gateway: GatewayDep) -> Caller:
        return Auth.require(await caller(request, gateway), scope)

    return scoped_caller


async def metrics_access(request: Request, gateway: GatewayDep) -> None:
    """GET /metrics: open, or (serve.metrics_need_key) a key with the `metrics` scope."""
    if gateway.settings.serve.metrics_need_key:
        Auth.require(await caller(request, gateway), "metrics")


async def require_admin(request: Request, gateway: GatewayDep) -> Caller:
    """The caller of an admin route: always an admin key."""
    return gateway.auth.admin(request.headers.get("authorization"))


CallerDep = Annotated[Caller, Depends(caller)]
ChatCallerDep = Annotated[Caller, Depends(scoped("chat"))]
FeedbackCallerDep = Annotated[Caller, Depends(scoped("feedback"))]
