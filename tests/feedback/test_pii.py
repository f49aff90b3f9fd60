"""PII scrubbing with presidio's recognizers: what is replaced, what is left alone, and a turn
scrubbed before it is stored ([store] scrub_at_write).

    pytest tests/feedback/test_pii.py
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from feedback.pii import scrub_text, scrub_turn
from tests.feedback.turns import bot, turn, user


@pytest.mark.parametrize(("text", "scrubbed", "kind"), [
    ("Mail jane.doe@example.com today", "Mail [EMAIL] today", "email"),
    ("Call +44 20 7946 0958 now", "Call [PHONE] now", "phone"),
    ("Call (415) 555-2671 now", "Call [PHONE] now", "phone"),
    ("Card 4111 1111 1111 1111 please", "Card [CARD] please", "card"),
    ("IBAN DE89 3704 0044 0532 0130 00 ok", "IBAN [IBAN] ok", "iban"),
    ("from 192.168.1.20 and 2001:db8::1", "from [IP] and [IP]", "ip"),
    ("SSN 536-90-4399", "SSN [ID]", "national_id"),
    ("Aadhaar 2345 6789 0124", "Aadhaar [ID]", "national_id"),
    ("codice RSSMRA85T10A562S", "codice [ID]", "national_id"),
])
def test_each_kind_is_replaced_and_counted(text, scrubbed, kind):
    counts = Counter()
    assert scrub_text(text, counts) == scrubbed
    assert counts == {kind: scrubbed.count("[")}


@pytest.mark.parametrize("text", [
    "In 1850 the town had 3,200 people, 14 shops and a mill built in 1832; on 2024-05-06 at 10:30.",
    "Card 4111 1111 1111 1112 fails the Luhn check",
    "Version 1.2.3 costs 19.99; see page 42-43.",
    "No digits and no at sign here.",
    "Order 1234567890123 shipped",  # an id pattern inside a longer number is not one
])
def test_what_is_not_pii_is_left_alone(text):
    assert scrub_text(text) == text


def test_a_turn_is_scrubbed_before_it_is_stored():
    t = turn("t1", [user("I am jane@example.com"), bot("Hi."), {"role": "user", "content": [
        {"type": "text", "text": "call +44 20 7946 0958"}, {"type": "image_url", "image_url": {"url": "x"}}]}],
        "Noted, jane@example.com.", raw_answer="Noted jane@example.com", style="pirate")
    counts = Counter()
    clean = scrub_turn(t, counts)
    assert clean.request_messages[0]["content"] == "I am [EMAIL]" and clean.request_messages[1] == bot("Hi.")
    assert clean.request_messages[2]["content"][0]["text"] == "call [PHONE]"
    assert clean.request_messages[2]["content"][1] == t.request_messages[2]["content"][1]
    assert (clean.answer, clean.raw_answer, clean.id, clean.style) == ("Noted, [EMAIL].", "Noted [EMAIL]", "t1", "pirate")
    assert counts == {"email": 3, "phone": 1}
    assert "jane@example.com" in t.request_messages[0]["content"]  # the original is not changed


def test_scrubbing_loads_neither_torch_nor_a_language_model():
    code = ("import sys; from feedback.pii import scrub_text; assert scrub_text('a jane@example.com') == 'a [EMAIL]'; "
            "print(sorted(m for m in ('torch', 'transformers', 'en_core_web_lg') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
