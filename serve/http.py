"""The gateway's HTTP client for the engine hop: httpx's API over aiohttp's connection pool.

Every chat request crosses this hop once. Under httpx's own transport (httpcore on anyio) the
hop was the largest part of the gateway's own cost: py-spy on a gateway at 8 in flight put 38%
of its event-loop time there, most of it anyio bookkeeping (cancel scopes, locks and
`asyncio.current_task` on every read and write). aiohttp parses HTTP in C and has none of it.

The rest of the gateway keeps httpx's interface: requests are built and sent with
`httpx.AsyncClient`, and `AiohttpTransport` raises httpx's exception classes, mapped so that the
distinctions the chat path acts on hold (see `chat.ChatService._post`):

- refused, or the name does not resolve: `httpx.ConnectError` (that replica is down);
- the connection closed before a whole response (a keep-alive connection the engine had
  closed, an engine that died mid-answer): `httpx.RemoteProtocolError`;
- no connection, or no bytes, within the timeout: `httpx.ConnectTimeout`, `httpx.ReadTimeout`.

The `httpx-aiohttp` package does the same job, but its mapping turns a refused connection into
`ConnectTimeout`, and a dropped one too, which would count a dead replica as a slow one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import httpx

# The first matching row wins: the more specific aiohttp classes come first.
_ERRORS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),  # includes SocketTimeoutError: no bytes within `read`
    (asyncio.TimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.RemoteProtocolError),  # the body broke off
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),  # not a valid HTTP response
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.ClientError, httpx.ReadError),  # ClientOSError (a reset) and anything else aiohttp raises
    (ConnectionError, httpx.ReadError),
)

JSON_HEADERS = (("Content-Type", "application/json"),)

# Below the keep-alive timeout of vLLM's server (uvicorn, 5 s), so the gateway drops an idle
# connection before the engine does and rarely reuses one the engine is closing.
KEEPALIVE_S = 4.0


@contextmanager
def _httpx_errors(request: httpx.Request | None) -> Iterator[None]:
    try:
        yield
    except httpx.HTTPError:
        raise
    except Exception as exc:
        for source, target in _ERRORS:
            if isinstance(exc, source):
                raise target(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, request=request) from exc
        raise


class _Body(httpx.AsyncByteStream):
    """A response body as aiohttp receives it: each chunk as soon as it arrives (SSE relays it on)."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request | None):
        self.response, self.request = response, request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors(self.request):
            async for chunk in self.response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        self.response.release()  # back to the pool when read to the end; closed when not


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport that sends each request over an aiohttp session (HTTP/1.1, no proxy,
    no redirects, bodies passed through undecoded: httpx decodes them)."""

    def __init__(self, *, max_connections: int = 1000):
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:  # made in the running loop, on first use
            connector = aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=KEEPALIVE_S)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False,
                                                  skip_auto_headers=("User-Agent", "Accept-Encoding"))
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        return await self._send(request.method, str(request.url), request.headers.multi_items(), body or None,
                                request.extensions.get("timeout", {}), request)

    async def post_json(self, url: str, body: bytes, timeout: dict[str, float | None], *, read: bool) -> httpx.Response:
        """POST `body` (JSON) to `url`, without an `httpx.Request` built first. `read`: the whole
        response body is read here, by aiohttp (not through httpx's byte-stream layers); else it
        is left to read."""
        return await self._send("POST", url, JSON_HEADERS, body, timeout, None, read=read)

    async def _send(self, method: str, url: str, headers: Any, body: bytes | None, timeout: dict[str, float | None],
                    request: httpx.Request | None, *, read: bool = False) -> httpx.Response:
        with _httpx_errors(request):
            response = await self._open().request(
                method, url, headers=headers, data=body, allow_redirects=False, compress=False,
                timeout=aiohttp.ClientTimeout(total=None, connect=timeout.get("pool"),
                                              sock_connect=timeout.get("connect"), sock_read=timeout.get("read")))
            if read:
                try:
                    content = await response.read()
                except BaseException:  # cut off or cancelled mid-body: that connection is not reused
                    response.close()
                    raise
                response.release()
        extensions = {"http_version": b"HTTP/1.1"}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode()
        body_or_stream = {"content": content} if read else {"stream": _Body(response, request)}
        return httpx.Response(response.status, headers=response.raw_headers, request=request, extensions=extensions,
                              **body_or_stream)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


async def post_json(client: httpx.AsyncClient, url: str, payload: dict[str, Any], timeout: httpx.Timeout, *,
                    stream: bool) -> httpx.Response:
    """`client.post(url, json=payload)`, the chat hop's fast path: over an `AiohttpTransport`
    straight to aiohttp, skipping what httpx does per request that the engine hop never needs
    (URL merging, cookies, auth and redirect handling: about a seventh of the gateway's time at
    8 in flight). With `stream` the body is left to read; without it, it is read here, so that a
    connection lost mid-answer raises here, like `client.send` does."""
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    transport = client._transport  # noqa: SLF001 (the client's mounted transport; httpx has no public name)
    if isinstance(transport, AiohttpTransport):
        return await transport.post_json(url, body, timeout.as_dict(), read=not stream)
    request = client.build_request("POST", url, content=body, headers=JSON_HEADERS, timeout=timeout)
    return await client.send(request, stream=stream)  # another transport (respx's, in the gateway's tests)


def engine_client(timeout_s: float, *, connect_s: float = 5.0, max_connections: int = 1000) -> httpx.AsyncClient:
    """The client the gateway sends engine calls with (chat, adapter loads, model lists)."""
    return httpx.AsyncClient(transport=AiohttpTransport(max_connections=max_connections),
                             timeout=httpx.Timeout(timeout_s, connect=connect_s), trust_env=False)
