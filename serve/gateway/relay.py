"""The relay and the turn recording that chat (serve/gateway/chat.py) and restyle share.

    flight = recorder.begin(route, body, stream=True, key_hash=None, conversation_id=None, style=None, started=t0)
    relay = Relay(recorder, engine_response, flight, forward_usage=False)
    return RelayResponse(relay.events(), on_close=relay.close, media_type="text/event-stream")
    recorder.finish(flight, answer="Hi!", finish_reason="stop", usage={...}, ttft=None, status="ok")
    recorder.refuse(flight, exc)          # the engine refused or failed before an answer: no turn

A request becomes a turn (`TurnCreate`) the moment it is accepted (`begin`): the version is
leased and counted in flight. It ends exactly once: `finish` (answered; metrics, then the turn
goes to the turn writer's spool) or `refuse` (an engine error before any answer; metrics only).
Requests turned away before they were accepted (unknown model, engine not ready, unknown
style, the turn spool full) are counted by `rejected` and write nothing.

No answer ends before its turn is on disk: `await recorder.durable(flight)` waits until the
turn `finish` handed over is fsync'd in the spool (feedback/spool.py), before the whole body of
a non-streamed answer is sent, and `Relay.done()` before a stream's final `[DONE]`; if the
spool cannot take it, the client gets a 503 (or an error event) instead of the end. `finish`
itself never waits, so it also runs when a request is cancelled. While the spool is full
(`store.spool.max_bytes`: the database has been away a long time) `begin` answers 503 with
Retry-After.

A stream's `id` and `model` are ours in every chunk: the completion id the turn is stored under
(what `POST /v1/feedback` takes) and the name the client asked for. `Relay.close()` logs what
was said so far, with status `incomplete` unless the engine finished, however the stream ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import orjson
from fastapi.responses import StreamingResponse

from feedback.models import TurnCreate, utcnow
from serve.gateway.protocol import APIError, sampling_params
from serve.metrics import COMPLETION_TOKENS, IN_FLIGHT, LATENCY, PROMPT_TOKENS, REQUESTS, TTFT
from serve.routing import Route

log = logging.getLogger("tunewheel.gateway")


def sse(data: Any) -> bytes:
    """One server-sent event."""
    return b"data: " + orjson.dumps(data) + b"\n\n"


def rejected(status: int | str, route: Route | None = None) -> None:
    """Count a request turned away before it was accepted (no turn), giving its lease back."""
    if route is None:
        REQUESTS.labels(alias="unknown", version="none", status=str(status)).inc()
        return
    route.lease.release()
    REQUESTS.labels(alias=route.model, version=route.version, status=str(status)).inc()


@dataclass
class InFlight:
    """One accepted request until it ends: its turn, the route it runs on, when it started."""

    turn: TurnCreate
    route: Route
    started: float
    spooled: asyncio.Future | None = None
    """Set by `finish`: resolves once the turn is on disk in the spool."""


SPOOL_FULL_RETRY_S = 30


class TurnRecorder:
    """Metrics and the turn log of accepted requests; `writer` is the started TurnWriter."""

    def __init__(self, writer: Any):
        self.writer = writer

    def begin(self, route: Route, body: dict[str, Any], *, stream: bool, key_hash: str | None,
              conversation_id: str | None, style: str | None, started: float) -> InFlight:
        """Accept a request: its turn (id = the completion id the client will see), counted in
        flight; 503 while the turn spool is full."""
        if self.writer.spool_full:
            rejected(503, route)
            raise APIError(503, "the turn log is full: the database has not taken answered turns for a while; "
                           "retry later", type="service_unavailable", code="turn_log_full",
                           headers={"Retry-After": str(SPOOL_FULL_RETRY_S)})
        turn = TurnCreate(id=f"chatcmpl-{uuid.uuid4().hex}", alias=route.model, adapter_version=route.version,
                          request_messages=body["messages"], params=sampling_params(body), stream=stream,
                          key_hash=key_hash, conversation_id=conversation_id, style=style)
        IN_FLIGHT.labels(alias=route.model).inc()
        return InFlight(turn=turn, route=route, started=started)

    def refuse(self, flight: InFlight, exc: BaseException) -> None:
        """The engine refused or failed before an answer: metrics, no turn."""
        self._end(flight)
        status = str(exc.status) if isinstance(exc, APIError) else "error"
        REQUESTS.labels(alias=flight.route.model, version=flight.route.version, status=status).inc()

    def finish(self, flight: InFlight, *, answer: str | None, finish_reason: str | None, usage: dict[str, Any],
               ttft: float | None, status: str) -> None:
        """Metrics and the turn log for one answered request; never waits, so it runs even on
        cancellation. `durable(flight)` then waits until the turn is on disk."""
        latency = time.perf_counter() - flight.started
        self._end(flight)
        alias, version = flight.route.model, flight.route.version
        REQUESTS.labels(alias=alias, version=version, status=status).inc()
        LATENCY.labels(alias=alias, version=version).observe(latency)
        if ttft is not None:
            TTFT.labels(alias=alias, version=version).observe(ttft)
        turn = flight.turn
        turn.prompt_tokens, turn.completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if turn.prompt_tokens:
            PROMPT_TOKENS.labels(alias=alias, version=version).inc(turn.prompt_tokens)
        if turn.completion_tokens:
            COMPLETION_TOKENS.labels(alias=alias, version=version).inc(turn.completion_tokens)
        turn.answer, turn.finish_reason, turn.status = answer, finish_reason, status
        turn.latency_ms, turn.ttft_ms = 1000 * latency, None if ttft is None else 1000 * ttft
        turn.created_at = utcnow()  # a turn is dated when its answer is complete, as it always was
        try:
            flight.spooled = asyncio.wrap_future(self.writer.submit(turn))
        except RuntimeError as exc:  # a stream cut off by a forced shutdown, after the writer closed
            log.error("turn %s answered after the turn writer closed; not logged", turn.id)
            flight.spooled = asyncio.get_running_loop().create_future()
            flight.spooled.set_exception(exc)
        flight.spooled.add_done_callback(_retrieve)

    async def durable(self, flight: InFlight) -> None:
        """Wait until the turn `finish` handed over is on disk (at once when none was handed over
        yet); 503 with Retry-After when it cannot be stored, so the client never gets an answer
        the log lost."""
        if flight.spooled is None:
            return
        try:
            await asyncio.shield(flight.spooled)
        except (OSError, RuntimeError) as exc:
            raise APIError(503, f"the answer could not be logged ({exc}); retry in a moment",
                           type="service_unavailable", code="turn_log_unavailable",
                           headers={"Retry-After": "10"}) from exc

    @staticmethod
    def _end(flight: InFlight) -> None:
        flight.route.lease.release()
        IN_FLIGHT.labels(alias=flight.route.model).dec()


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
    was said so far, logged once by `close()` (status `incomplete` unless the engine finished).
    `upstream`: the engine's streaming response (anything with `aclose()` for subclasses)."""

    def __init__(self, recorder: TurnRecorder, upstream: Any, flight: InFlight, *, forward_usage: bool):
        self.recorder, self.upstream, self.flight = recorder, upstream, flight
        self.forward_usage = forward_usage
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] = {}
        self.ttft: float | None = None
        self.status = "incomplete"
        self.closed = False

    async def events(self) -> AsyncIterator[bytes]:
        try:
            async for line in self.upstream.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    if self.status == "incomplete":
                        self.status = "ok"
                    yield await self.done()
                    break
                out = self.relabel(orjson.loads(data))
                if out is not None:
                    yield sse(out)
        except httpx.HTTPError as exc:  # the engine broke off mid-stream
            self.status = "error"
            yield sse(APIError(502, f"the engine stream broke off: {type(exc).__name__}", type="engine_error").body())
        finally:
            await self.close()

    def relabel(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """The chunk as the client gets it (None: not for the client), noting what it says."""
        if "error" in chunk:  # vLLM reports a failure inside the stream
            self.status = "error"
            return chunk
        chunk["id"], chunk["model"] = self.flight.turn.id, self.flight.turn.alias
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
                self.ttft = time.perf_counter() - self.flight.started
            if delta.get("content"):
                self.parts.append(delta["content"])
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return chunk

    async def done(self) -> bytes:
        """The stream's last event, sent only once the turn is on disk: `[DONE]`, or an error
        event when the turn cannot be logged."""
        await self.close()
        try:
            await self.recorder.durable(self.flight)
        except APIError as exc:
            return sse(exc.body())
        return b"data: [DONE]\n\n"

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.recorder.finish(self.flight, answer="".join(self.parts), finish_reason=self.finish_reason,
                             usage=self.usage, ttft=self.ttft, status=self.status)
        with anyio.CancelScope(shield=True):
            await self.upstream.aclose()


def _retrieve(fut: asyncio.Future) -> None:
    """A spool failure nobody awaited (a client that left) is logged, not left unretrieved."""
    if not fut.cancelled() and fut.exception() is not None:
        log.error("a turn could not be spooled: %s", fut.exception())
