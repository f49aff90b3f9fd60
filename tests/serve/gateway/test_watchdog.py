"""The event-loop watchdog (serve/gateway/watchdog.py) names what held the loop, and for how long."""

from __future__ import annotations

import asyncio
import logging
import time

from serve import metrics
from serve.gateway.watchdog import LoopWatchdog


def hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # a blocking call on the event loop, as a bug would make


def lag_count() -> float:
    return metrics.REGISTRY.get_sample_value("tunewheel_event_loop_lag_seconds_count") or 0.0


def test_a_held_loop_is_logged_with_its_stack_and_how_long(caplog):
    caplog.set_level(logging.WARNING, logger="serve.gateway.watchdog")
    before = lag_count()

    async def main() -> LoopWatchdog:
        async with LoopWatchdog(asyncio.get_running_loop(), interval_s=0.05, warn_s=0.3) as dog:
            await asyncio.sleep(0.2)
            hold_the_loop(0.8)
            await asyncio.sleep(0.3)
        return dog

    dog = asyncio.run(main())
    assert len(dog.stalls) == 1 and 0.6 <= dog.stalls[0] <= 2.0
    held = [r.getMessage() for r in caplog.records if "has been held" in r.getMessage()]
    assert len(held) == 1 and "hold_the_loop" in held[0] and "time.sleep" in held[0]
    assert any("ran again after" in r.getMessage() for r in caplog.records)
    assert lag_count() - before >= 5  # every tick is observed, the late one too


def test_a_loop_that_keeps_ticking_is_not_reported(caplog):
    caplog.set_level(logging.WARNING, logger="serve.gateway.watchdog")

    async def main() -> LoopWatchdog:
        async with LoopWatchdog(asyncio.get_running_loop(), interval_s=0.05, warn_s=0.5) as dog:
            for _ in range(10):
                hold_the_loop(0.05)  # short holds, each well under warn_s
                await asyncio.sleep(0.02)
        return dog

    assert list(asyncio.run(main()).stalls) == []
    assert not [r for r in caplog.records if r.name == "serve.gateway.watchdog"]
