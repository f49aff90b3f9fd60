"""PII scrubbing with presidio-analyzer's recognizers: e-mail addresses, phone numbers, credit
cards (Luhn checksum), IBANs (their checksum), IP addresses and national id numbers.

    counts = Counter()
    scrub_text("Mail jane@example.com, call +44 20 7946 0958", counts)   # "Mail [EMAIL], call [PHONE]"
    counts                                                              # {"email": 1, "phone": 1}
    scrub_turn(turn)          # a TurnCreate with its messages and answers scrubbed ([store] scrub_at_write)

Presidio's recognizers run on their own, without its AnalyzerEngine: the engine would want a
spaCy language model, which is a download, and the pattern recognizers need none (context
words, which only raise scores, need one; they are not used). What a recognizer finds is kept
when its score reaches MIN_SCORE: validated finds (card and IBAN checksums, national ids with
a check digit, e-mails with a known top-level domain) score 1.0, phone numbers 0.4 (parsed
and checked for the regions in PHONE_REGIONS by Google's libphonenumber port), IPv4/v6 0.6.

Speed: curation scrubs every text it writes. Every entity here holds a digit or an "@", so a
text with neither is returned at once; the others are scanned only in windows around their
digits and "@"s, and libphonenumber (the slow one, ~0.2 s per kB of number-heavy text) only on
runs of at least PHONE_MIN_DIGITS digits. bench/curation.py measures what it costs.

Importing presidio imports spaCy, and, through optional paths, torch and transformers (about
10 s); `recognizers()` imports it on first use with those optional paths blocked (presidio
and thinc fall back as they do when the packages are absent), so a process that never
imported torch does not start to, and the import takes a few seconds once per process. While
it runs, another thread's first `import torch` would fail: a process that imports torch or
transformers on other threads (a gateway with the learner in it) calls `recognizers()` at
start-up, before those threads do.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections import Counter
from typing import Any

from feedback.models import TurnCreate

# entity type -> (placeholder, counter name)
KINDS: dict[str, tuple[str, str]] = {
    "EMAIL_ADDRESS": ("[EMAIL]", "email"),
    "PHONE_NUMBER": ("[PHONE]", "phone"),
    "CREDIT_CARD": ("[CARD]", "card"),
    "IBAN_CODE": ("[IBAN]", "iban"),
    "IP_ADDRESS": ("[IP]", "ip"),
}
ID_PLACEHOLDER = ("[ID]", "national_id")  # every national id number
COUNTER_NAMES = ("email", "phone", "card", "iban", "ip", "national_id")
# National id numbers with a check digit or a distinctive shape (presidio's recognizers).
NATIONAL_IDS = ("UsSsnRecognizer", "UkNinoRecognizer", "EsNifRecognizer", "EsNieRecognizer", "ItFiscalCodeRecognizer",
                "InAadhaarRecognizer", "PlPeselRecognizer", "FiPersonalIdentityCodeRecognizer", "SePersonnummerRecognizer",
                "SgFinRecognizer", "KrRrnRecognizer", "AuTfnRecognizer")
PHONE_REGIONS = ("US", "GB", "DE", "FR", "IL", "IN", "CA", "BR")  # presidio's default regions
MIN_SCORE = 0.4
PHONE_MIN_DIGITS = 7
WINDOW = 48  # characters kept around a digit or "@" (the longest entity, an IBAN, has 34 + spaces)

_MAYBE = re.compile(r"[\d@]")
_SEED = re.compile(r"[\w.+-]*[\d@][\w.+@:-]*")
# A run of digits with the separators phone numbers are written with.
_PHONE_RUN = re.compile(r"(?<![\w+])\+?\(?\d[\d ().\-/]*\d(?![\w])")

_lock = threading.Lock()
_loaded: dict[str, Any] = {}


def recognizers() -> dict[str, Any]:
    """{"phone": PhoneRecognizer, "other": [the other recognizers]}, built once per process."""
    with _lock:
        if not _loaded:
            _loaded.update(_build())
        return _loaded


def _build() -> dict[str, Any]:
    os.environ.setdefault("PRESIDIO_DEVICE", "cpu")  # else presidio imports torch to look for a GPU
    blocked = [m for m in ("torch", "transformers") if m not in sys.modules]
    for m in blocked:  # optional in presidio and thinc: they fall back as when not installed
        sys.modules[m] = None  # type: ignore[assignment]
    try:
        import tldextract
        from presidio_analyzer import predefined_recognizers as pr
    finally:
        for m in blocked:
            sys.modules.pop(m, None)
    offline = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)  # the bundled suffix list, no download
    email = pr.EmailRecognizer()
    email.validate_result = lambda text: bool(offline(text).fqdn)
    other = [email, pr.CreditCardRecognizer(), pr.IbanRecognizer(), pr.IpRecognizer(),
             *(getattr(pr, name)() for name in NATIONAL_IDS)]
    return {"phone": pr.PhoneRecognizer(supported_regions=PHONE_REGIONS), "other": other}


def _windows(text: str) -> list[tuple[int, int]]:
    """Merged spans of `text` around every word holding a digit or "@"."""
    spans: list[tuple[int, int]] = []
    for m in _SEED.finditer(text):
        start, end = max(0, m.start() - WINDOW), min(len(text), m.end() + WINDOW)
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((start, end))
    return spans


def find(text: str) -> list[tuple[int, int, str]]:
    """(start, end, entity type) of every PII find in `text`, without overlaps, in order."""
    if not _MAYBE.search(text):
        return []
    recs = recognizers()
    found = []
    for start, end in _windows(text):
        part = text[start:end]
        for rec in recs["other"]:
            found += [(start + r.start, start + r.end, r.entity_type, r.score)
                      for r in rec.analyze(part, rec.supported_entities, None) if r.score >= MIN_SCORE]
    for m in _PHONE_RUN.finditer(text):
        if sum(c.isdigit() for c in m.group()) >= PHONE_MIN_DIGITS:
            phone = recs["phone"]
            found += [(m.start() + r.start, m.start() + r.end, r.entity_type, r.score)
                      for r in phone.analyze(m.group(), phone.supported_entities, None) if r.score >= MIN_SCORE]
    return _without_overlaps(found, text)


def _without_overlaps(found: list[tuple[int, int, str, float]], text: str) -> list[tuple[int, int, str]]:
    """The best find where several overlap: the highest score, then the longest. A find inside a
    longer word or number (an 11-digit id pattern in a 13-digit order number) is not one."""
    kept: list[tuple[int, int, str, float]] = []
    whole = [f for f in found if not (f[0] > 0 and text[f[0] - 1].isalnum()) and not (f[1] < len(text) and text[f[1]].isalnum())]
    for f in sorted(whole, key=lambda f: (-f[3], f[0] - f[1], f[0])):
        if all(f[1] <= k[0] or f[0] >= k[1] for k in kept):
            kept.append(f)
    return [(s, e, kind) for s, e, kind, _ in sorted(kept)]


def scrub_text(text: str, counts: Counter | None = None) -> str:
    """`text` with every PII find replaced by its placeholder ([EMAIL], [PHONE], [CARD], [IBAN],
    [IP], [ID]); `counts` (by COUNTER_NAMES) is told what was replaced."""
    finds = find(text)
    if not finds:
        return text
    out, at = [], 0
    for start, end, kind in finds:
        placeholder, name = KINDS.get(kind, ID_PLACEHOLDER)
        out += [text[at:start], placeholder]
        at = end
        if counts is not None:
            counts[name] += 1
    return "".join(out) + text[at:]


def _scrub_content(content: Any, counts: Counter) -> Any:
    """Message content, a string or OpenAI content parts, scrubbed (other parts kept as they are)."""
    if isinstance(content, str):
        return scrub_text(content, counts)
    if isinstance(content, list):
        return [{**p, "text": scrub_text(p["text"], counts)} if isinstance(p, dict) and isinstance(p.get("text"), str) else p
                for p in content]
    return content


def scrub_turn(turn: TurnCreate, counts: Counter | None = None) -> TurnCreate:
    """A copy of `turn` with PII scrubbed from its request messages, answer and raw answer: what
    the gateway stores when `[store] scrub_at_write` is on (before the turn is spooled or written)."""
    counts = counts if counts is not None else Counter()
    messages = [{**m, "content": _scrub_content(m.get("content"), counts)} if isinstance(m, dict) else m
                for m in turn.request_messages]
    return turn.model_copy(update={
        "request_messages": messages,
        "answer": None if turn.answer is None else scrub_text(turn.answer, counts),
        "raw_answer": None if turn.raw_answer is None else scrub_text(turn.raw_answer, counts),
    })
