"""Training mechanics on a tiny random Llama (2 layers, hidden 64) with the real SmolLM2 tokenizer.

    pytest tests/learn/test_train.py

Seconds, no real weights: config validation, data errors with line numbers, the head-only-at-
scored-positions loss against the full-head loss, a short run that lowers the loss and leaves a
finished adapter + report (and no temp folder), and the child process: success, a clear error,
and a SIGKILL mid-run that leaves nothing at out_dir.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from learn.train import TrainConfig, TrainError, collate, encode, read_chat_jsonl, scored_count, scored_loss, train, train_in_child


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


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, model_dir) -> Path:
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
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", coqa_rows(16))


def tiny_config(tiny_model, data, out, **overrides) -> TrainConfig:
    settings = dict(base_model=str(tiny_model), train_file=str(data), out_dir=str(out), rank=8, alpha=16,
                    learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant", batch_size=4, max_length=128, device="cpu")
    return TrainConfig(**{**settings, **overrides})


def test_config_errors_name_the_problem(tmp_path, tiny_model, data):
    with pytest.raises(TrainError, match="train_file .* does not exist"):
        tiny_config(tiny_model, tmp_path / "missing.jsonl", tmp_path / "a")
    with pytest.raises(TrainError, match="rank and alpha"):
        tiny_config(tiny_model, data, tmp_path / "a", rank=0)
    with pytest.raises(TrainError, match="qlora needs CUDA"):
        tiny_config(tiny_model, data, tmp_path / "a", qlora=True)
    with pytest.raises(TrainError, match="not a model folder"):
        tiny_config(tmp_path, data, tmp_path / "a")
    (tmp_path / "taken").mkdir()
    with pytest.raises(TrainError, match="never overwritten"):
        tiny_config(tiny_model, data, tmp_path / "taken")


def test_from_settings_copies_every_train_setting(tmp_path, tiny_model, data):
    from learn.settings import TrainSettings

    settings = TrainSettings(rank=4, alpha=8, epochs=2, train_on_inputs="true", max_steps=7)
    config = TrainConfig.from_settings(settings, base_model=str(tiny_model), train_file=data, out_dir=tmp_path / "out")
    assert {k: getattr(config, k) for k in settings.model_dump()} == settings.model_dump()
    assert config.train_file == str(data)


def test_bad_line_names_its_number(tmp_path):
    lines = [json.dumps(coqa_rows(1)[0]), json.dumps(coqa_rows(1)[0]), '{"messages": [{"role": "bot", "content": "x"}]}']
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TrainError, match=r"bad.jsonl line 3: message 0 needs a role"):
        read_chat_jsonl(path)
    path.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(TrainError, match="line 2"):
        read_chat_jsonl(path)


def test_too_few_examples_names_the_fix(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "small.jsonl", coqa_rows(3))
    with pytest.raises(TrainError, match="at least 8.*min_examples"):
        train(tiny_config(tiny_model, data, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_head_at_scored_positions_equals_full_head_loss(tiny_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    rows = [encode(tokenizer, r["messages"], train_on_inputs=False, max_length=128) for r in coqa_rows(3)]
    rows[1]["input_ids"] += [5, 6, 7]  # different lengths, so the batch has padding
    rows[1]["labels"] += [-100, -100, -100]
    batch = collate(rows, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        full = model(**batch).loss
        ours = scored_loss(model, batch) / scored_count(batch)
    assert torch.allclose(ours, full, rtol=1e-5, atol=1e-6)


def test_short_run_learns_and_writes_a_finished_adapter(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "repeated.jsonl", coqa_rows(1) * 16)
    out = tmp_path / "chat-v0001"
    result = train(tiny_config(tiny_model, data, out, epochs=4, max_steps=16, early_stopping_patience=4))

    assert result.out_dir == out
    assert {"adapter_config.json", "adapter_model.safetensors", "report.json", "loss.png"} <= {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob("chat-v0001.tmp-*"))
    report = json.loads((out / "report.json").read_text())
    losses = report["train_loss_per_step"]
    assert len(losses) == 16 == result.metrics["steps"]
    assert sum(losses[-3:]) < sum(losses[:3]) / 4
    assert [e["epoch"] for e in report["epochs_log"]] == [1, 2, 3, 4]
    assert result.metrics["val_loss"] == min(e["val_loss"] for e in report["epochs_log"])
    assert result.metrics["examples"] == {"train": 15, "val": 1, "dropped": 0}
    assert 0 <= result.metrics["padding_fraction"] < 0.5 and result.metrics["tokens"] > 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8


def test_child_trains_and_reports(tmp_path, tiny_model, data):
    result = train_in_child(tiny_config(tiny_model, data, tmp_path / "out", max_steps=2))
    assert (result.out_dir / "adapter_model.safetensors").is_file()
    assert result.metrics["steps"] == 2


def test_child_error_is_the_recipe_message(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "small.jsonl", coqa_rows(2))
    with pytest.raises(TrainError, match="at least 8"):
        train_in_child(tiny_config(tiny_model, data, tmp_path / "out"))


def training_children() -> list[int]:
    """Children of this test process that run learn.train (an engine child may run beside them)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and f"PPid:\t{os.getpid()}\n" in (entry / "status").read_text()
                    and b"learn.train" in (entry / "cmdline").read_bytes()):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_killed_child_leaves_nothing(tmp_path, tiny_model, data):
    out = tmp_path / "out"
    outcome: dict = {}

    def run():
        try:
            train_in_child(tiny_config(tiny_model, data, out, epochs=1000, early_stopping_patience=1000))
        except TrainError as e:
            outcome["error"] = str(e)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("out.tmp-*")) and time.monotonic() < deadline:  # training has started
        time.sleep(0.2)
    assert list(tmp_path.glob("out.tmp-*")), f"training never started: {outcome}"
    (child,) = training_children()
    os.kill(child, signal.SIGKILL)
    thread.join(60)
    assert "killed by SIGKILL" in outcome["error"]
    assert not out.exists()
    assert not list(tmp_path.glob("out.tmp-*"))
