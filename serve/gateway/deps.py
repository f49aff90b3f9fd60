"""FastAPI dependencies of the gateway's routes: the app state and the caller.

    @router.post("/v1/feedback")
    async def feedback(request: Request, gateway: GatewayDep, caller: CallerDep): ...
    router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])

The dependencies are async on purpose: a sync one would cost a threadpool hop per request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serve.gateway.auth import Caller
from serve.gateway.state import GatewayState


async def gateway_state(request: Request) -> GatewayState:
    """The state the lifespan built (serve/gateway/app.py)."""
    return request.app.state.gateway


GatewayDep = Annotated[GatewayState, Depends(gateway_state)]


async def caller(request: Request, gateway: GatewayDep) -> Caller:
    """The caller of an API route; 401 when keys are configured and the request's is missing or wrong."""
    return gateway.auth.identify(request.headers.get("authorization"))


async def require_admin(request: Request, gateway: GatewayDep) -> Caller:
    """The caller of an admin route: always an admin key."""
    return gateway.auth.admin(request.headers.get("authorization"))


CallerDep = Annotated[Caller, Depends(caller)]
