"""The held-out side of curation: which conversations are held out, the evaluation items they
give, and whether an operator controls that set.

    split = Split(fraction=0.1, salt=store_secret(db, "heldout_salt"), trusted_keys={"<sha256 hex>"})
    split.held(conversation_id, key_hash)          # True: the conversation is held out
    item = heldout_item(turns, scrub=memo.text)    # the learner's held-out format, or None
    trust(config, items=12)                        # {"trusted": True, "why": "..."}: the manifest's verdict

Nobody outside the server can choose what is held out: the split is a keyed hash (HMAC-SHA256)
of the conversation id with a secret salt the store makes once (feedback/queries.py
`store_secret`), so a caller who picks its own `x-conversation-id` still cannot tell or choose
which side it lands on. With `learn.trusted_keys` set, only those keys' conversations are held
out (the others all train), and the set they give is operator-controlled.

A held-out item's gold answers are only the model's own up-rated answers and explicit
corrections, never an assistant message a client sent as context: an item is the run of a
conversation's turns from its first, each asked with no history but the earlier turns of this
run (system + one user message per earlier turn and their answers) and each answered by the
model and rated up (or corrected). The run stops at the first turn that is not.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from feedback.conversations import text_of
from feedback.coqa import SYSTEM_PROMPT

STORY_PREFIX = SYSTEM_PROMPT.split("{story}")[0]


def get(row: Any, name: str, default: Any = None) -> Any:
    """A field of a plain dict row (curation's input, feedback/queries.py `iter_log`) or of a Turn."""
    try:
        return row.get(name, default)
    except AttributeError:
        return getattr(row, name, default)


def target_answer(turn: Any) -> str:
    """What the chat model said: the raw answer when a restyler rewrote it, else the answer."""
    raw = get(turn, "raw_answer")
    return text_of(raw if get(turn, "style") and raw else get(turn, "answer"))


def correction_of(turn: Any) -> str | None:
    """The turn's correction (the answer its user wanted), or None."""
    text = get(turn, "correction")
    return text if isinstance(text, str) and text.strip() else None


def gold_answer(turn: Any) -> str | None:
    """The answer a turn may be scored or trained against: its correction, else the model's own
    answer when it was rated up; None for anything else (and for a turn that did not complete)."""
    if get(turn, "status", "ok") != "ok":
        return None
    correction = correction_of(turn)
    if correction is not None:
        return correction
    answer = target_answer(turn)
    return answer if get(turn, "rating") == "up" and answer.strip() else None


def is_heldout(conversation_id: str, fraction: float, salt: str = "") -> bool:
    """Deterministic for one salt: the same conversation always lands on the same side."""
    h = hmac.new(salt.encode(), str(conversation_id).encode(), hashlib.sha256).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


@dataclass
class Split:
    """Which conversations are held out: a `fraction` of them, chosen by a keyed hash, from the
    trusted keys only when any are named."""

    fraction: float
    salt: str = ""
    trusted_keys: frozenset[str] = field(default_factory=frozenset)

    def held(self, conversation_id: str, key_hash: str | None) -> bool:
        if self.trusted_keys and key_hash not in self.trusted_keys:
            return False
        return is_heldout(conversation_id, self.fraction, self.salt)


def heldout_item(turns: Iterable[Any], *, scrub: Callable[[str], str] = lambda text: text) -> tuple[dict | None, int]:
    """(the learner-format item of a held-out conversation without its id, or None; how many of
    its turns were left out because they had no trusted gold answer or history)."""
    turns = sorted(turns, key=lambda t: get(t, "seq", 0))
    first = (get(turns[0], "request_messages") or []) if turns else []
    if not first or first[0].get("role") != "system":
        return None, len(turns)  # the learner prompts every item with a story
    story = text_of(first[0].get("content"))
    out = []
    for j, turn in enumerate(turns):
        request = get(turn, "request_messages") or []
        gold = gold_answer(turn)
        if (gold is None or len(request) != 2 * j + 2 or request[-1].get("role") != "user"
                or text_of(request[0].get("content")) != story):
            break
        out.append({"question": scrub(text_of(request[-1].get("content"))), "answers": [scrub(gold)]})
    if not out:
        return None, len(turns)
    return {"source": "log", "story": scrub(story.removeprefix(STORY_PREFIX)), "turns": out}, len(turns) - len(out)


def item_messages(item: dict) -> list[dict]:
    """An item as the chat the learner scores it with (system, then each question and gold answer)."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT.format(story=item["story"])}]
    for turn in item["turns"]:
        messages += [{"role": "user", "content": turn["question"]}, {"role": "assistant", "content": turn["answers"][0]}]
    return messages


def trust(*, operator_file: str | None, trusted_keys: Iterable[str], items: int) -> dict:
    """The manifest's `heldout` verdict: is the held-out set operator-controlled, and why (not)."""
    if operator_file:
        return {"trusted": True, "why": f"learn.heldout_file ({operator_file}): the operator's own set"}
    if not list(trusted_keys):
        return {"trusted": False, "why": "the held-out items come from any caller's conversations, so callers "
                                         "could shape the gate: set learn.heldout_file or learn.trusted_keys"}
    if items == 0:
        return {"trusted": False, "why": "no conversation of learn.trusted_keys was held out with a trusted gold "
                                         "answer (an up-rated model answer or a correction)"}
    return {"trusted": True, "why": f"{items} item(s) from conversations of learn.trusted_keys; gold answers are "
                                    "up-rated model answers and corrections only"}
