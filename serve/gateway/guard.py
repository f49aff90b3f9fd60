"""The gateway's door: the Host allowlist, then the per-key rate and requests in flight.

    app.add_middleware(Guard)          # serve/gateway/app.py; reads the GatewayState the lifespan built

In order, for each HTTP request:
1. Host. A web page can make a browser send requests to a gateway on the same machine by
   pointing its own domain at 127.0.0.1 (DNS rebinding); the Host header still names that
   domain. `serve.allowed_hosts` lists the names the API answers; left empty, a gateway bound to
   loopback answers only loopback names (`localhost`, 127.0.0.1, [::1]) and any other gateway
   (which needs keys) any name. /health, /ready and /metrics are exempt: probes and scrapers
   address a pod by its IP. Refused: 400 `invalid_host`.
2. The caller. For /v1/ routes the key is identified once here and handed to the route's
   dependency (serve/gateway/deps.py); a missing or wrong key passes on, so the route answers
   401 the way it always does.
3. The per-key token bucket (429 with Retry-After), for every /v1/ route.
4. Requests in flight, for POST /v1/chat/completions: one place of the gateway's and one of the
   key's, held until the answer has been sent in full (a stream included), so a client cannot
   hold more than its share of the engine (503 / 429 with Retry-After).
A pure ASGI middleware, so streams pass through untouched and a client that leaves mid-stream
still ends the request (and gives its place back) at once.
"""

from __future__ import annotations

from contextlib import ExitStack

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from serve.gateway.auth import Caller, is_loopback
from serve.gateway.protocol import APIError
from serve.gateway.relay import rejected

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})  # no Host check: probes and scrapers use pod IPs
CHAT_PATH = "/v1/chat/completions"


def host_name(host: str | None) -> str:
    """The name in a Host header, without its port, lowercased ("[::1]:8000" -> "[::1]")."""
    host = (host or "").strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host: str | None, allowed: list[str], *, bind: str) -> bool:
    """Whether the API answers a request whose Host header is `host` (see the module docstring)."""
    name = host_name(host)
    if not allowed:
        return not is_loopback(bind) or is_loopback(name)
    for pattern in (p.lower() for p in allowed):
        if pattern == "*" or name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


class Guard:
    """The ASGI middleware that applies the module docstring's rules before any route runs."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = getattr(scope["app"].state, "gateway", None) if scope["type"] == "http" else None
        if state is None:  # lifespan and websocket messages, or a request before startup
            await self.app(scope, receive, send)
            return
        with ExitStack() as stack:
            try:
                caller = self.admit(scope, state)
                if caller is not None and scope["path"] == CHAT_PATH and scope["method"] == "POST":
                    stack.enter_context(state.limits.in_flight(caller))
            except APIError as exc:
                if scope["path"] == CHAT_PATH:
                    rejected(exc.status)
                await JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)(scope, receive, send)
                return
            await self.app(scope, receive, send)

    @staticmethod
    def admit(scope: Scope, state) -> Caller | None:
        """The caller of a /v1/ request (None elsewhere, or when its key is wrong), after the Host
        check and its token bucket; APIError when the request is refused here."""
        headers, serve = Headers(scope=scope), state.settings.serve
        if scope["path"] not in OPEN_PATHS and not host_allowed(headers.get("host"), serve.allowed_hosts,
                                                                bind=serve.host):
            raise APIError(400, f"Host {host_name(headers.get('host'))!r} is not one this gateway answers "
                           "(serve.allowed_hosts)", code="invalid_host")
        if not scope["path"].startswith("/v1/"):
            return None
        try:
            caller = state.auth.identify(headers.get("authorization"))
        except APIError:
            return None  # the route's dependency answers 401
        scope.setdefault("state", {})["caller"] = caller
        state.limits.admit(caller)
        return caller
