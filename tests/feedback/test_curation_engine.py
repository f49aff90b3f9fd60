"""Chat through the real engine, rate answers through the API, curate: exactly the up-rated
answers and the corrections become training targets.

    TUNEWHEEL_TEST_ENGINE_URL=http://127.0.0.1:8101 pytest -m engine tests/feedback/test_curation_engine.py
"""

from __future__ import annotations

import json

import httpx
import pytest
from typer.testing import CliRunner

from feedback.check import check_file, load_token_counter
from feedback.curate import CurationConfig
from feedback.snapshot import build_snapshot, iter_log
from serve.cli import app as tunewheel_app

pytestmark = pytest.mark.engine


def ask(client, messages: list[dict], conversation: str) -> tuple[str, str]:
    """One chat turn; returns (completion id, answer)."""
    reply = client.chat.completions.create(model="chat", messages=messages, max_tokens=24, temperature=0,
                                           extra_headers={"x-conversation-id": conversation})
    return reply.id, reply.choices[0].message.content


def rate(gateway, completion_id: str, rating: str, **extra) -> None:
    response = httpx.post(f"{gateway.url}/v1/feedback", json={"completion_id": completion_id, "rating": rating, **extra}, timeout=30)
    assert response.status_code == 201, response.text


def targets(path) -> list[str]:
    """The assistant messages that are training targets (not weight 0) in a chat JSONL file."""
    out = []
    for line in path.read_text().splitlines():
        out += [m["content"] for m in json.loads(line)["messages"] if m["role"] == "assistant" and m.get("weight", 1) == 1]
    return out


def test_only_up_rated_answers_and_corrections_become_targets(gateway, model_dir, tmp_path):
    client = gateway.client()
    history = [{"role": "system", "content": "Answer in one short sentence."}]
    answers = {}
    for i, question in enumerate(["What is the capital of France?", "What river flows through it?", "Name a famous museum there."]):
        history.append({"role": "user", "content": question})
        cid, answer = ask(client, history, "conv-paris")
        answers[f"paris{i}"] = (cid, answer)
        history.append({"role": "assistant", "content": answer})
    answers["cats"] = ask(client, [{"role": "user", "content": "Why do cats purr?"}], "conv-cats")
    answers["sky"] = ask(client, [{"role": "user", "content": "Why is the sky blue?"}], "conv-sky")
    assert all(a.strip() for _, a in answers.values())
    gateway.writer.flush()

    rate(gateway, answers["paris1"][0], "up")  # only the middle turn of the three
    rate(gateway, answers["paris2"][0], "down")
    rate(gateway, answers["cats"][0], "down")
    rate(gateway, answers["cats"][0], "up")  # rating again replaces the rating
    rate(gateway, answers["sky"][0], "down", correction="Because air scatters blue light the most.")
    up = {answers["paris1"][1], answers["cats"][1], "Because air scatters blue light the most."}

    snap = build_snapshot(iter_log(gateway.db), root=tmp_path / "snapshots", config=CurationConfig(max_tokens=1024, heldout_fraction=0.0),
                          count_tokens=load_token_counter(model_dir))
    train = snap.path / "train.jsonl"
    assert sorted(targets(train)) == sorted(up)
    assert check_file(train, max_tokens=1024, count_tokens=load_token_counter(model_dir)).ok
    paris = next(json.loads(line)["messages"] for line in train.read_text().splitlines() if "France" in line)
    assert [m["content"] for m in paris if m["role"] == "assistant"] == [answers["paris0"][1], answers["paris1"][1]]
    counts = snap.manifest["counts"]
    assert (counts["turns"], counts["conversations"], counts["rated_up"], counts["rated_down"], counts["unrated"]) == (5, 3, 2, 2, 1)
    labels = {(json.loads(line)["completion"][0]["content"], json.loads(line)["label"])
              for line in (snap.path / "preferences.jsonl").read_text().splitlines()}
    assert labels == {(answers["paris1"][1], True), (answers["paris2"][1], False), (answers["cats"][1], True), (answers["sky"][1], False),
                      ("Because air scatters blue light the most.", True)}
    [pair] = [json.loads(line) for line in (snap.path / "preference_pairs.jsonl").read_text().splitlines()]
    assert (pair["chosen"][0]["content"], pair["rejected"][0]["content"]) == ("Because air scatters blue light the most.", answers["sky"][1])
    assert check_file(snap.path / "preference_pairs.jsonl", fmt="dpo").ok and check_file(snap.path / "preferences.jsonl", fmt="kto").ok

    # the same through the CLI, as a user would: export, then check the file
    config = tmp_path / "tunewheel.toml"
    config.write_text(f'data_dir = "{gateway.settings.data_dir}"\n[engine]\nmodel = "{model_dir}"\n'
                      f'[store]\nurl = "{gateway.settings.store_url}"\n')
    exported = tmp_path / "curated.jsonl"
    runner = CliRunner()
    result = runner.invoke(tunewheel_app, ["data", "export", "--out", str(exported), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert sorted(targets(exported)) == sorted(up)
    checked = runner.invoke(tunewheel_app, ["data", "check", str(exported), "--config", str(config)])
    assert checked.exit_code == 0, checked.output
