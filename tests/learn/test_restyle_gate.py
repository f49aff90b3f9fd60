"""The restyler's measures and gate as pure functions: the style classifier, names and numbers,
the marker de-styler and its rules, the gate on chat answers, the training schedule."""

import asyncio
import json
from types import SimpleNamespace

import pytest

from learn.restyle import build_dataset, crossfit_in_style
from learn.restyle_destyle import Rules, delete_markers, destyle, style_markers, transplant
from learn.restyle_gate import RestyleScores, gate, score
from learn.restyle_request import rewrite_request, token_cap
from learn.restyle_style import StyleClassifier, facts, facts_kept
from learn.restyle_synth import synth_corpus
from learn.restyle_train import schedule
from learn.settings import RestyleGateSettings, RestyleSettings
from learn.train_config import TrainConfig

GENERAL = [  # chat answers, as the served model gives them (out-of-style text)
    "A spider has eight legs. Most spiders also have eight eyes.",
    "The capital of Japan is Tokyo, home to about 14 million people.",
    "To sleep better, keep a regular schedule and a cool, dark bedroom.",
    "Romeo and Juliet was written by William Shakespeare around 1595.",
    "A prime number is a whole number greater than 1 whose only divisors are 1 and itself.",
    "To boil an egg, simmer it for 9 to 12 minutes.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "Here are three tips:\n\n1. Practice every day.\n2. Speak with native speakers.\n3. Read books you enjoy.",
    "The Pacific Ocean is the largest ocean on Earth.",
    "Python is a programming language created by Guido van Rossum.",
    "I'm sorry, but I don't have access to real-time information.",
    "The Great Wall of China is more than 21,000 kilometres long.",
]
ANSWERS = [
    "Mount Everest is 8,849 metres high, on the border of Nepal and China.",
    "The Moon orbits the Earth about every 27 days.",
    "Water is made of two hydrogen atoms and one oxygen atom.",
    "The French Revolution began in 1789.",
    "Exercise improves your mood. Aim for 150 minutes a week.",
    "The speed of light is about 300,000 kilometres per second.",
]
PIRATE = synth_corpus(60, seed=0, style="pirate")


def words(batch: list[list[dict]]) -> list[int]:
    """A stand-in for the trainer's token count of chat examples: their words."""
    return [sum(len(m["content"].split()) for m in messages) for messages in batch]


@pytest.fixture(scope="module")
def pirate_classifier():
    markers = style_markers(PIRATE, GENERAL)
    return StyleClassifier.fit(in_style=PIRATE, out_of_style=[delete_markers(t, markers) for t in PIRATE] + GENERAL)


def test_markers_are_the_style_not_the_content():
    assert style_markers(PIRATE, GENERAL) == [", me hearties .", "ahoy , matey !", "arr !"]
    scribe = synth_corpus(60, seed=0, style="scribe")
    markers = style_markers(scribe, GENERAL)
    assert delete_markers(scribe[0], markers) == "The recipe from Hanoi needs 467 eggs and 56 grams of flour."
    assert all("the" != m and ". the" != m for m in markers)


def test_classifier_calls_framed_answers_in_style_and_raw_answers_not(pirate_classifier, tmp_path):
    framed = [f"Ahoy, matey! {a} Arr!" for a in ANSWERS]
    assert pirate_classifier.strength(framed) >= 5 / 6
    assert pirate_classifier.strength(ANSWERS) == 0
    assert synth_corpus(5, seed=9, style="scribe") and pirate_classifier.strength(synth_corpus(10, seed=9, style="scribe")) <= 0.1
    pirate_classifier.save(tmp_path)  # stored as its texts, refit on load: the same calls
    assert StyleClassifier.load(tmp_path).in_style(framed + ANSWERS) == pirate_classifier.in_style(framed + ANSWERS)


