"""The one chat-JSONL validator: `data check` on broken files (every problem with its line number,
non-zero exit), and the trainer's `read_examples` refusing the same file with the same lines.

    pytest tests/feedback/test_check.py
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from feedback.check import ChatDataError, check_file, load_token_counter, read_examples, read_preferences, validate_messages
from serve.cli import app as tunewheel_app

GOOD = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def line(*messages, **extra) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in messages], **extra})


BROKEN = {
    "not valid JSON": '{"messages": [',
    "must be a JSON object": "[1, 2]",
    "missing `messages`": json.dumps({"prompt": "hi", "completion": "yo"}),
    "role 'tool'": line(("user", "hi"), ("tool", "x"), ("assistant", "y")),
    "system message may only come first": line(("user", "hi"), ("system", "be nice"), ("assistant", "y")),
    "must alternate": line(("user", "hi"), ("user", "again"), ("assistant", "y")),
    "last message must be from the assistant": line(("user", "hi"), ("assistant", "y"), ("user", "and?")),
    "empty content": line(("user", "hi"), ("assistant", "   ")),
    "content must be a string": json.dumps({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "y"}]}),
    "`messages` is empty": json.dumps({"messages": []}),
    "empty line": "",
    "`weight` is allowed only on assistant": json.dumps({"messages": [{"role": "user", "content": "hi", "weight": 1}, {"role": "assistant", "content": "y"}]}),
    "`meta.rating` must be up, down or null": line(("user", "hi"), ("assistant", "y"), meta={"key": None, "rating": "meh", "source": "rated"}),
}


@pytest.fixture
def broken_file(tmp_path) -> Path:
    """A good line, then one broken line per kind of problem, then a good line."""
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join([json.dumps(GOOD), *BROKEN.values(), json.dumps(GOOD)]) + "\n")
    return path


def test_every_problem_has_its_line_number(broken_file):
    report = check_file(broken_file)
    found = {p.line: p.message for p in report.problems}
    for lineno, expected in enumerate(BROKEN, start=2):
        assert expected in found.get(lineno, ""), f"line {lineno}: expected {expected!r}, got {found.get(lineno)!r}"
    assert 1 not in found and len(BROKEN) + 2 not in found
    assert report.bad_lines == len(BROKEN) and report.examples == 2 and not report.ok
    assert report.messages == 6 and report.assistant_turns == 2


def test_cli_exits_non_zero_and_prints_line_numbers(broken_file):
    result = CliRunner().invoke(tunewheel_app, ["data", "check", str(broken_file), "--max-tokens", "0"])
    assert result.exit_code == 1
    assert f"{broken_file}:2: not valid JSON" in result.output
    assert f"{broken_file}:7: message 1 is user but assistant was expected" in result.output
    assert "2 valid example(s)" in result.output


def test_cli_passes_a_good_file(tmp_path):
    good = tmp_path / "good.jsonl"
    weighted = {"messages": [*copy.deepcopy(GOOD["messages"]), {"role": "user", "content": "More?"}, {"role": "assistant", "content": "No."}]}
    weighted["messages"][2]["weight"] = 0
    good.write_text(json.dumps(GOOD) + "\n" + json.dumps(weighted) + "\n")
    result = CliRunner().invoke(tunewheel_app, ["data", "check", str(good), "--max-tokens", "0", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["examples"] == 2 and report["assistant_turns"] == 3


def test_missing_file_is_an_error(tmp_path):
    result = CliRunner().invoke(tunewheel_app, ["data", "check", str(tmp_path / "nope.jsonl"), "--max-tokens", "0"])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_weight_rules():
    assert validate_messages([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 1}]) == []
    assert "no target" in validate_messages([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}])[0]
    assert validate_messages([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}])


def test_token_limit_with_a_fake_counter(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(line(("user", "short"), ("assistant", "ok")) + "\n" + line(("user", "long " * 30), ("assistant", "ok")) + "\n")
    words = lambda batch: [sum(len(m["content"].split()) for m in msgs) for msgs in batch]  # noqa: E731
    report = check_file(path, max_tokens=10, count_tokens=words)
    assert [(p.line, "more than the limit of 10" in p.message) for p in report.problems] == [(2, True)]
    assert report.tokens == 2 and report.examples == 1


def test_real_tokenizer_counts_the_chat_template(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    count = load_token_counter(model_dir)
    conversation = [{"role": "system", "content": "Read the story.\nStory: Anna lived in Oakdale."}]
    for i in range(6):
        conversation += [{"role": "user", "content": f"Question {i}: where did Anna live?"}, {"role": "assistant", "content": "Oakdale"}]
    examples = [GOOD["messages"], GOOD["messages"][1:], [{"role": "user", "content": "Where is Oakdale?"}, {"role": "assistant", "content": "in the north"}],
                conversation, conversation[1:]]  # multi-turn: user and assistant messages cost different template tokens
    expected = [len(tok.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"]) for m in examples]
    assert count(examples) == expected


def printed_problems(output: str, path: Path) -> list[str]:
    """The `path:line: message` lines of `data check`'s output (not its summary)."""
    return [ln for ln in output.splitlines() if re.match(rf"{re.escape(str(path))}:\d+: ", ln)]


