"""The admin route of `tunewheel data forget`: delete what one key or conversation left, over HTTP.

    POST /admin/forget   {"key": "<sha256 hex>"} | {"conversation": "<id>"} [, "dry_run": true]  -> 200

    curl -X POST -H "Authorization: Bearer $ADMIN_KEY" localhost:8000/admin/forget \\
         -H 'Content-Type: application/json' -d '{"conversation": "support-1"}'

The answer is the deletion record (counts and hashes, no content), the snapshots that held the
target (their data files are gone) and the adapter versions trained on them, which keep serving
until a retrained version is promoted. The work is feedback/forget.py's, in a worker thread.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from feedback.forget import forget
from serve.gateway.auth import Caller
from serve.gateway.deps import GatewayDep, require_admin
from serve.gateway.protocol import read_json, validation_error

router = APIRouter(prefix="/admin", tags=["admin"])


class ForgetRequest(BaseModel):
    """Exactly one of `key` (an API key's sha256 hex, as in serve.api_keys) or `conversation`."""

    model_config = ConfigDict(extra="forbid")

    key: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    conversation: str | None = Field(None, min_length=1, max_length=64)
    dry_run: bool = False

    @model_validator(mode="after")
    def _one(self) -> ForgetRequest:
        if (self.key is None) == (self.conversation is None):
            raise ValueError("give exactly one of `key` (sha256 hex) or `conversation`")
        return self


@router.post("/forget")
async def forget_route(request: Request, gateway: GatewayDep, caller: Annotated[Caller, Depends(require_admin)]) -> dict[str, Any]:
    try:
        body = ForgetRequest.model_validate(await read_json(request, gateway.settings.serve.max_request_bytes))
    except ValidationError as exc:
        raise validation_error(exc) from exc
    result = await asyncio.to_thread(forget, gateway.db, key_hash=body.key, conversation_id=body.conversation,
                                     snapshots=gateway.settings.learn_dirs.snapshots, dry_run=body.dry_run,
                                     requested_by=caller.key_hash)
    out = result.to_dict()
    held = set(out["deletion"]["snapshots"])
    versions = await asyncio.to_thread(gateway.registry.list) if gateway.registry is not None else []
    out["adapters"] = [v.name for v in versions if v.snapshot_hash in held]
    out["message"] = result.describe()
    return out
