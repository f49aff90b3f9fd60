"""The turn spool: turns on disk before anyone waits on the database, read back in order,
bounded in bytes, kept across a crash, one lane per process.

    pytest tests/feedback/test_spool.py
"""

from __future__ import annotations

import errno
import json
import os
import threading

import pytest

from feedback import spool as spool_module
from feedback.spool import Quarantine, Spool, SpoolError
from tests.feedback.turns import turn, user


def spooled(n: int, prefix: str = "t", text: str = "hello") -> list:
    return [turn(f"{prefix}{i}", [user(f"question {i}")], f"{text} {i}") for i in range(n)]


def segments(spool: Spool) -> list[str]:
    return sorted(p.name for p in spool.lane.glob("*.seg"))


def test_turns_come_back_in_order_and_acknowledged_segments_go(tmp_path):
    bytes_seen = []
    spool = Spool(tmp_path, segment_bytes=1000, on_bytes=bytes_seen.append).open()
    for t in spooled(30):  # one commit at a time, so the segments rotate
        spool.append(t).result(timeout=10)
    assert len(segments(spool)) > 2
    records = spool.read(100, timeout=0)
    assert [r.turn.id for r in records] == [f"t{i}" for i in range(30)]
    assert records[3].turn.request_messages == [user("question 3")] and records[3].turn.answer == "hello 3"
    assert spool.pending_bytes == sum(r.size for r in records) == bytes_seen[-1]
    spool.ack(records)
    assert spool.pending_bytes == 0 and bytes_seen[-1] == 0
    assert segments(spool) == [f"{spool._active:012d}.seg"]  # only the one still being appended to
    assert spool.read(100, timeout=0) == []
    spool.close()
    assert segments(spool) == []


def test_one_fsync_covers_many_concurrent_appends(tmp_path, monkeypatch):
    calls = []
    real_fsync = os.fsync

    def slow_fsync(fd):
        calls.append(fd)
        threading.Event().wait(0.02)  # a disk that takes 20 ms per flush
        real_fsync(fd)

    monkeypatch.setattr(spool_module.os, "fsync", slow_fsync)
    spool = Spool(tmp_path).open()
    futures = []
    threads = [threading.Thread(target=lambda i=i: futures.extend(spool.append(t) for t in spooled(25, f"c{i}-")))
               for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for fut in futures:
        fut.result(timeout=30)
    assert len(futures) == 200
    assert len(calls) < 50, f"{len(calls)} fsyncs for 200 appends"
    assert len(spool.read(1000, timeout=0)) == 200
    spool.close()


def test_what_a_process_left_is_read_first_by_the_next_one(tmp_path):
    first = Spool(tmp_path).open()
    for t in spooled(5, "old"):
        first.append(t).result(timeout=10)
    first.ack(first.read(2, timeout=0))  # two written to the database before the "crash"
    first.close()  # as a dying process does: the lock goes, unacknowledged segments stay
    second = Spool(tmp_path).open()
    assert second.lane == first.lane
    assert second.leftover_ids == [f"old{i}" for i in range(5)]  # the segment is replayed whole
    second.append(spooled(1, "new")[0]).result(timeout=10)
    assert [r.turn.id for r in second.read(100, timeout=0)] == [*(f"old{i}" for i in range(5)), "new0"]
    second.close()


def test_each_process_holds_its_own_lane_and_orphans_are_adopted(tmp_path):
    a, b = Spool(tmp_path).open(), Spool(tmp_path).open()
    assert a.lane != b.lane
    b.append(spooled(1, "b")[0]).result(timeout=10)
    assert a.orphans() == [b.lane]
    assert Spool.adopt(b.lane) is None  # b is alive: its lane is not free
    b.close()
    orphan = Spool.adopt(b.lane)
    records = orphan.read(10, timeout=0)
    assert [r.turn.id for r in records] == ["b0"]
    orphan.ack(records)
    orphan.close()
    assert a.orphans() == [] and Spool.adopt(b.lane) is None  # drained: nothing left to adopt
    a.close()


def test_full_at_max_bytes_and_free_again_once_acknowledged(tmp_path):
    spool = Spool(tmp_path, max_bytes=1000).open()
    while not spool.full:
        spool.append(spooled(1)[0]).result(timeout=10)
    assert spool.pending_bytes >= 1000
    spool.ack(spool.read(1000, timeout=0))
    assert not spool.full
    spool.close()


def test_torn_and_corrupt_lines_come_back_without_a_turn(tmp_path):
    spool = Spool(tmp_path).open()
    for t in spooled(3):
        spool.append(t).result(timeout=10)
    spool.close()
    path = next(spool.lane.glob("*.seg"))
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"question", b"questiom")  # a flipped bit
    path.write_bytes(b"".join(lines) + lines[2][:20])  # and a line cut short by a power loss
    again = Spool(tmp_path).open()
    records = again.read(10, timeout=0)
    assert [r.turn.id if r.turn else r.problem for r in records] == [
        "t0", "checksum mismatch", "t2", "torn record (the process stopped while writing it)"]
    again.ack(records)
    assert again.pending_bytes == 0
    again.close()


def test_a_failed_write_fails_the_turns_and_leaves_no_partial_line(tmp_path, monkeypatch):
    spool = Spool(tmp_path).open()
    spool.append(spooled(1, "ok")[0]).result(timeout=10)
    real_write = os.write

    def disk_full(fd, data):
        real_write(fd, bytes(data)[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module.os, "write", disk_full)
    with pytest.raises(SpoolError, match="No space left"):
        spool.append(spooled(1, "lost")[0]).result(timeout=10)
    monkeypatch.setattr(spool_module.os, "write", real_write)
    spool.append(spooled(1, "after")[0]).result(timeout=10)
    assert [r.turn.id for r in spool.read(10, timeout=0)] == ["ok0", "after0"]
    spool.close()
    with pytest.raises(SpoolError, match="closed"):
        spool.append(spooled(1)[0]).result(timeout=10)


def test_prepare_runs_before_the_turn_reaches_the_disk(tmp_path):
    def scrub(t):
        return t.model_copy(update={"answer": t.answer.replace("secret", "[scrubbed]")})

    def broken(t):
        raise ValueError("scrubber bug")

    spool = Spool(tmp_path, prepare=scrub).open()
    spool.append(turn("s1", [user("hi")], "the secret is 42")).result(timeout=10)
    assert b"secret" not in next(spool.lane.glob("*.seg")).read_bytes()
    assert spool.read(10, timeout=0)[0].turn.answer == "the [scrubbed] is 42"
    spool.prepare = broken
    with pytest.raises(SpoolError, match="could not be prepared"):
        spool.append(turn("s2", [user("hi")], "secret")).result(timeout=10)
    spool.close()


def test_quarantine_keeps_the_turn_and_the_reason(tmp_path):
    q = Quarantine(tmp_path / "quarantine.jsonl")
    q.put("DataError: value too long", turn=turn("q1", [user("hi\x00")], "x"))
    q.put("checksum mismatch", raw=b"0000 {garbage")
    entries = [json.loads(line) for line in q.path.read_text().splitlines()]
    assert entries[0]["turn"]["id"] == "q1" and entries[0]["turn"]["request_messages"] == [user("hi\x00")]
    assert entries[1] == {"at": entries[1]["at"], "error": "checksum mismatch", "raw": "0000 {garbage"}
