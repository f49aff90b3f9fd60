"""Chat completions through the gateway: resolve the alias, call vLLM, relay, log the turn.

    service = ChatService(http=client, engine=engine, aliases=table, writer=writer)
    response = await service.create(request, body, caller=caller, conversation_id=None, started=t0)

`ChatService` is the serving class behind `POST /v1/chat/completions` (the route in serve/app.py
only reads and validates the body). It gets every collaborator in its constructor, so tests hand
it a fake engine (`.url`, `.ready`) and a respx-mocked `httpx.AsyncClient`.

What a client sees: the `id` of every answer (and of every chunk of a streamed one) is the
completion id stored in the turn log, which is what `POST /v1/feedback` takes; `model` is the
name the client asked for (`chat`, `base`, `chat@chat-v0003`); the header `x-tunewheel-adapter`
names the engine model that answered (`base` or an adapter version). Streams always ask vLLM for
usage so the log has token counts, but the usage chunk reaches the client only if it asked for
it (`stream_options.include_usage`).

Each answered request becomes one `TurnCreate`, handed to the turn writer after the answer: a
stream when it ends, with status `incomplete` and the partial answer when the client left early,
`error` when the engine broke off. Requests refused before an answer (unknown model, engine not
ready, an engine error status) are not turns and write nothing. Non-streamed answers have no
time to first token (`ttft_ms` None).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
from fastapi.responses import JSONResponse, StreamingResponse

from feedback.models import TurnCreate
from serve.aliases import AliasTable, Lease
from serve.auth import Caller
from serve.metrics import COMPLETION_TOKENS, IN_FLIGHT, LATENCY, PROMPT_TOKENS, REQUESTS, TTFT
from serve.protocol import GATEWAY_ONLY, APIError, ChatCompletionRequest, not_ready, sampling_params

PINNED_PREFIX = "chat@"
log = logging.getLogger("tunewheel.gateway")


class RelayResponse(StreamingResponse):
    """A StreamingResponse that always runs `on_close` when it ends, however it ends: a client
    that disconnects, even before the first byte, must not leave the turn unlogged, the version
    leased or the engine generating."""

    def __init__(self, content: AsyncIterator[bytes], *, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.on_close()


class Relay:
    """One streamed answer: vLLM's SSE chunks re-labelled with our id and model name, and what
    was said so far, logged once by `close()` (status `incomplete` unless the engine finished)."""

    def __init__(self, service: ChatService, response: httpx.Response, turn: dict[str, Any], started: float,
                 lease: Lease, *, forward_usage: bool):
        self.service, self.response, self.turn, self.started, self.lease = service, response, turn, started, lease
        self.forward_usage = forward_usage
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] = {}
        self.ttft: float | None = None
        self.status = "incomplete"
        self.closed = False

    async def events(self) -> AsyncIterator[bytes]:
        try:
            async for line in self.response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    if self.status == "incomplete":
                        self.status = "ok"
                    yield b"data: [DONE]\n\n"
                    break
                out = self.relabel(json.loads(data))
                if out is not None:
                    yield f"data: {json.dumps(out)}\n\n".encode()
        except httpx.HTTPError as exc:  # the engine broke off mid-stream
            self.status = "error"
            err = APIError(502, f"the engine stream broke off: {type(exc).__name__}", type="engine_error")
            yield f"data: {json.dumps(err.body())}\n\n".encode()
        finally:
            await self.close()

    def relabel(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """The chunk as the client gets it (None: not for the client), noting what it says."""
        if "error" in chunk:  # vLLM reports a failure inside the stream
            self.status = "error"
            return chunk
        chunk["id"] = self.turn["id"]
        chunk["model"] = self.turn["alias"]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        if not choices:  # the usage chunk we asked for
            return chunk if self.forward_usage else None
        if not self.forward_usage:
            chunk.pop("usage", None)
        for choice in choices:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if (delta.get("content") or delta.get("tool_calls")) and self.ttft is None:
                self.ttft = time.perf_counter() - self.started
            if delta.get("content"):
                self.parts.append(delta["content"])
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return chunk

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.service._record(self.turn, answer="".join(self.parts), finish_reason=self.finish_reason, usage=self.usage,
                             latency=time.perf_counter() - self.started, ttft=self.ttft, status=self.status,
                             lease=self.lease)
        with anyio.CancelScope(shield=True):
            await self.response.aclose()


def upstream_error(status: int, content: bytes) -> APIError:
    """An engine error answer as an OpenAI error object with the engine's status."""
    try:
        body = json.loads(content)
        err = body.get("error", body) if isinstance(body, dict) else {}
        if not isinstance(err, dict):
            err = {"message": str(err)}
    except ValueError:
        err = {}
    message = err.get("message") or content.decode(errors="replace")[:500] or f"engine answered HTTP {status}"
    return APIError(status, str(message), type=str(err.get("type") or "engine_error"), code=err.get("code"), param=err.get("param"))