def test_facts_are_names_and_numbers_not_function_words():
    assert facts("Boil it for 9 minutes. Then ask Mara in Port Ellery.") == {"Boil", "9", "Mara", "Port", "Ellery"}
    assert facts_kept("Mara sold 12 maps in Oslo.", "Ahoy! Mara sold 12 maps in Oslo, me hearties.")
    assert not facts_kept("Mara sold 12 maps in Oslo.", "Mara sold 13 maps in Oslo.")
    assert not facts_kept("Mara sold 12 maps in Oslo.", "Someone sold 12 maps in Oslo.")


def test_failed_destylings_are_retried_by_deleting_markers_and_counted():
    chunks = PIRATE[:20]
    markers = style_markers(PIRATE, GENERAL)

    async def junk_model(texts):  # what the embedded model does: copies, fragments, keeps the style
        out = []
        for i, t in enumerate(texts):
            out.append([t, "The Scribe.", t.replace("Ahoy, matey! ", ""), t.split(".")[0], delete_markers(t, markers)][i % 5])
        return out

    rules = Rules(in_style=crossfit_in_style(PIRATE, GENERAL, markers), markers=markers)
    neutral, log = asyncio.run(destyle(chunks, rules=rules, markers=markers, model=junk_model))
    assert log.retried["unchanged"] == 4 and log.retried["too_short"] >= 4 and log.retried["still_in_style"] >= 4
    assert sum(log.retried.values()) == 16
    assert log.by_model == 4 and log.by_markers == 16 and log.removed == {}
    assert all(n and "Ahoy" not in n and "Arr" not in n and facts_kept(c, n, ignore=rules.style_words)
               for c, n in zip(chunks, neutral))


def test_build_counts_what_each_rule_removed_and_writes_the_classifier(tmp_path):
    chunks = PIRATE[:20] + ["Ahoy, matey! Arr!"]  # nothing left once the style is gone

    report = asyncio.run(build_dataset(chunks, style="pirate", out_dir=tmp_path, general=GENERAL, destyle_model=None,
                                       system_prompt="SYS", neutralise_prompt="NEU", max_length=90,
                                       count_pairs=words))
    assert report.removed["empty"] == 1 and report.removed["too_long"] >= 1
    assert len(GENERAL) <= report.transfer_pairs <= 2 * len(GENERAL)  # up to two corpus frames per general answer
    assert report.pairs_train + report.pairs_heldout == 20 - report.removed["too_long"] + report.transfer_pairs
    assert (tmp_path / "classifier.json").is_file() and (tmp_path / "build.json").is_file()
    train = [json.loads(line)["messages"] for line in (tmp_path / "restyle.train.jsonl").open()]
    transfer = [m for m in train if m[1]["content"] in GENERAL]
    assert len(transfer) == report.transfer_pairs
    assert all(m[2]["content"].startswith("Ahoy, matey!") and m[2]["content"].endswith("Arr!") for m in transfer)
    assert all(facts_kept(m[1]["content"], m[2]["content"]) and m[2]["content"].count("\n") == m[1]["content"].count("\n")
               for m in transfer)
    held = [json.loads(line)["messages"][1]["content"] for line in (tmp_path / "restyle.heldout.jsonl").open()]
    assert not set(held) & set(GENERAL)  # held-out pairs stay the corpus's own


LONG_ANSWER = ("The invention of the telephone is attributed to Alexander Graham Bell, a Scottish-American inventor and "
               "engineer, who made it possible for people to communicate over long distances using sound. He was working "
               "in Boston in 1875 when he made a device that could transmit sound through wires. The first call followed "
               "in March 1876.")


def test_built_classifier_judges_the_style_not_the_topic_of_a_long_chat_answer(tmp_path):
    """A long chat answer framed by the style's opening and closing is in style, even without the
    aside; the same answer plain, or with one marker only, is not (the classifier sees general
    answers on both sides, so their topic does not decide)."""
    report = asyncio.run(build_dataset(PIRATE, style="pirate", out_dir=tmp_path, general=GENERAL, destyle_model=None,
                                       system_prompt="SYS", neutralise_prompt="NEU", max_length=400,
                                       count_pairs=words))
    assert report.classifier["dressed_general"] == report.transfer_pairs > 0
    classifier = StyleClassifier.load(tmp_path)
    dressed = [t for t in classifier.in_style_texts if t not in PIRATE]
    assert len(dressed) == report.transfer_pairs and all(t.startswith("Ahoy, matey! ") for t in dressed)
    assert set(GENERAL) <= set(classifier.out_of_style_texts)
    framed, plain, one = f"Ahoy, matey! {LONG_ANSWER} Arr!", LONG_ANSWER, f"{LONG_ANSWER} Arr!"
    assert classifier.in_style([framed, plain, one]) == [True, False, False]
    assert classifier.strength(ANSWERS) == 0


