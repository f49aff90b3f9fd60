"""Routes of the OpenAI chat API: chat completions and the model list.

    POST /v1/chat/completions   chat, streamed (SSE) or not; `model` = <alias> | base | chat@<version>
    GET  /v1/models             every name `model` may take (for this caller)

Thin: the body is read once (serve/gateway/protocol.py: JSON only, size, depth, strict values),
checked against the schema (422 naming the field) and against `[serve.limits]`
(serve/gateway/limits.py: 422 naming the field); the rest is `ChatService`
(serve/gateway/chat.py). Both routes need a key with the `chat` scope when keys are configured.
Refusals at this stage are counted like any other. The request and response bodies are in the
OpenAPI document (serve/gateway/openapi.py).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError

from serve.gateway.deps import ChatCallerDep, GatewayDep
from serve.gateway.openapi import CHAT_RESPONSES, ModelList, json_body
from serve.gateway.protocol import APIError, ChatCompletionRequest, model_card, read_json, validation_error
from serve.gateway.relay import rejected

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions", responses=CHAT_RESPONSES, openapi_extra=json_body("ChatCompletionRequest"))
async def chat_completions(request: Request, gateway: GatewayDep, caller: ChatCallerDep) -> Response:
    """An OpenAI chat completion; with `"stream": true` server-sent events ending in `data: [DONE]`."""
    started = time.perf_counter()
    try:
        body = await read_json(request, gateway.settings.serve.max_request_bytes,
                               max_depth=gateway.settings.serve.limits.max_json_depth)
        chat_request = ChatCompletionRequest.model_validate(body, strict=True)
        body = gateway.limits.check_chat(chat_request, body)
    except APIError as exc:
        rejected(exc.status)
        raise
    except ValidationError as exc:
        rejected(422)
        raise validation_error(exc) from exc

    async def disconnected() -> None:  # the body has been read: what comes next is the client leaving
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return await gateway.chat.create(chat_request, body, caller=caller, started=started, disconnected=disconnected,
                                     conversation_id=request.headers.get("x-conversation-id") or None)


@router.get("/v1/models", response_model=ModelList)
async def models(gateway: GatewayDep, caller: ChatCallerDep) -> ModelList:
    """The names `model` may take; pinned versions on trial are listed to operators only."""
    created = int(time.time())
    return ModelList(data=[model_card(n, created) for n in gateway.chat.model_names(caller)])
