"""The gateway's turn log under a slow or missing database: nothing freezes, no answer ends
before its turn is on disk, a full spool says 503, ratings wait or say 503. vLLM faked by respx.

    pytest tests/serve/gateway/test_turn_log.py
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import Future
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import pytest
from sqlalchemy.engine import make_url

from feedback.spool import SpoolError
from serve.gateway import routes_feedback
from serve.gateway.app import write_time_scrubber
from tests.serve.gateway.fakes import MESSAGES, events, sse_chunks, turns, vllm_answer


@contextmanager
def locked(gw):
    """Another connection holds SQLite's write lock (BEGIN EXCLUSIVE) until the block ends."""
    conn = sqlite3.connect(make_url(gw.settings.store_url).database, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def chat(gw, stream: bool = False):
    return gw.client.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": stream}, timeout=30)


class HeldSpool:
    """Stands in for the writer's `submit`: futures the test resolves (or fails) itself."""

    def __init__(self, writer):
        self.futures: list[Future] = []
        writer.submit = self.submit

    def submit(self, turn) -> Future:
        fut: Future = Future()
        self.futures.append(fut)
        return fut


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_ends_only_once_its_turn_is_on_disk(gw, upstream, stream):
    if stream:
        upstream.post("/v1/chat/completions").respond(200, content=b"".join(sse_chunks(["Hel", "lo"])))
    else:
        upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    held = HeldSpool(gw.writer)
    request = asyncio.create_task(chat(gw, stream))
    while not held.futures:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    assert not request.done()  # answered by the engine, but the turn is not on disk yet
    held.futures[0].set_result(None)
    response = await request
    assert response.status_code == 200
    if stream:
        assert events(response.text)[-1] == "[DONE]"


async def test_a_turn_the_spool_cannot_take_gives_503_not_the_answer(gw, upstream):
    upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    held = HeldSpool(gw.writer)
    request = asyncio.create_task(chat(gw))
    while not held.futures:
        await asyncio.sleep(0.01)
    held.futures[0].set_exception(SpoolError("the turn spool cannot be written: No space left on device"))
    response = await request
    assert response.status_code == 503 and response.headers["retry-after"] == "10"
    assert response.json()["error"]["code"] == "turn_log_unavailable"


async def test_a_stream_whose_turn_the_spool_cannot_take_ends_without_done(gw, upstream):
    upstream.post("/v1/chat/completions").respond(200, content=b"".join(sse_chunks(["Hel", "lo"])))
    held = HeldSpool(gw.writer)
    request = asyncio.create_task(chat(gw, stream=True))
    while not held.futures:
        await asyncio.sleep(0.01)
    held.futures[0].set_exception(SpoolError("the turn spool cannot be written: I/O error"))
    got = events((await request).text)
    assert "[DONE]" not in got and got[-1]["error"]["code"] == "turn_log_unavailable"


async def test_a_locked_database_freezes_nothing_and_loses_nothing(gw, upstream, monkeypatch):
    def engine(request: httpx.Request) -> httpx.Response:
        if b'"stream":true' in request.content.replace(b" ", b""):
            return httpx.Response(200, content=b"".join(sse_chunks(["Hi"])))
        return httpx.Response(200, json=vllm_answer())

    upstream.post("/v1/chat/completions").side_effect = engine
    monkeypatch.setattr(routes_feedback, "FEEDBACK_WAIT_S", 0.5)
    with locked(gw):
        started = time.monotonic()
        answers = await asyncio.gather(*(chat(gw, stream=i % 2 == 1) for i in range(40)))
        assert all(r.status_code == 200 for r in answers)
        health = time.monotonic()
        assert (await gw.client.get("/health")).status_code == 200 and time.monotonic() - health < 1
        assert time.monotonic() - started < 20
        first = answers[0].json()["id"]
        rating = await gw.client.post("/v1/feedback", json={"completion_id": first, "rating": "up"})
        assert rating.status_code == 503 and rating.headers["retry-after"] == "5"
        assert rating.json()["error"]["code"] == "turn_not_written_yet"
        assert gw.writer.pending == 40 and gw.writer.spool.pending_bytes > 0
        text = (await gw.client.get("/metrics")).text
        assert "tunewheel_log_pending_writes 40.0" in text and "tunewheel_log_spool_capacity_bytes" in text
    ids = {r.json()["id"] for r in answers[::2]} | {events(r.text)[0]["id"] for r in answers[1::2]}
    assert {t.id for t in turns(gw.writer)} == ids
    rating = await gw.client.post("/v1/feedback", json={"completion_id": first, "rating": "up"})
    assert rating.status_code == 201


async def test_a_full_spool_answers_503_with_retry_after_until_the_database_catches_up(make_gw, upstream):
    gw = await make_gw(store={"spool": {"max_bytes": 1}})
    upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    with locked(gw):
        assert (await chat(gw)).status_code == 200  # the spool was empty: this one fills it
        refused = await chat(gw)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "30"
        assert refused.json()["error"]["code"] == "turn_log_full"
        assert (await gw.client.get("/health")).status_code == 200
    assert gw.writer.flush(10)
    assert (await chat(gw)).status_code == 200
    assert len(turns(gw.writer)) == 2


def test_the_write_time_scrubber_is_off_by_default():
    assert write_time_scrubber(SimpleNamespace()) is None
    assert write_time_scrubber(SimpleNamespace(scrub_at_write=False)) is None


def test_the_write_time_scrubber_is_feedback_pii_when_on():
    pii = pytest.importorskip("feedback.pii")  # H11a's module
    assert write_time_scrubber(SimpleNamespace(scrub_at_write=True)) is pii.scrub_turn