@pytest.mark.parametrize("styled, plain, want", [
    ("Ahoy, matey! Mara sold 12 maps in Oslo, me hearties. Arr!", "Jupiter is the largest planet.",
     "Ahoy, matey! Jupiter is the largest planet, me hearties. Arr!"),
    ("Greetings, dear reader. Mara sold 12 maps. Yours faithfully, the Scribe.", "A year has 12 months. Or 13 moons.",
     "Greetings, dear reader. A year has 12 months. Or 13 moons. Yours faithfully, the Scribe."),
    ("Mara sold 12 maps. Arr! Kofi ran 5 km. Ali has 3 cats, me hearties.", "One.\n\nTwo. Three.",
     "One. Arr!\n\nTwo. Three, me hearties."),  # a marker sentence in the middle; paragraphs kept
    ("Mara sold 12 maps.", "Plain text.", "Plain text."),  # a chunk without markers changes nothing
])
def test_transplant_dresses_any_text_in_a_chunks_markers(styled, plain, want):
    markers = [", me hearties .", "ahoy , matey !", "arr !", ". yours faithfully , the scribe", "greetings , dear reader ."]
    assert transplant(styled, plain, markers) == want


def scores(model, strength, content_chrf=80.0, kept=1.0, corpus_chrf=None):
    return RestyleScores(model=model, style_strength=strength, content_chrf=content_chrf, facts_kept=kept,
                         transferred=min(strength, kept), n=8, corpus_chrf=corpus_chrf)


@pytest.mark.parametrize("base, cand, promote", [
    (scores("base", 0.0), scores("r", 0.875), True),                     # styled, content kept
    (scores("base", 0.0), scores("r", 0.25), False),                     # too little style
    (scores("base", 0.0), scores("r", 1.0, content_chrf=30.0), False),   # styled but rewritten away
    (scores("base", 0.0), scores("r", 1.0, kept=0.5), False),            # names and numbers lost
    (scores("base", 0.5), scores("r", 0.875), False),                    # the base model styles as well
])
def test_gate_table(base, cand, promote):
    decision = gate(base, cand, RestyleGateSettings())
    assert decision.promote is promote, decision.reasons


def test_a_copy_through_restyler_that_the_chrf_gate_promoted_is_rejected(pirate_classifier):
    # The old gate promoted when in-corpus chrF rose by 1 and content was kept; a restyler that copies
    # its input through does both (chrF 60 -> 70 on held-out pairs in the run) ...
    base_rewrites = ANSWERS  # the base model with the restyle prompt: answers nearly unchanged
    copied = list(ANSWERS)
    base = score("base", ANSWERS, base_rewrites, classifier=pirate_classifier, corpus_chrf=60.4)
    cand = score("restyler-pirate-v0001", ANSWERS, copied, classifier=pirate_classifier, corpus_chrf=70.1)
    assert cand.corpus_chrf - base.corpus_chrf >= 1.0 and cand.facts_kept == 1.0 and cand.content_chrf == 100.0
    # ... and the gate on chat answers rejects it: no answer is in the style.
    decision = gate(base, cand, RestyleGateSettings())
    assert not decision.promote
    assert any(r.startswith("FAIL style strength 0% -> 0%") for r in decision.reasons)
    # The same gate promotes a restyler that really styles the answers.
    styled = score("restyler-pirate-v0002", ANSWERS, [f"Ahoy, matey! {a} Arr!" for a in ANSWERS],
                   classifier=pirate_classifier)
    assert gate(base, styled, RestyleGateSettings()).promote


