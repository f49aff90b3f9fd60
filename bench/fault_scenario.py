"""The pieces of the fault scenario that bench/faults.py and tests/faults/ run: a supervised
engine, the gateway as its own process, 16 clients, /health probes, database outages.

    with SupervisedEngine(settings) as engine:                    # vLLM, restarted when it dies
        gateway = GatewayProcess(tmp, engine_url=engine.url, store_url=url, port=8123)
        gateway.start()                                           # python -m serve.cli serve
        run = Run(t0=time.monotonic())
        Clients(gateway.url, run).start(); Probes(gateway.url, run, tmp).start()
        engine.kill(); gateway.kill(); SqliteOutage(path).begin() ...
        logged_ids(url, {o.completion_id for o in run.outcomes if o.completion_id})

bench/faults.py puts them on a stage (`Stage`), with the plans and the checks.

The engine is vLLM under the same `EngineManager.supervise()` that `tunewheel serve` runs
(it restarts a dead child with backoff), here in a thread of this process, so that the gateway
(`python -m serve.cli serve`, attached with `engine.url`) can be SIGKILLed and restarted in
seconds without taking the engine with it. Each client sends short chats (half of them
streamed) back to back and records what it got: an answer counts only when it arrived whole
(the JSON body; a stream's `[DONE]`). A process of its own GETs /health every 0.25 s with a
1 s timeout; a thread reads /metrics for the spool's size and the writes pending.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 16
MAX_TOKENS = 8
CLIENTS_NICE = 10


@dataclass
class Outcome:
    """One request as its client saw it."""

    client: int
    stream: bool
    started: float
    ended: float = 0.0
    status: int | None = None  # None: no HTTP answer at all (connection refused or reset)
    completion_id: str | None = None  # set only when the whole answer arrived
    retry_after: str | None = None
    error: str | None = None  # transport error, or the code of an error event in a stream


@dataclass
class Run:
    """What a scenario saw: outcomes, probes, fault windows, figures read from /metrics."""

    t0: float
    outcomes: list[Outcome] = field(default_factory=list)
    probes: list[tuple[float, float, int | None]] = field(default_factory=list)  # (at, latency, status)
    engine_down: list[list[float]] = field(default_factory=list)  # [killed, ready again]
    gateway_down: list[list[float]] = field(default_factory=list)  # [killed, answering /health again]
    db_down: list[list[float]] = field(default_factory=list)
    spool_peak_bytes: float = 0.0
    pending: list[tuple[float, float]] = field(default_factory=list)  # (at, tunewheel_log_pending_writes)
    logged_ids: set[str] = field(default_factory=set)
    loop_stalls: list[str] = field(default_factory=list)  # the gateway's watchdog warnings
    ended: float = 0.0


class Clients:
    """`n` clients on an event loop of their own thread, chatting until `stop()`. They stand for
    users on other machines: the thread runs at nice CLIENTS_NICE, so on a 2-core box the load
    it makes does not take the CPU from the gateway it measures (the engine runs at engine.nice)."""

    def __init__(self, url: str, run: Run, n: int = CLIENTS, max_tokens: int = MAX_TOKENS):
        self.url, self.run, self.n, self.max_tokens = url, run, n, max_tokens
        self._loop = asyncio.new_event_loop()
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="fault-clients", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        while self._stopping is None:
            time.sleep(0.01)
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(180)

    def answered_after(self, t: float) -> int:
        return sum(1 for o in list(self.run.outcomes) if o.completion_id and o.started > t)

    def _main(self) -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), CLIENTS_NICE)  # this thread only (Linux)

        async def main():
            self._stopping = asyncio.Event()
            await asyncio.gather(*(self._client(i) for i in range(self.n)))

        self._loop.run_until_complete(main())
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    async def _client(self, i: int) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(120, connect=2), trust_env=False) as http:
            n = 0
            while not self._stopping.is_set():
                n += 1
                o = Outcome(client=i, stream=n % 2 == 0, started=time.monotonic())
                body = {"model": "chat", "max_tokens": self.max_tokens, "temperature": 0, "stream": o.stream,
                        "messages": [{"role": "user", "content": f"Client {i}, question {n}: name a colour."}]}
                try:
                    await (self._stream(http, body, o) if o.stream else self._plain(http, body, o))
                except (httpx.HTTPError, ValueError) as exc:
                    o.error = type(exc).__name__
                o.ended = time.monotonic()
                self.run.outcomes.append(o)
                if o.completion_id is None:
                    await asyncio.sleep(0.5)

    @staticmethod
    async def _plain(http: httpx.AsyncClient, body: dict, o: Outcome) -> None:
        r = await http.post("/v1/chat/completions", json=body)
        o.status, o.retry_after = r.status_code, r.headers.get("retry-after")
        if r.status_code == 200:
            o.completion_id = r.json()["id"]

    @staticmethod
    async def _stream(http: httpx.AsyncClient, body: dict, o: Outcome) -> None:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            o.status, o.retry_after = r.status_code, r.headers.get("retry-after")
            if r.status_code != 200:
                await r.aread()
                return
            seen = None
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    o.completion_id = seen
                    return
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    o.error = str(chunk["error"].get("code") or chunk["error"].get("type"))
                seen = chunk.get("id", seen)


PROBE = """
import http.client, sys, time
host, port, out = sys.argv[1], int(sys.argv[2]), open(sys.argv[3], "w", buffering=1)
conn = None
while True:
    time.sleep(0.25)
    at = time.monotonic()
    try:
        conn = conn or http.client.HTTPConnection(host, port, timeout=1.0)
        conn.request("GET", "/health")
        response = conn.getresponse()
        response.read()
        status = response.status
    except (OSError, http.client.HTTPException):
        conn = conn.close() if conn else None
        status = 0
    out.write(f"{at} {time.monotonic() - at} {status}\\n")
