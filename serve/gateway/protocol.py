"""Request models, body reading and error shapes of the gateway's OpenAI-compatible API.

    body = await read_json(request, limit=settings.serve.max_request_bytes)   # 413 / 400
    ChatCompletionRequest.model_validate(body)   # raises pydantic.ValidationError -> 422
    raise APIError(404, "...", type="not_found_error", code="model_not_found")

The gateway validates what it must understand itself (model, messages, stream options) and
passes every other field through to vLLM unchanged (`extra="allow"`), so vLLM's own sampling
extensions (`ignore_eos`, `min_tokens`, `top_k`, ...) keep working. Errors leave the gateway
as OpenAI error objects, `{"error": {"message", "type", "param", "code"}}`, which the official
`openai` client turns into its typed exceptions.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import orjson
from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

class APIError(Exception):
    """An error the gateway answers with; rendered as an OpenAI error object by the app."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | int | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def not_ready(reason: str = "the engine is not ready yet", retry_after: int = 5) -> APIError:
    return APIError(503, f"{reason}; retry in a few seconds", type="service_unavailable", code="engine_not_ready",
                    headers={"Retry-After": str(retry_after)})


def validation_error(exc: ValidationError) -> APIError:
    """422 whose message names every field at fault, e.g. `messages.0.role: Input should be ...`."""
    problems = []
    first_param = None
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        first_param = first_param or loc or None
        problems.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return APIError(422, "; ".join(problems), code="invalid_value", param=first_param)


JSON_DEPTH = 32  # default nesting limit of a body (serve.limits.max_json_depth)


async def read_json(request: Request, limit: int, *, max_depth: int = JSON_DEPTH) -> dict[str, Any]:
    """The request body as a JSON object, read once, here, for every route: 415 unless it is sent
    as JSON (a browser's cross-site form or no-cors fetch cannot send `application/json`), 413 past
    `limit` bytes (whether or not the client sent Content-Length), 400 when it is not strict JSON
    (NaN and Infinity are not JSON) or not an object, nests deeper than `max_depth` or holds a
    lone surrogate, 422 naming the field when a string holds a NUL character (no store keeps it)."""
    if not is_json(request.headers.get("content-type")):
        raise APIError(415, "send the body as JSON with `Content-Type: application/json`", code="unsupported_media_type")
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
    raw = b"".join(chunks)
    try:  # orjson for the bodies it takes; anything it refuses gets the stdlib's exact verdict and message
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = _strict_loads(raw, max_depth)
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    check_values(body, max_depth)
    return body


def _strict_loads(raw: bytes, max_depth: int) -> Any:
    """The stdlib's parse: NaN and Infinity refused, lone surrogates kept for `check_values` to name."""
    try:
        return json.loads(raw, parse_constant=_not_json)
    except RecursionError as exc:
        raise APIError(400, f"the body nests deeper than {max_depth} levels (serve.limits.max_json_depth)",
                       code="invalid_json") from exc
    except ValueError as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from exc


def json_response(data: dict[str, Any], *, headers: dict[str, str] | None = None) -> Response:
    """`JSONResponse(data)` encoded by orjson: the same compact UTF-8 bytes, several times faster."""
    return Response(orjson.dumps(data), media_type="application/json", headers=headers)


def is_json(content_type: str | None) -> bool:
    """`application/json` or any `+json` type, with or without parameters (charset)."""
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value (send a number, or null)")


