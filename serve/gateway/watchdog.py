"""The event-loop watchdog: says when the gateway's event loop was held, for how long, and where.

    async with LoopWatchdog(asyncio.get_running_loop()):   # serve/gateway/app.py, in the lifespan
        ...

Every request, /health included, is answered on one event loop, so anything that holds it holds
them all: a blocking call on the loop, another thread keeping the interpreter lock, the process
not being scheduled. A tick on the loop notes the time every `interval_s`, and
`tunewheel_event_loop_lag_seconds` records how late each tick ran. A thread of its own looks
every `interval_s`: once the loop has not ticked for `warn_s` it logs a WARNING with the stack
the loop's thread is in at that moment, and when the loop ticks again, how long it was held. If
the watchdog's own sleep overran as well, the whole process was held (not scheduled, or the
interpreter lock kept by native code), and the warning says so: then the loop's stack is only
where it happened to stand.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from collections import deque

from serve import metrics

log = logging.getLogger(__name__)

INTERVAL_S = 0.1
WARN_S = 0.5
STACK_FRAMES = 12
STALLS_KEPT = 64


class LoopWatchdog:
    """Ticks on `loop` and watches the ticks from a daemon thread; an async context manager."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, interval_s: float = INTERVAL_S, warn_s: float = WARN_S):
        self.loop, self.interval_s, self.warn_s = loop, interval_s, warn_s
        self.last_tick = time.monotonic()
        self.stalls: deque[float] = deque(maxlen=STALLS_KEPT)  # seconds held, the last warned stalls
        self._loop_thread: int | None = None
        self._stop = threading.Event()
        self._task: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)

    async def __aenter__(self) -> LoopWatchdog:
        self._loop_thread = threading.get_ident()
        self.last_tick = time.monotonic()
        self._task = self.loop.create_task(self._tick())
        self._thread.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
        await asyncio.to_thread(self._thread.join, 5)

    async def _tick(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.interval_s)
            self.last_tick = time.monotonic()
            metrics.LOOP_LAG.observe(max(0.0, self.last_tick - before - self.interval_s))

    def _watch(self) -> None:
        warned_at: float | None = None  # the tick a warning was logged for
        woke = time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            overslept, woke = now - woke - self.interval_s, now
            tick = self.last_tick
            if warned_at is not None and tick != warned_at:
                held = tick - warned_at
                self.stalls.append(held)
                log.warning("the event loop ran again after %.2f s held", held)
                warned_at = None
            held = now - tick
            if warned_at is None and held >= self.warn_s:
                warned_at = tick
                log.warning("the event loop has been held for %.2f s%s; its thread is at:\n%s", held,
                            f" (the whole process was held {overslept:.2f} s: not scheduled, or the "
                            "interpreter lock kept by native code)" if overslept >= self.warn_s / 2 else "",
                            self._loop_stack())

    def _loop_stack(self) -> str:
        frame = sys._current_frames().get(self._loop_thread) if self._loop_thread is not None else None
        if frame is None:
            return "  (no stack: the loop's thread is gone)"
        return "".join(traceback.format_stack(frame, limit=STACK_FRAMES)).rstrip()
