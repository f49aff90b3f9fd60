"""The restyler's dataset: target-style texts -> (neutral text -> original text) chat pairs.

    tunewheel restyle synth --style pirate --out corpus.jsonl   # a small house-style corpus (tests, demo)
    tunewheel restyle build --style pirate --texts corpus.jsonl

    report = await build_dataset(chunks, style="pirate", out_dir=d, general=answers, destyle_model=ask, ...)

A restyler is trained by running the method backwards: take texts already written in the
target style, cut them into chunks the size of chat answers, strip their style
(learn/restyle_destyle.py: the served model, checked and retried by deleting the style's
markers), and train on neutral -> original. The reverse pairs train a de-styler. A text that
fits stays whole (an opening and a signature belong to the whole text); a longer one is cut
into chunks of varied size, from one sentence to three paragraphs. Chunks alone teach the
restyler to undo its own corpus's de-styling, not to style an answer about anything else, so the
build adds transfer pairs: the served model's answers to general prompts, each dressed in the
markers of a corpus chunk (`transfer_rows`; none for a style without markers). The build also trains the
style classifier the gate scores with (learn/restyle_style.py) and writes `build.json`, which
counts what each rule removed.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from learn.restyle_destyle import Rules, ask_model, delete_markers, destyle, marker_words, style_markers, transplant
from learn.restyle_request import style_system_prompt
from learn.restyle_style import StyleClassifier

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'])")
STYLE_NAME = re.compile(r"^[a-z0-9][a-z0-9_]{0,63}$")


class RestyleDataError(ValueError):
    """A bad input text, line or style name; the message says what to fix."""


def check_style_name(style: str) -> str:
    """A style name is a registry key and a folder name: lowercase letters, digits and _, nothing
    that could climb out of the data directory (`../../x`)."""
    if not STYLE_NAME.match(style):
        raise RestyleDataError(f"style {style!r} is not a valid style name: use lowercase letters, digits and "
                               "underscores (at most 64, starting with a letter or digit), e.g. pirate or house_style")
    return style


# --- reading and chunking --------------------------------------------------------------

def read_texts(path: str | Path) -> Iterator[tuple[str, str]]:
    """(where, text) from a folder of .txt/.md files or a JSONL file with a `text` field."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        if not files:
            raise RestyleDataError(f"{path}: no .txt or .md files in this folder")
        for f in files:
            yield str(f), f.read_text(encoding="utf-8")
        return
    if not path.is_file():
        raise RestyleDataError(f"{path}: no such file or folder")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise RestyleDataError(f"{path}:{lineno}: expected a JSON object with a string `text` field ({exc})") from None
            if not isinstance(text, str):
                raise RestyleDataError(f"{path}:{lineno}: `text` must be a string")
            yield f"{path}:{lineno}", text


def split_sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(paragraph.strip()) if s.strip()]


def chunk_text(text: str, *, count_tokens: Callable[[str], int], max_tokens: int = 160, max_paragraphs: int = 3,
               rng: random.Random | None = None) -> list[str]:
    """Chunks the size of chat answers. A text within `max_tokens` and `max_paragraphs` stays
    whole. A longer one is cut into chunks of varied size, drawn for each chunk: one or two
    sentences, or one to `max_paragraphs` whole paragraphs, always within `max_tokens` (a
    paragraph over the limit is cut at sentence boundaries; a single sentence over it stays whole).
    """
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not paragraphs:
        return []
    if len(paragraphs) <= max_paragraphs and count_tokens("\n\n".join(paragraphs)) <= max_tokens:
        return ["\n\n".join(paragraphs)]
    rng = rng or random.Random(0)
    queue = [split_sentences(p) for p in paragraphs]  # each paragraph as its sentences
    chunks: list[str] = []
    while queue:
        size = rng.choice(["sentences"] + [f"{k}" for k in range(1, max_paragraphs + 1)])
        if size == "sentences" and len(queue[0]) > 1:
            take = rng.randint(1, min(2, len(queue[0]) - 1))
            chunks.append(_fit(queue[0][:take], count_tokens, max_tokens, chunks))
            queue[0] = queue[0][take:]
            continue
        group: list[str] = []
        for _ in range(1 if size == "sentences" else int(size)):
            if not queue:
                break
            para = " ".join(queue[0])
            if group and count_tokens("\n\n".join(group + [para])) > max_tokens:
                break
            if count_tokens(para) > max_tokens:
                if not group:
                    chunks.append(_fit(queue[0], count_tokens, max_tokens, chunks, rest=queue))
                break
            group.append(para)
            queue.pop(0)
        if group:
            chunks.append("\n\n".join(group))
    return chunks


