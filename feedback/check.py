"""The one validator of training data: `data check`, curation, snapshots' seed files and the
trainer all accept and refuse the same examples, with the same line-numbered messages. Three
formats: chat JSONL (SFT), KTO rows and DPO pairs (TRL's preference formats).

    tunewheel data check train.jsonl [--max-tokens 384] [--format auto|chat|kto|dpo]
    report = check_file("train.jsonl", max_tokens=384, count_tokens=load_token_counter(model_dir))
    report.problem_lines()                       # ["train.jsonl:3: not valid JSON (...)", ...]
    examples = read_examples("train.jsonl", max_tokens=384, count_tokens=counter)   # the trainer
        # -> every example's messages, or ChatDataError whose message is exactly those lines
    rows = read_preferences("preferences.jsonl", kind="kto", max_tokens=384, count_tokens=counter)

The rules are those of fine-tuning APIs (OpenAI, Together): one JSON object per line with
`messages`, a list of `{"role", "content"}` where role is system|user|assistant, a system
message only first, then user and assistant alternating (starting with user) and ending with
assistant, no empty content, and the whole example (chat template included) within the token
limit. Assistant messages may carry OpenAI's optional `"weight": 0|1` (0: context only, not a
training target).

Preference rows share the rules for their `prompt` (the messages before the answer, ending with
a user message): KTO rows `{"prompt": [...], "completion": [{"role": "assistant", ...}],
"label": true|false}` (unpaired: a desirable or undesirable answer), DPO rows `{"prompt": [...],
"chosen": [{...}], "rejected": [{...}]}` (two different answers, the chosen one preferred). A
row's length is its prompt plus its longest answer. Any line may carry a `meta` object
`{"key": <sha256 hex or null>, "rating": "up"|"down"|null, "source": one of SOURCES}` (what a
snapshot records about where the row came from). Every problem is reported with its 1-based
line number; the file is read as a stream and tokens are counted in batches.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feedback.tokens import TokenCounter, load_token_counter  # noqa: F401  (one import for every reader of training data)

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = {"role", "content", "name", "weight"}
TOKEN_BATCH = 512
FORMATS = ("chat", "kto", "dpo")
META_KEYS = {"key", "rating", "source"}
SOURCES = ("rated", "corrected", "seed", "replay", "pair")
_HEX64 = re.compile(r"[0-9a-f]{64}")



def validate_messages(messages: object) -> list[str]:
    """Every format problem of one example's `messages` (empty list when it is fine)."""
    problems = _conversation_problems(messages, "messages")
    if problems or not messages:
        return problems
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") != "assistant":
        problems.append("the last message must be from the assistant")
    if isinstance(last, dict) and last.get("weight") == 0:
        problems.append("the last assistant message has weight 0: the example has no target")
    return problems


def _conversation_problems(messages: object, name: str) -> list[str]:
    """What is wrong with a list of messages in the chat rules, whatever its last message."""
    if not isinstance(messages, list):
        return [f"`{name}` must be a list"]
    if not messages:
        return [f"`{name}` is empty"]
    problems: list[str] = []
    expected = "user"
    for i, m in enumerate(messages):
        where = f"message {i}"
        if not isinstance(m, dict):
            problems.append(f"{where} is not an object")
            continue
        role, content = m.get("role"), m.get("content")
        unknown = set(m) - MESSAGE_KEYS
        if unknown:
            problems.append(f"{where} has unknown keys {sorted(unknown)}")
        if role not in ROLES:
            problems.append(f"{where} has role {role!r}; expected one of {', '.join(ROLES)}")
            continue
        if not isinstance(content, str):
            problems.append(f"{where} ({role}) content must be a string")
        elif not content.strip():
            problems.append(f"{where} ({role}) has empty content")
        if "weight" in m and (role != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool)):
            problems.append(f"{where}: `weight` is allowed only on assistant messages and must be 0 or 1")
        if role == "system":
            if i != 0:
                problems.append(f"{where}: a system message may only come first")
            continue
        if role != expected:
            problems.append(f"{where} is {role} but {expected} was expected (user and assistant must alternate)")
        expected = "assistant" if role == "user" else "user"
    return problems


