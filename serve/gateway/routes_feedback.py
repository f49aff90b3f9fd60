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
waits for that turn (up to FEEDBACK_WAIT_S); a turn still in the spool after that (the database
is slow or down) gets 503 with Retry-After. Unknown id: 404. A completion answered for
another API key: 403, unless the caller holds an admin key. The key needs the `feedback`
scope. The body is read like every body (serve/gateway/protocol.py: JSON only, strict, no NUL
characters: 422 naming the field, and nothing is written); each completion keeps at most
`serve.limits.max_feedback_per_completion` ratings of history (409 beyond). Counted by the
version that answered (`tunewheel_feedback_total`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlmodel import Session, func, select

from feedback.models import Feedback, FeedbackCreate, FeedbackPublic, Turn
from feedback.queries import record_feedback
from serve import metrics
from serve.gateway.auth import Caller
from serve.gateway.deps import FeedbackCallerDep, GatewayDep
from serve.gateway.openapi import json_body
from serve.gateway.protocol import APIError, read_json, validation_error

FEEDBACK_WAIT_S = 10.0  # how long a rating waits for its turn to reach the database

router = APIRouter(tags=["feedback"])


class HistoryFull(Exception):
    """The completion has as many ratings as serve.limits.max_feedback_per_completion allows."""


@router.post("/v1/feedback", status_code=201, responses={201: {"model": FeedbackPublic}},
             openapi_extra=json_body("FeedbackCreate"))
async def feedback(request: Request, gateway: GatewayDep, caller: FeedbackCallerDep) -> JSONResponse:
    """Rate an answer by its completion id; rating again replaces the current rating and keeps the history."""
    serve = gateway.settings.serve
    try:
        body = await read_json(request, serve.max_request_bytes, max_depth=serve.limits.max_json_depth)
        rating = FeedbackCreate.model_validate(body, strict=True)  # as the document says: no coercion
    except ValidationError as exc:
        raise validation_error(exc) from exc
    if not await gateway.writer.wait_written(rating.completion_id, FEEDBACK_WAIT_S):
        raise APIError(503, "this completion is answered but not in the turn log's database yet (it is slow or "
                       "down; the turn is safe in the spool); retry shortly", type="service_unavailable",
                       code="turn_not_written_yet", headers={"Retry-After": "5"})
    if gateway.settings.store.scrub_at_write:
        rating = await asyncio.to_thread(scrubbed, rating)
    try:
        record, version = await asyncio.to_thread(store_rating, gateway.db, rating, caller,
                                                  serve.limits.max_feedback_per_completion)
    except LookupError as exc:
        raise APIError(404, f"no completion with id {rating.completion_id!r}", type="not_found_error",
                       code="completion_not_found", param="completion_id") from exc
    except PermissionError as exc:
        raise APIError(403, "this completion was answered for another API key", type="permission_error",
                       code="forbidden", param="completion_id") from exc
    except HistoryFull as exc:
        raise APIError(409, f"this completion has {serve.limits.max_feedback_per_completion} ratings already "
                       "(serve.limits.max_feedback_per_completion)", code="feedback_limit_reached",
                       param="completion_id") from exc
    metrics.FEEDBACK.labels(version=version, rating=rating.rating).inc()
    return JSONResponse(record, status_code=201)


def scrubbed(rating: FeedbackCreate) -> FeedbackCreate:
    """The rating with PII scrubbed from its comment and correction ([store] scrub_at_write)."""
    from feedback.pii import scrub_text

    return rating.model_copy(update={name: scrub_text(text) for name in ("comment", "correction")
                                     if (text := getattr(rating, name)) is not None})


def store_rating(db, rating: FeedbackCreate, caller: Caller, max_history: int) -> tuple[dict[str, Any], str]:
    """Store one rating; (the 201 body, the version that answered). LookupError / PermissionError / HistoryFull."""
    with Session(db) as session:
        kept = session.exec(select(func.count()).select_from(Feedback).where(Feedback.turn_id == rating.completion_id))
        if kept.one() >= max_history:  # the turn exists; refuse a stranger the way record_feedback would first
            owner = session.get(Turn, rating.completion_id).key_hash
            if owner is not None and owner != caller.key_hash and not caller.admin:
                raise PermissionError(rating.completion_id)
            raise HistoryFull(rating.completion_id)
        fb = record_feedback(session, turn_id=rating.completion_id, rating=rating.rating, comment=rating.comment,
                             correction=rating.correction, key_hash=caller.key_hash, admin=caller.admin)
        version = session.get(Turn, fb.turn_id).adapter_version
        return FeedbackPublic.of(fb).model_dump(mode="json"), version