def _fit(sentences: list[str], count_tokens, max_tokens: int, chunks: list[str], rest: list | None = None) -> str:
    """As many of `sentences` as fit (at least one); with `rest`, the sentences left go back on it."""
    take = 1
    while take < len(sentences) and count_tokens(" ".join(sentences[:take + 1])) <= max_tokens:
        take += 1
    if rest is not None:
        rest[0] = sentences[take:]
        if not rest[0]:
            rest.pop(0)
    return " ".join(sentences[:take])


# --- style parameters --------------------------------------------------------------------

PARAMS_PROMPT = ("Describe the tone and the mood of the following text, one word each, "
                 "exactly as: tone: <word>; mood: <word>")
_PARAM = re.compile(r"\b(tone|mood)\s*[:=]\s*([A-Za-z-]+)", re.IGNORECASE)


def parse_params(text: str) -> dict[str, str]:
    """{'tone': ..., 'mood': ...} from the model's description; what it did not name is left out."""
    return {k.lower(): v.lower() for k, v in _PARAM.findall(text)}


async def extract_params(chunks: list[str], *, url: str, model: str, concurrency: int = 8,
                         api_key: str | None = None) -> list[dict[str, str]]:
    """Style parameters of each chunk, asked of the served model before de-styling."""
    answers = await ask_model(chunks, url=url, model=model, prompt=PARAMS_PROMPT, concurrency=concurrency, max_tokens=16,
                              api_key=api_key)
    return [parse_params(a) for a in answers]


# --- pairs and the build ------------------------------------------------------------------

@dataclass
class BuildReport:
    style: str
    texts: int = 0
    chunks: int = 0
    chunk_tokens: dict[str, int] = field(default_factory=dict)
    """Smallest, median and largest chunk, in tokens."""
    markers: list[str] = field(default_factory=list)
    """The style's markers the de-styler deletes."""
    destyled_by: dict[str, int] = field(default_factory=dict)
    """Kept de-stylings by who made them: the served model, or marker deletion (a retry)."""
    retried: dict[str, int] = field(default_factory=dict)
    """Model de-stylings retried by marker deletion, by the rule they broke."""
    removed: dict[str, int] = field(default_factory=dict)
    """Chunks dropped, by rule (after the retry), including pairs over the token limit (too_long)."""
    pairs_train: int = 0
    pairs_heldout: int = 0
    transfer_pairs: int = 0
    """Train pairs whose input is general text (the served model's answers), dressed in the markers of a corpus chunk."""
    classifier: dict[str, int] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


def pair(system: str, user: str, assistant: str) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}]}


PAIR_FILES = {"train": "restyle.train.jsonl", "heldout": "restyle.heldout.jsonl",
              "destyle_train": "destyle.train.jsonl", "destyle_heldout": "destyle.heldout.jsonl"}