def test_the_trainer_is_refused_with_exactly_the_lines_data_check_prints(broken_file):
    result = CliRunner().invoke(tunewheel_app, ["data", "check", str(broken_file), "--max-tokens", "0"])
    with pytest.raises(ChatDataError) as refused:
        read_examples(broken_file)
    assert str(refused.value).splitlines() == printed_problems(result.output, broken_file)
    assert len(str(refused.value).splitlines()) == len(BROKEN)
    assert refused.value.report.bad_lines == len(BROKEN)


def test_a_file_data_check_accepts_gives_the_trainer_every_example(tmp_path):
    path = tmp_path / "good.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line(("user", "q"), ("assistant", "a")) + "\n")
    assert CliRunner().invoke(tunewheel_app, ["data", "check", str(path), "--max-tokens", "0"]).exit_code == 0
    assert read_examples(path) == [GOOD["messages"], [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]


def test_token_limit_refuses_the_same_lines_in_check_and_trainer(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(line(("user", "short"), ("assistant", "ok")) + "\n" + line(("user", "long " * 30), ("assistant", "ok")) + "\n")
    words = lambda batch: [sum(len(m["content"].split()) for m in msgs) for msgs in batch]  # noqa: E731
    with pytest.raises(ChatDataError) as refused:
        read_examples(path, max_tokens=10, count_tokens=words)
    assert str(refused.value) == f"{path}:2: 31 tokens, more than the limit of 10"
    assert check_file(path, max_tokens=10, count_tokens=words).problem_lines() == [str(refused.value)]
    assert len(read_examples(path, max_tokens=100, count_tokens=words)) == 2


def test_real_tokenizer_limit_gives_the_same_lines_in_check_and_trainer(tmp_path, model_dir):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([json.dumps(GOOD), line(("user", "tell me " * 200), ("assistant", "no")), "{oops"]) + "\n")
    config = tmp_path / "tunewheel.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[engine]\nmodel = "{model_dir}"\n[learn.train]\nmax_length = 64\n')
    result = CliRunner().invoke(tunewheel_app, ["data", "check", str(path), "--config", str(config)])
    assert result.exit_code == 1, result.output
    with pytest.raises(ChatDataError) as refused:
        read_examples(path, max_tokens=64, count_tokens=load_token_counter(model_dir))
    lines = str(refused.value).splitlines()
    assert lines == printed_problems(result.output, path)
    assert [ln.split(":")[1] for ln in lines] == ["2", "3"] and "more than the limit of 64" in lines[0]


# ---------------------------------------------------------------------------------------- preference formats

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
KTO = {"prompt": PROMPT, "completion": [{"role": "assistant", "content": "Paris."}], "label": True,
       "meta": {"key": None, "rating": "up", "source": "rated"}}
DPO = {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "Paris."}], "rejected": [{"role": "assistant", "content": "Lyon."}],
       "meta": {"key": "a" * 64, "rating": "down", "source": "corrected"}}
