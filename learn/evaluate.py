"""Score a served model on a CoQA-style held-out set with the official EM and F1.

    tunewheel eval --model chat --data heldout.jsonl --predictions-out preds.jsonl
    report = evaluate("heldout.jsonl", model="chat@chat-v0003", url="http://127.0.0.1:8000",
                      max_tokens=32, concurrency=8)                                 # from Python

The data is the learner's held-out JSONL (one {"id", "source", "story", "turns": [{"question",
"answers": [gold, ...]}]} per line; answers[0] is the main answer) or an official CoQA JSON
file ({"data": [...]}, told apart by content, read with feedback/coqa.py). Either is
validated first, with the line or story of every problem. For turn k the model gets the
system prompt "Read the story and extract answers for the questions.\\nStory: <story>"
(the one curation trains with), then the gold history of turns < k as user/assistant
pairs, then question k; it answers greedily (temperature 0, `max_tokens`, which the learner
and `tunewheel eval` take from `learn.eval_max_tokens`). Requests go to the gateway's (or any
OpenAI-style server's) /v1/chat/completions with `model=NAME`, `concurrency` at a time
(`learn.eval_concurrency`), so this scores exactly what the engine serves under that name.
A request that keeps failing stops the evaluation: a partial score would mislead the gate. Evaluation requests through the gateway are logged as turns like
any other; they carry no rating, so curation never trains on them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import httpx

from feedback import coqa
from learn.metrics import aggregate, score_turn

SYSTEM_PROMPT = coqa.SYSTEM_PROMPT  # scored with the very prompt the chat data trains on
_RETRIES = 3
_MAX_ERRORS = 20


class HeldoutError(ValueError):
    """A held-out file that fails validation; the message lists every problem with its place."""


class EvalError(RuntimeError):
    """The served model could not be scored (unknown model, unreachable gateway, failing requests)."""


@dataclass
class EvalItem:
    id: str
    source: str
    story: str
    turns: list[tuple[str, list[str]]]  # (question, gold answers), answers[0] the main one


@dataclass
class EvalReport:
    model: str
    n_turns: int
    em: float
    f1: float
    per_source: dict[str, dict[str, float]] = field(default_factory=dict)
    duration: float = 0.0  # seconds of wall time for all requests
    data: str | None = None
    cached_from: str | None = None  # read back from an earlier run on the same items ("cycle 3"), not scored now

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- loading and validation ---------------------------------------------------------------


def _check_item(obj: Any, where: str, seen: set[str]) -> tuple[EvalItem | None, list[str]]:
    """One learner-format item, or the problems with it (each prefixed by `where`)."""
    if not isinstance(obj, dict):
        return None, [f"{where}: expected a JSON object, got {type(obj).__name__}"]
    errors = []
    for key in ("id", "source", "story"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            errors.append(f"{where}: '{key}' must be a non-empty string")
    if isinstance(obj.get("id"), str):
        if obj["id"] in seen:
            errors.append(f"{where}: id {obj['id']!r} appears twice")
        seen.add(obj["id"])
    turns = obj.get("turns")
    if not isinstance(turns, list) or not turns:
        errors.append(f"{where}: 'turns' must be a non-empty list")
        turns = []
    parsed = []
    for k, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            errors.append(f"{where}: turn {k} must be an object with 'question' and 'answers'")
            continue
        q, answers = turn.get("question"), turn.get("answers")
        if not isinstance(q, str) or not q.strip():
            errors.append(f"{where}: turn {k}: 'question' must be a non-empty string")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            errors.append(f"{where}: turn {k}: 'answers' must be a non-empty list of strings")
        parsed.append((q, answers))
    if errors:
        return None, errors
    return EvalItem(obj["id"], obj["source"], obj["story"], parsed), []


def load_heldout(path: str | Path) -> list[EvalItem]:
    """Read and validate a held-out file (learner JSONL or official CoQA JSON)."""
    path = Path(path)
    if not path.is_file():
        raise HeldoutError(f"{path}: no such file; pass a held-out JSONL or a CoQA JSON file")
    text = path.read_text(encoding="utf-8")
    errors: list[str] = []
    items: list[EvalItem] = []
    seen: set[str] = set()
    doc = None
    if text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None  # not one JSON document: read it as JSONL below
    if isinstance(doc, dict) and "data" in doc:
        if not isinstance(doc["data"], list):
            raise HeldoutError(f"{path}: 'data' must be a list of CoQA stories")
        for n, raw in enumerate(doc["data"], 1):
            where = f"{path}: story {n} (id {raw.get('id') if isinstance(raw, dict) else None})"
            try:
                obj = coqa.to_heldout(coqa.parse_record(raw))
            except ValueError as exc:
                errors.append(f"{where}: {exc}")
                continue
            item, errs = _check_item(obj, where, seen)
            errors += errs
            items += [item] if item else []
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            item, errs = _check_item(obj, f"{path}:{n}", seen)
            errors += errs
            items += [item] if item else []
    if errors:
        more = f"\n... and {len(errors) - _MAX_ERRORS} more" if len(errors) > _MAX_ERRORS else ""
        raise HeldoutError(f"{len(errors)} problem(s) in the held-out file:\n" + "\n".join(errors[:_MAX_ERRORS]) + more)
    if not items:
        raise HeldoutError(f"{path}: no items; a held-out file needs at least one story with one question")
    return items


# -- prompting and scoring ------------------------------------------------------------------


def turn_messages(item: EvalItem, k: int) -> list[dict[str, str]]:
    """The chat messages for turn k (0-based): story, gold history of turns < k, question k."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT.format(story=item.story)}]
    for question, answers in item.turns[:k]:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answers[0]}]
    messages.append({"role": "user", "content": item.turns[k][0]})
    return messages


