"""Slow: the recipe trains a real SmolLM2-135M adapter for a few steps on CPU, and peft loads it.

    pytest -m slow tests/learn/test_train_real.py

About a minute on 2 cores. Serving the adapter through the real engine is tested with the
learner's hot-swap.
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