def validate_prompt(prompt: object) -> list[str]:
    """Every problem of a preference row's `prompt`: chat messages that end with a user message."""
    problems = [p.replace("message ", "prompt message ", 1) if p.startswith("message ") else p
                for p in _conversation_problems(prompt, "prompt")]
    if not problems and prompt[-1].get("role") != "user":
        problems.append("the prompt must end with a user message")
    return problems


def _answer_problems(answer: object, name: str) -> list[str]:
    if (not isinstance(answer, list) or len(answer) != 1 or not isinstance(answer[0], dict)
            or answer[0].get("role") != "assistant"):
        return [f"`{name}` must be a list holding one assistant message"]
    content = answer[0].get("content")
    unknown = set(answer[0]) - {"role", "content"}
    if unknown:
        return [f"`{name}` message has unknown keys {sorted(unknown)}"]
    if not isinstance(content, str) or not content.strip():
        return [f"`{name}` has no answer text"]
    return []


def validate_row(obj: dict, fmt: str, *, prompt_checked: bool = False) -> list[str]:
    """Every problem of one parsed line of format `fmt` (chat, kto or dpo), its `meta` included
    (`prompt_checked`: the caller already validated this preference row's prompt)."""
    if fmt == "chat":
        problems = ["missing `messages`"] if "messages" not in obj else validate_messages(obj["messages"])
    elif prompt_checked:
        problems = []
    else:
        problems = ["missing `prompt`"] if "prompt" not in obj else validate_prompt(obj["prompt"])
        answers = ("completion",) if fmt == "kto" else ("chosen", "rejected")
        for name in answers:
            problems += [f"missing `{name}`"] if name not in obj else _answer_problems(obj[name], name)
        if fmt == "kto" and not isinstance(obj.get("label"), bool):
            problems.append("`label` must be true (a desirable answer) or false (an undesirable one)")
        if fmt == "dpo" and not problems and obj["chosen"][0]["content"].strip() == obj["rejected"][0]["content"].strip():
            problems.append("`chosen` and `rejected` are the same answer")
    if "meta" in obj:
        problems += validate_meta(obj["meta"])
    return problems


def validate_meta(meta: object) -> list[str]:
    """Problems of a line's `meta`: {"key": sha256 hex or null, "rating": up|down|null, "source"}."""
    if not isinstance(meta, dict):
        return ["`meta` must be an object"]
    problems = [f"`meta` has unknown keys {sorted(set(meta) - META_KEYS)}"] if set(meta) - META_KEYS else []
    key = meta.get("key")
    if key is not None and not (isinstance(key, str) and _HEX64.fullmatch(key)):
        problems.append("`meta.key` must be a sha256 hex string or null")
    if meta.get("rating") not in ("up", "down", None):
        problems.append("`meta.rating` must be up, down or null")
    if meta.get("source") not in SOURCES:
        problems.append(f"`meta.source` must be one of {', '.join(SOURCES)}")
    return problems


def token_sequences(obj: dict, fmt: str) -> list[list[dict]]:
    """The message lists whose token counts make a row's length (the longest of them counts)."""
    if fmt == "chat":
        return [obj["messages"]]
    if fmt == "kto":
        return [obj["prompt"] + obj["completion"]]
    return [obj["prompt"] + obj["chosen"], obj["prompt"] + obj["rejected"]]


@dataclass
class Problem:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"

    def at(self, path: str | Path) -> str:
        """The problem as `data check` prints it: `path:line: message`."""
        return f"{path}:{self.line}: {self.message}"


def too_long(tokens: int, limit: int) -> str:
    """The one wording of an example over the token limit (data check, seed files)."""
    return f"{tokens} tokens, more than the limit of {limit}"


