"""The gateway: an OpenAI-compatible FastAPI app in front of the vLLM engine.

    app = create_app(load_settings(), engine=manager, writer=make_writer(settings), registry=registry)
    uvicorn.run(app, host="127.0.0.1", port=8000)            # `tunewheel serve` does this

    POST /v1/chat/completions   GET /v1/models             routes_chat.py
    POST /v1/feedback                                      routes_feedback.py
    GET  /health  /ready  /metrics                         routes_health.py
    /admin/...                  admin key only             routes_admin.py, routes_forget.py

Every request passes the guard first (serve/gateway/guard.py: Host allowlist, per-key rate,
requests in flight); every error leaves as an OpenAI error object, FastAPI's and Starlette's own
(404, 405, a bad query parameter) included; GET /openapi.json describes every route's bodies
and the limits in force (serve/gateway/openapi.py).

`create_app` builds nothing that does I/O. The lifespan (`serving`) opens the database
(`store_url`, migrated) and the turn writer unless one was passed, one pooled engine client
(`httpx.AsyncClient` over aiohttp, serve/http.py) for the app's lifetime and, with a registry,
the hot-swap reconciler and the restyle step; it puts them together into one `GatewayState` (state.py), the only thing
routes read. On shutdown it stops the reconciler and closes the writer, which writes pending
turns to the database for up to `store.spool.drain_timeout_s`; the rest stays in the spool
(feedback/spool.py) and the next start writes it first. `converger(app)` is the learner's "make serving converge now" when it runs
in the gateway's process (`tunewheel serve --with-learner`).
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from feedback.db import make_db
from feedback.writer import TurnWriter
from serve import metrics
from serve.gateway import routes_admin, routes_chat, routes_feedback, routes_forget, routes_health
from serve.gateway.auth import Auth
from serve.gateway.chat import ChatService
from serve.gateway.guard import Guard
from serve.gateway.limits import Limits
from serve.gateway.openapi import describe
from serve.gateway.protocol import APIError
from serve.gateway.relay import TurnRecorder
from serve.gateway.restyle import RestyleStep
from serve.gateway.state import GatewayState
from serve.gateway.watchdog import LoopWatchdog
from serve.http import engine_client
from serve.pool import EnginePool
from serve.reconcile import Reconciler
from serve.routing import Router
from serve.settings import Settings


def make_writer(settings: Settings) -> TurnWriter:
    """The turn writer on `settings.store_url` (migrated) and its spool in the data dir (or
    `store.spool.dir`), started, with the turn log's metrics wired."""
    db = make_db(settings.store_url)
    spool = settings.store.spool
    metrics.LOG_SPOOL_CAPACITY.set(spool.max_bytes)
    return TurnWriter(db, spool.dir_for(settings.data_dir), max_spool_bytes=spool.max_bytes,
                      segment_bytes=spool.segment_bytes, scrub=write_time_scrubber(settings.store),
                      on_pending=metrics.LOG_PENDING.set, on_error=metrics.LOG_ERRORS.inc,
                      on_quarantine=metrics.LOG_QUARANTINED.inc, on_spool_bytes=metrics.LOG_SPOOL_BYTES.set).start()


def write_time_scrubber(store: Any) -> Callable[[Any], Any] | None:
    """`feedback.pii.scrub_turn` when `store.scrub_at_write` is on: turns are scrubbed before
    they are spooled, so no copy of them on disk holds what was scrubbed."""
    if not getattr(store, "scrub_at_write", False):
        return None
    from feedback.pii import scrub_turn

    return scrub_turn


def create_app(settings: Settings, *, engine: Any = None, writer: TurnWriter | None = None, registry: Any = None,
               router: Router | None = None) -> FastAPI:
    """The gateway app. `engine`: an object with `.url` and `.ready` (serve.engine.EngineManager),
    owned by the caller; None attaches to `settings.engine.url`, or to the replicas of `engine.urls`
    (serve/pool.py), for the app's lifetime. `writer`:
    a started TurnWriter (closed by the app on shutdown); None opens `settings.store_url`.
    `registry`: learn.registry.Registry, which turns on reconciliation and restyling; None serves
    every alias from the base model. `router`: serve.routing.Router on the same registry
    (a test holds it to see or set what is served); None builds it from `[serve.aliases]`."""
    if engine is None and not settings.engine.attached:
        raise ValueError("create_app needs engine= (an EngineManager) or settings.engine.url(s) to attach to")
    router = router or Router(settings.serve.aliases, base=settings.engine.served_name, registry=registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with serving(settings, engine=engine, writer=writer, registry=registry, router=router) as state:
            app.state.gateway = state
            yield

    app = FastAPI(title="tunewheel gateway", version="0.1.0", lifespan=lifespan)
    app.add_middleware(Guard)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _query_error)
    for module in (routes_chat, routes_feedback, routes_health, routes_admin, routes_forget):
        app.include_router(module.router)
    app.openapi = lambda: describe(app, settings)
    return app


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """FastAPI's and Starlette's HTTP errors (the admin routes' 404/409/503, an unknown path, 405) as OpenAI errors."""
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(exc.status_code)
    error = APIError(exc.status_code, str(exc.detail), type=kind or "invalid_request_error", headers=exc.headers)
    return await _api_error(request, error)


