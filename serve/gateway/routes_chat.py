"""Routes of the OpenAI chat API: chat completions and the model list.

    POST /v1/chat/completions   chat, streamed (SSE) or not; `model` = <alias> | base | chat@<version>
    GET  /v1/models             every name `model` may take

Thin: the body is read once with a size cap (`serve.max_request_bytes`, 413 beyond it), invalid
JSON is 400 and a body that does not fit the schema 422 naming the field at fault; the rest is
`ChatService` (serve/gateway/chat.py). Refusals at this stage are counted like any other.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError

from serve.gateway.deps import CallerDep, GatewayDep
from serve.gateway.protocol import APIError, ChatCompletionRequest, model_card, read_json, validation_error
from serve.gateway.relay import rejected

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, gateway: GatewayDep, caller: CallerDep) -> Response:
    started = time.perf_counter()
    try:
        body = await read_json(request, gateway.settings.serve.max_request_bytes)
        chat_request = ChatCompletionRequest.model_validate(body)
    except APIError as exc:
        rejected(exc.status)
        raise
    except ValidationError as exc:
        rejected(422)
        raise validation_error(exc) from exc
    return await gateway.chat.create(chat_request, body, caller=caller, started=started,
                                     conversation_id=request.headers.get("x-conversation-id") or None)


@router.get("/v1/models")
async def models(gateway: GatewayDep, caller: CallerDep) -> dict[str, Any]:
    created = int(time.time())
    return {"object": "list", "data": [model_card(n, created) for n in gateway.router.model_names()]}