async def _answer(client: httpx.AsyncClient, url: str, body: dict) -> str:
    for attempt in range(_RETRIES):
        try:
            r = await client.post(url, json=body)
        except httpx.TransportError as exc:
            if attempt == _RETRIES - 1:
                raise EvalError(f"cannot reach {url}: {exc!r}; is the gateway running (`tunewheel serve`)?") from exc
            await asyncio.sleep(0.5 * 2**attempt)
            continue
        if r.status_code == 200:
            return r.json()["choices"][0]["message"]["content"] or ""
        if 400 <= r.status_code < 500 and r.status_code != 429:
            raise EvalError(f"{url} refused model {body['model']!r} with {r.status_code}: {r.text[:300]}")
        if attempt == _RETRIES - 1:
            raise EvalError(f"{url} kept failing with {r.status_code}: {r.text[:300]}")
        await asyncio.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


async def aevaluate(
    items: list[EvalItem],
    *,
    model: str,
    url: str,
    max_tokens: int = 32,
    concurrency: int = 8,
    api_key: str | None = None,
    timeout: float = 600.0,
    predictions_out: str | Path | None = None,
    progress: bool = True,
    data_name: str | None = None,
) -> EvalReport:
    """Answer every turn of `items` through `url` and score it; see `evaluate` for the sync form."""
    from tqdm.auto import tqdm

    jobs = [(item, k) for item in items for k in range(len(item.turns))]
    endpoint = url.rstrip("/") + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(max(1, concurrency))
    bar = tqdm(total=len(jobs), desc=f"eval {model}", unit="turn", disable=not progress)
    started = time.perf_counter()

    failures: list[EvalError] = []

    async def one(item: EvalItem, k: int) -> str:
        body = {"model": model, "messages": turn_messages(item, k), "temperature": 0, "max_tokens": max_tokens}
        async with sem:
            if failures:  # one turn failed for good: the score is void, send nothing more
                raise failures[0]
            try:
                answer = await _answer(client, endpoint, body)
            except EvalError as exc:
                failures.append(exc)
                raise
        bar.update(1)
        return answer.strip()

    limits = httpx.Limits(max_connections=max(1, concurrency), max_keepalive_connections=max(1, concurrency))
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
        tasks = [asyncio.ensure_future(one(item, k)) for item, k in jobs]
        try:
            answers = await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            bar.close()
    duration = time.perf_counter() - started
    agg = _score(jobs, answers, predictions_out)
    return EvalReport(model=model, n_turns=agg["n"], em=agg["em"], f1=agg["f1"], per_source=agg["per_source"], duration=duration, data=data_name)


def _score(jobs: list[tuple[EvalItem, int]], answers: list[str], predictions_out: str | Path | None) -> dict:
    """EM/F1 of every answer, aggregated (learn.metrics.aggregate); each turn's row to `predictions_out`."""
    rows, scores = [], []
    for (item, k), prediction in zip(jobs, answers, strict=True):
        golds = item.turns[k][1]
        em, f1 = score_turn(prediction, golds)
        scores.append((item.source, em, f1))
        rows.append({"id": item.id, "turn": k + 1, "prediction": prediction, "golds": golds, "em": em, "f1": f1})
    if predictions_out is not None:
        out = Path(predictions_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return aggregate(scores)


def evaluate(
    data: str | Path | list[EvalItem],
    *,
    model: str,
    url: str,
    max_tokens: int,
    concurrency: int,
    api_key: str | None = None,
    timeout: float = 600.0,
    predictions_out: str | Path | None = None,
    progress: bool = True,
) -> EvalReport:
    """Score `model` as served at `url` on a held-out file or items (`learn.eval_max_tokens` and
    `learn.eval_concurrency` are what the learner and `tunewheel eval` pass).

    Runs its own event loop: call it from plain (non-async) code, e.g. the learner's thread.
    """
    items = data if isinstance(data, list) else load_heldout(data)
    return asyncio.run(
        aevaluate(
            items,
            model=model,
            url=url,
            max_tokens=max_tokens,
            concurrency=concurrency,
            api_key=api_key,
            timeout=timeout,
            predictions_out=predictions_out,
            progress=progress,
            data_name=None if isinstance(data, list) else str(data),
        )
    )


def scored_once(evaluate, items: list, folder: Path, *, model: str, base: str, reuse: bool = True, label: str = "",
                **common: Any) -> EvalReport:
    """`evaluate(items, model=model, **common)`, unless `model` was scored on exactly these items with
    these settings before (`reuse`): then its report is read back from `folder`, with `cached_from`
    set to the `label` of the run that scored it. A version's answers depend only on its weights
    (immutable), the base model, the items and the decoding settings (greedy), so the figures are the
    ones a new run would give, minus the minutes. Every report computed here is kept for next time."""
    key = hashlib.sha256(json.dumps({"model": model, "base": base, "max_tokens": common.get("max_tokens"),
                                     "items": [asdict(i) if is_dataclass(i) else i for i in items]},
                                    sort_keys=True, default=str).encode()).hexdigest()[:32]
    path = Path(folder) / f"{key}.json"
    if reuse and path.is_file():
        try:
            return EvalReport(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            logging.getLogger(__name__).warning("unreadable score cache %s: scoring %s again", path, model)
    report = evaluate(items, model=model, **common)
    if isinstance(report, EvalReport):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**report.to_dict(), "cached_from": label or None}))
    return report
