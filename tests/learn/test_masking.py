"""Loss masking of the training recipe on the real SmolLM2 chat template (tokenizer only, no weights).

    pytest tests/learn/test_masking.py

With train_on_inputs false the scored tokens must be exactly the assistant turns as the template
renders them (content + <|im_end|>, not the `<|im_start|>assistant` header), every turn of a
multi-turn conversation, minus the ones with weight 0; with true every token is scored. The KTO
and DPO stages score only the answer being rated (and, for KTO's KL estimate, another row's answer
on this prompt): never the prompt, its earlier answers, or the header, whatever train_on_inputs says.
"""

from __future__ import annotations

import pytest

from learn.train_data import IGNORE, encode
from learn.train_pref import encode_dpo, encode_kto

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


def preference_prompt() -> list[dict]:
    """The conversation up to the last question: earlier answers are context, as a snapshot's prompt holds them."""
    return conversation()[:-1]


def test_kto_scores_only_the_rated_answer(tokenizer):
    rows = [{"prompt": preference_prompt(), "completion": [{"role": "assistant", "content": "on a hill"}], "label": True},
            {"prompt": preference_prompt()[:3], "completion": [{"role": "assistant", "content": "a dog"}], "label": False}]
    first, second = encode_kto(tokenizer, rows, max_length=512, seed=0)
    assert scored_runs(tokenizer, first["seq"]) == ["on a hill<|im_end|>"]
    assert scored_runs(tokenizer, second["seq"]) == ["a dog<|im_end|>"]
    # the KL estimate pairs each prompt with the other row's answer, scored the same way
    assert scored_runs(tokenizer, first["kl"]) == ["a dog<|im_end|>"]
    assert scored_runs(tokenizer, second["kl"]) == ["on a hill<|im_end|>"]
    assert ANSWERS[0] in tokenizer.decode(first["seq"]["input_ids"])  # context, not a target
    # packed in one row, the targets are the same tokens
    assert [tokenizer.decode([t for _, t in targets]) for targets in first["packed"]["targets"]] == ["on a hill<|im_end|>", "a dog<|im_end|>"]


def test_dpo_scores_only_the_chosen_and_the_rejected_answer(tokenizer):
    row = {"prompt": preference_prompt(), "chosen": [{"role": "assistant", "content": "on a hill above the harbour"}],
           "rejected": [{"role": "assistant", "content": "I do not know."}]}
    [pair] = encode_dpo(tokenizer, [row], max_length=512)
    assert scored_runs(tokenizer, pair["chosen"]) == ["on a hill above the harbour<|im_end|>"]
    assert scored_runs(tokenizer, pair["rejected"]) == ["I do not know.<|im_end|>"]
    n = len(pair["chosen"]["input_ids"]) - len(tokenizer("on a hill above the harbour<|im_end|>\n", add_special_tokens=False)["input_ids"])
    assert pair["chosen"]["input_ids"][:n] == pair["rejected"]["input_ids"][:n]  # one prompt, rendered once the same way
    packed = pair["packed"]
    assert [tokenizer.decode([t for _, t in targets]) for targets in packed["targets"]] == [
        "on a hill above the harbour<|im_end|>", "I do not know.<|im_end|>"]
    assert packed["segment"].count(0) == n  # the prompt is in the row once
