"""Held-out evaluation: file validation, prompts, scoring through a faked gateway, and once through the real one.

    pytest tests/learn/test_evaluate.py -m "not engine"      # seconds, no engine
    pytest tests/learn/test_evaluate.py -m engine            # through the gateway on the real vLLM engine

The fake gateway (respx) answers from a table keyed by question, so every EM/F1 below is
known in advance.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import respx
from typer.testing import CliRunner

from learn.evaluate import EvalError, HeldoutError, evaluate, load_heldout, turn_messages
from learn.settings import LearnSettings

URL = "http://gateway.test"

ITEMS = [
    {"id": "s1", "source": "race", "story": "Tom has a red barn and two cats.",
     "turns": [{"question": "What does Tom have?", "answers": ["a red barn"]},
               {"question": "How many cats?", "answers": ["two", "2"]}]},
    {"id": "s2", "source": "cnn", "story": "The storm hit Paris on Monday.",
     "turns": [{"question": "Where?", "answers": ["Paris"]},
               {"question": "When?", "answers": ["on Monday"]},
               {"question": "What hit?", "answers": ["the storm"]}]},
]
# question -> what the fake model says, and the (em, f1) that earns by hand
ANSWERS = {
    "What does Tom have?": "A red barn.",  # 1, 1
    "How many cats?": "two",  # golds two/2: leave-one-out -> (1 + 0) / 2 for both
    "Where?": "Paris",  # 1, 1
    "When?": "Monday",  # gold "on monday": p=1, r=1/2 -> f1 2/3, em 0
    "What hit?": "rain",  # 0, 0
}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def heldout(tmp_path) -> Path:
    return write_jsonl(tmp_path / "heldout.jsonl", ITEMS)


@pytest.fixture
def learn():
    return LearnSettings(eval_concurrency=3, eval_max_tokens=24)


def scored(data, learn: LearnSettings, **kw):
    """`evaluate` with the section's limits, as the learner and `tunewheel eval` call it."""
    return evaluate(data, max_tokens=learn.eval_max_tokens, concurrency=learn.eval_concurrency, progress=False, **kw)


