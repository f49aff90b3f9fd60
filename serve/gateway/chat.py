"""Chat completions through the gateway: route the name, call vLLM, relay, log the turn.

    service = ChatService(http=client, engine=engine, router=router, recorder=TurnRecorder(writer))
    response = await service.create(request, body, caller=caller, conversation_id=None, started=t0)

`ChatService` is the serving class behind `POST /v1/chat/completions` (the route in
serve/gateway/routes_chat.py only reads and validates the body). It gets every collaborator in
its constructor, so tests hand it a fake engine (`.url`, `.ready`), a `Router` they hold and a
respx-mocked `httpx.AsyncClient`.

What a client sees: the `id` of every answer (and of every chunk of a streamed one) is the
completion id stored in the turn log, which is what `POST /v1/feedback` takes; `model` is the
name the client asked for (`chat`, `base`, `chat@chat-v0003`); the header `x-tunewheel-adapter`
names the engine model that answered (`base` or an adapter version). Streams always ask vLLM for
usage so the log has token counts, but the usage chunk reaches the client only if it asked for
it (`stream_options.include_usage`).

Each accepted request becomes one turn (serve/gateway/relay.py), handed to the turn writer
after the answer: a stream when it ends, with status `incomplete` and the partial answer when
the client left early, `error` when the engine broke off. Requests refused before an answer
(unknown model, engine not ready, an engine error status) are not turns and write nothing.
Non-streamed answers have no time to first token (`ttft_ms` None).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from fastapi.responses import JSONResponse, Response

from serve.gateway.auth import Caller
from serve.gateway.protocol import APIError, ChatCompletionRequest, engine_payload, not_ready, upstream_error
from serve.gateway.relay import InFlight, Relay, RelayResponse, TurnRecorder, rejected
from serve.gateway.restyle import RestyleStep
from serve.routing import NotServed, Route, Router, UnknownModel


class ChatService:
    """`loader`: the reconciler, which loads pinned versions on demand (None without a registry).
    `restyle`: the restyle step (None: no styles served). `alias_styles`: alias -> its style."""

    def __init__(self, *, http: httpx.AsyncClient, engine: Any, router: Router, recorder: TurnRecorder,
                 loader: Any = None, restyle: RestyleStep | None = None, alias_styles: dict[str, str] | None = None,
                 timeout_s: float = 600.0):
        self.http = http
        self.engine = engine
        self.router = router
        self.recorder = recorder
        self.loader = loader
        self.restyle = restyle
        self.alias_styles = alias_styles or {}
        self.timeout = httpx.Timeout(timeout_s, connect=5.0)

    def model_names(self) -> list[str]:
        return self.router.model_names()

    async def create(self, request: ChatCompletionRequest, body: dict[str, Any], *, caller: Caller,
                     conversation_id: str | None, started: float) -> Response:
        """The answer to one validated request: JSON, or an SSE stream."""
        route = await self._route(request.model, conversation_id)
        style = request.style or self.alias_styles.get(route.model)
        try:
            if route.load is not None and self.loader is not None:
                await self._load_pinned(route)
            if not self.engine.ready:
                raise not_ready()
            restyler = await self._restyler(style) if style is not None else None
        except APIError as exc:
            rejected(exc.status, route)
            raise
        flight = self.recorder.begin(route, body, stream=request.stream, key_hash=caller.key_hash,
                                     conversation_id=conversation_id, style=style, started=started)
        payload = engine_payload(body, route.version, whole=restyler is not None)
        response = await self._send(payload, flight)
        if payload.get("stream"):
            relay = Relay(self.recorder, response, flight, forward_usage=request.wants_usage)
            return RelayResponse(relay.events(), on_close=relay.close, media_type="text/event-stream",
                                 headers={"x-tunewheel-adapter": route.version, "cache-control": "no-cache",
                                          "x-accel-buffering": "no"})
        data = await self._read(response, flight)
        if restyler is not None:
            return await self.restyle.answer(flight, data, restyler=restyler, params=request.style_params,
                                             stream=request.stream)
        choice = (data.get("choices") or [{}])[0]
        data["id"], data["model"] = flight.turn.id, flight.turn.alias
        self.recorder.finish(flight, answer=(choice.get("message") or {}).get("content"),
                             finish_reason=choice.get("finish_reason"), usage=data.get("usage") or {}, ttft=None,
                             status="ok")
        return JSONResponse(data, headers={"x-tunewheel-adapter": route.version})

    async def _route(self, model: str, conversation_id: str | None) -> Route:
        """The router's decision; 404 listing the valid names."""
        try:
            return await self.router.route(model, conversation_id=conversation_id)
        except UnknownModel as exc:
            rejected(404)
            raise APIError(404, str(exc), type="not_found_error", code="model_not_found", param="model") from exc
        except NotServed as exc:  # its version is loading (gateway start, engine restart): retry, not 404
            rejected(503)
            raise not_ready(str(exc)) from exc

    async def _load_pinned(self, route: Route) -> None:
        try:
            await self.loader.ensure_pinned(route.load)
        except Exception as exc:  # the registry knows it but the engine would not load it
            raise APIError(503, f"adapter {route.version} could not be loaded: {exc}", type="service_unavailable",
                           code="adapter_unavailable", headers={"Retry-After": "30"}) from exc

    async def _restyler(self, style: str) -> str:
        """The loaded restyler version of `style`; 404 naming the styles there are."""
        if self.restyle is None:
            raise APIError(404, f"style {style!r} is not served: this gateway has no restyler registry; styles: none",
                           type="not_found_error", code="style_not_found", param="style")
        return await self.restyle.version_for(style)

    async def _send(self, payload: dict[str, Any], flight: InFlight) -> httpx.Response:
        """The engine's 200 response (a stream when asked); anything else refuses the request."""
        request = self.http.build_request("POST", f"{self.engine.url}/v1/chat/completions", json=payload,
                                          timeout=self.timeout)
        try:
            try:
                response = await self.http.send(request, stream=bool(payload.get("stream")))
            except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:
                raise not_ready(f"the engine is unreachable ({type(exc).__name__})") from exc
            except httpx.TimeoutException as exc:
                raise APIError(504, "the engine did not answer in time (serve.request_timeout_s)", type="timeout",
                               code="engine_timeout") from exc
            if response.status_code != 200:
                try:
                    if response.status_code == 404 and flight.route.version != self.router.base:
                        self.router.table.lost(flight.route.version)  # the engine lost it: reload, retry
                        raise not_ready(f"adapter {flight.route.version} is being reloaded into the engine")
                    raise upstream_error(response.status_code, await response.aread())
                finally:
                    await response.aclose()
        except BaseException as exc:  # a cancelled request must also give its lease back
            self.recorder.refuse(flight, exc)
            raise
        return response

    async def _read(self, response: httpx.Response, flight: InFlight) -> dict[str, Any]:
        """A whole (non-streamed) answer as JSON; 502 when it cannot be read."""
        try:
            try:
                return json.loads(await response.aread())
            except (ValueError, httpx.HTTPError) as exc:
                raise APIError(502, f"the engine's answer could not be read: {exc}", type="engine_error") from exc
            finally:
                await response.aclose()
        except BaseException as exc:
            self.recorder.refuse(flight, exc)
            raise
