"""How a restyler is asked: the one request the gateway, the gate and the bench all send.

    body = rewrite_request(config, "restyler-pirate-v0003", answer, params=None, answer_tokens=usage["completion_tokens"])
    httpx.post(f"{engine}/v1/chat/completions", json=body)

A restyler is asked with exactly the system prompt it was trained with (`style_system_prompt`:
`restyle.system_prompt` plus any style parameters), greedily, and bounded:
- a token cap from the raw answer's length (`max_tokens_ratio` x its tokens + `max_tokens_extra`
  for the style's own words), so a restyler that loops stops soon after the answer's length;
- `frequency_penalty` (OpenAI's, which vLLM applies to the tokens the rewrite has produced so
  far). vLLM's `repetition_penalty` would also count the prompt's tokens, which penalises the
  very copying of names and numbers a restyler must do; the frequency penalty only pushes
  against the rewrite repeating itself (the looping opening seen in undertrained restylers).

The gate scores restylers through this same request, so what it measures is what users get.
"""

from __future__ import annotations

import math
from typing import Any

CHARS_PER_TOKEN = 4  # when the answer's token count is unknown (a logged answer, a corpus text)


def style_system_prompt(base: str, params: dict[str, str] | None) -> str:
    """The restyler's system prompt with style parameters (tone, mood) appended; training and
    serving (a request's `style_params`) both use this one format."""
    if not params:
        return base
    return base + "\n" + "\n".join(f"{k.capitalize()}: {v}" for k, v in sorted(params.items()))


def token_cap(text: str, *, ratio: float, extra: int, answer_tokens: int | None = None) -> int:
    """max_tokens of a rewrite of `text`: its tokens (counted, or estimated from its length) times
    `ratio`, plus `extra` for the style's own words."""
    tokens = answer_tokens if answer_tokens else math.ceil(len(text) / CHARS_PER_TOKEN)
    return max(16, math.ceil(ratio * tokens) + extra)


def rewrite_request(config: Any, version: str, text: str, *, params: dict[str, str] | None = None,
                    answer_tokens: int | None = None, stream: bool = False) -> dict[str, Any]:
    """The chat-completions body that asks `version` to restyle `text`; `config` is the [restyle] section."""
    body: dict[str, Any] = {
        "model": version, "stream": stream, "temperature": 0,
        "max_tokens": token_cap(text, ratio=config.max_tokens_ratio, extra=config.max_tokens_extra,
                                answer_tokens=answer_tokens),
        "messages": [{"role": "system", "content": style_system_prompt(config.system_prompt, params)},
                     {"role": "user", "content": text}],
    }
    if config.frequency_penalty:
        body["frequency_penalty"] = config.frequency_penalty
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body