BROKEN_KTO = {
    "the prompt must end with a user message": {**KTO, "prompt": [*PROMPT, {"role": "assistant", "content": "Hm."}]},
    "`completion` must be a list holding one assistant message": {**KTO, "completion": [{"role": "user", "content": "x"}]},
    "`label` must be true": {**KTO, "label": "yes"},
    "`completion` has no answer text": {**KTO, "completion": [{"role": "assistant", "content": " "}]},
    "`meta.source` must be one of": {**KTO, "meta": {"key": None, "rating": "up", "source": "made-up"}},
    "`meta.key` must be a sha256 hex string": {**KTO, "meta": {"key": "alice", "rating": "up", "source": "rated"}},
    "missing `prompt`": {"completion": KTO["completion"], "label": False},
}
BROKEN_DPO = {
    "`chosen` and `rejected` are the same answer": {**DPO, "rejected": DPO["chosen"]},
    "missing `rejected`": {k: v for k, v in DPO.items() if k != "rejected"},
    "prompt message 1 is assistant but user was expected": {**DPO, "prompt": [PROMPT[0], {"role": "assistant", "content": "x"},
                                                                               PROMPT[1]]},
}


@pytest.mark.parametrize(("fmt", "good", "broken"), [("kto", KTO, BROKEN_KTO), ("dpo", DPO, BROKEN_DPO)])
def test_preference_files_are_checked_with_line_numbers(tmp_path, fmt, good, broken):
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [good, *broken.values(), good]) + "\n")
    report = check_file(path, fmt=fmt)
    found = {p.line: p.message for p in report.problems}
    for lineno, expected in enumerate(broken, start=2):
        assert expected in found.get(lineno, ""), f"line {lineno}: expected {expected!r}, got {found.get(lineno)!r}"
    assert report.examples == 2 and report.bad_lines == len(broken)
    with pytest.raises(ChatDataError) as exc:
        read_preferences(path, kind=fmt)
    assert str(exc.value).splitlines() == report.problem_lines()
    path.write_text(json.dumps(good) + "\n")
    assert read_preferences(path, kind=fmt) == [good]


def test_preference_rows_count_their_longest_answer_against_the_token_limit(tmp_path):
    path = tmp_path / "dpo.jsonl"
    long = {**DPO, "rejected": [{"role": "assistant", "content": "word " * 30}]}
    path.write_text(json.dumps(DPO) + "\n" + json.dumps(long) + "\n")
    words = lambda batch: [sum(len(m["content"].split()) for m in msgs) for msgs in batch]  # noqa: E731
    report = check_file(path, fmt="dpo", max_tokens=20, count_tokens=words)
    assert [(p.line, p.message) for p in report.problems] == [(2, "35 tokens, more than the limit of 20")]


def test_cli_checks_a_preference_file_by_its_format(tmp_path):
    path = tmp_path / "preferences.jsonl"
    path.write_text(json.dumps(KTO) + "\n" + json.dumps({**KTO, "label": False}) + "\n" + json.dumps(BROKEN_KTO["`label` must be true"]) + "\n")
    result = CliRunner().invoke(tunewheel_app, ["data", "check", str(path), "--max-tokens", "0"])
    assert result.exit_code == 1
    assert f"{path}:3: `label` must be true" in result.output and "2 valid KTO row(s), 1 desirable, 1 undesirable" in result.output
    path.write_text(json.dumps(DPO) + "\n")
    result = CliRunner().invoke(tunewheel_app, ["data", "check", str(path), "--max-tokens", "0", "--format", "dpo"])
    assert result.exit_code == 0 and "1 valid DPO pair(s)" in result.output