"""


class Probes:
    """GET /health every 0.25 s with a 1 s timeout, from a small process of its own (as a load
    balancer would: this process's threads cannot delay it), and /metrics every second."""

    def __init__(self, url: str, run: Run, workdir: Path):
        self.url, self.run = url, run
        self._out = Path(workdir) / "health-probes.txt"
        self._proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._metrics, daemon=True)

    def start(self) -> None:
        host, port = self.url.removeprefix("http://").split(":")
        self._proc = subprocess.Popen([sys.executable, "-c", PROBE, host, port, str(self._out)])
        self._thread.start()

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        self._proc.wait(10)
        self._stop.set()
        self._thread.join(10)
        for line in self._out.read_text().splitlines():
            at, latency, status = line.split()
            self.run.probes.append((float(at), float(latency), int(status) or None))

    def _metrics(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10.0, trust_env=False) as http:
            while not self._stop.wait(1.0):
                try:
                    text = http.get("/metrics").text
                except httpx.HTTPError:
                    continue
                self.run.spool_peak_bytes = max(self.run.spool_peak_bytes, metric(text, "tunewheel_log_spool_bytes"))
                self.run.pending.append((time.monotonic(), metric(text, "tunewheel_log_pending_writes")))


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


class GatewayProcess:
    """`python -m serve.cli serve --config FILE` attached to `engine_url`: start, SIGKILL, restart."""

    def __init__(self, workdir: Path, *, engine_url: str, store_url: str, port: int, extra_toml: str = ""):
        self.workdir, self.port = Path(workdir), port
        self.url = f"http://127.0.0.1:{port}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = self.workdir / "tunewheel.toml"
        self.config.write_text(f'data_dir = "{self.workdir / "data"}"\n[serve]\nport = {port}\n'
                               f'[engine]\nurl = "{engine_url}"\n[store]\nurl = "{store_url}"\n{extra_toml}')
        self.log = self.workdir / "gateway.log"
        self.proc: subprocess.Popen | None = None

    def spawn(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "serve", "--config", str(self.config)],
                                         cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "PYTHONPATH": str(ROOT)})

    def start(self, timeout: float = 180.0) -> float:
        """Start it, again and again while it exits (the database may be down: a supervisor's
        restart loop); the time /health first answers."""
        deadline = time.monotonic() + timeout
        self.spawn()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                time.sleep(1.0)
                self.spawn()
                continue
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0, trust_env=False).status_code == 200:
                    return time.monotonic()
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the gateway did not start within {timeout:g} s; see {self.log}:\n{self.tail()}")

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/ready", timeout=1.0, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> float:
        """SIGKILL; the time it was sent."""
        at = time.monotonic()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        return at

    def stop(self, timeout: float = 120.0) -> int | None:
        """SIGTERM (the graceful path: requests finish, the spool drains); its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    def loop_stalls(self) -> list[str]:
        """The watchdog's warnings in the log (serve/gateway/watchdog.py), each with the stack it names."""
        records: list[list[str]] = []
        current: list[str] | None = None
        for line in self.log.read_text(errors="replace").splitlines() if self.log.exists() else []:
            if " serve.gateway.watchdog: " in line:
                current = [line]
                records.append(current)
            elif current is not None and line.startswith(" "):  # the stack under the warning
                current.append(line)
            else:
                current = None
        return ["\n".join(r) for r in records]


