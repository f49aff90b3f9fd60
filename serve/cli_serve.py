"""`tunewheel serve`: the engine (child process or attached) and the gateway in one process.

    tunewheel serve                                  # embedded SmolLM2 on 127.0.0.1:8000
    tunewheel serve --config tunewheel.toml --host 0.0.0.0 --port 8080   # needs serve.api_keys
    tunewheel serve --with-learner                   # and the learner's scheduler in-process

Order on start: settings are checked (an open gateway may only bind loopback), the engine's LoRA
capacity is sized to the training rank and the adapters the registry serves, the embedded model is
prepared if the engine is ours, the engine starts and is supervised (restarted with
backoff if it dies, `/ready` says 503 meanwhile), the database is migrated, then uvicorn
serves the app. SIGINT/SIGTERM stop the gateway first (in-flight requests finish, pending turns
are written), then the engine and its whole process tree, so nothing is left behind.

`ServerThread` runs any app on uvicorn in a background thread; test fixtures and the gateway
benchmark use it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from typing import Annotated, Any, Callable, Optional

import typer

from feedback.cli_common import ConfigOption, fail, load, setup_logging

log = logging.getLogger("tunewheel.serve")


class ServerThread:
    """uvicorn serving `app` on host:port in a daemon thread; `start()` returns once it accepts."""

    def __init__(self, app: Any, host: str, port: int, *, log_level: str = "warning"):
        import uvicorn

        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                                    timeout_graceful_shutdown=30))
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{port}", daemon=True)

    def start(self, timeout: float = 120.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the gateway on {self.url} failed to start (see the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateway on {self.url} did not start within {timeout:g} s")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def _build_store(settings):
    """Database (migrated), turn writer and adapter registry on `settings.store_url`."""
    from learn.registry import Registry
    from serve.gateway.app import make_writer

    writer = make_writer(settings)
    return writer, Registry(writer.engine)


def sized_to_registry(settings):
    """`settings` with engine.max_lora_rank fixed to the LoRA capacity the engine needs: the training rank's
    size, or more when the registry already serves an adapter of a larger rank (a promoted version, a
    fallback, a restyler, trained before learn.train.rank was lowered), so that it still loads."""
    from feedback.db import make_db
    from learn.promotion import served_rank
    from learn.registry import Registry

    if settings.engine.max_lora_rank is not None:
        return settings
    db = make_db(settings.store_url)
    try:
        rank = served_rank(Registry(db))
    finally:
        db.dispose()
    capacity = settings.lora_capacity_for(rank)
    if capacity != settings.lora_capacity:
        log.info("engine LoRA capacity %d, not %d: the registry serves an adapter of rank %d", capacity,
                 settings.lora_capacity, rank)
    return settings.model_copy(update={"engine": settings.engine.model_copy(update={"max_lora_rank": capacity})})


def start_learner(settings, db, *, converge: Callable[[], None]):
    """`--with-learner`: the learner's jobs in a background thread of this process (an APScheduler)."""
    from learn.cycle import cycle_runner
    from learn.scheduler import Learner, build_scheduler

    from learn.live import live_trials

    learner = Learner(cycle_runner(settings, converge=converge), db=db, schedule=settings.learn.schedule,
                      live=live_trials(settings, converge=converge))
    scheduler = build_scheduler(settings.learn.schedule, learner)
    scheduler.start()
    log.info("learner scheduler started: %s", ", ".join(str(j.trigger) for j in scheduler.get_jobs()) or "no jobs")
    return scheduler


async def run_serve(settings, *, with_learner: bool = False) -> None:
    """Engine, gateway (and learner) until SIGINT/SIGTERM; then everything stops, gateway first."""
    import uvicorn

    from serve.engine import EngineManager
    from serve.gateway.app import converger, create_app

    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    server: uvicorn.Server | None = None
    stopping = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        if server is not None and server.started:
            server.should_exit = True  # uvicorn drains requests, the lifespan flushes the turn log
        elif not stopping:
            loop.call_soon_threadsafe(main.cancel)  # still starting: abandon the start, clean up below
        stopping = True

    # uvicorn installs its own handlers while it serves and re-raises the signal after shutdown;
    # ours must then be the ones in place, or a default SIGTERM would kill us before the engine stops.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    engine = None
    supervise = None
    learner = None
    try:
        settings = await asyncio.to_thread(sized_to_registry, settings)
        engine = None if settings.engine.pooled else EngineManager(settings)  # replicas: probed by the gateway's pool
        if not settings.engine.attached:
            from serve.model import prepare_model

            await asyncio.to_thread(prepare_model, settings)
        if engine is not None:
            await engine.start()
            supervise = asyncio.create_task(engine.supervise())
        writer, registry = await asyncio.to_thread(_build_store, settings)
        app = create_app(settings, engine=engine, writer=writer, registry=registry)
        if with_learner:
            learner = start_learner(settings, registry.db, converge=converger(app))
        server = uvicorn.Server(uvicorn.Config(app, host=settings.serve.host, port=settings.serve.port,
                                               log_level="info", lifespan="on", timeout_graceful_shutdown=30))
        if not stopping:
            await server.serve()
    finally:
        if learner is not None and hasattr(learner, "shutdown"):
            learner.shutdown(wait=False)
        if supervise is not None:
            supervise.cancel()
        if engine is not None:
            await engine.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_port(host: str, port: int) -> None:
    """The gateway's address is free, checked before the engine takes half a minute to start."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            fail(f"the gateway cannot listen on {host}:{port} ({exc.strerror}): stop what uses that port, "
                 "or choose another with --port (serve.port)")


def serve(
    ctx: typer.Context,
    config: ConfigOption = None,
    host: Annotated[Optional[str], typer.Option("--host", help="Gateway bind address (default serve.host, 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option("--port", help="Gateway port (default serve.port, 8000).")] = None,
    with_learner: Annotated[bool, typer.Option("--with-learner", help="Also run the learner's scheduler in this process.")] = False,
) -> None:
    """Start the vLLM engine (or attach to engine.url) and the OpenAI-compatible gateway."""
    from serve.gateway.auth import check_bind
    from serve.engine import EngineStartError

    setup_logging(logging.INFO)
    settings = load(ctx, config)
    if host is not None:
        settings.serve.host = host
    if port is not None:
        settings.serve.port = port
    try:
        check_bind(settings)
    except ValueError as exc:
        fail(str(exc), 2)
    check_port(settings.serve.host, settings.serve.port)
    try:
        asyncio.run(run_serve(settings, with_learner=with_learner))
    except EngineStartError as exc:
        first, *details = str(exc).splitlines() or [""]
        fix = next((line for line in details if line.startswith("likely fix:")), None)
        for line in details:  # the engine's last log lines, as context above the one error line
            if line != fix:
                typer.echo(line, err=True)
        fail(f"the engine did not start: {first}" + (f"; {fix}" if fix else ""))
    except (asyncio.CancelledError, KeyboardInterrupt):
        typer.echo("stopped before the gateway was up", err=True)
        raise typer.Exit(130)