class FakeGateway:
    """Answers chat completions from ANSWERS, recording bodies and the most requests seen at once."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        answer = ANSWERS[body["messages"][-1]["content"]]
        return httpx.Response(200, json={"id": "c1", "choices": [{"index": 0, "message": {"role": "assistant", "content": f" {answer}\n"}}]})


# -- loading -------------------------------------------------------------------------------


def test_loads_the_learner_format(heldout):
    items = load_heldout(heldout)
    assert [i.id for i in items] == ["s1", "s2"]
    assert items[0].turns[1] == ("How many cats?", ["two", "2"])


def test_loads_official_coqa_json_with_additional_answers(tmp_path):
    doc = {"version": "1.0", "data": [{
        "id": "c1", "source": "mctest", "story": "Ann sings.",
        "questions": [{"turn_id": 1, "input_text": "Who sings?"}, {"turn_id": 2, "input_text": "Does she?"}],
        "answers": [{"turn_id": 1, "input_text": "Ann"}, {"turn_id": 2, "input_text": "yes"}],
        "additional_answers": {"0": [{"turn_id": 1, "input_text": "Ann."}, {"turn_id": 2, "input_text": "Yes"}],
                               "1": [{"turn_id": 1, "input_text": "ann"}, {"turn_id": 2, "input_text": "yes she does"}]},
    }]}
    (tmp_path / "dev.json").write_text(json.dumps(doc, indent=2))
    [item] = load_heldout(tmp_path / "dev.json")
    assert (item.id, item.source, item.story) == ("c1", "mctest", "Ann sings.")
    assert item.turns == [("Who sings?", ["Ann", "Ann.", "ann"]), ("Does she?", ["yes", "Yes", "yes she does"])]


def test_validation_lists_every_problem_with_its_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        ITEMS[0],
        "{not json",
        {"id": "s3", "source": "race", "story": "x", "turns": [{"question": "q?", "answers": []}]},
        {"id": "s1", "source": "race", "story": "x", "turns": [{"question": "q?", "answers": ["a"]}]},
        {"id": "s4", "story": "x", "turns": []},
    ])
    with pytest.raises(HeldoutError) as exc:
        load_heldout(path)
    msg = str(exc.value)
    assert f"{path}:2: not valid JSON" in msg
    assert f"{path}:3: turn 1: 'answers' must be a non-empty list of strings" in msg
    assert f"{path}:4: id 's1' appears twice" in msg
    assert f"{path}:5: 'source' must be a non-empty string" in msg
    assert f"{path}:5: 'turns' must be a non-empty list" in msg
    assert f"{path}:1" not in msg


def test_validation_of_coqa_json_names_the_story(tmp_path):
    doc = {"data": [{"id": "c9", "source": "race", "story": "s", "questions": [{"turn_id": 1, "input_text": "q"}], "answers": []}]}
    (tmp_path / "dev.json").write_text(json.dumps(doc))
    with pytest.raises(HeldoutError, match=r"story 1 \(id c9\).*answers"):
        load_heldout(tmp_path / "dev.json")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(HeldoutError, match="no such file"):
        load_heldout(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(HeldoutError, match="no items"):
        load_heldout(tmp_path / "empty.jsonl")


def test_prompt_is_story_then_gold_history_then_question(heldout):
    item = load_heldout(heldout)[1]
    messages = turn_messages(item, 2)
    assert messages == [
        {"role": "system", "content": "Read the story and extract answers for the questions.\nStory: The storm hit Paris on Monday."},
        {"role": "user", "content": "Where?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "When?"},
        {"role": "assistant", "content": "on Monday"},
        {"role": "user", "content": "What hit?"},
    ]
    assert len(turn_messages(item, 0)) == 2


# -- scoring through a faked gateway --------------------------------------------------------


def test_scores_through_the_gateway(heldout, learn, tmp_path):
    fake = FakeGateway()
    preds = tmp_path / "preds.jsonl"
    with respx.mock(assert_all_called=True) as mock:
        mock.post(f"{URL}/v1/chat/completions").mock(side_effect=fake)
        report = scored(heldout, learn, model="chat@chat-v0002", url=URL, predictions_out=preds)

    assert report.n_turns == 5
    assert report.em == pytest.approx((1 + 0.5 + 1 + 0 + 0) / 5)
    assert report.f1 == pytest.approx((1 + 0.5 + 1 + 2 / 3 + 0) / 5)
    assert report.per_source["race"] == {"em": pytest.approx(0.75), "f1": pytest.approx(0.75), "n": 2}
    assert report.per_source["cnn"]["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert report.model == "chat@chat-v0002"

    assert {(b["model"], b["temperature"], b["max_tokens"]) for b in fake.bodies} == {("chat@chat-v0002", 0, 24)}
    assert 1 < fake.max_in_flight <= 3  # many in flight, never more than eval_concurrency

    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [(r["id"], r["turn"]) for r in lines] == [("s1", 1), ("s1", 2), ("s2", 1), ("s2", 2), ("s2", 3)]
    assert lines[0] == {"id": "s1", "turn": 1, "prediction": "A red barn.", "golds": ["a red barn"], "em": 1.0, "f1": 1.0}
    assert lines[3]["f1"] == pytest.approx(2 / 3)


def test_unknown_model_fails_at_once(heldout, learn):
    with respx.mock() as mock:
        route = mock.post(f"{URL}/v1/chat/completions").respond(404, json={"error": {"message": "model 'nope' not found"}})
        with pytest.raises(EvalError, match="refused model 'nope' with 404"):
            scored(heldout, learn, model="nope", url=URL)
    assert route.call_count <= learn.eval_concurrency  # no retries of a client error


def test_transient_server_errors_are_retried(heldout, learn):
    fake = FakeGateway()
    with respx.mock() as mock:
        mock.post(f"{URL}/v1/chat/completions").mock(side_effect=[httpx.Response(503), *[fake] * 5])
        report = scored(heldout, learn, model="chat", url=URL)
    assert report.n_turns == 5 and len(fake.bodies) == 5


def test_unreachable_gateway_is_a_clear_error(heldout, learn):
    with respx.mock() as mock:
        mock.post(f"{URL}/v1/chat/completions").mock(side_effect=httpx.ConnectError("refused"))
        with pytest.raises(EvalError, match="cannot reach"):
            scored(heldout, learn, model="chat", url=URL)


def test_cli_prints_the_table_and_writes_the_report(heldout, tmp_path, monkeypatch):
    from serve.cli import app

    monkeypatch.setenv("TUNEWHEEL_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "report.json"
    with respx.mock() as mock:
        for path, body in (("/health", {}), ("/ready", {}), ("/v1/models", {"data": [{"id": "base"}]})):  # the pre-flight
            mock.get(f"{URL}{path}").respond(200, json=body)
        mock.post(f"{URL}/v1/chat/completions").mock(side_effect=FakeGateway())
        result = CliRunner().invoke(app, ["eval", "--model", "base", "--data", str(heldout), "--url", URL, "--report-out", str(out)])
    assert result.exit_code == 0, result.output
    assert "overall" in result.output and "race" in result.output and "cnn" in result.output
    report = json.loads(out.read_text())
    assert report["model"] == "base" and report["n_turns"] == 5
    assert report["f1"] == pytest.approx((1 + 0.5 + 1 + 2 / 3 + 0) / 5)


def test_cli_rejects_a_bad_file_before_any_request(tmp_path, monkeypatch):
    from serve.cli import app

    monkeypatch.setenv("TUNEWHEEL_DATA_DIR", str(tmp_path / "data"))
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops"])
    with respx.mock(assert_all_called=False) as mock:
        route = mock.post(f"{URL}/v1/chat/completions").respond(200)
        result = CliRunner().invoke(app, ["eval", "--model", "base", "--data", str(bad), "--url", URL])
    assert result.exit_code == 1
    assert "bad.jsonl:1: not valid JSON" in result.output
    assert route.call_count == 0


# -- the real thing -------------------------------------------------------------------------


@pytest.mark.engine
def test_scores_the_base_model_through_the_real_gateway(gateway, heldout, tmp_path):
    preds = tmp_path / "preds.jsonl"
    report = scored(heldout, gateway.settings.learn, model="base", url=gateway.url, predictions_out=preds)
    assert report.n_turns == 5
    assert 0.0 <= report.em <= report.f1 <= 1.0  # a turn's F1 is 1 whenever its EM is
    assert set(report.per_source) == {"race", "cnn"}
    assert report.f1 > 0.0  # SmolLM2 reads "Paris" out of a one-line story
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(lines) == 5
    assert all(isinstance(r["prediction"], str) and r["prediction"] for r in lines)
    assert [r["golds"] for r in lines][1] == ["two", "2"]


def test_scored_once_reads_a_model_back_on_the_same_items_and_settings(tmp_path):
    from learn.evaluate import EvalItem, EvalReport, scored_once

    calls = []

    def evaluate(items, *, model, max_tokens, **_):
        calls.append((model, max_tokens))
        return EvalReport(model=model, n_turns=len(items), em=0.5, f1=0.6)

    items = [EvalItem(id="a", source="s", story="Bo has a cat.", turns=[("Who has a cat?", ["Bo"])])]
    first = scored_once(evaluate, items, tmp_path, model="base", base="/m", label="the first look", max_tokens=32)
    again = scored_once(evaluate, items, tmp_path, model="base", base="/m", label="cycle 1", max_tokens=32)
    assert calls == [("base", 32)] and first.cached_from is None and again.cached_from == "the first look"
    assert (again.em, again.f1, again.n_turns) == (0.5, 0.6, 1)
    scored_once(evaluate, items, tmp_path, model="base", base="/m", max_tokens=64)  # other settings
    scored_once(evaluate, items, tmp_path, model="base", base="/other", max_tokens=32)  # another base model
    scored_once(evaluate, items[:0] + [EvalItem(id="b", source="s", story="x", turns=[("q", ["a"])])], tmp_path,
                model="base", base="/m", max_tokens=32)  # other items
    scored_once(evaluate, items, tmp_path, model="base", base="/m", max_tokens=32, reuse=False)  # a candidate: always scored
    assert len(calls) == 5