class SupervisedEngine:
    """vLLM under `EngineManager.supervise()` in a thread of this process: SIGKILL its process
    group and the supervisor restarts it, as `tunewheel serve` does for its child."""

    def __init__(self, settings, command: list[str] | None = None):
        """`command`: another engine's command line (a fake one in quick checks of this harness)."""
        from serve.engine import EngineManager

        self.manager = EngineManager(settings, command=command)
        self.url = self.manager.url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-engine", daemon=True)

    def __enter__(self) -> SupervisedEngine:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.manager.start(), self._loop).result()
        self._supervisor = asyncio.run_coroutine_threadsafe(self.manager.supervise(), self._loop)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.manager.stop(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def kill(self) -> float:
        """SIGKILL the engine's whole process group (vLLM and its engine-core child), as the OOM
        killer might; the time it was sent."""
        at = time.monotonic()
        os.killpg(self.manager.pid, signal.SIGKILL)
        return at


class SqliteOutage:
    """The database unavailable to the gateway: another connection holds BEGIN EXCLUSIVE."""

    def __init__(self, path: str):
        self.path, self._conn = path, None

    def begin(self) -> None:
        self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=60)
        self._conn.execute("BEGIN EXCLUSIVE")

    def end(self) -> None:
        self._conn.execute("ROLLBACK")
        self._conn.close()


class PostgresServer:
    """A throwaway PostgreSQL of its own (never the shared test server: this one gets stopped),
    started like tests/fixtures/postgres.py does; `begin`/`end` stop and restart it."""

    def __init__(self):
        from tests.fixtures.postgres import _pg_bindir, _Server

        bindir = _pg_bindir()
        if bindir is None:
            raise RuntimeError("no PostgreSQL binaries (/usr/lib/postgresql/*/bin)")
        self.server = _Server(bindir)
        self.down = False

    def __enter__(self) -> PostgresServer:
        self.url = self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.down:  # a run that failed during the outage: nothing to stop
            shutil.rmtree(self.server.dir, ignore_errors=True)
        else:
            self.server.stop()

    def begin(self) -> None:
        s = self.server
        s._run(str(s.bindir / "pg_ctl"), "-D", str(s.data), "-m", "fast", "-w", "stop")
        self.down = True

    def end(self) -> None:
        s = self.server
        opts = f"-p {s.port} -k {s.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        s._run(str(s.bindir / "pg_ctl"), "-D", str(s.data), "-l", str(s.dir / "server.log"), "-w", "-o", opts, "start")
        self.down = False


def logged_ids(store_url: str, ids: set[str]) -> set[str]:
    """Which of `ids` are in the turn log."""
    from sqlalchemy import bindparam, create_engine, text

    engine = create_engine(store_url)
    query = text("SELECT id FROM turn WHERE id IN :ids").bindparams(bindparam("ids", expanding=True))
    try:
        with engine.connect() as conn:
            wanted, found = sorted(ids), set()
            for i in range(0, len(wanted), 500):
                found |= {row[0] for row in conn.execute(query, {"ids": wanted[i:i + 500]})}
            return found
    finally:
        engine.dispose()
