"""The trainer and `tunewheel data check` agree: one validator, the same line-numbered messages.

    pytest tests/learn/test_train_data.py

On the tiny random Llama (seconds): a chat JSONL file that `data check` accepts trains; one it
refuses is refused by the trainer (in process and in the child) with exactly the
`{path}:{line}: {message}` lines `data check` prints, token limit included (`learn.train.max_length`,
counted with the base model's tokenizer by both). A learner snapshot's train.jsonl, curated log
turns plus seed files, passes the check the trainer runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from learn.train import TrainError, train, train_in_child
from serve.settings import load_settings
from tests.learn.chats import coqa_rows, write_jsonl


@pytest.fixture
def config_file(tmp_path, tiny_model) -> Path:
    """One config for both sides: the tiny model's tokenizer and a 128-token limit."""
    path = tmp_path / "tunewheel.toml"
    path.write_text(f'data_dir = "{tmp_path / "data"}"\n[engine]\nmodel = "{tiny_model}"\n'
                    '[learn.train]\nmax_length = 128\nmax_steps = 1\ndevice = "cpu"\nmin_examples = 4\n')
    return path


def data_check(path: Path, config_file: Path) -> tuple[int, list[str]]:
    """`tunewheel data check PATH`: exit code and its problem lines."""
    from serve.cli import app

    result = CliRunner().invoke(app, ["data", "check", str(path), "--config", str(config_file)])
    return result.exit_code, problem_lines(result.output, path)


def problem_lines(text: str | Exception, path: Path) -> list[str]:
    """The `{path}:{line}: {message}` lines of a command's output or an error."""
    return [line for line in str(text).splitlines() if re.match(re.escape(f"{path}:") + r"\d+: ", line)]


def bad_file(tmp_path: Path) -> Path:
    good = coqa_rows(6)
    long_story = " ".join(["The goats climbed the hill again and again."] * 40)
    lines = [json.dumps(r) for r in good[:4]]
    lines.append(json.dumps({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}))
    lines.append("{not json")
    lines.append(json.dumps({"messages": [{"role": "user", "content": "Who?"}]}))  # no assistant answer
    lines.append(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi?"},
                                          {"role": "assistant", "content": "Hello"}]}))  # no alternation
    lines.append(json.dumps({"messages": [{"role": "system", "content": long_story}, *good[4]["messages"][1:]]}))
    lines += [json.dumps(r) for r in good[5:]]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_file_data_check_refuses_is_refused_with_the_same_lines(tmp_path, tiny_model, config_file):
    path = bad_file(tmp_path)
    code, expected = data_check(path, config_file)
    assert code == 1 and len(expected) >= 5
    assert any("more than the limit of 128" in line for line in expected)  # the token limit is part of the check

    config = load_settings(config_file).learn.train
    with pytest.raises(TrainError) as refused:
        train(config, base_model=str(tiny_model), train_file=path, out_dir=tmp_path / "out")
    assert problem_lines(refused.value, path) == expected
    assert not (tmp_path / "out").exists()

    with pytest.raises(TrainError) as refused_in_child:
        train_in_child(config, base_model=str(tiny_model), train_file=path, out_dir=tmp_path / "out")
    assert problem_lines(refused_in_child.value, path) == expected


def test_a_bad_validation_file_is_refused_the_same_way(tmp_path, tiny_model, config_file):
    good, bad = write_jsonl(tmp_path / "good.jsonl", coqa_rows(8)), bad_file(tmp_path)
    _, expected = data_check(bad, config_file)
    with pytest.raises(TrainError) as refused:
        train(load_settings(config_file).learn.train, base_model=str(tiny_model), train_file=good, val_file=bad,
              out_dir=tmp_path / "out")
    assert problem_lines(refused.value, bad) == expected


def test_a_file_data_check_accepts_trains(tmp_path, tiny_model, config_file):
    path = write_jsonl(tmp_path / "good.jsonl", coqa_rows(8))
    assert data_check(path, config_file) == (0, [])
    result = train(load_settings(config_file).learn.train, base_model=str(tiny_model), train_file=path, out_dir=tmp_path / "out")
    assert result.metrics["steps"] == 1 and (tmp_path / "out" / "adapter_model.safetensors").is_file()


def rate_turns(db, n: int) -> None:
    """`n` up-rated answers in the log, each its own conversation."""
    from sqlmodel import Session

    from feedback.models import Conversation, Turn

    with Session(db) as s:
        for i in range(n):
            s.add(Conversation(id=f"c{i}"))
            s.add(Turn(id=f"t{i}", conversation_id=f"c{i}", alias="chat", adapter_version="base", thread_hash=f"h{i}",
                       request_messages=[{"role": "system", "content": f"Story: Ann has {i + 2} red kites."},
                                         {"role": "user", "content": "How many kites does Ann have?"}],
                       answer=f"{i + 2}", rating="up"))
        s.commit()


def test_a_learner_snapshot_of_log_and_seeds_passes_the_trainers_check(tmp_path, tiny_model, config_file):
    from feedback.check import check_file, load_token_counter
    from feedback.db import make_db
    from feedback.synth import synth_coqa
    from learn.cycle import _snapshot

    seeds = tmp_path / "seed.json"  # synthetic CoQA stories, as the demo seeds its learner
    seeds.write_text(json.dumps(synth_coqa(stories=6, seed=0, variant="A")))
    settings = load_settings(config_file, learn={"seed_files": [str(seeds), str(write_jsonl(tmp_path / "seed.jsonl", coqa_rows(6)))],
                                                 "train": {"max_length": 384}, "heldout_fraction": 0.0})
    db = make_db(settings.store_url)
    rate_turns(db, 5)
    snap = _snapshot(settings.learn, db, settings.learn_dirs, str(tiny_model))
    report = check_file(snap.path / "train.jsonl", max_tokens=settings.learn.train.max_length, count_tokens=load_token_counter(tiny_model))
    assert report.ok, report.problems
    assert report.examples == snap.manifest["counts"]["train_total"] == 5 + 6 + 6
