"""Loss masking of the training recipe on the real SmolLM2 chat template (tokenizer only, no weights).

    pytest tests/learn/test_masking.py

With train_on_inputs false the scored tokens must be exactly the assistant turns as the template
renders them (content + <|im_end|>, not the `<|im_start|>assistant` header), every turn of a
multi-turn conversation, minus the ones with weight 0; with true every token is scored.
"""

from __future__ import annotations

import pytest

from learn.train_data import IGNORE, encode

SYSTEM = "Story: Anna keeps three goats on a hill above the harbour."
QUESTIONS = ["Who keeps goats?", "How many?", "Where are they?"]
ANSWERS = ["Anna", "three goats", "on a hill above the harbour"]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def conversation(weights=(1, 1, 1), system=True) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    for q, a, w in zip(QUESTIONS, ANSWERS, weights):
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a, "weight": w}]
    return messages


def scored_runs(tokenizer, example) -> list[str]:
    """The labelled tokens, decoded as runs of consecutive labelled positions."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE:
            assert label == token
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_only_every_assistant_turn_is_scored(tokenizer):
    example = encode(tokenizer, conversation(), train_on_inputs=False, max_length=512)
    runs = scored_runs(tokenizer, example)
    assert runs == [f"{a}<|im_end|>" for a in ANSWERS]
    scored = "".join(runs)
    for text in [SYSTEM, *QUESTIONS, "assistant", "<|im_start|>"]:
        assert text not in scored


def test_default_system_prompt_is_not_scored(tokenizer):
    example = encode(tokenizer, conversation(system=False), train_on_inputs=False, max_length=512)
    assert scored_runs(tokenizer, example) == [f"{a}<|im_end|>" for a in ANSWERS]
    assert "SmolLM" in tokenizer.decode(example["input_ids"])  # the template added its own system prompt


def test_weight_zero_turn_is_context_only(tokenizer):
    example = encode(tokenizer, conversation(weights=(1, 0, 1)), train_on_inputs=False, max_length=512)
    assert scored_runs(tokenizer, example) == [f"{ANSWERS[0]}<|im_end|>", f"{ANSWERS[2]}<|im_end|>"]
    assert ANSWERS[1] in tokenizer.decode(example["input_ids"])


def test_train_on_inputs_scores_everything(tokenizer):
    example = encode(tokenizer, conversation(weights=(1, 0, 1)), train_on_inputs=True, max_length=512)
    assert example["labels"] == example["input_ids"]
    rendered = tokenizer.apply_chat_template(conversation(), tokenize=False)
    assert tokenizer.decode(example["input_ids"]) == rendered


def test_truncation_keeps_the_start(tokenizer):
    full = encode(tokenizer, conversation(), train_on_inputs=False, max_length=512)
    cut = encode(tokenizer, conversation(), train_on_inputs=False, max_length=40)
    assert len(full["input_ids"]) > 40
    assert cut["input_ids"] == full["input_ids"][:40]
    assert cut["labels"] == full["labels"][:40]


def test_min_examples_counts_before_the_validation_split(tokenizer):
    """8 conversations with min_examples 8 train (7 + 1 held for validation), as the loader's check allows."""
    from learn.train import TrainError, tokenize
    from learn.train_config import TrainConfig
    config = TrainConfig(min_examples=8)
    rows = [conversation() for _ in range(8)]
    train_set, val_set = tokenize(config, tokenizer, rows[:7], rows[7:])
    assert (len(train_set), len(val_set)) == (7, 1)
    with pytest.raises(TrainError, match=r"8 conversation\(s\) have no assistant token left, leaving 0 training.*"
                                         r"raise max_length"):
        tokenize(TrainConfig(min_examples=8, max_length=16), tokenizer, rows[:7], rows[7:])
