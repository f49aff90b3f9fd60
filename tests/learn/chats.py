"""Helpers for the training tests: short CoQA-style chats and a tiny random Llama with SmolLM2's tokenizer.

    from tests.learn.chats import coqa_rows, write_jsonl, save_tiny_llama
    write_jsonl(tmp_path / "train.jsonl", coqa_rows(16))

tests/learn/conftest.py turns `save_tiny_llama` into the session fixture `tiny_model`.
"""

from __future__ import annotations

import json
from pathlib import Path


def coqa_rows(n: int) -> list[dict]:
    """Short CoQA-style conversations: a story as system prompt, two questions with short answers."""
    names = ["Anna", "Ben", "Chloe", "Dev"]
    rows = []
    for i in range(n):
        name, count = names[i % len(names)], i % 5 + 2
        rows.append({"messages": [
            {"role": "system", "content": f"{name} keeps {count} goats on a hill."},
            {"role": "user", "content": "Who keeps goats?"},
            {"role": "assistant", "content": name},
            {"role": "user", "content": "How many?"},
            {"role": "assistant", "content": str(count)},
        ]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def save_tiny_llama(folder: Path, model_dir: Path) -> Path:
    """A randomly initialised 2-layer Llama saved with the SmolLM2 tokenizer and chat template.

    Weights drawn wider than the usual 0.02 so that a LoRA on it can move the tied head's logits far
    enough for the loss to fall clearly within a few steps. No pad_token_id in its config: the pad
    token is <|im_end|>, and an embedding's padding row starts at zero, which would pin that
    (tied) output logit at 0.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=0.2, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def preference_rows(n: int) -> tuple[list[dict], list[dict]]:
    """(KTO rows, DPO pairs) in the snapshot's formats, from the same short chats: the story's answer is the
    desirable one (and a correction's `chosen`), a wrong name the undesirable one."""
    kto, pairs = [], []
    for i, row in enumerate(coqa_rows(n)):
        prompt, right = row["messages"][:2], row["messages"][2]["content"]
        wrong = "Nobody keeps goats, I think."
        kto.append({"prompt": prompt, "completion": [{"role": "assistant", "content": right if i % 3 == 0 else wrong}],
                    "label": i % 3 == 0, "meta": {"key": None, "rating": "up" if i % 3 == 0 else "down", "source": "rated"}})
        pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": right}],
                      "rejected": [{"role": "assistant", "content": wrong}], "meta": {"key": None, "rating": "down", "source": "pair"}})
    return kto, pairs
