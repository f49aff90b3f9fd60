"""The turn writer: answered turns go to the spool on disk, then to the database in batches.

    writer = TurnWriter(db, data_dir / "spool", on_pending=gauge.set, on_error=counter.inc).start()
    await writer.asubmit(TurnCreate(id="chatcmpl-1", alias="chat", adapter_version="base",
                                    request_messages=[{"role": "user", "content": "hi"}], answer="hello"))
    # ^ returns once the turn is fsync'd in the spool (feedback/spool.py): it survives a SIGKILL
    await writer.wait_written("chatcmpl-1", timeout=5)   # before rating a turn just answered
    writer.close(timeout=20)     # on shutdown: writes what it can; the rest waits in the spool

`submit` never blocks: it queues the turn for the spool's next group commit and returns a
future. The writer's thread reads the spool in order and writes batches to the database,
threading each turn into its conversation (feedback/conversations.py). A batch smaller than
`batch_size` waits `linger_s` (20 ms) for more turns first, unless someone waits for a turn to be
written (`wait_written`, `flush`, `close`): one transaction for many light-traffic turns, so the
writer's thread takes less of the gateway's interpreter from the requests themselves. A database that is down,
locked or failing is retried with backoff, forever; a restarted writer first writes what the
last process left in the spool. Each turn lands once: the completion id is the primary key,
and a turn already stored (written just before a crash, replayed after it) is skipped.

Nothing is dropped for a bad value. NUL characters, which Postgres text cannot hold, are
stored as the six characters `\\u0000`. A turn the database still refuses for its content
(DataError, IntegrityError, a value that cannot be bound) is isolated from its batch and
quarantined (feedback/spool.py `Quarantine`, counted by `on_quarantine`); so is a spool line
that cannot be read back. SQL parameters (prompts and answers) never reach the logs: only the
error's class and the driver's first line, and `make_db` hides parameters from SQLAlchemy's.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, exc
from sqlmodel import Session, select

from feedback.conversations import add_turns
from feedback.models import Turn, TurnCreate
from feedback.spool import Quarantine, Record, Spool

log = logging.getLogger(__name__)

ADOPT_EVERY_S = 60.0  # how often an idle writer looks for lanes that gateways gone for good left


class TurnWriter:
    """Spools turns and writes them to `engine`'s turn log on its own thread.

    `spool_dir`: the spool's folder (None: a new temporary folder, for tests). `max_spool_bytes`:
    beyond it `spool_full` is true and the gateway refuses new requests. `scrub(turn) -> turn`:
    applied before a turn is spooled (the write-time PII scrubber). Callbacks for the gateway's
    metrics: `on_pending(n)` turns not yet in the database, `on_error()` once per failed write
    (each retried), `on_quarantine()` once per quarantined turn, `on_spool_bytes(n)` bytes spooled
    and not yet written.
    """

    def __init__(
        self,
        engine: Engine,
        spool_dir: Path | None = None,
        *,
        max_spool_bytes: int = 256 << 20,
        segment_bytes: int = 4 << 20,
        scrub: Callable[[TurnCreate], TurnCreate] | None = None,
        batch_size: int = 256,
        linger_s: float = 0.02,
        backoff_s: tuple[float, ...] = (0.1, 0.5, 1.0, 2.0, 5.0),
        on_pending: Callable[[int], Any] | None = None,
        on_error: Callable[[], Any] | None = None,
        on_quarantine: Callable[[], Any] | None = None,
        on_spool_bytes: Callable[[int], Any] | None = None,
    ):
        self.engine = engine
        self.batch_size = batch_size
        self.linger_s = linger_s
        self.backoff_s = backoff_s
        self._on_pending = on_pending or (lambda n: None)
        self._on_error = on_error or (lambda: None)
        self._on_quarantine = on_quarantine or (lambda: None)
        root = Path(spool_dir) if spool_dir is not None else Path(tempfile.mkdtemp(prefix="tunewheel-spool-"))
        self.spool = Spool(root, max_bytes=max_spool_bytes, segment_bytes=segment_bytes, prepare=scrub,
                           on_bytes=on_spool_bytes).open()
        self.quarantine = Quarantine(self.spool.lane / "quarantine.jsonl")
        self._escape_nul = engine.dialect.name == "postgresql"
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending: Counter[str] = Counter(self.spool.leftover_ids)  # id -> copies not yet written
        self._count = len(self.spool.leftover_ids)  # their sum, kept so that no submit sums a long backlog
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}
        self._stop = threading.Event()
        self._hurry = threading.Event()  # someone waits for a turn to be written: no linger
        self._flushing = 0  # threads in `flush` (and `close`), which hurry the writer until they return
        self._thread: threading.Thread | None = None
        self._closed = False
        self._on_pending(self.pending)

    def start(self) -> TurnWriter:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="turn-writer", daemon=True)
            self._thread.start()
        return self

    @property
    def pending(self) -> int:
        """Turns handed over and not yet in the database."""
        with self._lock:
            return self._count

    @property
    def spool_full(self) -> bool:
        return self.spool.full

    def submit(self, turn: TurnCreate) -> Future:
        """Hand `turn` over without waiting; the future resolves once it is fsync'd in the spool
        (SpoolError if it cannot be). RuntimeError after `close`."""
        if self._closed:
            raise RuntimeError("TurnWriter is closed")
        self._mark_pending(turn.id)
        fut = self.spool.append(turn)
        fut.add_done_callback(lambda f: f.exception() is not None and self._mark_written([turn.id]))
        return fut

    async def asubmit(self, turn: TurnCreate) -> None:
        """`submit`, then wait (without blocking the event loop) until the turn is on disk."""
        await asyncio.wrap_future(self.submit(turn))

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
        self._hurry.set()
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
        """Block until every submitted turn is in the database (or quarantined); False if
        `timeout` passed first."""
        self.start()
        with self._idle:
            self._flushing += 1
            self._hurry.set()
            try:
                return self._idle.wait_for(lambda: not self._pending, timeout)
            finally:
                self._flushing -= 1

    def close(self, timeout: float | None = None) -> bool:
        """Stop taking turns, write what is pending for up to `timeout` seconds, stop. True when
        everything is in the database; otherwise the rest stays in the spool (logged) and the
        next writer on this spool writes it first."""
        if self._closed:
            return not self.pending
        self._closed = True
        deadline = None if timeout is None else time.monotonic() + timeout
        self.flush(timeout)
        self._stop.set()
        self._thread.join(None if deadline is None else max(0.1, deadline - time.monotonic()))
        self.spool.close(timeout=5)
        left = self.pending
        if left:
            log.warning("turn writer stopped with %d turns not yet in the database; they stay in the spool %s "
                        "and are written at the next start", left, self.spool.lane)
        return left == 0

    # -- the writer's thread

    def _run(self) -> None:
        next_adopt = time.monotonic() + 1.0
        while True:
            records = self.spool.read(self.batch_size, timeout=0.2)
            if records and len(records) < self.batch_size and self.linger_s > 0 and not self._stop.is_set():
                if not self._hurry.wait(self.linger_s):
                    records += self.spool.read(self.batch_size - len(records), timeout=0)
            if records:
                with self._lock:
                    if not self._waiters and not self._flushing:
                        self._hurry.clear()
                if not self._drain(self.spool, records):
                    return
                continue
            if self._stop.is_set():
                return
            if time.monotonic() >= next_adopt:
                next_adopt = time.monotonic() + ADOPT_EVERY_S
                try:
                    self._adopt_orphans()
                except OSError as e:
                    log.warning("turn writer: could not look at other lanes of the spool: %s", e)

    def _drain(self, spool: Spool, records: list[Record]) -> bool:
        """Store `records` and acknowledge them, whatever fails meanwhile (the quarantine's disk);
        False when stopped before they were stored."""
        attempt = 0
        while True:
            try:
                return self._store(spool, records)
            except Exception as e:  # never let the writer's thread die: it is the only one
                log.error("turn writer: %s; retrying the batch", describe(e))
                self._on_error()
                attempt += 1
                if self._stop.wait(self.backoff_s[min(attempt, len(self.backoff_s)) - 1]):
                    return False

    def _store(self, spool: Spool, records: list[Record]) -> bool:
        for r in records:
            if r.turn is None:
                log.error("turn spool %s: %s; quarantined", spool.lane, r.problem)
                self.quarantine.put(r.problem or "unreadable record", raw=r.raw)
                self._on_quarantine()
        if not self._write_retrying([r.turn for r in records if r.turn is not None]):
            return False
        spool.ack(records)
        self._mark_written([r.turn_id for r in records if r.turn_id is not None])
        return True

    def _adopt_orphans(self) -> None:
        """Write what writers that are gone for good left in their lanes (a replica scaled away)."""
        for lane in self.spool.orphans():
            orphan = Spool.adopt(lane)
            if orphan is None:
                continue
            try:
                while records := orphan.read(self.batch_size, timeout=0):
                    if not self._drain(orphan, records):
                        return
            finally:
                orphan.close()

    def _write_retrying(self, batch: list[TurnCreate]) -> bool:
        """Store `batch`, retrying while the database fails; False if stopped first."""
        attempt = 0
        while batch:
            try:
                self._insert(batch)
                return True
            except Exception as e:
                if _bad_value(e):
                    if len(batch) == 1:
                        log.error("turn %s refused by the database (%s); quarantined", batch[0].id, describe(e))
                        self.quarantine.put(describe(e), turn=batch[0])
                        self._on_quarantine()
                        return True
                    return all(self._write_retrying([turn]) for turn in batch)  # isolate the bad one
                wait = self.backoff_s[min(attempt, len(self.backoff_s) - 1)]
                log.warning("turn log write failed (%s); retrying in %.1f s", describe(e), wait)
                self._on_error()
                attempt += 1
                if self._stop.wait(wait):
                    return False
        return True

    def _insert(self, batch: list[TurnCreate]) -> None:
        with Session(self.engine) as session:
            stored = set(session.exec(select(Turn.id).where(Turn.id.in_([t.id for t in batch]))))
            new = []
            for turn in batch:
                if turn.id in stored:  # written before a crash, or a repeated id: once is enough
                    continue
                new.append(without_nul(turn) if self._escape_nul else turn)
                stored.add(turn.id)
            add_turns(session, new)
            session.commit()

    def _mark_pending(self, turn_id: str) -> None:
        with self._lock:
            self._pending[turn_id] += 1
            self._count += 1
            n = self._count
        self._on_pending(n)

    def _mark_written(self, ids: list[str]) -> None:
        with self._lock:
            for turn_id in ids:
                if self._pending.get(turn_id, 0) <= 0:  # not ours (an adopted lane's turn)
                    continue
                self._pending[turn_id] -= 1
                self._count -= 1
                if self._pending[turn_id] == 0:
                    del self._pending[turn_id]
                    for loop, fut in self._waiters.pop(turn_id, []):
                        try:
                            loop.call_soon_threadsafe(_resolve, fut)
                        except RuntimeError:  # that event loop is closed
                            pass
            n = self._count
            self._idle.notify_all()
        self._on_pending(n)


def _bad_value(e: Exception) -> bool:
    """The database refused this content (retrying cannot help), as opposed to being unavailable."""
    if isinstance(e, (exc.DataError, exc.IntegrityError)):
        return True
    if isinstance(e, exc.StatementError) and not isinstance(e, exc.DBAPIError):
        return True  # a parameter that could not be bound
    return isinstance(e, (ValueError, TypeError))


def describe(e: Exception) -> str:
    """The error's class and the driver's first line: never the statement's parameters."""
    orig = getattr(e, "orig", None) or e
    first = (str(orig).strip().splitlines() or [""])[0]
    if isinstance(e, exc.StatementError) and "[SQL:" in first:
        first = first.split("[SQL:")[0].strip()
    return f"{type(orig).__name__}: {first[:300]}"


def without_nul(turn: TurnCreate) -> TurnCreate:
    """`turn` with every NUL character written as the six characters \\u0000 (Postgres text
    cannot hold NUL); the same turn when it has none."""
    data = turn.model_dump()
    cleaned = _escape(data)
    return turn if cleaned == data else TurnCreate.model_validate(cleaned)


def _escape(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\\u0000")
    if isinstance(value, dict):
        return {_escape(k): _escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape(v) for v in value]
    return value


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(True)
