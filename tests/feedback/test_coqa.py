"""CoQA import: a small hand-written CoQA file, with a malformed record, -> chat JSONL + held-out.

    pytest tests/feedback/test_coqa.py
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from feedback.check import check_file
from feedback.coqa import CoqaError, import_coqa
from serve.cli import app as tunewheel_app

STORY = "Anna had two dogs. They were called Rex and Pip. She lived in Oakdale."


def answer(turn: int, text: str) -> dict:
    return {"turn_id": turn, "input_text": text, "span_text": text, "span_start": 0, "span_end": len(text)}


def coqa_doc() -> dict:
    good = {
        "id": "s1", "source": "mctest", "story": STORY,
        "questions": [{"turn_id": 1, "input_text": "How many dogs did Anna have?"}, {"turn_id": 2, "input_text": "Where did she live?"}],
        "answers": [answer(1, "two"), answer(2, "Oakdale")],
        "additional_answers": {"0": [answer(1, "2"), answer(2, "in Oakdale")], "1": [answer(1, "two dogs"), answer(2, "Oakdale")]},
    }
    no_answers = {"id": "s2", "source": "race", "story": "Short.", "questions": [{"turn_id": 1, "input_text": "Why?"}], "answers": []}
    plain = {"id": "s3", "source": "race", "story": "Tom is tall.", "questions": [{"turn_id": 1, "input_text": "Is Tom tall?"}],
             "answers": [answer(1, "yes")]}
    return {"version": "1.0", "data": [good, no_answers, plain]}


@pytest.fixture
def coqa_file(tmp_path):
    path = tmp_path / "mini-coqa.json"
    path.write_text(json.dumps(coqa_doc()))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_import_writes_chat_and_heldout(coqa_file, tmp_path):
    result = import_coqa(coqa_file, tmp_path / "out")
    assert result.records == 2 and result.turns == 3
    [problem] = result.problems
    assert problem.index == 1 and problem.id == "s2" and "answers" in problem.message

    chat = read_jsonl(result.chat_path)
    assert chat[0]["messages"] == [
        {"role": "system", "content": f"Read the story and extract answers for the questions.\nStory: {STORY}"},
        {"role": "user", "content": "How many dogs did Anna have?"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "Where did she live?"},
        {"role": "assistant", "content": "Oakdale"},
    ]
    assert check_file(result.chat_path).ok

    heldout = read_jsonl(result.heldout_path)
    assert heldout[0] == {"id": "s1", "source": "mctest", "story": STORY, "turns": [
        {"question": "How many dogs did Anna have?", "answers": ["two", "2", "two dogs"]},
        {"question": "Where did she live?", "answers": ["Oakdale", "in Oakdale", "Oakdale"]},
    ]}
    assert heldout[1]["turns"] == [{"question": "Is Tom tall?", "answers": ["yes"]}]


def test_fail_mode_writes_nothing(coqa_file, tmp_path):
    with pytest.raises(CoqaError, match=r"record 1 \(id s2\)"):
        import_coqa(coqa_file, tmp_path / "out", on_error="fail")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("broken, message", [
    ({"turn_id": 2, "input_text": "x"}, "turn_id 2, expected 1"),
    ({"turn_id": 1}, "string `input_text`"),
])
def test_malformed_turns_are_named(tmp_path, broken, message):
    doc = coqa_doc()
    doc["data"][2]["answers"] = [broken]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    result = import_coqa(path, tmp_path)
    assert [p.index for p in result.problems] == [1, 2] and message in result.problems[1].message


def test_cli_import(coqa_file, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(tunewheel_app, ["data", "import-coqa", str(coqa_file), "--out-dir", str(tmp_path / "o")])
    assert ok.exit_code == 0, ok.output
    assert "skipped record 1 (id s2)" in ok.output and "2 stories, 3 turns" in ok.output
    failed = runner.invoke(tunewheel_app, ["data", "import-coqa", str(coqa_file), "--out-dir", str(tmp_path / "f"), "--on-error", "fail"])
    assert failed.exit_code == 1 and "record 1 (id s2)" in failed.output
    not_json = tmp_path / "x.json"
    not_json.write_text("{oops")
    bad = runner.invoke(tunewheel_app, ["data", "import-coqa", str(not_json)])
    assert bad.exit_code == 1 and "not valid JSON" in bad.output
