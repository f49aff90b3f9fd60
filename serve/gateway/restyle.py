"""The restyle step: an answer rewritten into a house style by that style's promoted restyler.

    curl -s localhost:8000/v1/chat/completions -d '{"model":"chat","style":"pirate","messages":[...]}'

    step = RestyleStep(router=router, loader=reconciler, recorder=recorder, http=client,
                       engines=pool, config=settings.restyle)
    restyler = await step.version_for("pirate")                  # loaded; 404 naming the styles there are
    response = await step.answer(flight, data, restyler=restyler, params=None, stream=False)

The chat model decides what to say; the restyler, a LoRA adapter trained for one style only
(`tunewheel restyle train`), rewrites the final answer with exactly the system prompt it was
trained with. A style comes from the request's `style` field (the OpenAI SDK sends it through
`extra_body`) or from the alias (`[serve.aliases.NAME] style = ...`); which version restyles
it, the router (serve/routing.py) decides. The raw answer is made whole first (a restyler
needs the whole text) and kept on the turn as `raw_answer`; a streamed request then streams
the restyled text. A restyler that fails never passes the raw answer off as styled: with
`restyle.fallback = "error"` the client gets a 502 saying so, with `"raw"` the raw answer
with the header `x-tunewheel-restyle: failed`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi.responses import JSONResponse, Response

from learn.restyle_request import rewrite_request
from learn.settings import RestyleSettings
from serve.gateway.protocol import APIError
from serve.gateway.relay import InFlight, Relay, RelayResponse, TurnRecorder, sse
from serve.metrics import RESTYLE_LATENCY
from serve.routing import Router, Target


class RestyleFailed(RuntimeError):
    """The restyler could not rewrite the answer."""


def restyled_text(body: bytes) -> str:
    """The text of a restyler's (non-streamed) answer; RestyleFailed when there is none to read."""
    try:
        content = (json.loads(body)["choices"][0]["message"] or {}).get("content") or ""
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise RestyleFailed(f"the restyler's answer could not be read ({type(exc).__name__}: {body[:120]!r})") from exc
    if not isinstance(content, str) or not content.strip():
        raise RestyleFailed("restyler returned an empty text")
    return content


