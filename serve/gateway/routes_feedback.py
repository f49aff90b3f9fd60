"""The feedback route: a thumbs up or down on a completion id, and the answer the user wanted.

    POST /v1/feedback   {"completion_id": "chatcmpl-...", "rating": "up"|"down", "comment"?: str,
                         "correction"?: str} -> 201

    curl -s localhost:8000/v1/feedback -H 'Content-Type: application/json' \
         -d '{"completion_id":"chatcmpl-...","rating":"down","correction":"Paris."}'

A correction (any rating) becomes that turn's SFT target and the chosen side of a preference
pair against the model's answer (feedback/curate.py); a later rating without one withdraws it.
With `[store] scrub_at_write` the correction and comment are scrubbed of PII before they are
stored, as the turns are.

A rating may arrive right after its answer, before the turn writer has stored the turn, so it
waits for that turn (up to FEEDBACK_WAIT_S). Unknown id: 404. A completion answered for
another API key: 403, unless the caller holds an admin key. Counted by the version that
answered (`tunewheel_feedback_total`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlmodel import Session

from feedback.models import FeedbackCreate, FeedbackPublic, Turn
from feedback.queries import record_feedback
from serve import metrics
from serve.gateway.auth import Caller
from serve.gateway.deps import CallerDep, GatewayDep
from serve.gateway.protocol import APIError, read_json, validation_error

FEEDBACK_WAIT_S = 10.0  # how long a rating waits for its turn to reach the database

router = APIRouter(tags=["feedback"])


@router.post("/v1/feedback", status_code=201)
async def feedback(request: Request, gateway: GatewayDep, caller: CallerDep) -> JSONResponse:
    try:
        rating = FeedbackCreate.model_validate(await read_json(request, gateway.settings.serve.max_request_bytes))
    except ValidationError as exc:
        raise validation_error(exc) from exc
    await gateway.writer.wait_written(rating.completion_id, FEEDBACK_WAIT_S)
    if gateway.settings.store.scrub_at_write:
        rating = await asyncio.to_thread(scrubbed, rating)
    try:
        record, version = await asyncio.to_thread(store_rating, gateway.db, rating, caller)
    except LookupError as exc:
        raise APIError(404, f"no completion with id {rating.completion_id!r}", type="not_found_error",
                       code="completion_not_found", param="completion_id") from exc
    except PermissionError as exc:
        raise APIError(403, "this completion was answered for another API key", type="permission_error",
                       code="forbidden", param="completion_id") from exc
    metrics.FEEDBACK.labels(version=version, rating=rating.rating).inc()
    return JSONResponse(record, status_code=201)


def scrubbed(rating: FeedbackCreate) -> FeedbackCreate:
    """The rating with PII scrubbed from its comment and correction ([store] scrub_at_write)."""
    from feedback.pii import scrub_text

    return rating.model_copy(update={name: scrub_text(text) for name in ("comment", "correction")
                                     if (text := getattr(rating, name)) is not None})


def store_rating(db, rating: FeedbackCreate, caller: Caller) -> tuple[dict[str, Any], str]:
    """Store one rating; (the 201 body, the version that answered). LookupError / PermissionError."""
    with Session(db) as session:
        fb = record_feedback(session, turn_id=rating.completion_id, rating=rating.rating, comment=rating.comment,
                             correction=rating.correction, key_hash=caller.key_hash, admin=caller.admin)
        version = session.get(Turn, fb.turn_id).adapter_version
        return FeedbackPublic.of(fb).model_dump(mode="json"), version
