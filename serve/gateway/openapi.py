"""The gateway's OpenAPI document: every route's request and response bodies, and the limits in force.

    app.openapi = lambda: describe(app, settings)      # serve/gateway/app.py; GET /openapi.json serves it
    curl -s localhost:8000/openapi.json | python -m json.tool

Clients are generated from it and fuzzers (schemathesis, in tests/serve/gateway/test_openapi.py)
drive the gateway with it, so it says what the gateway really accepts and answers:
- The chat request as vLLM documents its own (`ChatCompletionRequest`, protocol.py), narrowed to
  this gateway's config: `max_tokens` has the `serve.limits.max_tokens` maximum, `n`, `stop`,
  `stop_token_ids`, `logit_bias` and `messages` their sizes, the vLLM extensions are exactly
  `serve.limits.engine_params`, and nothing else is accepted (additionalProperties false).
- The feedback request is `FeedbackCreate` (feedback/models.py), whatever fields it grows.
- Every error is an OpenAI error object (`ErrorResponse`): 4XX and 5XX on every operation.
- Routes declared elsewhere without body models (health, admin) are described here (`OTHER_ROUTES`).
- Operations that need a key say so (a bearer scheme), following the config: /v1/ when keys
  are configured, /admin/ always, /metrics when `serve.metrics_need_key`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from feedback.models import FeedbackCreate
from serve.gateway.protocol import OPENAI_FIELDS, ChatCompletionRequest
from serve.settings import ENGINE_PARAMS, Settings

REF = "#/components/schemas/{model}"


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """Every error the gateway answers: an OpenAI error object."""

    error: ErrorBody


class AnswerMessage(BaseModel):
    role: str
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class Choice(BaseModel):
    index: int
    message: AnswerMessage
    finish_reason: str | None = None
    logprobs: Any = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int | None = None
    total_tokens: int


class ChatCompletion(BaseModel):
    """A whole answer; `id` is the completion id that POST /v1/feedback takes."""

    id: str = Field(description="The completion id: what POST /v1/feedback takes.")
    object: str
    created: int
    model: str = Field(description="The name the request asked for.")
    choices: list[Choice]
    usage: Usage | None = None


class Delta(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: Any = None


class ChatCompletionChunk(BaseModel):
    """One event of a streamed answer; the last one before `[DONE]` carries `usage` when asked for."""

    id: str = Field(description="The completion id, the same in every chunk.")
    object: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class Status(BaseModel):
    status: str


class ReadyStatus(BaseModel):
    status: str
    aliases: dict[str, str] = Field(description="alias -> the engine model that answers it now")


class AdapterVersionPublic(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    kind: str
    style: str | None = None
    state: str
    parent: str | None = None
    path: str | None = None
    snapshot_hash: str | None = None
    metrics: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None
    error: str | None = None
    created_at: str | None = None


class AdapterList(BaseModel):
    adapters: list[AdapterVersionPublic]
    aliases: dict[str, str]


class AliasChange(BaseModel):
    change: str
    previous: str | None = None
    prod: str | None = None
    aliases: dict[str, str]


class Reload(BaseModel):
    aliases: dict[str, str]
    last_error: str | None = None


def json_body(component: str) -> dict[str, Any]:
    """`openapi_extra` of a route that reads its JSON body itself: the body is `component`."""
    schema = {"$ref": REF.format(model=component)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


# One server-sent event of a stream (OpenAPI before 3.2: the schema describes each event):
# a chunk, an error object when the engine broke off, or the closing `[DONE]`.
EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
    {"const": "[DONE]"},
    {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
        {"$ref": REF.format(model="ChatCompletionChunk")}, {"$ref": REF.format(model="ErrorResponse")}]}}]}}}
CHAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": ChatCompletion, "description": "The answer; a stream of `chat.completion.chunk` events when "
          "`stream` is true", "content": {"text/event-stream": {"schema": EVENT}}},
}
TEXT = {"text/plain": {"schema": {"type": "string"}}}
OTHER_ROUTES: dict[tuple[str, str], dict[int, Any]] = {  # (path, method) -> status -> model or content
    ("/health", "get"): {200: Status},
    ("/ready", "get"): {200: ReadyStatus},
    ("/metrics", "get"): {200: TEXT},
    ("/admin/adapters", "get"): {200: AdapterList},
    ("/admin/adapters/{version}/promote", "post"): {200: AliasChange},
    ("/admin/adapters/rollback", "post"): {200: AliasChange},
    ("/admin/reload", "post"): {200: Reload},
}


def describe(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The OpenAPI document of `app` under `settings` (built once, then cached on the app)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                      description="OpenAI-compatible chat gateway with feedback (tunewheel).")
    extra = [ErrorResponse, ChatCompletionChunk, ChatCompletionRequest, FeedbackCreate, *{m for r in OTHER_ROUTES.values()
                                                                    for m in r.values() if isinstance(m, type)}]
    _, defs = models_json_schema([(m, "validation") for m in extra], ref_template=REF)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(defs["$defs"])
    for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 shape; ours is ErrorResponse
        schemas.pop(unused, None)
    _narrow_chat_request(schemas["ChatCompletionRequest"], settings)
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            _describe_operation(path, method, operation, settings)
    doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                       "description": "An API key (`serve.keys`)."}}
    app.openapi_schema = doc
    return doc


def _describe_operation(path: str, method: str, operation: dict[str, Any], settings: Settings) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)  # FastAPI's own validation shape: ours is the error object below
    for status, what in OTHER_ROUTES.get((path, method), {}).items():
        schema = {"$ref": REF.format(model=getattr(what, "__name__", ""))}
        content = what if isinstance(what, dict) else {"application/json": {"schema": schema}}
        responses[str(status)] = {"description": "OK", "content": content}
    error = {"application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}}
    responses.setdefault("4XX", {"description": "Refused: an OpenAI error object", "content": error})
    responses.setdefault("5XX", {"description": "Failed or not ready (503 with Retry-After)", "content": error})
    keyed = (path.startswith("/admin/") or (path.startswith("/v1/") and bool(settings.serve.key_scopes()))
             or (path == "/metrics" and settings.serve.metrics_need_key))
    if keyed:
        operation["security"] = [{"bearer": []}]


def _narrow_chat_request(schema: dict[str, Any], settings: Settings) -> None:
    """The chat request as this gateway's `[serve.limits]` accept it."""
    limits = settings.serve.limits
    props = schema["properties"]
    for name in [p for p in props if p in ENGINE_PARAMS and p not in limits.engine_params]:
        del props[name]
    for name in limits.engine_params:
        props.setdefault(name, {"description": "A vLLM parameter, passed through (serve.limits.engine_params)."})
    schema["additionalProperties"] = False
    _limit(props["max_tokens"], maximum=limits.max_tokens)
    _limit(props["max_completion_tokens"], maximum=limits.max_tokens)
    _limit(props["n"], maximum=limits.max_n)
    props["messages"]["maxItems"] = limits.max_messages
    props["stop"] = {"anyOf": [{"type": "string", "maxLength": limits.max_stop_chars},
                               {"type": "array", "maxItems": limits.max_stop,
                                "items": {"type": "string", "maxLength": limits.max_stop_chars}},
                               {"type": "null"}]}
    if "stop_token_ids" in props:
        _limit(props["stop_token_ids"], maxItems=limits.max_stop)
    _limit(props["logit_bias"], maxProperties=limits.max_logit_bias, propertyNames={"pattern": "^[0-9]{1,10}$"},
           additionalProperties={"type": "number", "minimum": -100, "maximum": 100})
    assert OPENAI_FIELDS <= set(props), "every OpenAI field the gateway accepts is documented"


def _limit(prop: dict[str, Any], **constraints: Any) -> None:
    """Add `constraints` to the non-null branch of an optional property."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") != "null":
            branch.update(constraints)
