"""The gateway: an OpenAI-compatible FastAPI app in front of the vLLM engine.

    app = create_app(load_settings(), engine=manager, writer=make_writer(settings), registry=registry)
    uvicorn.run(app, host="127.0.0.1", port=8000)            # `tunewheel serve` does this

    POST /v1/chat/completions   GET /v1/models             routes_chat.py
    POST /v1/feedback                                      routes_feedback.py
    GET  /health  /ready  /metrics                         routes_health.py
    /admin/...                  admin key only             routes_admin.py

`create_app` builds nothing that does I/O. The lifespan (`serving`) opens the database
(`store_url`, migrated) and the turn writer unless one was passed, one pooled
`httpx.AsyncClient` for the app's lifetime and, with a registry, the hot-swap reconciler and
the restyle step; it puts them together into one `GatewayState` (state.py), the only thing
routes read. On shutdown it stops the reconciler and closes the writer, which writes every
pending turn first. `converger(app)` is the learner's "make serving converge now" when it runs
in the gateway's process (`tunewheel serve --with-learner`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from feedback.db import make_db
from feedback.writer import TurnWriter
from serve import metrics
from serve.gateway import routes_admin, routes_chat, routes_feedback, routes_health
from serve.gateway.auth import Auth
from serve.gateway.chat import ChatService
from serve.gateway.protocol import APIError
from serve.gateway.relay import TurnRecorder
from serve.gateway.restyle import RestyleStep
from serve.gateway.state import GatewayState
from serve.reconcile import Reconciler
from serve.routing import Router
from serve.settings import Settings


def make_writer(settings: Settings) -> TurnWriter:
    """The turn writer on `settings.store_url` (migrated), its queue gauge and error counter wired."""
    db = make_db(settings.store_url)
    return TurnWriter(db, max_queue=settings.serve.log_queue_size,
                      on_pending=metrics.LOG_PENDING.set, on_error=metrics.LOG_ERRORS.inc).start()


def create_app(settings: Settings, *, engine: Any = None, writer: TurnWriter | None = None, registry: Any = None,
               router: Router | None = None) -> FastAPI:
    """The gateway app. `engine`: an object with `.url` and `.ready` (serve.engine.EngineManager),
    owned by the caller; None attaches to `settings.engine.url` for the app's lifetime. `writer`:
    a started TurnWriter (closed by the app on shutdown); None opens `settings.store_url`.
    `registry`: learn.registry.Registry, which turns on reconciliation and restyling; None serves
    every alias from the base model. `router`: serve.routing.Router on the same registry
    (a test holds it to see or set what is served); None builds it from `[serve.aliases]`."""
    if engine is None and settings.engine.url is None:
        raise ValueError("create_app needs engine= (an EngineManager) or settings.engine.url to attach to")
    router = router or Router(settings.serve.aliases, base=settings.engine.served_name, registry=registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with serving(settings, engine=engine, writer=writer, registry=registry, router=router) as state:
            app.state.gateway = state
            yield

    app = FastAPI(title="tunewheel gateway", version="0.1.0", lifespan=lifespan)
    app.add_exception_handler(APIError, _api_error)
    for module in (routes_chat, routes_feedback, routes_health, routes_admin):
        app.include_router(module.router)
    return app


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@asynccontextmanager
async def serving(settings: Settings, *, engine: Any, writer: TurnWriter | None, registry: Any,
                  router: Router) -> AsyncIterator[GatewayState]:
    """Everything the routes need, started; stopped again in reverse order on exit."""
    async with AsyncExitStack() as stack:
        if engine is None:
            engine = await stack.enter_async_context(attached_engine(settings))
        if writer is None:
            writer = await asyncio.to_thread(make_writer, settings)
        stack.push_async_callback(asyncio.to_thread, writer.close)  # runs last: after in-flight streams logged
        http = await stack.enter_async_context(httpx.AsyncClient(
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=256),
            timeout=httpx.Timeout(settings.serve.request_timeout_s, connect=5.0), trust_env=False))
        recorder = TurnRecorder(writer)
        reconciler = restyle = None
        if registry is not None:
            reconciler = Reconciler(router, http, engine.url, drain_timeout_s=settings.serve.request_timeout_s,
                                    max_lora_rank=settings.lora_capacity)
            await reconciler.start()
            stack.push_async_callback(reconciler.stop)
            _reload_after_restart(stack, engine, reconciler)
            restyle = RestyleStep(router=router, loader=reconciler, recorder=recorder, http=http,
                                  engine_url=engine.url, config=settings.restyle)
        chat = ChatService(http=http, engine=engine, router=router, recorder=recorder, loader=reconciler,
                           restyle=restyle, timeout_s=settings.serve.request_timeout_s,
                           alias_styles={n: a.style for n, a in settings.serve.aliases.items() if a.style})
        yield GatewayState(settings=settings, auth=Auth.from_settings(settings), engine=engine, router=router,
                           chat=chat, writer=writer, registry=registry, reconciler=reconciler,
                           store_metrics=metrics.StoreMetrics(writer.engine))


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
