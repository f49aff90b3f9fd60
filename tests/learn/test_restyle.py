"""Restyler data: chunks of varied size, text reading errors, style names, pairs, synthetic styles, style params."""

import json
import random
import statistics

import pytest

from learn.restyle import (
    BuildReport,
    RestyleDataError,
    check_style_name,
    chunk_text,
    parse_params,
    read_texts,
    write_pairs,
)
from learn.restyle_request import style_system_prompt
from learn.restyle_synth import synth_corpus

words = lambda s: len(s.split())  # noqa: E731  a tokenizer stand-in: one token per word


def test_a_text_that_fits_stays_whole_with_its_opening_and_signature():
    text = "Greetings, dear reader. Mara sold 5 maps.\n\nLena bought 3. Yours faithfully, the Scribe."
    assert chunk_text(text, count_tokens=words, max_tokens=100) == [text]


def test_a_long_text_is_cut_into_chunks_of_varied_size_within_the_limit():
    paragraphs = [" ".join(f"Sentence {p}.{i} ends here." for i in range(4)) for p in range(12)]
    text = "\n\n".join(paragraphs)
    chunks = chunk_text(text, count_tokens=words, max_tokens=60, rng=random.Random(1))
    sizes = [words(c) for c in chunks]
    assert max(sizes) <= 60
    assert min(sizes) <= 8 and max(sizes) >= 30  # a sentence or two, up to several paragraphs
    assert max(c.count("\n\n") + 1 for c in chunks) <= 3
    assert " ".join(" ".join(chunks).split()) == " ".join(text.split())  # nothing lost, order kept


def test_single_overlong_sentence_stays_whole():
    sentence = ("word " * 50 + "end.").strip()
    assert chunk_text(sentence + "\n\n" + sentence, count_tokens=words, max_tokens=10) == [sentence, sentence]


def test_read_texts_jsonl_reports_bad_line(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "ok"}\n\nnot json\n')
    with pytest.raises(RestyleDataError, match=r"t.jsonl:3"):
        list(read_texts(f))


def test_read_texts_folder(tmp_path):
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "b.md").write_text("B")
    (tmp_path / "c.bin").write_text("C")
    assert [t for _, t in read_texts(tmp_path)] == ["A", "B"]
    with pytest.raises(RestyleDataError, match="no such file"):
        list(read_texts(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RestyleDataError, match="no .txt or .md"):
        list(read_texts(tmp_path / "empty"))


@pytest.mark.parametrize("bad", ["../../x", "a/b", "Pirate", "", ".hidden", "x" * 65, "sp ace"])
def test_style_names_cannot_leave_the_data_directory(bad):
    with pytest.raises(RestyleDataError, match="not a valid style name"):
        check_style_name(bad)
    assert check_style_name("house_style2") == "house_style2"


def test_restyle_build_refuses_a_path_as_style_before_writing_anything(tmp_path):
    from typer.testing import CliRunner

    from serve.cli import app

    result = CliRunner().invoke(app, ["restyle", "build", "--style", "../../x", "--texts", str(tmp_path / "t.jsonl")],
                                env={"TUNEWHEEL_DATA_DIR": str(tmp_path / "data")})
    assert result.exit_code == 2 and "not a valid style name" in result.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "data").exists()


def test_pairs_and_reverse_pairs(tmp_path):
    originals = synth_corpus(10, seed=3)
    rows = [(o, o.replace("Ahoy, matey! ", "").replace(" Arr!", ""), {}) for o in originals]
    report = BuildReport(style="pirate")
    write_pairs(tmp_path, report, rows, system_prompt="SYS", neutralise_prompt="NEU")
    assert report.pairs_train + report.pairs_heldout == 10 and report.pairs_heldout == 1
    train = [json.loads(x) for x in open(report.files["train"])]
    assert train[0]["messages"][0]["content"] == "SYS"
    assert train[0]["messages"][2]["content"].startswith("Ahoy, matey!")
    reverse = [json.loads(x) for x in open(report.files["destyle_train"])]
    assert reverse[0]["messages"][1]["content"] == train[0]["messages"][2]["content"]
    assert reverse[0]["messages"][2]["content"] == train[0]["messages"][1]["content"]


@pytest.mark.parametrize("style, opening, closing", [("pirate", "Ahoy, matey!", "Arr!"),
                                                     ("scribe", "Greetings, dear reader.", "Yours faithfully, the Scribe.")])
def test_synthetic_styles_are_deterministic_framed_and_of_varied_size(style, opening, closing):
    a = synth_corpus(40, seed=1, style=style)
    assert a == synth_corpus(40, seed=1, style=style) and a != synth_corpus(40, seed=2, style=style)
    assert all(t.startswith(opening) and t.endswith(closing) for t in a)
    paragraphs = [t.count("\n\n") + 1 for t in a]
    assert min(paragraphs) == 1 and max(paragraphs) == 3
    assert statistics.pstdev(words(t) for t in a) > 10
    with pytest.raises(ValueError, match="unknown synthetic style"):
        synth_corpus(1, style="sonnet")


def test_style_params_parse_and_reach_the_system_prompt(tmp_path):
    assert parse_params("Tone: Cheerful; mood: playful.") == {"tone": "cheerful", "mood": "playful"}
    assert parse_params("I cannot tell.") == {}
    params = [{"tone": "cheerful", "mood": "playful"}, {}]
    report = BuildReport(style="pirate")
    write_pairs(tmp_path, report, [("Ahoy! A.", "A.", params[0]), ("Ahoy! B.", "B.", params[1])], system_prompt="SYS",
                neutralise_prompt="NEU", heldout_fraction=0.0001)
    rows = [json.loads(x) for f in ("train", "heldout") for x in open(report.files[f])]
    systems = {r["messages"][2]["content"]: r["messages"][0]["content"] for r in rows}
    assert systems["Ahoy! A."] == "SYS\nMood: playful\nTone: cheerful" == style_system_prompt("SYS", params[0])
    assert systems["Ahoy! B."] == "SYS"
