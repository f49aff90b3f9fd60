"""The one chat-JSONL validator: `data check`, curation, snapshots' seed files and the trainer
all accept and refuse the same examples, with the same line-numbered messages.

    tunewheel data check train.jsonl [--max-tokens 384]
    report = check_file("train.jsonl", max_tokens=384, count_tokens=load_token_counter(model_dir))
    report.problem_lines()                       # ["train.jsonl:3: not valid JSON (...)", ...]
    examples = read_examples("train.jsonl", max_tokens=384, count_tokens=counter)   # the trainer
        # -> every example's messages, or ChatDataError whose message is exactly those lines

The rules are those of fine-tuning APIs (OpenAI, Together): one JSON object per line with
`messages`, a list of `{"role", "content"}` where role is system|user|assistant, a system
message only first, then user and assistant alternating (starting with user) and ending with
assistant, no empty content, and the whole example (chat template included) within the token
limit. Assistant messages may carry OpenAI's optional `"weight": 0|1` (0: context only, not a
training target). Every problem is reported with its 1-based line number; the file is read as
a stream and tokens are counted in batches.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = {"role", "content", "name", "weight"}
TOKEN_BATCH = 512

# Token counts of whole examples: a batch of message lists -> one count per list.
TokenCounter = Callable[[list[list[dict]]], list[int]]


def validate_messages(messages: object) -> list[str]:
    """Every format problem of one example's `messages` (empty list when it is fine)."""
    if not isinstance(messages, list):
        return ["`messages` must be a list"]
    if not messages:
        return ["`messages` is empty"]
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
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") != "assistant":
        problems.append("the last message must be from the assistant")
    if isinstance(last, dict) and last.get("weight") == 0:
        problems.append("the last assistant message has weight 0: the example has no target")
    return problems


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
    lines: int = 0
    examples: int = 0
    bad_lines: int = 0
    messages: int = 0
    assistant_turns: int = 0
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
        return (f"{self.path}: {self.examples} valid example(s), {self.messages} messages, "
                f"{self.assistant_turns} assistant turns{tokens}; {verdict}")

    def problem_lines(self) -> list[str]:
        """Every problem as `path:line: message`, in line order: what `data check` prints."""
        return [p.at(self.path) for p in self.problems]

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "problems"}
        d["ok"] = self.ok
        d["problems"] = [{"line": p.line, "message": p.message} for p in self.problems]
        return d


def parse_line(text: str) -> tuple[list | None, list[str]]:
    """One JSONL line -> (messages, problems)."""
    if not text.strip():
        return None, ["empty line"]
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, [f"not valid JSON ({exc.msg} at column {exc.colno})"]
    if not isinstance(obj, dict):
        return None, ["a line must be a JSON object"]
    if "messages" not in obj:
        return None, ["missing `messages`"]
    problems = validate_messages(obj["messages"])
    return (obj["messages"] if not problems else None), problems


def iter_valid_examples(lines: Iterable[str], on_problem: Callable[[Problem], None]) -> Iterator[tuple[int, list]]:
    """(line number, messages) of every valid line; problems go to `on_problem`."""
    for lineno, text in enumerate(lines, 1):
        messages, problems = parse_line(text)
        for p in problems:
            on_problem(Problem(lineno, p))
        if messages is not None:
            yield lineno, messages


class ChatDataError(ValueError):
    """A chat JSONL file with problems. The message is `report.problem_lines()`, one per line."""

    def __init__(self, report: CheckReport):
        super().__init__("\n".join(report.problem_lines()))
        self.report = report


def within_limit(examples: Iterable[tuple[Any, list]], *, max_tokens: int | None, count_tokens: TokenCounter | None,
                 on_too_long: Callable[[Any, int], None], batch: int = TOKEN_BATCH) -> Iterator[tuple[Any, list, int]]:
    """(key, messages, tokens) of each example within `max_tokens`; `on_too_long(key, tokens)` for
    the others. Without a limit or a counter nothing is dropped and every count is 0."""
    limit = max_tokens if count_tokens else None
    pending: list[tuple[Any, list]] = []

    def flush() -> Iterator[tuple[Any, list, int]]:
        counts = count_tokens([m for _, m in pending]) if limit else [0] * len(pending)
        for (key, messages), n in zip(pending, counts):
            if limit and n > limit:
                on_too_long(key, n)
            else:
                yield key, messages, n
        pending.clear()

    for example in examples:
        pending.append(example)
        if len(pending) >= batch:
            yield from flush()
    yield from flush()