def write_pairs(out_dir: Path, report: BuildReport, rows: list[tuple[str, str, dict]], *, system_prompt: str,
                neutralise_prompt: str, heldout_fraction: float = 0.1, seed: int = 0,
                transfer: list[tuple[str, str, dict]] = ()) -> None:
    """train/heldout JSONL of (neutral -> original) and the reverse (original -> neutral); `rows`:
    (original, neutral, style parameters). Each pair's system prompt carries its chunk's style
    parameters, formatted as the gateway formats a request's `style_params`. `transfer` rows
    (same shape) go to train only: the held-out pairs stay the corpus's own."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(rows) * heldout_fraction)) if len(rows) > 1 else 0
    held = set(order[:n_held])
    rows = [*rows, *transfer]
    out_dir.mkdir(parents=True, exist_ok=True)
    handles = {k: (out_dir / v).open("w", encoding="utf-8") for k, v in PAIR_FILES.items()}
    try:
        for i, (original, neutral_text, chunk_params) in enumerate(rows):
            split = "heldout" if i in held else "train"
            handles[split].write(json.dumps(pair(style_system_prompt(system_prompt, chunk_params), neutral_text, original)) + "\n")
            handles[f"destyle_{split}"].write(json.dumps(pair(neutralise_prompt, original, neutral_text)) + "\n")
    finally:
        for h in handles.values():
            h.close()
    report.pairs_heldout, report.pairs_train = len(held), len(rows) - len(held)
    report.files = {k: str(out_dir / v) for k, v in PAIR_FILES.items()}


def crossfit_in_style(corpus: list[str], general: list[str], markers: list[str],
                      folds: int = 5) -> Callable[[list[str], list[str]], list[bool]]:
    """The classifier's call on each candidate de-styling, out of fold: each is judged by a
    classifier that never saw its original, trained on the corpus against general text and the
    corpus with its markers cut out (the same content without the style), so that a de-styling
    that kept the style is called in-style and content alone calls nothing. With no markers found
    the other candidates stand in for the marker-free corpus."""
    def in_style(originals: list[str], neutrals: list[str]) -> list[bool]:
        calls = [False] * len(neutrals)
        for k in range(min(folds, len(neutrals))):
            fold = sorted(range(k, len(neutrals), folds))
            held = {originals[i] for i in fold}
            rest = [c for c in corpus if c not in held]
            plain = ([delete_markers(c, markers) for c in rest] if markers else
                     [n for i, n in enumerate(neutrals) if i not in set(fold) and n.strip()])
            clf = StyleClassifier.fit(in_style=rest, out_of_style=general + plain)
            for i, call in zip(fold, clf.in_style([neutrals[i] for i in fold])):
                calls[i] = call
        return calls
    return in_style


def transfer_rows(rows: list[tuple[str, str, dict]], general: list[str], markers: list[str], *, system_prompt: str,
                  count_pairs: Callable[[list[list[dict]]], list[int]], max_length: int, per_text: int = 2,
                  seed: int = 0) -> list[tuple[str, str, dict]]:
    """(styled, plain, params) pairs on text unlike the corpus: each general answer dressed in the
    markers of `per_text` corpus chunks (learn/restyle_destyle.py `transplant`), so that the restyler
    learns to put the style on any answer, not only to undo the de-styling of its own corpus. None
    for a style without markers, or answers the markers would not change."""
    framed = [(o, p) for o, _, p in rows if transplant(o, "Plain text.", markers) != "Plain text."]
    if not framed or not general:
        return []
    rng = random.Random(seed)
    out = []
    for text in general:
        for original, params in rng.sample(framed, min(per_text, len(framed))):
            styled = transplant(original, text, markers)
            if styled != text and (styled, text, params) not in out:
                out.append((styled, text, params))
    return pairs_within(out, system_prompt=system_prompt, count_pairs=count_pairs, max_length=max_length)


def pairs_within(rows: list[tuple[str, str, dict]], *, system_prompt: str,
                 count_pairs: Callable[[list[list[dict]]], list[int]], max_length: int) -> list[tuple[str, str, dict]]:
    """The (original, neutral, params) rows whose restyle pair fits `max_length` tokens."""
    lengths = count_pairs([pair(style_system_prompt(system_prompt, p), n, o)["messages"] for o, n, p in rows])
    return [r for r, n in zip(rows, lengths) if n <= max_length]


async def build_dataset(chunks: list[str], *, style: str, out_dir: Path, general: list[str],
                        destyle_model: Callable[[list[str]], Awaitable[list[str]]] | None, system_prompt: str,
                        neutralise_prompt: str, count_pairs: Callable[[list[list[dict]]], list[int]], max_length: int,
                        params: list[dict[str, str]] | None = None, seed: int = 0) -> BuildReport:
    """De-style `chunks`, drop what failed, write the pairs, the style classifier and build.json.
    `general`: the served model's answers to general prompts (out-of-style text); `count_pairs`:
    tokens of chat examples (the trainer's count); pairs over `max_length` are dropped (too_long)."""
    report = BuildReport(style=style, chunks=len(chunks))
    report.markers = style_markers(chunks, general)
    rules = Rules(in_style=crossfit_in_style(chunks, general, report.markers), markers=report.markers)
    neutral, log = await destyle(chunks, rules=rules, markers=report.markers, model=destyle_model)
    report.destyled_by = {"model": log.by_model, "markers": log.by_markers}
    report.retried, report.removed = log.retried, dict(log.removed)
    params = params or [{} for _ in chunks]
    rows = [(o, n, p) for o, n, p in zip(chunks, neutral, params) if n is not None]
    fitting = pairs_within(rows, system_prompt=system_prompt, count_pairs=count_pairs, max_length=max_length)
    if len(fitting) < len(rows):
        report.removed["too_long"] = len(rows) - len(fitting)
    transfer = transfer_rows(fitting, general, report.markers, system_prompt=system_prompt, count_pairs=count_pairs,
                             max_length=max_length, seed=seed)
    report.transfer_pairs = len(transfer)
    write_pairs(out_dir, report, fitting, system_prompt=system_prompt, neutralise_prompt=neutralise_prompt, seed=seed,
                transfer=transfer)
    kept_neutral = [n for _, n, _ in fitting]
    # The classifier sees general answers on both sides (plain: out of style; dressed in the style's
    # markers, as the transfer pairs are: in style), so that what tells the classes apart is the
    # style, not the corpus's topics: trained on the corpus alone it called a long chat answer with
    # the style's opening and closing out of style, because its body read like the general text.
    dressed = [styled for styled, _, _ in transfer]
    if fitting:
        StyleClassifier.fit(in_style=chunks + dressed, out_of_style=kept_neutral + general).save(out_dir)
    report.classifier = {"in_style": len(chunks) + len(dressed), "out_of_style": len(kept_neutral) + len(general),
                         "dressed_general": len(dressed)}
    (out_dir / "general.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in general), encoding="utf-8")
    (out_dir / "build.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report
