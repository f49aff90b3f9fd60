"""The gateway's limits: what one chat request may ask for, and how much a key may send.

    limits = Limits(settings.serve.limits)
    body = limits.check_chat(chat_request, body)      # 422 naming the field; max_tokens filled in
    limits.admit(caller)                              # per-key token bucket: 429 with Retry-After
    with limits.in_flight(caller): ...                # 503 (gateway) / 429 (key) with Retry-After

Every number comes from `[serve.limits]` (serve/settings.py documents each one). The checks
here are the ones the engine cannot do cheaply or safely itself: the length of the answer
(`max_tokens` capped, and filled in when the request names none, because vLLM's own default is
the whole context; `ignore_eos` then runs to that cap at most), the size of the prompt in
characters (the engine counts tokens only after it has tokenized everything), the pass-through
fields that cost work per item (`stop`, `stop_token_ids`, `logit_bias`, guided-decoding
constraints, `n`), and an allowlist of fields: an engine parameter that the operator did not
list is refused rather than forwarded.

Rates use the token bucket of the `token-bucket` package (the Falcon maintainers'): `limits`
and `pyrate-limiter`, the other maintained choices, count requests in fixed, moving or sliding
windows and run timer or leak threads; a token bucket is the algorithm asked for (a sustained
rate plus a burst), it is one float pair per key and needs no thread. Buckets exist only for
keys in config, so memory stays bounded. Per-key limits skip admin keys (operators, and the
learner, which evaluates at full speed); an open gateway has no keys and one local user, so
only the gateway-wide in-flight limit applies there. Counts are per gateway process: with N
replicas a key may send N times the rate.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import token_bucket

from serve.gateway.auth import Caller
from serve.gateway.protocol import GATEWAY_ONLY, OPENAI_FIELDS, APIError, ChatCompletionRequest
from serve.settings import LimitsSettings

GRAMMAR_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                  "structured_outputs")


def too_large(param: str, message: str) -> APIError:
    return APIError(422, f"{param}: {message}", code="limit_exceeded", param=param)


class Limits:
    """The checks and counters of `[serve.limits]` for one gateway process."""

    def __init__(self, config: LimitsSettings):
        self.config = config
        self.allowed = OPENAI_FIELDS | frozenset(GATEWAY_ONLY) | frozenset(config.engine_params)
        self._storage = token_bucket.MemoryStorage()  # read back after a refusal, for Retry-After
        self._bucket = token_bucket.Limiter(config.requests_per_minute / 60, config.burst, self._storage)
        self._flights: Counter[str | None] = Counter()
        self._total = 0

    # --- one request's body ------------------------------------------------------------------
    def check_chat(self, request: ChatCompletionRequest, body: dict[str, Any]) -> dict[str, Any]:
        """`body` within the limits, with max_tokens filled in when it names none; 422 otherwise."""
        c = self.config
        unknown = sorted(set(body) - self.allowed)
        if unknown:
            raise APIError(422, f"{unknown[0]}: not a parameter this gateway passes to the engine (besides the OpenAI "
                           f"fields it allows {', '.join(c.engine_params) or 'none'}: serve.limits.engine_params)",
                           code="unknown_parameter", param=unknown[0])
        cap = self._max_tokens(request)
        if request.max_tokens is None and request.max_completion_tokens is None:
            body = {**body, "max_tokens": c.default_max_tokens}
        if request.n is not None and request.n > c.max_n:
            raise too_large("n", f"{request.n} choices is over the limit of {c.max_n} (serve.limits.max_n)")
        if request.min_tokens is not None and request.min_tokens > cap:
            raise too_large("min_tokens", f"{request.min_tokens} is over the request's max_tokens ({cap})")
        self._check_prompt(request)
        self._check_stops(request)
        self._check_logit_bias(request.logit_bias)
        for field in GRAMMAR_FIELDS:
            if body.get(field) is not None:
                size = len(json.dumps(body[field]).encode())
                if size > c.max_grammar_bytes:
                    raise too_large(field, f"{size} bytes is over the limit of {c.max_grammar_bytes} "
                                    "(serve.limits.max_grammar_bytes)")
        return body

    def _max_tokens(self, request: ChatCompletionRequest) -> int:
        """The answer length the request may reach; 422 past serve.limits.max_tokens."""
        for field in ("max_tokens", "max_completion_tokens"):
            value = getattr(request, field)
            if value is not None and value > self.config.max_tokens:
                raise too_large(field, f"{value} is over the limit of {self.config.max_tokens} (serve.limits.max_tokens)")
        asked = [v for v in (request.max_tokens, request.max_completion_tokens) if v is not None]
        return min(asked) if asked else self.config.default_max_tokens

    def _check_prompt(self, request: ChatCompletionRequest) -> None:
        c = self.config
        if len(request.messages) > c.max_messages:
            raise too_large("messages", f"{len(request.messages)} messages is over the limit of {c.max_messages} "
                            "(serve.limits.max_messages)")
        chars = sum(len(m.text()) for m in request.messages)
        for extra in (request.tools, request.style_params):  # both end up in a prompt
            chars += len(json.dumps(extra)) if extra else 0
        if chars > c.max_prompt_chars:
            raise too_large("messages", f"the prompt has {chars} characters (messages, tools, style_params), over "
                            f"the limit of {c.max_prompt_chars} (serve.limits.max_prompt_chars)")

    def _check_stops(self, request: ChatCompletionRequest) -> None:
        c = self.config
        stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
        if len(stops) > c.max_stop:
            raise too_large("stop", f"{len(stops)} stop sequences is over the limit of {c.max_stop} "
                            "(serve.limits.max_stop)")
        if any(len(s) > c.max_stop_chars for s in stops):
            raise too_large("stop", f"a stop sequence is longer than {c.max_stop_chars} characters "
                            "(serve.limits.max_stop_chars)")
        if request.stop_token_ids is not None and len(request.stop_token_ids) > c.max_stop:
            raise too_large("stop_token_ids", f"{len(request.stop_token_ids)} ids is over the limit of {c.max_stop} "
                            "(serve.limits.max_stop)")

    def _check_logit_bias(self, bias: dict[str, float] | None) -> None:
        if not bias:
            return
        if len(bias) > self.config.max_logit_bias:
            raise too_large("logit_bias", f"{len(bias)} entries is over the limit of {self.config.max_logit_bias} "
                            "(serve.limits.max_logit_bias)")
        for token, value in bias.items():
            if not token.isdigit() or len(token) > 10:
                raise too_large("logit_bias", f"{token[:20]!r} is not a token id")
            if not -100 <= value <= 100:
                raise too_large("logit_bias", f"the bias of token {token} must be in [-100, 100]")

    # --- how much a key sends ----------------------------------------------------------------
    def per_key(self, caller: Caller) -> bool:
        """Whether per-key limits apply: a keyed caller without the admin scope."""
        return caller.key_hash is not None and not caller.admin

    def admit(self, caller: Caller) -> None:
        """Take one token from the caller's bucket; 429 with Retry-After when it is empty."""
        if not self.per_key(caller) or self._bucket.consume(caller.key_hash):
            return
        rate = self.config.requests_per_minute / 60
        wait = (1 - self._storage.get_token_count(caller.key_hash)) / rate
        raise APIError(429, f"rate limit of {self.config.requests_per_minute:g} requests per minute for this key "
                       "(serve.limits.requests_per_minute); retry later", type="rate_limit_error",
                       code="rate_limit_exceeded", headers={"Retry-After": str(max(1, math.ceil(wait)))})

    @contextmanager
    def in_flight(self, caller: Caller) -> Iterator[None]:
        """Hold one of the gateway's and the key's in-flight places for the block."""
        c = self.config
        key = caller.key_hash if self.per_key(caller) else None
        if self._total >= c.max_in_flight:
            raise APIError(503, f"the gateway is answering {c.max_in_flight} requests already "
                           "(serve.limits.max_in_flight); retry shortly", type="service_unavailable",
                           code="server_busy", headers={"Retry-After": "1"})
        if key is not None and self._flights[key] >= c.max_in_flight_per_key:
            raise APIError(429, f"this key has {c.max_in_flight_per_key} requests in flight already "
                           "(serve.limits.max_in_flight_per_key)", type="rate_limit_error",
                           code="too_many_requests_in_flight", headers={"Retry-After": "1"})
        self._total += 1
        self._flights[key] += 1
        try:
            yield
        finally:
            self._total -= 1
            self._flights[key] -= 1
            if self._flights[key] <= 0:
                del self._flights[key]
