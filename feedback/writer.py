"""The background turn writer: the gateway hands it each answered turn; requests never wait
for the database.

    writer = TurnWriter(db, on_pending=gauge.set, on_error=counter.inc).start()
    writer.submit(TurnCreate(id="chatcmpl-1", alias="chat", adapter_version="base",
                             request_messages=[{"role": "user", "content": "hi"}], answer="hello"))
    await writer.wait_written("chatcmpl-1", timeout=5)   # before rating a turn just answered
    writer.close()                                       # on shutdown: writes everything pending

Its thread threads each turn into its conversation (feedback/conversations.py) and inserts the
turns in batches, retrying while the database is down.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, exc
from sqlmodel import Session

from feedback.conversations import add_turn
from feedback.models import TurnCreate

log = logging.getLogger(__name__)

_STOP = object()


class TurnWriter:
    """Writes turns on its own thread, in batches, so that requests never wait for the database.

    `submit` only enqueues; when `max_queue` turns are waiting it blocks until there is room
    (back-pressure, never loss) — `asubmit` waits for room without blocking the event loop.
    A database that is down or locked is retried with backoff until it answers; a turn the
    database refuses for its content (a repeated id) is logged and dropped, never the writer.
    `on_pending(n)` is told the number of turns not yet written after every change, `on_error()`
    once per failed write: the gateway points them at its metrics.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_queue: int = 10_000,
        batch_size: int = 256,
        backoff_s: tuple[float, ...] = (0.1, 0.5, 1.0, 2.0, 5.0),
        on_pending: Callable[[int], Any] | None = None,
        on_error: Callable[[], Any] | None = None,
    ):
        self.engine = engine
        self.batch_size = batch_size
        self.backoff_s = backoff_s
        self._on_pending = on_pending or (lambda n: None)
        self._on_error = on_error or (lambda: None)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending: Counter[str] = Counter()  # id -> copies not yet written
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> TurnWriter:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="turn-writer", daemon=True)
            self._thread.start()
        return self

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(self._pending.values())

    def submit(self, turn: TurnCreate) -> None:
        if self._closed:
            raise RuntimeError("TurnWriter is closed")
        self._mark_pending(turn.id)
        try:
            self._queue.put_nowait(turn)
        except queue.Full:
            log.warning("turn log queue full (%d): waiting for the writer", self._queue.maxsize)
            self._queue.put(turn)

    async def asubmit(self, turn: TurnCreate) -> None:
        """`submit` for async code: waits for room in a worker thread when the queue is full."""
        if self._queue.full():
            await asyncio.to_thread(self.submit, turn)
        else:
            self.submit(turn)

    async def wait_written(self, turn_id: str, timeout: float) -> bool:
        """Wait until `turn_id` is no longer pending; True unless `timeout` seconds passed first.
        An id this writer never saw counts as written (it may be stored by another replica)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            if not self._pending[turn_id]:
                self._pending.pop(turn_id, None)
                return True
            self._waiters.setdefault(turn_id, []).append((loop, fut))
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            with self._lock:
                waiting = self._waiters.get(turn_id, [])
                if (loop, fut) in waiting:
                    waiting.remove((loop, fut))
                if not waiting:
                    self._waiters.pop(turn_id, None)

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every submitted turn is written (or dropped); False if `timeout` passed first."""
        if self._thread is None:
            self.start()
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Write everything pending, then stop the thread. False (and an error logged) if turns
        were still unwritten after `timeout` seconds, e.g. because the database stayed down."""
        if self._closed:
            return not self.pending
        self._closed = True
        self.start()
        self._queue.put(_STOP)
        self._thread.join(timeout)
        left = self.pending
        if left:
            log.error("turn writer stopped with %d turns unwritten (database unreachable?)", left)
        return left == 0

    # -- writer thread

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            if batch[0] is _STOP:
                break
            while len(batch) < self.batch_size:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._write_retrying(batch)
            self._mark_written([r.id for r in batch])

    def _write_retrying(self, batch: list[TurnCreate]) -> None:
        attempt = 0
        while True:
            try:
                with Session(self.engine) as session:
                    for turn in batch:
                        add_turn(session, turn)
                    session.commit()
                return
            except exc.OperationalError as e:  # unreachable, locked, disk full: try again
                wait = self.backoff_s[min(attempt, len(self.backoff_s) - 1)]
                log.warning("turn log write failed (%s); retrying in %.1f s", e.orig or e, wait)
                self._on_error()
                attempt += 1
                time.sleep(wait)
            except Exception:
                if len(batch) > 1:  # find the one bad turn; the others still get written
                    for turn in batch:
                        self._write_retrying([turn])
                    return
                log.exception("turn %s could not be stored and is dropped", batch[0].id)
                self._on_error()
                return

    def _mark_pending(self, turn_id: str) -> None:
        with self._lock:
            self._pending[turn_id] += 1
            n = sum(self._pending.values())
        self._on_pending(n)

    def _mark_written(self, ids: list[str]) -> None:
        with self._lock:
            for turn_id in ids:
                self._pending[turn_id] -= 1
                if self._pending[turn_id] <= 0:
                    del self._pending[turn_id]
                    for loop, fut in self._waiters.pop(turn_id, []):
                        try:
                            loop.call_soon_threadsafe(_resolve, fut)
                        except RuntimeError:  # that event loop is closed
                            pass
            n = sum(self._pending.values())
            self._idle.notify_all()
        self._on_pending(n)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(True)
