"""The learner's schedule: cycles on a cron or an interval, and when enough new ratings arrived.

    tunewheel learn schedule [--config FILE]     # this loop alone, until Ctrl-C
    tunewheel serve --with-learner               # the same jobs inside the gateway process

    [learn.schedule]
    cron = "0 3 * * *"          # or interval_minutes = 60
    min_new_ratings = 200       # also run once 200 turns were rated since the last cycle
    check_seconds = 60          # ... checked this often

    learner = Learner(cycle_runner(settings), db=db, schedule=settings.learn.schedule)
    scheduler = build_scheduler(settings.learn.schedule, learner)      # BackgroundScheduler
    scheduler.start()

`Learner` gets a plain `run(trigger) -> LearnerCycle` (learn/cycle.py `cycle_runner` builds it;
tests hand it a recorder) and never sees the gateway: whoever assembles the process puts the
"converge serving now" callable into that runner. APScheduler 3 runs the jobs with coalescing
(missed runs collapse into one), one instance per job, a misfire grace of an hour, and a single
worker thread, so in one process a cycle never starts while another runs. Across processes and
replicas `run_cycle` takes the database lock, and a cycle that finds it taken ends at once as
"skipped".
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Callable

from sqlalchemy import Engine

from feedback.queries import rated_turns
from learn.cycle import LearnerCycle, last_cycle
from learn.settings import ScheduleSettings

log = logging.getLogger("tunewheel.learn")

MISFIRE_GRACE_S = 3600
LIVE_JOB = "learner-live"


def new_rated_turns(db: Engine) -> int:
    """Turns rated since the last cycle started (all rated turns before the first cycle)."""
    last = last_cycle(db)
    return rated_turns(db, since=last.started_at if last is not None else None)


class Learner:
    """The jobs: a timed cycle and a new-ratings check, both ending in `run(trigger)`, and the check of
    the live trials (`live`: learn/live.py LiveTrials; the canary and probation), on a thread of its
    own so that a long cycle does not hold a rollback up."""

    def __init__(self, run: Callable[[str], LearnerCycle], *, db: Engine, schedule: ScheduleSettings, live=None):
        self.run, self.db, self.schedule, self.live = run, db, schedule, live
        self.last_cycle: LearnerCycle | None = None

    def check_live(self) -> None:
        """One check of the running canary and probation; never raises."""
        try:
            self.live.check()
        except Exception:
            log.exception("live trials check crashed")

    def cycle(self, trigger: str = "schedule") -> LearnerCycle | None:
        """One cycle; never raises (a scheduler job that raises only logs, and the cycle records itself)."""
        try:
            self.last_cycle = self.run(trigger)
            log.info("learner cycle (%s): %s", trigger, self.last_cycle.text())
        except Exception:
            log.exception("learner cycle (%s) crashed", trigger)
        return self.last_cycle

    def check_ratings(self) -> None:
        """Start a cycle when at least `min_new_ratings` turns were rated since the last one."""
        need = self.schedule.min_new_ratings
        try:
            n = new_rated_turns(self.db)
        except Exception:
            log.exception("could not count new ratings")
            return
        if need is not None and n >= need:
            log.info("%d new rated turns (>= %d): starting a learner cycle", n, need)
            self.cycle(trigger="ratings")


def add_jobs(scheduler, learner: Learner, schedule: ScheduleSettings) -> list[str]:
    """Register the jobs of `schedule` on an APScheduler 3 scheduler; returns their ids."""
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    opts = dict(coalesce=True, max_instances=1, misfire_grace_time=MISFIRE_GRACE_S, replace_existing=True)
    ids = []
    if schedule.cron:
        scheduler.add_job(learner.cycle, CronTrigger.from_crontab(schedule.cron), id="learner-cycle", kwargs={"trigger": "cron"}, **opts)
        ids.append("learner-cycle")
    elif schedule.interval_minutes:
        scheduler.add_job(learner.cycle, IntervalTrigger(minutes=schedule.interval_minutes), id="learner-cycle",
                          kwargs={"trigger": "interval"}, **opts)
        ids.append("learner-cycle")
    if schedule.min_new_ratings:
        scheduler.add_job(learner.check_ratings, IntervalTrigger(seconds=schedule.check_seconds), id="learner-ratings", **opts)
        ids.append("learner-ratings")
    if learner.live is not None:
        scheduler.add_job(learner.check_live, IntervalTrigger(seconds=learner.live.settings.check_seconds), id=LIVE_JOB,
                          executor="live", **opts)
    return ids


def build_scheduler(schedule: ScheduleSettings, learner: Learner, *, blocking: bool = False):
    """A Background (or Blocking) scheduler with one worker thread and the learner's jobs (not started)."""
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.schedulers.blocking import BlockingScheduler

    cls = BlockingScheduler if blocking else BackgroundScheduler
    scheduler = cls(executors={"default": ThreadPoolExecutor(max_workers=1), "live": ThreadPoolExecutor(max_workers=1)},
                    timezone="UTC")
    if not add_jobs(scheduler, learner, schedule):
        log.warning("no learner schedule configured (learn.schedule.cron, interval_minutes or min_new_ratings): nothing will run")
    return scheduler


def run_forever(scheduler) -> None:
    """`tunewheel learn schedule`: a blocking scheduler until SIGINT/SIGTERM (the running cycle finishes)."""
    if not [j for j in scheduler.get_jobs() if j.id != LIVE_JOB]:
        raise ValueError("no learner schedule configured: set learn.schedule.cron, interval_minutes or min_new_ratings")

    def stop(signum, _frame) -> None:
        log.info("stopping the learner scheduler (signal %s)", signum)
        threading.Thread(target=scheduler.shutdown, kwargs={"wait": True}, daemon=True).start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    log.info("learner scheduler running: %s", ", ".join(f"{j.id} ({j.trigger})" for j in scheduler.get_jobs()))
    scheduler.start()