class ChatService:
    def __init__(self, *, http: httpx.AsyncClient, engine: Any, aliases: AliasTable, writer: Any,
                 reconciler: Any = None, timeout_s: float = 600.0, restyle: Any = None,
                 alias_styles: dict[str, str] | None = None):
        self.http = http
        self.restyle = restyle  # serve.restyle.RestyleStep, or None: no styles served
        self.alias_styles = alias_styles or {}
        self.engine = engine
        self.aliases = aliases
        self.writer = writer
        self.reconciler = reconciler
        self.timeout = httpx.Timeout(timeout_s, connect=5.0)

    # --- names ---------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        """Every name a client may send as `model`, pinned versions included."""
        pinned = {v for v in self.aliases.loaded if v != self.aliases.base}
        pinned |= {v for v in self.aliases.aliases().values() if v != self.aliases.base}
        return [*self.aliases.aliases(), "base", *(PINNED_PREFIX + v for v in sorted(pinned))]

    async def resolve(self, model: str) -> str:
        """The engine model name for the client's `model`; 404 listing the valid names."""
        if model == "base":
            return self.aliases.base
        if model in self.aliases:
            return self.aliases.resolve(model)
        if model.startswith(PINNED_PREFIX) and len(model) > len(PINNED_PREFIX):
            version = model[len(PINNED_PREFIX):]
            if self.reconciler is not None:
                try:
                    if await self.reconciler.ensure_pinned(version):
                        return version
                except Exception as exc:  # the registry knows it but the engine would not load it
                    raise APIError(503, f"adapter {version} could not be loaded: {exc}", type="service_unavailable",
                                   code="adapter_unavailable", headers={"Retry-After": "30"}) from exc
            elif version in self.aliases.loaded:
                return version
        raise APIError(404, f"model {model!r} does not exist; valid names: {', '.join(self.model_names())}",
                       type="not_found_error", code="model_not_found", param="model")

    # --- the request ---------------------------------------------------------------------
    async def create(self, request: ChatCompletionRequest, body: dict[str, Any], *, caller: Caller,
                     conversation_id: str | None, started: float) -> JSONResponse | StreamingResponse:
        alias = request.model
        try:
            version = await self.resolve(alias)
        except APIError as exc:
            REQUESTS.labels(alias="unknown", version="none", status=str(exc.status)).inc()
            raise
        if not self.engine.ready:
            REQUESTS.labels(alias=alias, version=version, status="503").inc()
            raise not_ready()
        style = request.style or self.alias_styles.get(alias)
        restyler = None
        if style is not None:
            try:
                restyler = await self._restyler(style)
            except APIError as exc:
                REQUESTS.labels(alias=alias, version=version, status=str(exc.status)).inc()
                raise
        payload = {k: v for k, v in body.items() if k not in GATEWAY_ONLY}
        payload["model"] = version
        turn = dict(id=f"chatcmpl-{uuid.uuid4().hex}", alias=alias, adapter_version=version,
                    request_messages=body["messages"], params=sampling_params(body), stream=request.stream,
                    key_hash=caller.key_hash, conversation_id=conversation_id, style=style)
        if restyler is not None:  # the restyler needs the whole answer: ask for it in one piece
            payload["stream"] = False
            payload.pop("stream_options", None)
        lease = self.aliases.acquire(version)
        IN_FLIGHT.labels(alias=alias).inc()
        try:
            if payload.get("stream"):
                payload["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
                response = await self._send(payload, stream=True)
            else:
                response = await self._send(payload, stream=False)
        except BaseException as exc:
            self._finish_refused(alias, version, lease, exc)
            raise
        if response.status_code != 200:
            try:
                err = upstream_error(response.status_code, await response.aread())
            except BaseException as exc:
                self._finish_refused(alias, version, lease, exc)
                raise
            finally:
                await response.aclose()
            self._finish_refused(alias, version, lease, err)
            raise err
        if not payload.get("stream"):
            try:
                data = json.loads(await response.aread())
            except BaseException as exc:  # a cancelled request must also give its lease back
                err = exc
                if isinstance(exc, (ValueError, httpx.HTTPError)):
                    err = APIError(502, f"the engine's answer could not be read: {exc}", type="engine_error")
                self._finish_refused(alias, version, lease, err)
                if err is exc:
                    raise
                raise err from exc
            finally:
                await response.aclose()
            if restyler is not None:
                from serve.restyle import restyled_answer

                return await restyled_answer(self, data, turn, started, lease, restyler=restyler, request=request)
            self._log_plain(data, turn, started, lease)
            return JSONResponse(data, headers={"x-tunewheel-adapter": version})
        return self._stream(response, turn, started, lease, forward_usage=request.wants_usage)

    async def _restyler(self, style: str) -> str:
        """The loaded restyler version of `style`; 404 naming the styles there are."""
        if self.restyle is None:
            raise APIError(404, f"style {style!r} is not served: this gateway has no restyler registry; styles: none",
                           type="not_found_error", code="style_not_found", param="style")
        return await self.restyle.version_for(style)

    async def _send(self, payload: dict[str, Any], *, stream: bool) -> httpx.Response:
        request = self.http.build_request("POST", f"{self.engine.url}/v1/chat/completions", json=payload,
                                          timeout=self.timeout)
        try:
            return await self.http.send(request, stream=stream)
        except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:
            raise not_ready(f"the engine is unreachable ({type(exc).__name__})") from exc
        except httpx.TimeoutException as exc:
            raise APIError(504, "the engine did not answer in time (serve.request_timeout_s)", type="timeout",
                           code="engine_timeout") from exc

    def _finish_refused(self, alias: str, version: str, lease: Lease, exc: BaseException) -> None:
        lease.release()
        IN_FLIGHT.labels(alias=alias).dec()
        status = str(exc.status) if isinstance(exc, APIError) else "error"
        REQUESTS.labels(alias=alias, version=version, status=status).inc()

    # --- answers -------------------------------------------------------------------------
    def _log_plain(self, data: dict[str, Any], turn: dict[str, Any], started: float, lease: Lease) -> None:
        latency = time.perf_counter() - started
        data["id"] = turn["id"]
        data["model"] = turn["alias"]
        choice = (data.get("choices") or [{}])[0]
        usage = data.get("usage") or {}
        self._record(turn, answer=(choice.get("message") or {}).get("content"), finish_reason=choice.get("finish_reason"),
                     usage=usage, latency=latency, ttft=None, status="ok", lease=lease)

    def _stream(self, response: httpx.Response, turn: dict[str, Any], started: float, lease: Lease, *,
                forward_usage: bool) -> RelayResponse:
        relay = Relay(self, response, turn, started, lease, forward_usage=forward_usage)
        return RelayResponse(relay.events(), on_close=relay.close, media_type="text/event-stream",
                             headers={"x-tunewheel-adapter": turn["adapter_version"], "cache-control": "no-cache",
                                      "x-accel-buffering": "no"})

    def _record(self, turn: dict[str, Any], *, answer: str | None, finish_reason: str | None, usage: dict[str, Any],
                latency: float, ttft: float | None, status: str, lease: Lease) -> None:
        """Metrics and the turn log for one answered request; synchronous so it runs even on cancellation."""
        alias, version = turn["alias"], turn["adapter_version"]
        lease.release()
        IN_FLIGHT.labels(alias=alias).dec()
        REQUESTS.labels(alias=alias, version=version, status=status).inc()
        LATENCY.labels(alias=alias, version=version).observe(latency)
        if ttft is not None:
            TTFT.labels(alias=alias, version=version).observe(ttft)
        prompt_tokens, completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if prompt_tokens:
            PROMPT_TOKENS.labels(alias=alias, version=version).inc(prompt_tokens)
        if completion_tokens:
            COMPLETION_TOKENS.labels(alias=alias, version=version).inc(completion_tokens)
        record = TurnCreate(**turn, answer=answer, finish_reason=finish_reason, prompt_tokens=prompt_tokens,
                            completion_tokens=completion_tokens, latency_ms=1000 * latency,
                            ttft_ms=None if ttft is None else 1000 * ttft, status=status)
        try:
            self.writer.submit(record)
        except RuntimeError:  # a stream cut off by a forced shutdown, after the writer closed
            log.error("turn %s answered after the turn writer closed; not logged", record.id)
