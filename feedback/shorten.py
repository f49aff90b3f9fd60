"""Rows over the token limit cut to their last turns instead of dropped.

    for key, row in fitting(keyed_rows, max_tokens=384, count_tokens=count, on_too_long=drop, on_shortened=count_cut):
        write(row)

A long conversation's late turn is worth keeping: its target (an up-rated answer, a correction)
is a turn like any other, and what makes it long is the history before it. A row over the
limit loses its oldest exchange (a user message and what followed it), its system messages (a
story, say) and last user turn kept, and is counted again, until it fits; only a row that
cannot be cut any further is too long. Works for every kind of row whose messages are in
`messages` (SFT) or `prompt` (KTO, DPO); feedback/check.py `within_limit` does the counting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from feedback.check import TOKEN_BATCH, TokenCounter, within_limit


def drop_oldest_exchange(messages: list[dict]) -> list[dict] | None:
    """`messages` without its oldest exchange (the first user message after the system messages
    and everything up to the next user message), or None when only the last user turn is left."""
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if len(users) < 2:
        return None
    return messages[:users[0]] + messages[users[1]:]


def shorter(row: dict) -> dict | None:
    """The row with its oldest exchange dropped (an SFT example keeps its target last), or None
    when nothing is left to drop."""
    name = "messages" if "messages" in row else "prompt" if "prompt" in row else None
    cut = drop_oldest_exchange(row[name]) if name else None
    return None if cut is None else {**row, name: cut}


def fitting(keyed: Iterable[tuple[Any, dict]], *, max_tokens: int | None, count_tokens: TokenCounter | None,
            on_too_long: Callable[[Any, int], None], on_shortened: Callable[[Any], None],
            keep_whole: Callable[[Any], bool] = lambda key: False, batch: int = TOKEN_BATCH,
            sequences: Callable[[dict], list[list[dict]]] = lambda row: [row["messages"]]) -> Iterator[tuple[Any, dict]]:
    """(key, row) of each row within `max_tokens`, cut to its last turns where it had to be
    (`on_shortened(key)` once per row that was); `on_too_long(key, tokens)` for a row that cannot
    be cut to fit, or that `keep_whole(key)` says must not be cut."""
    pending: Iterable = (((key, False, row), row) for key, row in keyed)  # ((key, cut yet, row), row)
    while pending:
        retry: list = []

        def over(tagged: tuple, n: int) -> None:
            key, _, row = tagged
            cut = None if keep_whole(key) else shorter(row)
            if cut is None:
                on_too_long(key, n)
            else:
                retry.append(((key, True, cut), cut))
        for (key, was_cut, _), row, _ in within_limit(pending, max_tokens=max_tokens, count_tokens=count_tokens,
                                                      on_too_long=over, batch=batch, sequences=sequences):
            if was_cut:
                on_shortened(key)
            yield key, row
        pending = retry