def check_values(body: Any, max_depth: int) -> None:
    """Walk a parsed body: 400 past `max_depth` levels or at a lone surrogate (it cannot be encoded
    to UTF-8, for the engine or the store), 422 at a NUL character; the error names the field."""
    stack: list[tuple[Any, tuple, int]] = [(body, (), 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > max_depth:
                raise APIError(400, f"the body nests deeper than {max_depth} levels at {_dotted(path)} "
                               "(serve.limits.max_json_depth)", code="invalid_json", param=_dotted(path))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key, path)
                stack.append((item, (*path, key), depth + 1))
        elif isinstance(value, str):
            _check_text(value, path)


def _check_text(text: str, path: tuple) -> None:
    where = _dotted(path) or None
    if "\x00" in text:
        raise APIError(422, f"{where or 'a key'}: NUL characters are not accepted", code="invalid_value", param=where)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise APIError(400, f"{where or 'a key'}: a lone surrogate (\\u{ord(text[exc.start]):04x}) is not valid "
                           "Unicode", code="invalid_json", param=where) from None


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def upstream_error(status: int, content: bytes) -> APIError:
    """An engine error answer as an OpenAI error object with the engine's status."""
    try:
        body = json.loads(content)
        err = body.get("error", body) if isinstance(body, dict) else {}
        if not isinstance(err, dict):
            err = {"message": str(err)}
    except ValueError:
        err = {}
    message = err.get("message") or content.decode(errors="replace")[:500] or f"engine answered HTTP {status}"
    return APIError(status, str(message), type=str(err.get("type") or "engine_error"), code=err.get("code"), param=err.get("param"))


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str | None = None

    def text(self) -> str:
        content = getattr(self, "content", None)
        if isinstance(content, list):
            return "".join(p.text for p in content)
        return content or ""


class SystemMessage(_Message):
    role: Literal["system"]
    content: str


class UserMessage(_Message):
    role: Literal["user"]
    content: str | list[TextPart]


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _says_something(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs `content` (a string) or `tool_calls`")
        return self


class ToolMessage(_Message):
    role: Literal["tool"]
    content: str
    tool_call_id: str | None = None


ChatMessage = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = None


class ChatCompletionRequest(BaseModel):
    """The OpenAI chat request, with the vLLM sampling extensions that `serve.limits.engine_params`
    allows by default. Sizes are checked against `[serve.limits]` after this schema (limits.py);
    fields this model does not name pass through to vLLM as they came when that list allows them."""

    model_config = ConfigDict(extra="allow")

    model: str = Field("chat", description="An alias (`chat`), `base`, or a pinned version `chat@<version>`.")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, description="At most serve.limits.max_tokens; "
                                   "serve.limits.default_max_tokens when neither this nor max_completion_tokens is sent.")
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: dict[str, float] | None = Field(None, description="Token id -> bias in [-100, 100].")
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = Field(None, max_length=256)
    # vLLM's sampling extensions (vllm.entrypoints.openai.protocol.ChatCompletionRequest)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    length_penalty: float | None = None
    min_tokens: int | None = Field(None, ge=0, description="At most the request's max_tokens.")
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=1)
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    # the gateway's own
    style: str | None = Field(None, min_length=1, max_length=200, description="Restyle the answer into this style.")
    style_params: dict[str, str] | None = Field(None, description="Style parameters (tone, mood) the restyler was trained with.")

    @property
    def wants_usage(self) -> bool:
        """Did the client ask for the final usage chunk of a stream?"""
        return bool(self.stream_options and self.stream_options.include_usage)


# Fields that describe the request rather than how to sample it: not stored as `params`.
NOT_PARAMS = frozenset({"model", "messages", "stream", "stream_options", "user", "style", "style_params"})
# Fields of ours that the engine must not see.
GATEWAY_ONLY = ("style", "style_params")
# The OpenAI chat fields the gateway accepts; vLLM's extensions besides them: serve.limits.engine_params.
OPENAI_FIELDS = frozenset({
    "model", "messages", "stream", "stream_options", "temperature", "top_p", "max_tokens", "max_completion_tokens",
    "stop", "n", "seed", "logprobs", "top_logprobs", "logit_bias", "response_format", "tools", "tool_choice",
    "parallel_tool_calls", "presence_penalty", "frequency_penalty", "user"})


def sampling_params(body: dict[str, Any]) -> dict[str, Any]:
    """The request's sampling parameters as the client sent them, for the turn log."""
    return {k: v for k, v in body.items() if k not in NOT_PARAMS}


def engine_payload(body: dict[str, Any], version: str, *, whole: bool) -> dict[str, Any]:
    """What vLLM gets: the client's body for engine model `version`, without our own fields.
    A stream always asks for usage, so the turn log has token counts. `whole`: ask for the
    answer in one piece whatever the client asked (the restyler needs the whole text)."""
    payload = {k: v for k, v in body.items() if k not in GATEWAY_ONLY}
    payload["model"] = version
    if whole:
        payload["stream"] = False
        payload.pop("stream_options", None)
    elif payload.get("stream"):
        payload["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return payload


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "tunewheel"}
