"""De-styling: each styled chunk back to neutral prose, checked, retried or dropped.

    markers = style_markers(chunks, general_answers)          # ['ahoy , matey !', 'arr !', ...]
    delete_markers("Ahoy, matey! Mara sold 12 maps. Arr!", markers)   # 'Mara sold 12 maps.'
    neutral, log = await destyle(chunks, model=served_model_rewrite, markers=markers, check=rule)

A restyler is trained on (neutral -> styled) pairs, so the neutral side must really be neutral
and still say the same thing. Two de-stylers:
- the served model with `restyle.neutralise_prompt` (`build --model NAME` picks a stronger one);
- deleting the style's markers (the "delete" step of Li et al. 2018, *Delete, Retrieve,
  Generate*): word n-grams frequent in the corpus and rare in general text (the served model's
  answers), such as an opening, a signature or a catchphrase, are cut out of the text.
Each model de-styling is checked by `failure` (the rules below); one that fails is retried with
the marker deleter, and dropped when that fails too. The build report counts each rule's hits.

Rules (`failure`, the first one broken counts): `empty`; `unchanged` (the same text);
`too_short` (under `min_length_ratio` of the original's characters once its markers are cut,
e.g. a whole text neutralised to "The Scribe."); `facts_lost` (a name or number of the original
is gone); `still_in_style` (the style classifier still calls it in-style).
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from learn.restyle_style import facts_kept

TOKEN = re.compile(r"\w+|[^\w\s]")
RULES = ("empty", "unchanged", "still_in_style", "too_short", "facts_lost", "too_long")


# --- the marker deleter -------------------------------------------------------------------

def _ngrams(text: str, max_n: int) -> set[tuple[str, ...]]:
    tokens = TOKEN.findall(text.lower())
    return {tuple(tokens[i:i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1)}


def style_markers(in_style: list[str], general: list[str], *, max_n: int = 6, min_share: float = 0.5,
                  min_ratio: float = 5.0) -> list[str]:
    """Word n-grams (as space-joined tokens, longest first) found in at least `min_share` of the
    in-style texts and at least `min_ratio` times as often, by share of texts, as in `general`.

    Chosen greedily, most frequent (then longest) first, each counted on the texts left once the
    markers before it are cut out, and each with a word of its own that is as rare in general
    text and no function word ('the' or 'in' is no style's word, however rare a small general
    sample makes it): ', the' is a marker of 'Yours faithfully, the Scribe.' only as part of it, and
    on its own would cut every ', the' of a text. An n-gram that only adds a neighbour to a more
    frequent marker ('ahoy , matey ! the' beside 'ahoy , matey !') is left out: the neighbour is
    the text's, not the style's."""
    style_df, general_df = Counter(), Counter()
    for text in in_style:
        style_df.update(_ngrams(text, max_n))
    for text in general:
        general_df.update(_ngrams(text, max_n))
    n_style, n_general = len(in_style), len(general)

    def ratio(gram: tuple[str, ...], count: int) -> float:
        return ((count + 1) / (n_style + 1)) / ((general_df[gram] + 1) / (n_general + 1))

    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    def own(word: str) -> bool:  # a word of the style's own: no function word, as rare in general text
        return word[0].isalnum() and word not in ENGLISH_STOP_WORDS and ratio((word,), style_df[(word,)]) >= min_ratio

    def passes(gram: tuple[str, ...], count: int) -> bool:
        return count >= min_share * n_style and ratio(gram, count) >= min_ratio and any(own(t) for t in gram)

    candidates = {g for g, c in style_df.items() if passes(g, c)}
    candidates = [g for g in candidates
                  if not any(sub in candidates and style_df[sub] > 1.2 * style_df[g] for sub in (g[1:], g[:-1]))]
    remaining = [" ".join(TOKEN.findall(t.lower())) for t in in_style]
    markers = []
    for gram in sorted(candidates, key=lambda g: (-style_df[g], -len(g), g)):
        phrase = " ".join(gram)
        pattern = re.compile(r"(?<!\S)" + re.escape(phrase) + r"(?!\S)")
        if passes(gram, sum(1 for t in remaining if pattern.search(t))):
            markers.append(phrase)
            remaining = [pattern.sub(" ", t) for t in remaining]
    return markers


def marker_words(markers: list[str]) -> set[str]:
    """The words of the markers, capitalised as a text would write them (facts to ignore)."""
    return {w.capitalize() for m in markers for w in m.split() if w[0].isalpha()}


def _pattern(marker: str) -> re.Pattern:
    parts = [re.escape(t) for t in marker.split()]
    body = r"\s*".join(parts)
    start = r"\b" if marker[0].isalnum() else ""
    end = r"\b" if marker[-1].isalnum() else ""
    return re.compile(start + body + end, re.IGNORECASE)


def tidy(text: str) -> str:
    """Whitespace and punctuation left behind by deletions, and sentence capitals."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", text):
        para = re.sub(r"[ \t]+", " ", para).strip()
        para = re.sub(r"\s+([,.!?;:])", r"\1", para)
        para = re.sub(r"([,;:])(?=[.!?])", "", para)          # "keeps 5 maps,." -> "keeps 5 maps."
        para = re.sub(r"([.!?])[,;:.!?]+", r"\1", para)       # ". ," and "!!" left by a deleted phrase
        para = re.sub(r"^[,.!?;:\s]+", "", para)
        para = re.sub(r"(^|[.!?]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), para)
        if para and para[-1].isalnum():  # a deleted closing took the sentence's full stop with it
            para += "."
        if para:
            paragraphs.append(para)
    return "\n\n".join(paragraphs)


def delete_markers(text: str, markers: list[str]) -> str:
    """`text` without any of the style's markers (longest first)."""
    for marker in markers:
        text = _pattern(marker).sub(" ", text)
    return tidy(text)


def transplant(styled: str, plain: str, markers: list[str]) -> str:
    """`plain` dressed as `styled` is: the markers of a styled chunk carried over to a text the
    corpus never held (the reverse of the marker deleter, for transfer pairs). Whole-marker
    sentences before `styled`'s first content sentence open the text, those after its last close
    it, those in between follow the sentence at the same relative place; a marker ending a content
    sentence (", me hearties.") ends the sentence of `plain` at the same relative place.

        transplant("Ahoy, matey! Mara sold 12 maps, me hearties. Arr!", "Jupiter is big.", markers)
        # 'Ahoy, matey! Jupiter is big, me hearties. Arr!'
    """
    from learn.restyle import split_sentences

    source = [s for para in re.split(r"\n\s*\n", styled) for s in split_sentences(para)]
    parts = re.split(r"(\n\s*)", plain.strip())  # lines and paragraphs, their breaks kept: a list stays a list
    paragraphs, breaks = [split_sentences(p) for p in parts[::2]], parts[1::2]
    target = [s for para in paragraphs for s in para]
    if not source or not target or not markers:
        return plain
    # a marker may take the previous sentence's full stop with it ('. yours faithfully , the scribe')
    bare = [delete_markers(s, markers) and delete_markers(". " + s, markers) for s in source]
    content = [i for i, b in enumerate(bare) if b]
    if not content:
        return plain
    first, last = content[0], content[-1]
    opening, closing = source[:first], source[last + 1:]
    after: dict[int, list[str]] = {}
    endings: dict[int, str] = {}

    def place(i: int) -> int:  # the sentence of `plain` at source sentence i's relative place
        return round((i - first) / max(1, last - first) * (len(target) - 1))
    for i in range(first, last + 1):
        if not bare[i]:
            after.setdefault(place(i - 1), []).append(source[i])  # it follows the sentence before it
        elif bare[i] != tidy(source[i]):
            for marker in markers:
                match = _pattern(marker).search(source[i])
                if match and not source[i][match.end():].strip(" .!?") and match.group(0)[0] in ",;:":
                    endings[place(i)] = match.group(0).rstrip() + ("" if match.group(0).rstrip()[-1] in ".!?" else ".")
    out, at = [], 0
    for para in paragraphs:
        sentences = []
        for sentence in para:
            if at in endings:
                sentence = sentence.rstrip(" .!?") + endings[at]
            sentences.append(sentence)
            sentences += after.get(at, [])
            at += 1
        out.append(sentences)
    out[0] = opening + out[0]
    out[-1] = out[-1] + closing
    return "".join(" ".join(para) + (breaks[k] if k < len(breaks) else "") for k, para in enumerate(out))


# --- the served model -----------------------------------------------------------------------

async def ask_model(texts: list[str], *, url: str, model: str, prompt: str, concurrency: int = 8,
                    max_tokens: int | Callable[[str], int] = 256, api_key: str | None = None) -> list[str]:
    """Each text answered by the served `model` under the system `prompt` (greedy), in order;
    `max_tokens` may depend on the text (a de-styling need not be much longer than its input)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=600) as client:
        async def one(text: str) -> str:
            async with sem:
                messages = ([{"role": "system", "content": prompt}] if prompt else []) + [{"role": "user", "content": text}]
                cap = max_tokens(text) if callable(max_tokens) else max_tokens
                r = await client.post("/v1/chat/completions", json={
                    "model": model, "temperature": 0, "max_tokens": cap, "messages": messages})
                r.raise_for_status()
                return (r.json()["choices"][0]["message"]["content"] or "").strip()
        return list(await asyncio.gather(*(one(t) for t in texts)))


# --- the rules --------------------------------------------------------------------------------

@dataclass
class Rules:
    """When a de-styling failed. `in_style(originals, neutrals)`: the style classifier's call on each
    neutral text (learn/restyle.py's `crossfit_in_style`)."""

    in_style: Callable[[list[str], list[str]], list[bool]]
    markers: list[str] = field(default_factory=list)
    min_length_ratio: float = 0.5

    def __post_init__(self) -> None:
        self.style_words = marker_words(self.markers)

    def failures(self, originals: list[str], neutrals: list[str]) -> list[str | None]:
        """The first rule each (original, neutral) breaks, or None."""
        styled = self.in_style(originals, neutrals) if neutrals else []
        out = []
        for original, neutral, still in zip(originals, neutrals, styled):
            out.append(self.failure(original, neutral, still_in_style=still))
        return out

    def failure(self, original: str, neutral: str, *, still_in_style: bool) -> str | None:
        if not neutral.strip():
            return "empty"
        if " ".join(neutral.split()).lower() == " ".join(original.split()).lower():
            return "unchanged"
        if len(neutral) < self.min_length_ratio * len(delete_markers(original, self.markers)):
            return "too_short"
        if not facts_kept(original, neutral, ignore=self.style_words):
            return "facts_lost"
        if still_in_style:
            return "still_in_style"
        return None


@dataclass
class DestyleLog:
    """What happened to the chunks: who de-styled each kept one, what each rule removed."""

    by_model: int = 0
    by_markers: int = 0
    retried: dict[str, int] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)


async def destyle(chunks: list[str], *, rules: Rules, markers: list[str],
                  model: Callable[[list[str]], Awaitable[list[str]]] | None) -> tuple[list[str | None], DestyleLog]:
    """The neutral text of each chunk (None: dropped). `model`: the served model's de-styler, or
    None to delete markers only. A model de-styling that breaks a rule is retried by deleting markers."""
    log = DestyleLog()
    neutral: list[str | None] = list(await model(chunks)) if model is not None else [None] * len(chunks)
    if model is not None:
        for i, why in enumerate(rules.failures(chunks, neutral)):
            if why is None:
                log.by_model += 1
            else:
                log.retried[why] = log.retried.get(why, 0) + 1
                neutral[i] = None
    todo = [i for i, n in enumerate(neutral) if n is None]
    deleted = [delete_markers(chunks[i], markers) for i in todo]
    for i, text, why in zip(todo, deleted, rules.failures([chunks[i] for i in todo], deleted)):
        if why is None:
            neutral[i] = text
            log.by_markers += 1
        else:
            log.removed[why] = log.removed.get(why, 0) + 1
    return neutral, log
