"""The gateway: an OpenAI-compatible FastAPI app in front of the vLLM engine.

    app = create_app(load_settings(), engine=manager)          # `tunewheel serve` does this
    uvicorn.run(app, host="127.0.0.1", port=8000)

    POST /v1/chat/completions   chat, streamed (SSE) or not; `model` = chat | base | chat@<version>
    POST /v1/feedback           {"completion_id", "rating": "up"|"down", "comment"?} -> 201
    GET  /v1/models             served names
    GET  /health  /ready  /metrics
    /admin/...                  serve/admin.py, admin key only

Routes are thin: they read and validate the body and hand it to `ChatService` (serve/chat.py).
Bodies are read here, once, with a size cap (`serve.max_request_bytes`, 413 beyond it, whether
or not the client sent Content-Length); invalid JSON is 400, a body that does not fit the
schema 422 with the field at fault. `create_app` builds nothing that does I/O: the lifespan opens
the database (`store_url`, migrated) and the turn writer unless one was passed, one pooled
`httpx.AsyncClient` for the app's lifetime, and, with a registry, the hot-swap reconciler. On
shutdown it closes the writer, which writes every pending turn first.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sqlmodel import Session

from feedback.db import make_db
from feedback.models import FeedbackCreate, FeedbackPublic, Turn
from feedback.queries import record_feedback
from feedback.writer import TurnWriter
from serve import admin, metrics
from serve.aliases import AliasTable
from serve.auth import Auth, CallerDep
from serve.chat import ChatService
from serve.settings import Settings
from serve.protocol import APIError, ChatCompletionRequest, model_card, not_ready, validation_error

FEEDBACK_WAIT_S = 10.0  # how long a rating waits for its turn to reach the database


def make_writer(settings: Settings) -> TurnWriter:
    """The turn writer on `settings.store_url` (migrated), its queue gauge and error counter wired."""
    db = make_db(settings.store_url)
    return TurnWriter(db, max_queue=settings.serve.log_queue_size,
                      on_pending=metrics.LOG_PENDING.set, on_error=metrics.LOG_ERRORS.inc).start()


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object: 413 past `limit` bytes, 400 when it is not JSON."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body of {length} bytes is over the limit of {limit} (serve.max_request_bytes)",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes (serve.max_request_bytes)",
                           code="request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return body


def _rejected(status: int) -> None:
    metrics.REQUESTS.labels(alias="unknown", version="none", status=str(status)).inc()


def create_app(settings: Settings, *, engine: Any = None, writer: TurnWriter | None = None, registry: Any = None) -> FastAPI:
    """The gateway app. `engine`: an object with `.url` and `.ready` (serve.engine.EngineManager),
    owned by the caller; None attaches to `settings.engine.url` for the app's lifetime. `writer`:
    a started TurnWriter (closed by the app on shutdown); None opens `settings.store_url`.
    `registry`: learn.registry.Registry, which turns on alias reconciliation; None serves every
    alias from the base model and `chat@<version>` only for versions in `aliases.loaded`."""
    if engine is None and settings.engine.url is None:
        raise ValueError("create_app needs engine= (an EngineManager) or settings.engine.url to attach to")
    aliases = AliasTable(settings.serve.aliases, base=settings.engine.served_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from serve.engine import EngineManager  # only when attaching on our own

        eng = engine if engine is not None else EngineManager(settings)
        supervise = None
        if engine is None:
            await eng.start()
            supervise = asyncio.create_task(eng.supervise())
        w = writer if writer is not None else await asyncio.to_thread(make_writer, settings)
        http = httpx.AsyncClient(limits=httpx.Limits(max_connections=1000, max_keepalive_connections=256),
                                 timeout=httpx.Timeout(settings.serve.request_timeout_s, connect=5.0), trust_env=False)
        reconciler = None
        if registry is not None:
            from serve.reconcile import Reconciler

            reconciler = Reconciler(settings, registry, aliases, http, eng.url)
            reconciler.start()
            if hasattr(eng, "on_restart"):
                async def reload_adapters() -> None:
                    reconciler.on_engine_restart()

                eng.on_restart.append(reload_adapters)
        app.state.engine, app.state.writer, app.state.db, app.state.http = eng, w, w.engine, http
        app.state.reconciler = reconciler
        restyle = None
        if registry is not None:
            from serve.restyle import RestyleStep

            restyle = RestyleStep(settings=settings, registry=registry, reconciler=reconciler, http=http, engine_url=eng.url)
        app.state.chat = ChatService(http=http, engine=eng, aliases=aliases, writer=w, reconciler=reconciler,
                                     timeout_s=settings.serve.request_timeout_s, restyle=restyle,
                                     alias_styles={n: a.style for n, a in settings.serve.aliases.items() if a.style})
        try:
            yield
        finally:
            if reconciler is not None:
                await reconciler.stop()
            if supervise is not None:
                supervise.cancel()
                await eng.stop()
            await http.aclose()
            await asyncio.to_thread(w.close)

    app = FastAPI(title="tunewheel gateway", version="0.1.0", lifespan=lifespan)
    app.state.settings, app.state.aliases, app.state.registry = settings, aliases, registry
    app.state.auth = Auth.from_settings(settings)
    app.state.reconciler = None
    limit = settings.serve.max_request_bytes

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, caller: CallerDep) -> Response:
        started = time.perf_counter()
        try:
            body = await read_json(request, limit)
            chat_request = ChatCompletionRequest.model_validate(body)
        except APIError as exc:
            _rejected(exc.status)
            raise
        except ValidationError as exc:
            _rejected(422)
            raise validation_error(exc) from exc
        return await request.app.state.chat.create(chat_request, body, caller=caller, started=started,
                                                   conversation_id=request.headers.get("x-conversation-id") or None)

    @app.post("/v1/feedback", status_code=201)
    async def feedback(request: Request, caller: CallerDep) -> JSONResponse:
        try:
            rating = FeedbackCreate.model_validate(await read_json(request, limit))
        except ValidationError as exc:
            raise validation_error(exc) from exc
        state = request.app.state
        await state.writer.wait_written(rating.completion_id, FEEDBACK_WAIT_S)

        def store() -> tuple[FeedbackPublic, str]:
            with Session(state.db) as session:
                fb = record_feedback(session, turn_id=rating.completion_id, rating=rating.rating, comment=rating.comment,
                                     key_hash=caller.key_hash, admin=caller.admin)
                version = session.get(Turn, fb.turn_id).adapter_version
                return FeedbackPublic.of(fb), version

        try:
            record, version = await asyncio.to_thread(store)
        except LookupError as exc:
            raise APIError(404, f"no completion with id {rating.completion_id!r}", type="not_found_error",
                           code="completion_not_found", param="completion_id") from exc
        except PermissionError as exc:
            raise APIError(403, "this completion was answered for another API key", type="permission_error",
                           code="forbidden", param="completion_id") from exc
        metrics.FEEDBACK.labels(version=version, rating=rating.rating).inc()
        return JSONResponse(record.model_dump(mode="json"), status_code=201)

    @app.get("/v1/models")
    async def models(request: Request, caller: CallerDep) -> dict[str, Any]:
        created = int(time.time())
        return {"object": "list", "data": [model_card(n, created) for n in request.app.state.chat.model_names()]}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> dict[str, Any]:
        eng = request.app.state.engine
        if not eng.ready:
            raise not_ready()
        return {"status": "ready", "aliases": request.app.state.aliases.aliases()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    app.include_router(admin.router)
    return app