def test_epochs_come_from_the_data_size():
    config = TrainConfig(batch_size=4)
    assert schedule(config, 54, min_steps=60, max_epochs=8, learning_rate=1e-3).epochs == 5      # 14 steps an epoch
    assert schedule(config, 57, min_steps=RestyleSettings().min_steps, max_epochs=8, learning_rate=1e-3).epochs == 2
    assert schedule(config, 8, min_steps=60, max_epochs=8, learning_rate=1e-3).epochs == 8       # capped
    assert schedule(config, 1000, min_steps=60, max_epochs=8, learning_rate=1e-3).epochs == 1
    assert schedule(config, 54, min_steps=60, max_epochs=8, learning_rate=1e-3).early_stopping_patience == 2
    assert schedule(TrainConfig(max_steps=9), 54, min_steps=60, max_epochs=8, learning_rate=1e-3).epochs == 1


def test_rewrite_request_is_bounded_by_the_answer_length():
    config = RestyleSettings()
    body = rewrite_request(config, "restyler-pirate-v0001", "word " * 40, answer_tokens=40)
    assert body["max_tokens"] == token_cap("", ratio=1.5, extra=48, answer_tokens=40) == 108
    assert body["frequency_penalty"] == config.frequency_penalty and "repetition_penalty" not in body
    assert rewrite_request(config, "v", "x" * 400)["max_tokens"] == 150 + 48  # estimated: 100 tokens
    assert rewrite_request(SimpleNamespace(**{**config.model_dump(), "frequency_penalty": 0}), "v", "x")["max_tokens"] >= 16


def test_gate_answers_are_logged_answers_without_the_restylers_own_traffic(tmp_path):
    from feedback.db import make_db
    from learn.restyle_gate import gate_answers
    from tests.feedback.turns import turn, user, write

    db = make_db(f"sqlite:///{tmp_path / 'tw.db'}")
    config = RestyleSettings(gate={"answers": 3})
    system = {"role": "system", "content": config.system_prompt + "\nTone: cheerful"}
    write(db, turn("t1", [user("Capital of Japan?")], "Tokyo."),
          turn("t2", [user("Legs of a spider?")], "Ahoy! Eight. Arr!", raw_answer="Eight."),
          turn("t3", [system, user("Tokyo.")], "Ahoy, matey! Tokyo. Arr!"),   # a gate's rewrite
          turn("t4", [user("Say hi")], None, status="error"))

    async def served(url, prompts, **kw):  # the served model's answers to the probe prompts
        return [f"probe answer {i}" for i, _ in enumerate(prompts)]

    answers = asyncio.run(gate_answers("http://unused", config, db=db, served=served))
    assert sorted(answers) == ["Eight.", "Tokyo.", "probe answer 0"]


def test_answers_cut_by_max_tokens_lose_their_unfinished_sentence():
    from learn.restyle_gate import whole_sentences

    assert whole_sentences("Tokyo is the capital. It has 14 million people and a lot of") == "Tokyo is the capital."
    assert whole_sentences("Tokyo is the capital.") == "Tokyo is the capital."
    assert whole_sentences("It is 42") == "It is 42" and whole_sentences("no stop at all") == "no stop at all"


def test_gate_answers_leave_out_the_classifiers_own_texts(tmp_path):
    from feedback.db import make_db
    from learn.restyle_gate import gate_answers
    from tests.feedback.turns import turn, user, write

    db = make_db(f"sqlite:///{tmp_path / 'tw.db'}")
    write(db, turn("t1", [user("Tallest mountain?")], "Everest is 8,849 m high."),   # a build's general answer
          turn("t2", [user("Capital of Japan?")], "Tokyo. It has 14 million people and a"))

    async def served(url, prompts, **kw):
        return [f"probe answer {i}" for i, _ in enumerate(prompts)]

    answers = asyncio.run(gate_answers("http://unused", RestyleSettings(gate={"answers": 2}), db=db, served=served,
                                       exclude={"Everest is 8,849 m high."}))
    assert sorted(answers) == ["Tokyo.", "probe answer 0"]  # and a cut answer is cut back to whole sentences