class RestyleStep:
    """Restyles whole answers. `loader`: the reconciler, which loads restylers on the chat
    engine; `config.engine_url` puts them on an engine of their own, loaded here."""

    def __init__(self, *, router: Router, loader: Any, recorder: TurnRecorder, http: httpx.AsyncClient,
                 engines: Any, config: RestyleSettings):
        """`engines`: the chat engine's replicas (serve/pool.py EnginePool)."""
        self.router, self.loader, self.recorder, self.http, self.config = router, loader, recorder, http, config
        self.engines = engines
        self.separate_engine = config.engine_url is not None
        self._loaded: set[str] = set()
        self._lock = asyncio.Lock()

    @property
    def url(self) -> str:
        """Where a rewrite goes: restyle.engine_url, else the least busy chat engine replica."""
        if self.separate_engine:
            return self.config.engine_url.rstrip("/")
        return self.engines.url

    async def version_for(self, style: str) -> str:
        """The engine name of the style's promoted restyler, loaded; 404 naming the styles there are."""
        target = await asyncio.to_thread(self.router.restyler, style)
        if target is None:
            known = await asyncio.to_thread(self.router.styles)
            raise APIError(404, f"style {style!r} has no promoted restyler; styles: {', '.join(known) or 'none'}",
                           type="not_found_error", code="style_not_found", param="style")
        await self._ensure_loaded(target)
        return target.version

    async def _ensure_loaded(self, target: Target) -> None:
        if not self.separate_engine:
            try:
                await self.loader.ensure_pinned(target)
            except Exception as exc:  # the registry has it but the engine would not load it
                raise APIError(503, f"restyler {target.version} could not be loaded: {exc}",
                               type="service_unavailable") from exc
            return
        async with self._lock:
            if target.version in self._loaded:
                return
            r = await self.http.post(f"{self.url}/v1/load_lora_adapter",
                                     json={"lora_name": target.version, "lora_path": target.path})
            if r.status_code != 200 and "already" not in r.text:
                raise APIError(503, f"restyler {target.version} could not be loaded: {r.text[:200]}",
                               type="service_unavailable")
            self._loaded.add(target.version)

    # --- the answer --------------------------------------------------------------------------
    async def answer(self, flight: InFlight, data: dict, *, restyler: str, params: dict[str, str] | None,
                     stream: bool) -> Response:
        """The chat model's whole answer `data`, passed through `restyler`: JSON or an SSE stream."""
        turn = flight.turn
        choice = (data.get("choices") or [{}])[0]
        turn.raw_answer = (choice.get("message") or {}).get("content") or ""
        usage = data.get("usage") or {}  # the turn counts the chat model's tokens, not the restyler's
        headers = {"x-tunewheel-adapter": turn.adapter_version, "x-tunewheel-restyler": restyler}
        step, chunks = Timer(turn.style), None
        try:
            if not stream:
                styled = await self.rewrite(restyler, turn.raw_answer, params, usage.get("completion_tokens"))
            else:
                chunks = self.stream(restyler, turn.raw_answer, params, usage.get("completion_tokens"))
                try:
                    first = await chunks.__anext__()
                except (RestyleFailed, StopAsyncIteration, httpx.HTTPError) as exc:
                    await chunks.aclose()
                    raise RestyleFailed(str(exc) or "restyler sent nothing") from exc
        except RestyleFailed as exc:
            step.done("failed")
            return self._failed(flight, data, exc, usage=usage)
        except BaseException:  # cancelled (the client left) or a bug: log the turn, give the lease back
            step.done("failed")
            if chunks is not None:
                await chunks.aclose()
            self.recorder.finish(flight, answer=None, finish_reason="restyle_failed", usage=usage, ttft=None,
                                 status="incomplete")
            raise
        if not stream:
            step.done("ok")
            data["id"], data["model"] = turn.id, turn.alias
            choice.setdefault("message", {})["content"] = styled
            self.recorder.finish(flight, answer=styled, finish_reason=choice.get("finish_reason"), usage=usage,
                                 ttft=None, status="ok")
            return JSONResponse(data, headers=headers)
        relay = StyledRelay(self.recorder, chunks, first, flight, usage=usage, timer=step)
        return RelayResponse(relay.events(), on_close=relay.close, media_type="text/event-stream",
                             headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"})

    def _failed(self, flight: InFlight, data: dict, exc: RestyleFailed, *, usage: dict) -> Response:
        """Never the raw answer passed off as styled: an error, or (fallback 'raw') the raw answer marked so."""
        turn = flight.turn
        if self.config.fallback == "raw":
            self.recorder.finish(flight, answer=turn.raw_answer, finish_reason="restyle_failed", usage=usage, ttft=None,
                                 status="ok")
            data["id"], data["model"] = turn.id, turn.alias
            return JSONResponse(data, headers={"x-tunewheel-adapter": turn.adapter_version, "x-tunewheel-restyle": "failed"})
        self.recorder.finish(flight, answer=None, finish_reason="restyle_failed", usage=usage, ttft=None, status="error")
        raise APIError(502, f"the answer could not be restyled into {turn.style!r}: {exc}", type="restyle_error",
                       code="restyle_failed")

    # --- the restyler's engine calls -------------------------------------------------------------
    def payload(self, version: str, text: str, params: dict[str, str] | None, stream: bool,
                answer_tokens: int | None = None) -> dict:
        """Exactly the prompt the restyler was trained with; greedy, bounded (learn/restyle_request.py)."""
        return rewrite_request(self.config, version, text, params=params, answer_tokens=answer_tokens, stream=stream)

    async def rewrite(self, version: str, text: str, params: dict[str, str] | None, answer_tokens: int | None = None) -> str:
        """The restyled text; raises RestyleFailed."""
        try:
            r = await self.http.post(f"{self.url}/v1/chat/completions",
                                     json=self.payload(version, text, params, False, answer_tokens))
        except httpx.HTTPError as exc:
            raise RestyleFailed(f"restyler unreachable ({type(exc).__name__})") from exc
        if r.status_code != 200:
            raise RestyleFailed(f"restyler answered HTTP {r.status_code}: {r.text[:200]}")
        return restyled_text(r.content)

    async def stream(self, version: str, text: str, params: dict[str, str] | None,
                     answer_tokens: int | None = None) -> AsyncIterator[dict]:
        """The restyler's SSE chunks as dicts; raises RestyleFailed before the first chunk on failure."""
        request = self.http.build_request("POST", f"{self.url}/v1/chat/completions",
                                          json=self.payload(version, text, params, True, answer_tokens))
        try:
            response = await self.http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise RestyleFailed(f"restyler unreachable ({type(exc).__name__})") from exc
        if response.status_code != 200:
            content = await response.aread()
            await response.aclose()
            raise RestyleFailed(f"restyler answered HTTP {response.status_code}: {content[:200]!r}")
        try:
            async for line in response.aiter_lines():
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    try:
                        chunk = json.loads(line[5:])
                    except ValueError as exc:
                        raise RestyleFailed(f"the restyler's stream could not be read: {line[:120]!r}") from exc
                    if not isinstance(chunk, dict):
                        raise RestyleFailed(f"the restyler's stream could not be read: {line[:120]!r}")
                    yield chunk
        finally:
            await response.aclose()


class Timer:
    """The restyle step's added latency, observed once when it ends."""

    def __init__(self, style: str | None):
        self.style, self.started, self.observed = style or "none", time.perf_counter(), False

    def done(self, status: str) -> None:
        if not self.observed:
            self.observed = True
            RESTYLE_LATENCY.labels(style=self.style, status=status).observe(time.perf_counter() - self.started)


class StyledRelay(Relay):
    """The restyler's stream relabelled with the chat turn's id and alias; logs the turn once
    (`Relay.close`, which also closes the restyler's stream)."""

    def __init__(self, recorder: TurnRecorder, chunks: AsyncIterator[dict], first: dict, flight: InFlight, *,
                 usage: dict, timer: Timer):
        super().__init__(recorder, chunks, flight, forward_usage=False)
        self.first = first
        self.usage = usage  # the turn counts the chat model's tokens, not the restyler's
        self.timer = timer

    def relabel(self, chunk: dict) -> dict | None:
        choices = chunk.get("choices")
        if not choices:
            return None  # the restyler's usage chunk
        chunk["id"], chunk["model"] = self.flight.turn.id, self.flight.turn.alias
        chunk.pop("usage", None)
        delta = choices[0].get("delta") or {}
        if delta.get("content"):
            self.ttft = self.ttft or time.perf_counter() - self.flight.started
            self.parts.append(delta["content"])
        self.finish_reason = choices[0].get("finish_reason") or self.finish_reason
        return chunk

    async def events(self) -> AsyncIterator[bytes]:
        try:
            chunk: dict | None = self.first
            while chunk is not None:
                if "error" in chunk:
                    raise RestyleFailed(str(chunk["error"]))
                out = self.relabel(chunk)
                if out is not None:
                    yield sse(out)
                chunk = await anext(self.upstream, None)
            self.status = "ok"
            yield await self.done()  # [DONE] only once the turn is on disk
        except (RestyleFailed, httpx.HTTPError) as exc:
            self.status = "error"
            yield sse(APIError(502, f"the restyler broke off: {exc}", type="restyle_error", code="restyle_failed").body())
        finally:
            await self.close()

    async def close(self) -> None:
        self.timer.done("ok" if self.status == "ok" else "failed")
        await super().close()
