"""What a rewrite is measured by: style strength (a style classifier) and content kept (chrF, facts).

    clf = StyleClassifier.fit(in_style=corpus_chunks, out_of_style=destyled + general_answers)
    clf.in_style(["Ahoy, matey! Tokyo is the capital of Japan. Arr!"])   # [True]
    clf.save(folder); StyleClassifier.load(folder)                      # classifier.json: its texts
    facts("Mara sold 12 maps in Port Ellery.")                          # {'Mara', 'Port', 'Ellery', '12'}
    facts_kept(raw, rewrite)                                            # every fact of raw is in rewrite
    chrf(rewrites, raws)                                                # corpus chrF, 0-100

The two figures of the style-transfer literature: *style strength*, the share of rewrites a
classifier of the target style calls in-style, and *content kept*, how much of the source
survives (chrF of rewrite against source, and the names and numbers check). The classifier is
char n-gram tf-idf + logistic regression (scikit-learn), trained at build time on the style's
corpus against de-styled and general text: the de-styled versions carry the same content as the
corpus, so what separates the classes is the style, not the topic. It is stored as the texts it
was trained on (`classifier.json`) and refit on load: fitting takes well under a second, and a
file of texts cannot run code or break with the scikit-learn version, as a pickle could.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

CLASSIFIER_FILE = "classifier.json"
NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
SENTENCE_START = re.compile(r"(?:^|[.!?:;]\s+|\n\s*(?:[-*]|\d+[.)])?\s*|[\"(]\s*)$")


def facts(text: str, *, ignore: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """The numbers and names of `text`: a name is a capitalised word, except a function word opening
    a sentence ('The', 'Then', 'It'). `ignore`: words that belong to the style rather than the
    content (its opening, its signature)."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    found = set(NUMBER.findall(text))
    for m in WORD.finditer(text):
        word = m.group()
        if not word[0].isupper() or word == "I" or word in ignore:
            continue
        if word.lower() in ENGLISH_STOP_WORDS and SENTENCE_START.search(text[:m.start()]):
            continue
        found.add(word)
    return found


def facts_kept(source: str, output: str, *, ignore: set[str] | frozenset[str] = frozenset()) -> bool:
    """Every number and name of `source` appears in `output`."""
    return all(f in output for f in facts(source, ignore=ignore))


def chrf(outputs: list[str], references: list[str]) -> float:
    """Corpus chrF (sacrebleu), 0-100; 0 for no pairs."""
    import sacrebleu

    if not outputs:
        return 0.0
    return sacrebleu.corpus_chrf(outputs, [references]).score


def sentence_chrf(output: str, reference: str) -> float:
    import sacrebleu

    return sacrebleu.sentence_chrf(output, [reference]).score


@dataclass
class StyleClassifier:
    """A style's classifier: char n-grams (2-5, within words) with tf-idf, logistic regression."""

    in_style_texts: list[str]
    out_of_style_texts: list[str]
    threshold: float = 0.5
    pipeline: object = None

    @classmethod
    def fit(cls, *, in_style: list[str], out_of_style: list[str], threshold: float = 0.5) -> StyleClassifier:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        if not in_style or not out_of_style:
            raise ValueError("a style classifier needs texts of both classes: in-style (the corpus) and out-of-style")
        # sublinear tf and l2 norm keep a long answer's body from drowning the style's few marker
        # n-grams; balanced weights because the two classes are rarely the same size.
        pipeline = make_pipeline(
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2, lowercase=False),
            LogisticRegression(C=10.0, class_weight="balanced", max_iter=2000),
        )
        pipeline.fit(list(in_style) + list(out_of_style), [1] * len(in_style) + [0] * len(out_of_style))
        return cls(list(in_style), list(out_of_style), threshold, pipeline)

    def probability(self, texts: list[str]) -> list[float]:
        """P(in style) of each text."""
        if not texts:
            return []
        return [float(p) for p in self.pipeline.predict_proba(list(texts))[:, 1]]

    def in_style(self, texts: list[str]) -> list[bool]:
        return [p >= self.threshold for p in self.probability(texts)]

    def strength(self, texts: list[str]) -> float:
        """Style strength: the share of `texts` called in-style (0 for none)."""
        calls = self.in_style(texts)
        return sum(calls) / len(calls) if calls else 0.0

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CLASSIFIER_FILE
        path.write_text(json.dumps({"in_style": self.in_style_texts, "out_of_style": self.out_of_style_texts,
                                    "threshold": self.threshold}, indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> StyleClassifier:
        path = Path(folder) / CLASSIFIER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: run `tunewheel restyle build` for this style first")
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls.fit(in_style=data["in_style"], out_of_style=data["out_of_style"], threshold=data["threshold"])
