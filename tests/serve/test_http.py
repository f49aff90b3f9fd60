"""The gateway's engine client (serve/http.py) against real servers on localhost: answers,
streams, keep-alive, and each way an engine can fail, raised as the httpx error the chat path
acts on (a refused connection is a replica down; a broken one is tried again; silence times out).

    pytest tests/serve/test_http.py
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable

import httpx
import pytest

from serve.http import engine_client, post_json

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[str, bytes]:
    """The request line and body of one HTTP/1.1 request (Content-Length bodies)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next((int(v) for k, _, v in (line.partition(": ") for line in lines) if k.lower() == "content-length"), 0)
    return lines[0], await reader.readexactly(length)


def response(body: bytes, *, status: str = "200 OK", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{extra}\r\n").encode() + body


class Server:
    """A TCP server on a free port that runs `handler` for each connection; counts connections."""

    def __init__(self, handler: Handler):
        self.handler, self.connections = handler, 0

    async def __aenter__(self) -> str:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each request on the connection with its request line and body, as JSON."""
    while True:
        line, body = await read_request(reader)
        writer.write(response(json.dumps({"line": line, "body": json.loads(body or b"null")}).encode()))
        await writer.drain()


async def test_json_round_trip():
    async with Server(echo) as url, engine_client(5) as client:
        first = await client.post(f"{url}/v1/chat/completions", json={"model": "chat", "n": 1})
        second = await client.get(f"{url}/v1/models")
    assert first.status_code == 200 and first.json() == {"line": "POST /v1/chat/completions HTTP/1.1",
                                                         "body": {"model": "chat", "n": 1}}
    assert second.json() == {"line": "GET /v1/models HTTP/1.1", "body": None}


async def test_one_connection_serves_requests_in_turn():
    server = Server(echo)
    async with server as url, engine_client(5) as client:
        for n in range(5):
            assert (await client.post(f"{url}/x", json={"n": n})).json()["body"] == {"n": n}
    assert server.connections == 1


async def test_error_statuses_are_responses_not_exceptions():
    async def refuse(reader, writer):
        await read_request(reader)
        writer.write(response(b'{"error": "no such model"}', status="404 Not Found"))
        await writer.drain()

    async with Server(refuse) as url, engine_client(5) as client:
        r = await client.post(f"{url}/v1/chat/completions", json={})
        assert r.status_code == 404 and r.reason_phrase == "Not Found" and r.json() == {"error": "no such model"}


async def test_a_stream_arrives_chunk_by_chunk():
    """Each SSE event reaches the caller before the engine sends the next one."""
    sent, received = asyncio.Event(), []

    async def stream(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for n in range(3):
            event = f"data: {n}\n\n".encode()
            writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            await writer.drain()
            sent.clear()
            await asyncio.wait_for(sent.wait(), 5)  # the client has read it
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with Server(stream) as url, engine_client(5) as client:
        async with client.stream("POST", f"{url}/v1/chat/completions", json={"stream": True}) as r:
            async for line in r.aiter_lines():
                if line:
                    received.append(line)
                    sent.set()
    assert received == ["data: 0", "data: 1", "data: 2"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_refused_connection_is_a_connect_error():
    async with engine_client(5) as client:
        with pytest.raises(httpx.ConnectError):
            await client.post(f"http://127.0.0.1:{closed_port()}/v1/chat/completions", json={})


async def test_a_connection_closed_before_the_answer_is_a_remote_protocol_error():
    async def hang_up(reader, writer):
        await read_request(reader)

    async with Server(hang_up) as url, engine_client(5) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(f"{url}/v1/chat/completions", json={})


async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers with all but the last 10 bytes of its body, then closes the connection."""
    await read_request(reader)
    writer.write(response(b'{"choices": [{"message": {"content": "a long answer"}}]}')[:-10])
    await writer.drain()


async def test_an_answer_cut_short_is_a_remote_protocol_error():
    async with Server(cut_short) as url, engine_client(5) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(f"{url}/v1/chat/completions", json={})


async def test_a_keep_alive_connection_the_engine_closed_is_a_remote_protocol_error():
    """The engine answers, then closes the idle connection; the next request on it breaks. The
    chat path tries such a request again (chat.ChatService._post)."""
    async def once(reader, writer):
        await read_request(reader)
        writer.write(response(b"{}"))
        await writer.drain()
        await read_request(reader)  # the second request arrives, and the connection closes unanswered

    async with Server(once) as url, engine_client(5) as client:
        assert (await client.post(f"{url}/x", json={})).status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(f"{url}/x", json={})


async def test_an_engine_that_says_nothing_times_out_as_a_read_timeout():
    async def silent(reader, writer):
        await read_request(reader)
        await asyncio.sleep(5)

    async with Server(silent) as url, engine_client(0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(f"{url}/v1/chat/completions", json={})


async def test_a_stream_that_stalls_times_out_between_chunks():
    async def stall(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"9\r\ndata: 0\n\n\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    async with Server(stall) as url, engine_client(0.3) as client:
        async with client.stream("POST", f"{url}/x", json={"stream": True}) as r:
            lines = r.aiter_lines()
            assert await anext(lines) == "data: 0"
            with pytest.raises(httpx.ReadTimeout):
                async for _ in lines:
                    pass


async def test_a_malformed_answer_is_a_remote_protocol_error():
    async def garbage(reader, writer):
        await read_request(reader)
        writer.write(b"this is not HTTP\r\n\r\n")
        await writer.drain()

    async with Server(garbage) as url, engine_client(5) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(f"{url}/health")


async def test_an_unresolvable_host_is_a_connect_error():
    async with engine_client(5) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("http://no-such-engine.invalid:8000/health")


TIMEOUT = httpx.Timeout(5.0, connect=1.0)


async def test_post_json_sends_the_payload_and_reads_a_whole_answer():
    async with Server(echo) as url, engine_client(5) as client:
        r = await post_json(client, f"{url}/v1/chat/completions", {"model": "chat", "text": "héllo"}, TIMEOUT, stream=False)
        assert r.is_stream_consumed and r.json() == {"line": "POST /v1/chat/completions HTTP/1.1",
                                                     "body": {"model": "chat", "text": "héllo"}}


async def test_post_json_leaves_a_stream_to_read():
    async with Server(echo) as url, engine_client(5) as client:
        r = await post_json(client, f"{url}/x", {"n": 1}, TIMEOUT, stream=True)
        assert not r.is_stream_consumed
        assert json.loads(await r.aread())["body"] == {"n": 1}
        await r.aclose()


async def test_post_json_raises_a_broken_whole_answer_itself():
    """A non-streamed answer cut short fails in the call, where the chat path tries it again."""
    async with Server(cut_short) as url, engine_client(5) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await post_json(client, f"{url}/x", {}, TIMEOUT, stream=False)
        with pytest.raises(httpx.ConnectError):
            await post_json(client, f"http://127.0.0.1:{closed_port()}/x", {}, TIMEOUT, stream=False)


async def test_post_json_on_another_transport_goes_through_httpx():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.headers["content-type"], json.loads(request.content)))
        return httpx.Response(200, json={"ok": True})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        r = await post_json(client, "http://engine.test/v1/chat/completions", {"n": 2}, TIMEOUT, stream=False)
    assert r.json() == {"ok": True} and seen == [("application/json", {"n": 2})]
