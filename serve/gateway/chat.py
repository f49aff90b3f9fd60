"""Chat completions through the gateway: route the name, call vLLM, relay, log the turn.

    service = ChatService(http=client, engines=EnginePool.of(engine, client), router=router, recorder=TurnRecorder(writer))
    response = await service.create(request, body, caller=caller, conversation_id=None, started=t0)

`ChatService` is the serving class behind `POST /v1/chat/completions` (the route in
serve/gateway/routes_chat.py only reads and validates the body). It gets every collaborator in
its constructor, so tests hand it a pool of a fake engine (`.url`, `.ready`), a `Router` they hold and a
respx-mocked `httpx.AsyncClient`.

What a client sees: the `id` of every answer (and of every chunk of a streamed one) is the
completion id stored in the turn log, which is what `POST /v1/feedback` takes; `model` is the
name the client asked for (`chat`, `base`, `chat@chat-v0003`); the header `x-tunewheel-adapter`
names the engine model that answered (`base` or an adapter version). Streams always ask vLLM for
usage so the log has token counts, but the usage chunk reaches the client only if it asked for
it (`stream_options.include_usage`).

Each accepted request becomes one turn (serve/gateway/relay.py), handed to the turn writer
after the answer and on disk before the client gets its end (the whole JSON body; a stream's
`[DONE]`): a stream when it ends, with status `incomplete` and the partial answer when
the client left early, `error` when the engine broke off. Requests refused before an answer
(unknown model, engine not ready, an engine error status) are not turns and write nothing.
Non-streamed answers have no time to first token (`ttft_ms` None). A client that leaves before
a non-streamed answer is complete cancels the engine request (nobody would read the answer;
closing the connection makes vLLM abort the generation): counted as status 499, no turn.

Who may ask for what: `chat@<version>` of a version that is not promoted (a candidate on
trial, a retired or rejected one) is for operators only (an admin key, or the user of an open
loopback gateway), so a chat key cannot make the engine load versions that never passed the
gate; to anyone else it does not exist, and the names a 404 lists are the public ones. A
pinned version the engine would not load is a 503 that names the version, never its folder.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import httpx
import orjson
from fastapi.responses import Response

from serve.gateway.auth import Caller
from serve.gateway.protocol import (APIError, ChatCompletionRequest, engine_payload, json_response, not_ready,
                                   upstream_error)
from serve.gateway.relay import InFlight, Relay, RelayResponse, TurnRecorder, rejected
from serve.gateway.restyle import RestyleStep
from serve.http import post_json
from serve.pool import EnginePool, Replica
from serve.routing import BASE_NAME, PINNED_PREFIX, NotServed, Route, Router, UnknownModel, conversation_key, pinned_version

log = logging.getLogger("tunewheel.gateway")
T = TypeVar("T")
Disconnected = Callable[[], Awaitable[Any]]


class ChatService:
    """`loader`: the reconciler, which loads pinned versions on demand (None without a registry).
    `restyle`: the restyle step (None: no styles served). `alias_styles`: alias -> its style."""

    def __init__(self, *, http: httpx.AsyncClient, engines: EnginePool, router: Router, recorder: TurnRecorder,
                 loader: Any = None, restyle: RestyleStep | None = None, alias_styles: dict[str, str] | None = None,
                 timeout_s: float = 600.0):
        self.http = http
        self.engines = engines  # serve/pool.py: the replicas a request may go to (one, for one engine)
        self.router = router
        self.recorder = recorder
        self.loader = loader
        self.restyle = restyle
        self.alias_styles = alias_styles or {}
        self.timeout = httpx.Timeout(timeout_s, connect=5.0)

    def model_names(self, caller: Caller) -> list[str]:
        """The names `caller` may send as `model`: pinned versions on trial only for operators."""
        if caller.operator:
            return self.router.model_names()
        served = dict.fromkeys(v for v in self.router.table.aliases().values() if v != self.router.base)
        return [*self.router.table.aliases(), BASE_NAME, *(PINNED_PREFIX + v for v in served)]

    async def create(self, request: ChatCompletionRequest, body: dict[str, Any], *, caller: Caller,
                     conversation_id: str | None, started: float, disconnected: Disconnected | None = None) -> Response:
        """The answer to one validated request: JSON, or an SSE stream. `disconnected`: returns once
        the client has gone (a non-streamed request is cancelled then)."""
        route = await self._route(request.model, conversation_id, caller, body)
        style = request.style or self.alias_styles.get(route.model)
        try:
            if route.load is not None and self.loader is not None:
                await self._load_pinned(route)
            if not self.engines.ready:
                raise not_ready()
            restyler = await self._restyler(style) if style is not None else None
        except APIError as exc:
            rejected(exc.status, route)
            raise
        flight = self.recorder.begin(route, body, stream=request.stream, key_hash=caller.key_hash,
                                     conversation_id=conversation_id, style=style, started=started)
        payload = engine_payload(body, route.version, whole=restyler is not None)
        affinity = None
        if len(self.engines.replicas) > 1:  # a conversation's turns go to the replica that has its prefix cached
            affinity = conversation_key(body.get("messages") or [], conversation_id=conversation_id, key_hash=caller.key_hash)
        if payload.get("stream"):
            response, replica = await self._send(payload, flight, affinity)
            relay = Relay(self.recorder, response, flight, forward_usage=request.wants_usage)

            async def close() -> None:
                try:
                    await relay.close()
                finally:
                    replica.end()

            return RelayResponse(relay.events(), on_close=close, media_type="text/event-stream",
                                 headers={"x-tunewheel-adapter": route.version, "cache-control": "no-cache",
                                          "x-accel-buffering": "no"})
        data = await unless_client_leaves(self._whole(payload, flight, affinity), disconnected)
        if restyler is not None:
            response = await self.restyle.answer(flight, data, restyler=restyler, params=request.style_params,
                                                 stream=request.stream)
            await self.recorder.durable(flight)  # a whole answer leaves only once its turn is on disk
            return response
        choice = (data.get("choices") or [{}])[0]
        data["id"], data["model"] = flight.turn.id, flight.turn.alias
        self.recorder.finish(flight, answer=(choice.get("message") or {}).get("content"),
                             finish_reason=choice.get("finish_reason"), usage=data.get("usage") or {}, ttft=None,
                             status="ok")
        await self.recorder.durable(flight)
        return json_response(data, headers={"x-tunewheel-adapter": route.version})

    async def _route(self, model: str, conversation_id: str | None, caller: Caller, body: dict[str, Any]) -> Route:
        """The router's decision; 404 listing the names this caller may use. While the alias has a
        canary, the conversation's key picks the arm (serve/routing.py)."""
        version = pinned_version(model)
        key = None
        if model in self.router.table.canaries:
            key = conversation_key(body.get("messages") or [], conversation_id=conversation_id, key_hash=caller.key_hash)
        try:
            if version is not None and not caller.operator and not await self._public(version):
                raise UnknownModel(model, [])
            return await self.router.route(model, conversation_key=key)
        except UnknownModel as exc:
            rejected(404)
            hint = "" if caller.operator or version is None else \
                " (pinned versions that are not promoted need an admin key)"
            raise APIError(404, f"model {model!r} does not exist; valid names: {', '.join(self.model_names(caller))}"
                           f"{hint}", type="not_found_error", code="model_not_found", param="model") from exc
        except NotServed as exc:  # its version is loading (gateway start, engine restart): retry, not 404
            rejected(503)
            raise not_ready(str(exc)) from exc

    async def _public(self, version: str) -> bool:
        """Whether anyone with a chat key may pin `version`: an alias serves it, or it is a promoted chat version."""
        if version in self.router.table.aliases().values() or self.router.registry is None:
            return True
        v = await asyncio.to_thread(self.router.registry.get, version)
        return v is not None and v.kind == "chat" and v.state == "promoted"

    async def _load_pinned(self, route: Route) -> None:
        try:
            await self.loader.ensure_pinned(route.load)
        except Exception as exc:  # the registry knows it but the engine would not load it; the details stay here
            log.error("pinned version %s could not be loaded: %s", route.version, exc)
            raise APIError(503, f"adapter {route.version} could not be loaded into the engine; the gateway log has "
                           "the reason", type="service_unavailable", code="adapter_unavailable",
                           headers={"Retry-After": "30"}) from exc

    async def _restyler(self, style: str) -> str:
        """The loaded restyler version of `style`; 404 naming the styles there are."""
        if self.restyle is None:
            raise APIError(404, f"style {style!r} is not served: this gateway has no restyler registry; styles: none",
                           type="not_found_error", code="style_not_found", param="style")
        return await self.restyle.version_for(style)

    async def _send(self, payload: dict[str, Any], flight: InFlight, affinity: str | None = None) -> tuple[httpx.Response, Replica]:
        """The engine's 200 response (a stream when asked) and the replica it came from, which counts
        it in flight until the caller calls `replica.end()`; anything else refuses the request. When
        no response came (a refused connection, a keep-alive connection the engine had closed, an
        engine that died while it generated) or a replica has lost the version, the request is tried
        again, on another replica while there is one: each replica once, plus one more try."""
        tried: list[Replica] = []
        tries = len(self.engines.replicas) + 1
        try:
            for attempt in range(tries):
                replica = self.engines.pick(affinity, exclude=tried) or self.engines.pick(affinity)
                if replica is None:
                    raise not_ready("no engine replica is ready" if tried else "the engine is not ready yet")
                tried.append(replica)
                replica.begin()
                try:
                    response = await self._post(replica, payload, flight, last=attempt == tries - 1)
                except BaseException:
                    replica.end()
                    raise
                if response is not None:
                    return response, replica
                replica.end()
            raise AssertionError("unreachable: the last try returns or raises")
        except BaseException as exc:  # a cancelled request must also give its lease back
            self.recorder.refuse(flight, _client_left(exc))
            raise

    async def _post(self, replica: Replica, payload: dict[str, Any], flight: InFlight, *, last: bool) -> httpx.Response | None:
        """One try on `replica`: its 200 response, or None when the request should be tried again."""
        try:
            response = await post_json(self.http, f"{replica.url}/v1/chat/completions", payload, self.timeout,
                                       stream=bool(payload.get("stream")))
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:  # no response: refused, or the connection broke
            if isinstance(exc, httpx.ConnectError):  # refused: that replica is down (or restarting)
                self.engines.failed(replica, f"{type(exc).__name__}: {exc}")
            if not last:
                return None
            raise not_ready(f"the engine is unreachable ({type(exc).__name__})") from exc
        except httpx.TimeoutException as exc:
            raise APIError(504, "the engine did not answer in time (serve.request_timeout_s)", type="timeout",
                           code="engine_timeout") from exc
        if response.status_code == 200:
            return response
        try:
            if response.status_code == 404 and flight.route.version != self.router.base:
                if len(self.engines.replicas) > 1 and not last:  # this replica lost the version (it restarted)
                    self.engines.failed(replica, f"it has lost {flight.route.version}")
                    return None
                self.router.table.lost(flight.route.version)  # the engine lost it: reload, retry
                raise not_ready(f"adapter {flight.route.version} is being reloaded into the engine")
            raise upstream_error(response.status_code, await response.aread())
        finally:
            await response.aclose()

    async def _whole(self, payload: dict[str, Any], flight: InFlight, affinity: str | None = None) -> dict[str, Any]:
        response, replica = await self._send(payload, flight, affinity)
        try:
            return await self._read(response, flight)
        finally:
            replica.end()

    async def _read(self, response: httpx.Response, flight: InFlight) -> dict[str, Any]:
        """A whole (non-streamed) answer as JSON; 502 when it cannot be read."""
        try:
            try:
                return orjson.loads(await response.aread())
            except (ValueError, httpx.HTTPError) as exc:
                raise APIError(502, f"the engine's answer could not be read: {exc}", type="engine_error") from exc
            finally:
                await response.aclose()
        except BaseException as exc:
            self.recorder.refuse(flight, _client_left(exc))
            raise


def _client_left(exc: BaseException) -> BaseException:
    """How a refusal is counted: a cancelled request is one whose client left (499, as nginx counts it)."""
    if isinstance(exc, asyncio.CancelledError):
        return APIError(499, "the client closed the connection", code="client_closed_request")
    return exc


async def unless_client_leaves(work: Coroutine[Any, Any, T], disconnected: Disconnected | None) -> T:
    """`work`'s result, or 499 once `disconnected()` returns first: `work` is cancelled then."""
    if disconnected is None:
        return await work
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling():
            raise
        raise _client_left(asyncio.CancelledError()) from None
