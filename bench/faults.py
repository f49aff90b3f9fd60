"""Faults under load: 16 clients chat through the gateway while (a) the engine is SIGKILLed,
(b) the database is away for 60 s, (c) the gateway is SIGKILLed and restarted. Nothing a
client was answered may be missing from the turn log.

    python bench/faults.py                         # 10 minutes, SQLite, an engine of its own
    python bench/faults.py --minutes 3 --store postgres

Prints requests answered, turns logged, turns lost (must be 0), the spool's peak size and the
recovery time of each fault; writes bench/results/faults.json. The timeline over `--minutes`:
the engine is SIGKILLed at 10 % (its supervisor restarts it); the database goes away at 30 %
for 60 s (SQLite: another connection holds BEGIN EXCLUSIVE; Postgres: the server is stopped);
20 s before it comes back the gateway is SIGKILLed (its answered turns are then only in its
spool) and restarted at once, again and again until it starts (on Postgres it cannot start
before the database is back); at 70 % the gateway is SIGKILLed again, with the database up.
tests/faults/ runs the same pieces, faults overlapping, in about a minute per store.

Recovery times: engine and gateway, from the SIGKILL to the first whole answer of a request
sent after it; database, from its return to the turn log having caught up (no pending writes).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fault_scenario import (  # noqa: E402
    Clients,
    GatewayProcess,
    PostgresServer,
    Probes,
    Run,
    SqliteOutage,
    SupervisedEngine,
    logged_ids,
)

RESULTS = Path(__file__).parent / "results" / "faults.json"
HEALTH_LIMIT_S = 1.0
SLACK_S = 1.0  # a request that ends just after a window closes still belongs to it


class Stage:
    """A gateway process on `engine_url` with its store, clients and probes; the faults as methods,
    each noting when it started and ended in `run`."""

    def __init__(self, workdir: Path, *, engine: SupervisedEngine, store_url: str, outage: Any, port: int,
                 clients: int = 16):
        self.engine, self.store_url, self.outage = engine, store_url, outage
        self.gateway = GatewayProcess(workdir, engine_url=engine.url, store_url=store_url, port=port)
        self.run = Run(t0=time.monotonic())
        self.clients = Clients(self.gateway.url, self.run, n=clients)
        self.probes = Probes(self.gateway.url, self.run, workdir)
        self._restart: threading.Thread | None = None

    def __enter__(self) -> Stage:
        self.gateway.start()
        self.wait(self.gateway.ready, "the gateway to be ready", 120)
        self.probes.start()
        self.clients.start()
        return self

    def __exit__(self, *exc) -> None:
        self.clients.stop()
        self.probes.stop()
        self.gateway.stop()

    def wait(self, condition, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}; gateway log:\n{self.gateway.tail()}")
            time.sleep(0.1)

    def wait_answers(self, n: int, timeout: float = 120.0) -> None:
        """Until `n` requests sent from now on were answered whole."""
        mark = time.monotonic()
        self.wait(lambda: self.clients.answered_after(mark) >= n, f"{n} answers", timeout)

    # --- (a) the engine ----------------------------------------------------------------------
    def kill_engine(self) -> None:
        self.run.engine_down.append([self.engine.kill(), float("inf")])

    def wait_engine_back(self, timeout: float = 300.0) -> None:
        self.wait(lambda: not self.engine.manager.ready, "the supervisor to notice the engine died", 30)
        self.wait(lambda: self.engine.manager.ready and self.gateway.ready(), "the engine to be back", timeout)
        self.run.engine_down[-1][1] = time.monotonic()

    # --- (b) the database --------------------------------------------------------------------
    def db_down(self) -> None:
        self.outage.begin()
        self.run.db_down.append([time.monotonic(), float("inf")])

    def db_up(self) -> None:
        self.outage.end()
        self.run.db_down[-1][1] = time.monotonic()

    # --- (c) the gateway ---------------------------------------------------------------------
    def kill_gateway(self, restart_in_background: bool = False) -> None:
        """SIGKILL, then start it again at once (in a thread when the database may be away)."""
        self.run.gateway_down.append([self.gateway.kill(), float("inf")])
        self._restart = threading.Thread(target=self._restart_gateway, daemon=True)
        self._restart.start()
        if not restart_in_background:
            self.gateway_restarted()

    def gateway_restarted(self, timeout: float = 300.0) -> None:
        self._restart.join(timeout)
        self.wait(self.gateway.ready, "the restarted gateway to be ready", 60)

    def _restart_gateway(self) -> None:
        self.run.gateway_down[-1][1] = self.gateway.start(timeout=300)

    # --- the end -------------------------------------------------------------------------------
    def finish(self, timeout: float = 120.0) -> Run:
        """Stop the clients, wait until every answered turn is in the log (or `timeout`), stop
        the gateway gracefully."""
        self.clients.stop()
        answered = {o.completion_id for o in self.run.outcomes if o.completion_id}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.run.logged_ids = logged_ids(self.store_url, answered)
            if self.run.logged_ids >= answered:
                break
            time.sleep(1.0)
        time.sleep(1.5)  # one more /metrics sample: the writer has caught up
        self.probes.stop()
        self.run.ended = time.monotonic()
        self.run.loop_stalls = self.gateway.loop_stalls()
        return self.run


def overlapping(stage: Stage, outage_s: float = 60.0) -> None:
    """All three faults inside one database outage (the test's plan): answers that exist only
    in the spool when the engine dies and when the gateway is SIGKILLed."""
    stage.wait_answers(16)
    stage.db_down()
    started = time.monotonic()
    stage.wait_answers(16)
    stage.kill_engine()
    stage.wait_engine_back()
    stage.wait_answers(16)
    stage.kill_gateway(restart_in_background=True)
    time.sleep(max(5.0, started + outage_s - time.monotonic()))
    stage.db_up()
    stage.gateway_restarted()
    stage.wait_answers(32)


def spread(stage: Stage, seconds: float, outage_s: float = 60.0) -> None:
    """The bench's plan: one fault after the other over `seconds`."""
    t0 = time.monotonic()

    def at(fraction: float, extra: float = 0.0) -> None:
        time.sleep(max(0.0, t0 + fraction * seconds + extra - time.monotonic()))

    at(0.1)
    stage.kill_engine()
    stage.wait_engine_back()
    at(0.3)
    stage.db_down()
    at(0.3, outage_s - 20)
    stage.kill_gateway(restart_in_background=True)
    at(0.3, outage_s)
    stage.db_up()
    stage.gateway_restarted()
    at(0.7)
    stage.kill_gateway()
    at(1.0)


def verify(run: Run) -> list[str]:
    """What went wrong, in words; [] when nothing did."""
    problems = []
    answered = [o.completion_id for o in run.outcomes if o.completion_id]
    missing = set(answered) - run.logged_ids
    if missing:
        problems.append(f"{len(missing)} of {len(set(answered))} answered turns are not in the log, e.g. {sorted(missing)[:3]}")
    if len(answered) != len(set(answered)):
        problems.append("the gateway gave two answers the same completion id")
    for o in run.outcomes:
        if o.status is not None and o.status >= 500:
            if o.status != 503 or not o.retry_after:
                problems.append(f"a {o.status} (Retry-After {o.retry_after!r}) at {o.started - run.t0:.1f} s")
            elif not within(o, run.engine_down):
                problems.append(f"a 503 at {o.started - run.t0:.1f} s while the engine was up")
        elif o.completion_id is None and o.status in (None, 200) and not within(o, run.engine_down + run.gateway_down):
            problems.append(f"a request broken off ({o.error}) at {o.started - run.t0:.1f} s with no fault to explain it")
    for at, latency, status in run.probes:
        # a probe still waiting for its answer when the gateway was SIGKILLed cannot get one either
        if any(start <= at + latency and at <= end + SLACK_S for start, end in run.gateway_down):
            continue
        if status != 200 or latency > HEALTH_LIMIT_S:
            problems.append(f"/health at {at - run.t0:.1f} s: {status} after {latency:.2f} s")
    return problems


def within(o, windows: list[list[float]]) -> bool:
    return any(o.started <= end + SLACK_S and o.ended >= start for start, end in windows)


def report(run: Run, clients: int = 16, **conditions: Any) -> dict[str, Any]:
    answered = {o.completion_id for o in run.outcomes if o.completion_id}
    first_answer = lambda t: min((o.ended for o in run.outcomes if o.completion_id and o.started > t), default=None)  # noqa: E731
    # Caught up: no more pending writes than turns the clients have in flight (one batch).
    caught_up = lambda t: next((at for at, n in run.pending if at > t and n <= clients), None)  # noqa: E731
    faults = [{"fault": "engine SIGKILL", "at_s": s - run.t0, "recovery_s": _since(first_answer(s), s)}
              for s, _ in run.engine_down]
    faults += [{"fault": "database away", "at_s": s - run.t0, "for_s": e - s, "recovery_s": _since(caught_up(e), e)}
               for s, e in run.db_down]
    faults += [{"fault": "gateway SIGKILL", "at_s": s - run.t0, "recovery_s": _since(first_answer(s), s)}
               for s, _ in run.gateway_down]
    statuses: dict[str, int] = {}
    for o in run.outcomes:
        key = str(o.status) if o.status is not None else "no answer"
        statuses[key] = statuses.get(key, 0) + 1
    return {
        "clients": clients, **conditions, "duration_s": round((run.ended or time.monotonic()) - run.t0, 1),
        "requests": len(run.outcomes), "answered": len(answered), "turns_logged": len(answered & run.logged_ids),
        "turns_lost": len(answered - run.logged_ids), "statuses": statuses,
        "streams_broken_off": sum(1 for o in run.outcomes if o.status == 200 and not o.completion_id),
        "spool_peak_bytes": int(run.spool_peak_bytes), "health_probes": len(run.probes),
        "health_max_latency_s": round(max((lat for _, lat, _ in run.probes), default=0.0), 3),
        "health_slowest": [[round(at - run.t0, 1), round(lat, 3), status]
                           for at, lat, status in sorted(run.probes, key=lambda p: -p[1])[:3]],
        "faults": [{k: round(v, 1) if isinstance(v, float) else v for k, v in f.items()} for f in faults],
        "loop_stalls": run.loop_stalls,
        "problems": verify(run),
    }


def _since(t: float | None, start: float) -> float | None:
    return None if t is None else t - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the run (at least 2)")
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--data-dir", default=".tunewheel", help="where `tunewheel model prepare` put the model")
    args = parser.parse_args()
    from serve.engine_child import free_port
    from serve.settings import load_settings

    settings = load_settings(None, data_dir=Path(args.data_dir), engine={"port": free_port()})
    with tempfile.TemporaryDirectory(prefix="tunewheel-faults-") as tmp, ExitStack() as stack:
        if args.store == "postgres":
            pg = stack.enter_context(PostgresServer())
            store_url, outage = pg.url, pg
        else:
            store_url = f"sqlite:///{tmp}/gateway/data/tunewheel.db"
            outage = SqliteOutage(f"{tmp}/gateway/data/tunewheel.db")
        engine = stack.enter_context(SupervisedEngine(settings))
        with Stage(Path(tmp) / "gateway", engine=engine, store_url=store_url, outage=outage, port=free_port(),
                   clients=args.clients) as stage:
            spread(stage, 60 * args.minutes)
            run = stage.finish()
        result = report(run, args.clients, store=args.store, max_tokens=8, minutes=args.minutes)
    print(json.dumps(result, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"requests answered {result['answered']}, turns logged {result['turns_logged']}, "
          f"turns lost {result['turns_lost']}, spool peak {result['spool_peak_bytes']} bytes")
    for f in result["faults"]:
        print(f"  {f['fault']:16s} at {f['at_s']:6.1f} s: recovered in {f['recovery_s']} s")
    sys.exit(1 if result["problems"] or result["turns_lost"] else 0)


if __name__ == "__main__":
    main()