async def _query_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A path or query parameter that does not fit (the bodies are read by the routes): 422 naming it."""
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    message = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in exc.errors())
    return await _api_error(request, APIError(422, message, code="invalid_value", param=param))


@asynccontextmanager
async def serving(settings: Settings, *, engine: Any, writer: TurnWriter | None, registry: Any,
                  router: Router) -> AsyncIterator[GatewayState]:
    """Everything the routes need, started; stopped again in reverse order on exit."""
    async with AsyncExitStack() as stack:
        start_worker_threads(asyncio.get_running_loop())
        await stack.enter_async_context(LoopWatchdog(asyncio.get_running_loop()))
        if writer is None:
            writer = await asyncio.to_thread(make_writer, settings)
        # Runs last, after in-flight streams are logged; bounded: what is left waits in the spool.
        stack.push_async_callback(asyncio.to_thread, writer.close, settings.store.spool.drain_timeout_s)
        http = await stack.enter_async_context(engine_client(settings.serve.request_timeout_s))
        if engine is None and settings.engine.pooled:  # replicas, probed by the pool
            engines = EnginePool.attached(settings, http)
            await engines.start()
            stack.push_async_callback(engines.stop)
        else:
            if engine is None:
                engine = await stack.enter_async_context(attached_engine(settings))
            engines = EnginePool.of(engine, http, max_rank=settings.lora_capacity)
        recorder = TurnRecorder(writer)
        reconciler = restyle = None
        if registry is not None:
            reconciler = Reconciler(router, http, engines, drain_timeout_s=settings.serve.request_timeout_s,
                                    max_loras=settings.engine.max_loras)
            await reconciler.start()
            stack.push_async_callback(reconciler.stop)
            if engine is not None:
                _reload_after_restart(stack, engine, reconciler)
            restyle = RestyleStep(router=router, loader=reconciler, recorder=recorder, http=http,
                                  engines=engines, config=settings.restyle)
        chat = ChatService(http=http, engines=engines, router=router, recorder=recorder, loader=reconciler,
                           restyle=restyle, timeout_s=settings.serve.request_timeout_s,
                           alias_styles={n: a.style for n, a in settings.serve.aliases.items() if a.style})
        yield GatewayState(settings=settings, auth=Auth.from_settings(settings), engine=engines, router=router,
                           chat=chat, writer=writer, registry=registry, reconciler=reconciler,
                           store_metrics=metrics.StoreMetrics(writer.engine), limits=Limits(settings.serve.limits))


def start_worker_threads(loop: asyncio.AbstractEventLoop, workers: int | None = None) -> None:
    """Give `loop` a default executor (`asyncio.to_thread`: every database call) whose threads are
    all started now. A thread an executor adds later is started on the event loop, and
    `Thread.start` blocks until the new thread runs: under load, with the database going away
    (calls pile up, so the executor grows), that held the loop, /health included, for 0.7 s.
    Once per loop; the loop's owner shuts the executor down (asyncio.run does)."""
    if loop in _warmed:
        return
    workers = workers or min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's own default
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gateway-io")
    met = threading.Barrier(workers)
    for _ in range(workers):  # none is idle until all have met, so each submit starts a thread
        executor.submit(met.wait, 60)
    loop.set_default_executor(executor)
    _warmed.add(loop)


_warmed: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def _reload_after_restart(stack: AsyncExitStack, engine: Any, reconciler: Reconciler) -> None:
    """A restarted engine has lost its run-time adapters: reconcile then (EngineManager only)."""
    hooks = getattr(engine, "on_restart", None)
    if hooks is not None:
        hooks.append(reconciler.on_engine_restart)
        stack.callback(hooks.remove, reconciler.on_engine_restart)


@asynccontextmanager
async def attached_engine(settings: Settings) -> AsyncIterator[Any]:
    """An EngineManager on `settings.engine.url`, supervised for the app's lifetime."""
    from serve.engine import EngineManager

    engine = EngineManager(settings)
    await engine.start()
    supervise = asyncio.create_task(engine.supervise())
    try:
        yield engine
    finally:
        supervise.cancel()
        await engine.stop()


def converger(app: FastAPI, timeout_s: float = 300.0) -> Callable[[], None]:
    """The learner's "make serving converge now" for a learner in this process: one reconcile
    pass on the gateway's event loop, called from any other thread. Before the app has started,
    or without a registry, it does nothing (the gateway's periodic pass converges anyway)."""

    def converge() -> None:
        state: GatewayState | None = getattr(app.state, "gateway", None)
        reconciler = state.reconciler if state is not None else None
        if reconciler is None or reconciler.loop is None:
            return
        asyncio.run_coroutine_threadsafe(reconciler.reconcile(), reconciler.loop).result(timeout=timeout_s)

    return converge
