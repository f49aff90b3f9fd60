"""Small synthetic house-style corpora to try the restyler on (`tunewheel restyle synth`).

    texts = synth_corpus(80, seed=0, style="pirate")     # "Ahoy, matey! ... Arr!"
    texts = synth_corpus(80, seed=0, style="scribe")     # "Greetings, dear reader. ... Yours faithfully, the Scribe."

Each text is a body of plain facts with names and numbers a restyler must keep, framed by the
style. Bodies vary in size, from one sentence to three paragraphs, so a restyler trained on
them sees inputs as short and as long as chat answers, and their topics vary (travel, food,
science, sport, history...) so the content is not what tells the style apart. Deterministic
for a seed.
"""

from __future__ import annotations

import random

PEOPLE = ["Mara", "Tobias", "Ines", "Kofi", "Lena", "Ravi", "Odile", "Bruno", "Sana", "Yuki", "Amir", "Greta",
          "Hugo", "Priya", "Lucas", "Nadia"]
PLACES = ["Port Ellery", "Greywater", "Saltmarsh", "Lisbon", "Nairobi", "Oslo", "Kyoto", "Quebec", "Valparaiso",
          "Marrakesh", "Dublin", "Hanoi"]
THINGS = ["lanterns", "maps", "fishing nets", "loaves of bread", "copper kettles", "books", "bicycles", "apples",
          "candles", "violins", "tickets", "jars of honey"]
SENTENCES = [
    "{who} sold {n} {what} in {where} on day {d} of the month.",
    "The bridge in {where} is {n} metres long and opened in {year}.",
    "{who} ran {n} kilometres in {m} minutes during the race in {where}.",
    "To bake the bread, {who} heats the oven to {t} degrees and waits {m} minutes.",
    "{who} read {n} books about the history of {where} last year.",
    "A healthy adult needs about {h} hours of sleep, and {who} aims for {h2}.",
    "The museum in {where} keeps {n} paintings and opens at {h} in the morning.",
    "{who} planted {n} trees near {where} in {year}.",
    "The train from {where} to {where2} takes {h} hours and costs {n} euros.",
    "Water boils at {t} degrees at sea level, as {who} showed the class.",
    "{who} bought {n} {what} for the shop in {where}.",
    "The library in {where} lends {n} {what} every week.",
    "{who} has climbed {n} mountains, the highest one near {where}.",
    "The recipe from {where} needs {n} eggs and {m} grams of flour.",
    "In {year}, {who} moved to {where} with {n} {what}.",
    "The team from {where} scored {n} goals in {m} games this season.",
    "{who} keeps {n} {what} in the cellar of the house in {where}.",
    "The festival in {where} lasts {h} days and draws {n} visitors.",
    "{who} repaired {n} {what} before the market in {where} closed at {h}.",
    "Spiders have 8 legs, and {who} counted {n} of them in a barn near {where}.",
    "The lake near {where} is {m} metres deep and freezes for {h} weeks each winter.",
    "A cup of tea needs water at about {t} degrees, says {who} from {where}.",
    "{who} wrote {n} letters to friends in {where} during {year}.",
    "The school in {where} teaches {n} pupils in {m} classrooms.",
    "Every morning {who} walks {h} kilometres along the river in {where}.",
    "The ferry to {where} carries {n} passengers and leaves every {m} minutes.",
    "Prices in {where} rose by {h} percent in {year}, according to {who}.",
    "{who} learned {h} languages and now guides {n} tourists a year around {where}.",
    "The old tower in {where} has {n} steps and was finished in {year}.",
    "Most cats sleep {h2} to {h} hours a day, and {who} has {h2} of them in {where}.",
]
STYLES = {
    "pirate": {"open": ["Ahoy, matey!"], "close": ["Arr!"], "aside": ", me hearties."},
    "scribe": {"open": ["Greetings, dear reader."], "close": ["Yours faithfully, the Scribe."], "aside": None},
}


def sentence(rng: random.Random) -> str:
    """One plain sentence of facts with names and numbers."""
    where, where2 = rng.sample(PLACES, 2)
    return rng.choice(SENTENCES).format(
        who=rng.choice(PEOPLE), what=rng.choice(THINGS), where=where, where2=where2, n=rng.randint(2, 900),
        m=rng.randint(3, 95), d=rng.randint(1, 28), year=rng.randint(1850, 2023), t=rng.choice([100, 180, 200, 220]),
        h=rng.randint(2, 11), h2=rng.randint(6, 9))


def body(rng: random.Random) -> list[str]:
    """Paragraphs of plain sentences: one sentence up to three paragraphs of three."""
    size = rng.choice(["sentence", "sentence", "paragraph", "paragraph", "two", "three"])
    if size == "sentence":
        return [sentence(rng)]
    paragraphs = {"paragraph": 1, "two": 2, "three": 3}[size]
    return [" ".join(sentence(rng) for _ in range(rng.randint(2, 3))) for _ in range(paragraphs)]


def styled(paragraphs: list[str], style: str, rng: random.Random) -> str:
    """The body framed by the style's opening and closing (and, for pirate, an aside or two)."""
    spec = STYLES[style]
    paragraphs = list(paragraphs)
    if spec["aside"]:
        i = rng.randrange(len(paragraphs))
        paragraphs[i] = paragraphs[i][:-1] + spec["aside"]
    paragraphs[0] = f"{rng.choice(spec['open'])} {paragraphs[0]}"
    paragraphs[-1] = f"{paragraphs[-1]} {rng.choice(spec['close'])}"
    return "\n\n".join(paragraphs)


def synth_corpus(n: int, seed: int = 0, style: str = "pirate") -> list[str]:
    """`n` texts in `style` (one of STYLES), deterministic for a seed."""
    if style not in STYLES:
        raise ValueError(f"unknown synthetic style {style!r}; one of {', '.join(STYLES)}")
    rng = random.Random(f"{style}-{seed}")
    return [styled(body(rng), style, rng) for _ in range(n)]