@dataclass
class CheckReport:
    """What `data check` found: problems by line and a summary of the good examples."""

    path: str
    format: str = "chat"
    lines: int = 0
    examples: int = 0
    bad_lines: int = 0
    messages: int = 0
    assistant_turns: int = 0
    desirable: int = 0  # KTO rows labelled true
    tokens: int = 0
    max_example_tokens: int = 0
    max_tokens: int | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        tokens = f", {self.tokens} tokens (longest {self.max_example_tokens})" if self.max_tokens else ""
        verdict = "OK" if self.ok else f"{self.bad_lines} bad line(s)"
        if self.format == "chat":
            what = f"{self.examples} valid example(s), {self.messages} messages, {self.assistant_turns} assistant turns"
        elif self.format == "kto":
            what = f"{self.examples} valid KTO row(s), {self.desirable} desirable, {self.examples - self.desirable} undesirable"
        else:
            what = f"{self.examples} valid DPO pair(s)"
        return f"{self.path}: {what}{tokens}; {verdict}"

    def problem_lines(self) -> list[str]:
        """Every problem as `path:line: message`, in line order: what `data check` prints."""
        return [p.at(self.path) for p in self.problems]

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "problems"}
        d["ok"] = self.ok
        d["problems"] = [{"line": p.line, "message": p.message} for p in self.problems]
        return d

    def _count(self, obj: dict, tokens: int) -> None:
        self.examples += 1
        self.tokens += tokens
        self.max_example_tokens = max(self.max_example_tokens, tokens)
        if self.format == "chat":
            self.messages += len(obj["messages"])
            self.assistant_turns += sum(1 for m in obj["messages"] if m["role"] == "assistant")
        else:
            self.messages += len(obj["prompt"]) + (1 if self.format == "kto" else 2)
            self.assistant_turns += 1 if self.format == "kto" else 2
            self.desirable += self.format == "kto" and obj["label"]


def parse_row(text: str, fmt: str = "chat") -> tuple[dict | None, list[str]]:
    """One JSONL line of format `fmt` -> (the row, when valid; its problems)."""
    if not text.strip():
        return None, ["empty line"]
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, [f"not valid JSON ({exc.msg} at column {exc.colno})"]
    if not isinstance(obj, dict):
        return None, ["a line must be a JSON object"]
    problems = validate_row(obj, fmt)
    return (obj if not problems else None), problems


def parse_line(text: str) -> tuple[list | None, list[str]]:
    """One chat JSONL line -> (messages, problems)."""
    obj, problems = parse_row(text, "chat")
    return (obj["messages"] if obj is not None else None), problems


def iter_valid_rows(lines: Iterable[str], on_problem: Callable[[Problem], None], fmt: str = "chat") -> Iterator[tuple[int, dict]]:
    """(line number, row) of every valid line of format `fmt`; problems go to `on_problem`."""
    for lineno, text in enumerate(lines, 1):
        obj, problems = parse_row(text, fmt)
        for p in problems:
            on_problem(Problem(lineno, p))
        if obj is not None:
            yield lineno, obj


def iter_valid_examples(lines: Iterable[str], on_problem: Callable[[Problem], None]) -> Iterator[tuple[int, list]]:
    """(line number, messages) of every valid chat line; problems go to `on_problem`."""
    for lineno, obj in iter_valid_rows(lines, on_problem, "chat"):
        yield lineno, obj["messages"]


