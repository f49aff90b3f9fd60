"""Slow: the recipe trains real SmolLM2-135M adapters for a few steps on CPU (SFT, KTO, DPO), and peft loads them.

    pytest -m slow tests/learn/test_train_real.py

About a minute on 2 cores for SFT, less for each preference stage (3 steps). Serving the adapter through the real engine is
tested with the learner's hot-swap.
"""

from __future__ import annotations

import json

import pytest

from learn.train import TrainConfig, train
from learn.train_data import collate, encode, scored_count, scored_loss

STORIES = [
    ("The lighthouse on Gull Rock was painted red in 1910 by a keeper named Ada.", [("What was painted?", "The lighthouse"), ("What color?", "red"), ("Who painted it?", "Ada")]),
    ("Tom baked forty loaves on Monday and sold all of them before noon at the market.", [("Who baked?", "Tom"), ("How many loaves?", "forty"), ("Where did he sell them?", "at the market")]),
    ("A grey cat named Pilot slept every afternoon on the warm roof of the train station.", [("What is the cat's name?", "Pilot"), ("Where did it sleep?", "on the roof"), ("What color is it?", "grey")]),
    ("Maria planted twelve apple trees behind the school, and the oldest is now thirty years old.", [("What did Maria plant?", "apple trees"), ("How many?", "twelve"), ("Where?", "behind the school")]),
]


def coqa_chats(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        story, turns = STORIES[i % len(STORIES)]
        messages = [{"role": "system", "content": f"Answer briefly from the story.\n{story}"}]
        for q, a in turns[: 2 + i % 2]:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append({"messages": messages})
    return rows


@pytest.mark.slow
def test_real_smollm2_adapter_trains_and_loads(tmp_path, model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = coqa_chats(16)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "chat-v0001"
    config = TrainConfig(max_length=256, epochs=2, max_steps=5, learning_rate=1e-3, warmup_ratio=0.0, device="cpu")
    result = train(config, base_model=str(model_dir), train_file=data, out_dir=out)

    assert result.metrics["steps"] == 5 and result.metrics["tokens_per_s"] > 0
    assert {"adapter_config.json", "adapter_model.safetensors", "report.json", "loss.png"} <= {p.name for p in out.iterdir()}
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["r"] == 16 and set(adapter_config["target_modules"]) == set(config.target_modules)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = collate([encode(tokenizer, r["messages"], train_on_inputs=False, max_length=256) for r in rows[:4]],
                    tokenizer.pad_token_id, "cpu")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        base_loss = float(scored_loss(base, batch)) / scored_count(batch)
        tuned = PeftModel.from_pretrained(base, out)
        tuned.eval()
        tuned_loss = float(scored_loss(tuned, batch)) / scored_count(batch)
    assert tuned_loss < base_loss  # the loaded adapter changes the model, toward the training answers


def preference_files(tmp_path, n: int = 12) -> tuple:
    """KTO rows and DPO pairs on the real stories: the story's answer up / chosen, a wrong one down / rejected."""
    kto, pairs = [], []
    for i, row in enumerate(coqa_chats(n)):
        prompt, right = row["messages"][:2], row["messages"][2]["content"]
        wrong = "I am not sure, the story does not say."
        meta = {"key": None, "rating": "down", "source": "pair"}
        pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": right}], "rejected": [{"role": "assistant", "content": wrong}], "meta": meta})
        kto.append({"prompt": prompt, "completion": [{"role": "assistant", "content": wrong if i % 2 else right}], "label": not i % 2,
                    "meta": {**meta, "rating": "down" if i % 2 else "up", "source": "rated"}})
    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return tmp_path / name
    return write("preferences.jsonl", kto), write("preference_pairs.jsonl", pairs), pairs


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["kto", "dpo"])
def test_real_smollm2_preference_stage_trains_an_adapter_that_prefers_the_chosen_answer(tmp_path, model_dir, stage):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from learn.train_data import sequence_logps
    from learn.train_pref import encode_answer

    preferences, pairs_file, pairs = preference_files(tmp_path)
    out = tmp_path / f"chat-{stage}"
    config = TrainConfig(max_length=256, max_steps=3, learning_rate=2e-3, warmup_ratio=0.0, beta=0.5, device="cpu", val_fraction=0.2)
    result = train(config, base_model=str(model_dir), preference_file=preferences, pair_file=pairs_file, stages=(stage,), out_dir=out)
    assert list(result.metrics["stages"]) == [stage] and 1 <= result.metrics["stages"][stage]["steps"] <= 3  # max_steps bounds it
    assert {"adapter_config.json", "adapter_model.safetensors", "report.json", "loss.png"} <= {p.name for p in out.iterdir()}

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [(p["prompt"], p[k][0]) for p in pairs[:4] for k in ("chosen", "rejected")]
    batch = collate([encode_answer(tokenizer, prompt, answer, max_length=256) for prompt, answer in rows], tokenizer.pad_token_id, "cpu")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        before = sequence_logps(base, batch)
        after = sequence_logps(PeftModel.from_pretrained(base, out).eval(), batch)
    margin = lambda logps: float((logps[0::2] - logps[1::2]).mean())  # noqa: E731  chosen minus rejected
    assert margin(after) > margin(before)  # the loaded adapter moved toward the preferred answers
