"""The turn spool: each answered turn is on local disk, fsync'd, before its client gets the end
of the answer; the turn writer (feedback/writer.py) then copies it to the database.

    spool = Spool(data_dir / "spool", max_bytes=256 << 20).open()   # claims a lane, finds leftovers
    done = spool.append(turn)          # concurrent.futures.Future: resolved once the turn is on disk
    records = spool.read(256, timeout=0.5)   # the writer's thread: the next records on disk, in order
    spool.ack(records)                 # they are in the database: their bytes are free, old files go
    spool.close()

Layout: `<dir>/lane-<n>/<000000000001>.seg`, append-only segment files of one line per turn,
`<crc32 hex> <TurnCreate as JSON>\\n`. One process holds a lane (an exclusive flock on
`lane-<n>/lock`), so gateway replicas sharing a volume never write the same files, and a
gateway that starts takes the first free lane with whatever its last owner left, which it
replays first, in order. Lanes left by replicas that are gone for good are drained by any
gateway's writer (`orphans`, `Spool.adopt`).

Appends are group-committed: one thread writes every turn queued since its last fsync, fsyncs
once and then resolves all their futures, so one fsync covers many requests and nothing waits
on the event loop. A segment is closed at `segment_bytes` and deleted once every line of it is
acknowledged. The spool is bounded in bytes: `pending_bytes` (on disk, not yet acknowledged)
against `max_bytes`; the gateway refuses new requests while it is `full`, so the spool passes
`max_bytes` only by the answers already in flight. A line that cannot be read back (a torn tail
after a power cut, a bad checksum) comes out of `read` as a record without a turn, which the
writer quarantines (`Quarantine`: JSON lines beside the segments, never deleted).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from feedback.models import TurnCreate

log = logging.getLogger(__name__)

MAX_LANES = 1024
SUFFIX = ".seg"


class SpoolError(OSError):
    """A turn could not be put on disk (closed spool, disk full, I/O error, failed scrubber)."""


@dataclass(frozen=True)
class Record:
    """One line of the spool as read back: its turn, or (turn None) the raw line and what is wrong."""

    segment: int
    end: int  # offset just after the line
    size: int
    turn: TurnCreate | None
    raw: bytes = b""
    problem: str | None = None
    turn_id: str | None = None  # also of a turn that could not be read back, when its id could


def encode(turn: TurnCreate) -> bytes:
    """The spool line of `turn`; a value JSON cannot hold is stored as its repr (never refused)."""
    body = turn.model_dump_json(fallback=repr).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def decode(segment: int, start: int, line: bytes) -> Record:
    end, size = start + len(line), len(line)
    if not line.endswith(b"\n"):
        return Record(segment, end, size, None, line, "torn record (the process stopped while writing it)")
    crc, _, body = line[:-1].partition(b" ")
    try:
        if int(crc, 16) != zlib.crc32(body):
            return Record(segment, end, size, None, line, "checksum mismatch")
        turn = TurnCreate.model_validate_json(body)
        return Record(segment, end, size, turn, turn_id=turn.id)
    except ValueError as exc:
        return Record(segment, end, size, None, line, f"unreadable record: {type(exc).__name__}", _id_of(body))


class Spool:
    """Append-only, group-committed, byte-bounded files of turns. `prepare(turn) -> turn` runs on
    each turn before it is written (the write-time PII scrubber); `on_bytes(n)` is told
    `pending_bytes` after every change. Thread-safe: `append` from any thread; `read` and `ack`
    from one consumer thread."""

    def __init__(self, root: Path, *, max_bytes: int = 256 << 20, segment_bytes: int = 4 << 20,
                 prepare: Callable[[TurnCreate], TurnCreate] | None = None,
                 on_bytes: Callable[[int], Any] | None = None):
        self.root, self.max_bytes, self.segment_bytes = Path(root), max_bytes, segment_bytes
        self.prepare = prepare
        self._on_bytes = on_bytes or (lambda n: None)
        self.lane: Path | None = None
        self.leftover_ids: list[str] = []  # turns a previous owner of the lane left, oldest first
        self._lock = threading.Lock()
        self._queued = threading.Condition(self._lock)  # appends waiting for the committer
        self._committed = threading.Condition(self._lock)  # new lines on disk, for the reader
        self._queue: list[tuple[TurnCreate, Future]] = []
        self._sizes: dict[int, int] = {}  # segment -> bytes on disk (all fsync'd)
        self._active: int | None = None  # the segment appends go to (None: drain-only)
        self._fd: int | None = None
        self._pending = 0
        self._closing = self._closed = False
        self._committer: threading.Thread | None = None
        self._lock_file: BinaryIO | None = None
        self._cursor = (0, 0)  # the reader's (segment, offset)
        self._reader: tuple[int, BinaryIO] | None = None

    # --- opening and closing ----------------------------------------------------------------
    def open(self) -> Spool:
        """Claim the first free lane under `root` and start appending to a new segment in it."""
        self.root.mkdir(parents=True, exist_ok=True)
        for n in range(MAX_LANES):
            if self._claim(self.root / f"lane-{n}"):
                break
        else:
            raise SpoolError(f"no free lane under {self.root}: {MAX_LANES} processes hold one")
        self._active = max(self._sizes, default=0) + 1
        self._sizes[self._active] = 0
        self._fd = os.open(self._path(self._active), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _fsync_dir(self.lane)
        self._committer = threading.Thread(target=self._commit_loop, name="turn-spool", daemon=True)
        self._committer.start()
        return self

    @classmethod
    def adopt(cls, lane: Path) -> Spool | None:
        """A drain-only spool on another process's `lane`, if that process is gone (its lock is
        free) and it left turns; None otherwise. Read, ack, then close it."""
        spool = cls(lane.parent)
        if not spool._claim(lane):
            return None
        if not spool._sizes:
            spool.close()
            return None
        return spool

    def orphans(self) -> list[Path]:
        """The other lanes under `root` that hold segments (their owners may still be alive)."""
        return [p for p in sorted(self.root.glob("lane-*")) if p != self.lane and any(p.glob(f"*{SUFFIX}"))]

    def close(self, timeout: float | None = None) -> None:
        """Write what is queued, stop appending, release the lane. Fully acknowledged segments are
        deleted; the rest stays for whoever takes the lane next."""
        with self._lock:
            self._closing = True
            self._queued.notify_all()
            self._committed.notify_all()
        if self._committer is not None:
            self._committer.join(timeout)
        with self._lock:
            self._closed = True
            if self._pending == 0:
                for segment in list(self._sizes):
                    self._unlink(segment)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._close_reader()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    # --- appending (any thread) --------------------------------------------------------------
    @property
    def pending_bytes(self) -> int:
        return self._pending

    @property
    def full(self) -> bool:
        return self._pending >= self.max_bytes

    def append(self, turn: TurnCreate) -> Future:
        """Queue `turn` for the next group commit; the future resolves once it is on disk, or
        fails with SpoolError. It cannot be cancelled: a turn handed over is written."""
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        with self._lock:
            if self._closing or self._active is None:
                fut.set_exception(SpoolError("the turn spool is closed"))
                return fut
            self._queue.append((turn, fut))
            self._queued.notify()
        return fut

    def _commit_loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._queued.wait()
                batch, self._queue = self._queue, []
            if not batch:
                return
            lines, done = [], []
            for turn, fut in batch:
                try:
                    lines.append(encode(self.prepare(turn) if self.prepare else turn))
                    done.append(fut)
                except Exception as exc:  # a failing scrubber: refuse the turn rather than store it raw
                    fut.set_exception(SpoolError(f"turn {turn.id} could not be prepared: {type(exc).__name__}"))
            try:
                self._write(b"".join(lines))
            except OSError as exc:
                log.error("turn spool %s cannot be written: %s", self.lane, exc)
                for fut in done:
                    fut.set_exception(SpoolError(f"the turn spool cannot be written: {exc.strerror or exc}"))
                continue
            for fut in done:
                fut.set_result(None)

    def _write(self, data: bytes) -> None:
        """Append and fsync (the group commit); on failure cut the segment back to its last good line."""
        if not data:
            return
        if self._sizes[self._active] >= self.segment_bytes:
            self._rotate()
        start = self._sizes[self._active]
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise
        with self._lock:
            self._sizes[self._active] += len(data)
            self._pending += len(data)
            self._committed.notify_all()
        self._on_bytes(self._pending)

    def _rotate(self) -> None:
        os.close(self._fd)
        with self._lock:
            self._active += 1
            self._sizes[self._active] = 0
        self._fd = os.open(self._path(self._active), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _fsync_dir(self.lane)

    # --- reading (the writer's thread) -------------------------------------------------------
    def read(self, limit: int, timeout: float) -> list[Record]:
        """Up to `limit` records after the last one read, waiting up to `timeout` s for one."""
        with self._lock:
            if not self._unread() and not self._closing:
                self._committed.wait(timeout)
            sizes = dict(self._sizes)
        records: list[Record] = []
        segment, offset = self._cursor
        while len(records) < limit:
            end = sizes.get(segment, 0)
            if offset >= end:
                later = [s for s in sizes if s > segment]
                if not later:
                    break
                segment, offset = min(later), 0
                continue
            f = self._reader_for(segment)
            f.seek(offset)
            line = f.readline(end - offset)
            if not line:  # the file is shorter than written: someone cut it
                records.append(Record(segment, end, end - offset, None, b"", "bytes missing from the spool file"))
                offset = end
                continue
            records.append(decode(segment, offset, line))
            offset += len(line)
        self._cursor = (segment, offset)
        return records

    def ack(self, records: list[Record]) -> None:
        """`records` (the oldest read and not yet acknowledged, in order) are safely elsewhere."""
        if not records:
            return
        last = records[-1]
        with self._lock:
            if self._closed:
                return
            self._pending -= sum(r.size for r in records)
            for segment, size in list(self._sizes.items()):
                if segment < last.segment or (segment == last.segment != self._active and last.end >= size):
                    self._unlink(segment)
        self._on_bytes(self._pending)

    def _unread(self) -> bool:
        segment, offset = self._cursor
        return offset < self._sizes.get(segment, 0) or any(s > segment for s in self._sizes)

    def _reader_for(self, segment: int) -> BinaryIO:
        if self._reader is None or self._reader[0] != segment:
            self._close_reader()
            self._reader = (segment, open(self._path(segment), "rb"))
        return self._reader[1]

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader[1].close()
            self._reader = None

    # --- lanes ---------------------------------------------------------------------------------
    def _claim(self, lane: Path) -> bool:
        """Take `lane` if no live process holds it; then note what it holds."""
        lane.mkdir(parents=True, exist_ok=True)
        lock_file = open(lane / "lock", "ab")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            return False
        self.lane, self._lock_file = lane, lock_file
        for path in sorted(lane.glob(f"*{SUFFIX}")):
            segment = int(path.stem)
            self._sizes[segment] = path.stat().st_size
        for segment in list(self._sizes):
            if self._sizes[segment] == 0:
                self._unlink(segment)
        self._pending = sum(self._sizes.values())
        self._cursor = (min(self._sizes, default=0), 0)
        self.leftover_ids = [turn_id for s in sorted(self._sizes) for turn_id in _ids(self._path(s))]
        if self._sizes:
            log.warning("turn spool %s: %d turns (%d bytes) left by a previous process; writing them first",
                        lane, len(self.leftover_ids), self._pending)
        return True

    def _path(self, segment: int) -> Path:
        return self.lane / f"{segment:012d}{SUFFIX}"

    def _unlink(self, segment: int) -> None:
        self._sizes.pop(segment, None)
        try:
            self._path(segment).unlink()
        except FileNotFoundError:
            pass


class Quarantine:
    """Turns the database refused for their content, and spool lines that could not be read
    back: one JSON object a line, `{"at", "error", "turn"}` or `{"at", "error", "raw"}`, fsync'd,
    never deleted by tunewheel. An operator fixes and replays them, or keeps them as evidence."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def put(self, error: str, *, turn: TurnCreate | None = None, raw: bytes = b"") -> None:
        entry: dict[str, Any] = {"at": datetime.now(timezone.utc).isoformat(), "error": error}
        if turn is not None:
            entry["turn"] = json.loads(turn.model_dump_json(fallback=repr))
        else:
            entry["raw"] = raw.decode(errors="replace")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(json.dumps(entry, ensure_ascii=False).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())


def _ids(path: Path) -> list[str]:
    """The turn ids in a segment, for turns readable enough to have one."""
    with open(path, "rb") as f:
        return [turn_id for line in f if (turn_id := _id_of(line.partition(b" ")[2])) is not None]


def _id_of(body: bytes) -> str | None:
    try:
        turn_id = json.loads(body)["id"]
    except (ValueError, KeyError, TypeError):
        return None
    return turn_id if isinstance(turn_id, str) else None


def _fsync_dir(path: Path) -> None:
    """Make a new file's name durable, not only its content."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