def detect_format(path: str | Path) -> str:
    """chat, kto or dpo, by the keys of the file's first JSON object (chat when none tells)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for text in f:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return "dpo" if "chosen" in obj or "rejected" in obj else "kto" if "completion" in obj or "label" in obj else "chat"
    return "chat"


class ChatDataError(ValueError):
    """A training data file with problems. The message is `report.problem_lines()`, one per line."""

    def __init__(self, report: CheckReport):
        super().__init__("\n".join(report.problem_lines()))
        self.report = report


def within_limit(examples: Iterable[tuple[Any, Any]], *, max_tokens: int | None, count_tokens: TokenCounter | None,
                 on_too_long: Callable[[Any, int], None], batch: int = TOKEN_BATCH,
                 sequences: Callable[[Any], list[list[dict]]] = lambda messages: [messages]) -> Iterator[tuple[Any, Any, int]]:
    """(key, item, tokens) of each example within `max_tokens`; `on_too_long(key, tokens)` for
    the others. An item is an example's messages, or anything `sequences` turns into the message
    lists whose longest is its length (a preference row). Without a limit or a counter nothing is
    dropped and every count is 0."""
    limit = max_tokens if count_tokens else None
    pending: list[tuple[Any, Any]] = []

    def flush() -> Iterator[tuple[Any, Any, int]]:
        seqs = [sequences(item) for _, item in pending]
        flat = count_tokens([s for group in seqs for s in group]) if limit else []
        at = 0
        for (key, item), group in zip(pending, seqs):
            n = max(flat[at:at + len(group)]) if limit else 0
            at += len(group)
            if limit and n > limit:
                on_too_long(key, n)
            else:
                yield key, item, n
        pending.clear()

    for example in examples:
        pending.append(example)
        if len(pending) >= batch:
            yield from flush()
    yield from flush()


def check_file(path: str | Path, *, max_tokens: int | None = None, count_tokens: TokenCounter | None = None,
               fmt: str = "chat") -> CheckReport:
    """Validate a file of format `fmt` (chat, kto, dpo). Token limits are checked only with both
    `max_tokens` and `count_tokens`."""
    return _scan(path, max_tokens, count_tokens, keep=None, fmt=fmt)


def read_examples(path: str | Path, *, max_tokens: int | None = None, count_tokens: TokenCounter | None = None) -> list[list[dict]]:
    """Every example's messages of a chat JSONL file that `check_file` passes, read in the same
    single pass; ChatDataError (the problems as `data check` prints them) otherwise."""
    return [row["messages"] for row in _read(path, "chat", max_tokens, count_tokens)]


def read_preferences(path: str | Path, *, kind: str, max_tokens: int | None = None,
                     count_tokens: TokenCounter | None = None) -> list[dict]:
    """Every row of a KTO (`kind="kto"`) or DPO (`"dpo"`) file that `check_file` passes, `meta`
    included; ChatDataError (the problems as `data check` prints them) otherwise."""
    if kind not in ("kto", "dpo"):
        raise ValueError(f"kind must be kto or dpo, got {kind!r}")
    return _read(path, kind, max_tokens, count_tokens)


def _read(path, fmt: str, max_tokens: int | None, count_tokens: TokenCounter | None) -> list[dict]:
    rows: list[dict] = []
    report = _scan(path, max_tokens, count_tokens, keep=rows, fmt=fmt)
    if not report.ok:
        raise ChatDataError(report)
    return rows


def _scan(path: str | Path, max_tokens: int | None, count_tokens: TokenCounter | None, keep: list | None,
          fmt: str = "chat") -> CheckReport:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    report = CheckReport(path=str(path), format=fmt, max_tokens=max_tokens if count_tokens else None)
    bad: set[int] = set()

    def problem(p: Problem) -> None:
        report.problems.append(p)
        bad.add(p.line)

    def drop(lineno: int, n: int) -> None:
        problem(Problem(lineno, too_long(n, report.max_tokens)))

    with open(path, encoding="utf-8", errors="replace") as f:
        valid = iter_valid_rows(_counted(f, report), problem, fmt)
        for _, obj, n in within_limit(valid, max_tokens=report.max_tokens, count_tokens=count_tokens, on_too_long=drop,
                                      sequences=lambda obj: token_sequences(obj, fmt)):
            report._count(obj, n)
            if keep is not None:
                keep.append(obj)
    report.problems.sort(key=lambda p: p.line)
    report.bad_lines = len(bad)
    return report


def _counted(f, report: CheckReport) -> Iterator[str]:
    for text in f:
        report.lines += 1
        yield text