def check_file(path: str | Path, *, max_tokens: int | None = None, count_tokens: TokenCounter | None = None) -> CheckReport:
    """Validate a chat JSONL file. Token limits are checked only with both `max_tokens` and `count_tokens`."""
    return _scan(path, max_tokens, count_tokens, keep=None)


def read_examples(path: str | Path, *, max_tokens: int | None = None, count_tokens: TokenCounter | None = None) -> list[list[dict]]:
    """Every example's messages of a chat JSONL file that `check_file` passes, read in the same
    single pass; ChatDataError (the problems as `data check` prints them) otherwise."""
    examples: list[list[dict]] = []
    report = _scan(path, max_tokens, count_tokens, keep=examples)
    if not report.ok:
        raise ChatDataError(report)
    return examples


def _scan(path: str | Path, max_tokens: int | None, count_tokens: TokenCounter | None, keep: list | None) -> CheckReport:
    report = CheckReport(path=str(path), max_tokens=max_tokens if count_tokens else None)
    bad: set[int] = set()

    def problem(p: Problem) -> None:
        report.problems.append(p)
        bad.add(p.line)

    def drop(lineno: int, n: int) -> None:
        problem(Problem(lineno, too_long(n, report.max_tokens)))

    with open(path, encoding="utf-8", errors="replace") as f:
        valid = iter_valid_examples(_counted(f, report), problem)
        for _, messages, n in within_limit(valid, max_tokens=report.max_tokens, count_tokens=count_tokens, on_too_long=drop):
            report.examples += 1
            report.messages += len(messages)
            report.assistant_turns += sum(1 for m in messages if m["role"] == "assistant")
            report.tokens += n
            report.max_example_tokens = max(report.max_example_tokens, n)
            if keep is not None:
                keep.append(messages)
    report.problems.sort(key=lambda p: p.line)
    report.bad_lines = len(bad)
    return report


def _counted(f, report: CheckReport) -> Iterator[str]:
    for text in f:
        report.lines += 1
        yield text


def load_token_counter(model_path: str | Path) -> TokenCounter:
    """Token counts with the model's own tokenizer and chat template, batch-encoded for speed.

    Applying the Jinja chat template to every example is slow, so the template's cost is
    measured once: the tokens around a message of each role (they differ: "assistant" is two
    tokens in SmolLM2's vocabulary, "user" one), plus the system message's, or the default
    system prompt the template inserts when an example has none. Contents are then
    batch-encoded and the overheads added; the special tokens around each message keep this
    equal to the templated count (give or take a token where a content starts with whitespace).
    """
    from transformers import AutoTokenizer

    local = Path(model_path)
    if not local.exists() and (local.is_absolute() or str(model_path).startswith(".") or str(model_path).count("/") > 1):
        raise FileNotFoundError(f"no model folder at {model_path}: run `tunewheel model prepare` first (or pass --max-tokens 0)")
    try:
        tok = AutoTokenizer.from_pretrained(str(model_path))
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"cannot load the tokenizer of {model_path}: run `tunewheel model prepare` first "
                                f"(or turn the token limit off) — {exc}") from exc

    def templated(messages: list[dict]) -> int:
        return len(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    def plain(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    s, u, a = {"role": "system", "content": "story"}, {"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}
    u2 = {"role": "user", "content": "again"}
    overhead = {"assistant": templated([u, a]) - templated([u]) - plain("world"),
                "user": templated([u, a, u2]) - templated([u, a]) - plain("again")}
    with_system = templated([s, u]) - plain("story") - plain("hello") - overhead["user"]
    without_system = templated([u]) - plain("hello") - overhead["user"]

    backend = tok.backend_tokenizer  # the Rust tokenizer: no per-text Python conversion

    def count(batch: list[list[dict]]) -> list[int]:
        # Examples of one conversation repeat their context: encode each distinct text once.
        lengths = dict.fromkeys(m["content"] for msgs in batch for m in msgs)
        texts = list(lengths)
        for text, encoding in zip(texts, backend.encode_batch_fast(texts, add_special_tokens=False) if texts else []):
            lengths[text] = len(encoding)
        out = []
        for msgs in batch:
            n = sum(lengths[m["content"]] + overhead.get(m["role"], 0) for m in msgs)
            out.append(n + (with_system if msgs and msgs[0]["role"] == "system" else without_system))
        return out

    return count
