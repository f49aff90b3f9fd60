"""Training mechanics on a tiny random Llama (2 layers, hidden 64) with the real SmolLM2 tokenizer.

    pytest tests/learn/test_train.py

Seconds, no real weights: too little data, the head-only-at-scored-positions loss against the
full-head loss, a short run that lowers the loss and leaves a finished adapter + report (and no
temp folder), and the child process: success, a clear error, and a SIGKILL mid-run that leaves
nothing at out_dir. The trainer's data check against `tunewheel data check` is
tests/learn/test_train_data.py; the config, tests/learn/test_train_config.py.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from learn.train import TrainConfig, TrainError, main, pick_precision, train, train_in_child
from learn.train_data import collate, encode, head_logits, scored_count, scored_loss
from tests.learn.chats import coqa_rows, write_jsonl


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", coqa_rows(16))


def tiny_config(**overrides) -> TrainConfig:
    settings = dict(rank=8, alpha=16, learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant", batch_size=4, max_length=128,
                    device="cpu")
    return TrainConfig(**{**settings, **overrides})


def paths(tiny_model, data, out) -> dict:
    return dict(base_model=str(tiny_model), train_file=data, out_dir=out)


def test_too_few_examples_names_the_fix(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "small.jsonl", coqa_rows(3))
    with pytest.raises(TrainError, match="at least 8.*min_examples"):
        train(tiny_config(), **paths(tiny_model, data, tmp_path / "out"))
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


def test_bf16_forward_keeps_the_lm_head_and_the_loss_in_fp32(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    hidden = torch.randn(5, model.config.hidden_size)
    plain = head_logits(model, hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = head_logits(model, hidden)
        bf16_head = model.get_output_embeddings()(hidden)
    assert under_autocast.dtype == torch.float32 and torch.equal(under_autocast, plain)
    assert bf16_head.dtype == torch.bfloat16 and not torch.equal(bf16_head.float(), plain)  # what it would be otherwise


def test_precision_follows_the_setting_and_the_cpu(monkeypatch):
    for native, auto in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr("learn.train.cpu_has_bf16", lambda native=native: native)
        assert pick_precision(TrainConfig(precision="auto"), "cpu") == auto
        assert pick_precision(TrainConfig(), "cpu") == "fp32"  # bf16 is asked for, never assumed
        assert pick_precision(TrainConfig(precision="fp32"), "cpu") == "fp32"
        assert pick_precision(TrainConfig(precision="bf16"), "cpu") == "bf16"
        assert pick_precision(TrainConfig(precision="fp32"), "cuda") == "bf16"  # the base model's own dtype there


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_short_run_learns_and_writes_a_finished_adapter(tmp_path, tiny_model, precision):
    data = write_jsonl(tmp_path / "repeated.jsonl", coqa_rows(1) * 16)
    out = tmp_path / "chat-v0001"
    result = train(tiny_config(epochs=4, max_steps=16, early_stopping_patience=4, precision=precision),
                   **paths(tiny_model, data, out))
    assert result.metrics["precision"] == precision

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


def test_a_nan_loss_stops_the_run_and_saves_nothing(tmp_path, tiny_model, data, monkeypatch):
    import learn.train_stages

    calls, real = [], learn.train_stages.scored_loss

    def nan_at_the_second_step(model, batch):  # as a bf16 overflow did on CUDA (learn/train_pref.py mask_as)
        calls.append(1)
        return real(model, batch) * (float("nan") if len(calls) == 2 else 1.0)

    monkeypatch.setattr(learn.train_stages, "scored_loss", nan_at_the_second_step)
    with pytest.raises(TrainError, match=r"sft step 2: the loss is nan, so training stopped and nothing was saved"):
        train(tiny_config(max_steps=4), **paths(tiny_model, data, tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_command_line_trains_with_flags_and_records_the_paths(tmp_path, tiny_model, data, capsys):
    out = tmp_path / "cli-out"
    argv = ["--base", str(tiny_model), "--train", str(data), "--out", str(out), "--rank", "4", "--max-steps", "1",
            "--device", "cpu", "--lr-scheduler", "constant"]
    assert main(argv) == 0, capsys.readouterr().err
    assert f"adapter: {out}" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 1
    assert report["config"]["rank"] == 4 and report["config"]["base_model"] == str(tiny_model)
    assert report["config"]["train_file"] == str(data) and report["config"]["out_dir"] == str(out)


def test_command_line_names_a_bad_flag_value(tmp_path, tiny_model, data, capsys):
    assert main(["--base", str(tiny_model), "--train", str(data), "--out", str(tmp_path / "x"), "--rank", "0"]) == 2
    assert "rank and alpha must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_child_trains_and_reports(tmp_path, tiny_model, data):
    result = train_in_child(tiny_config(max_steps=2), **paths(tiny_model, data, tmp_path / "out"))
    assert (result.out_dir / "adapter_model.safetensors").is_file()
    assert result.metrics["steps"] == 2


def test_child_error_is_the_recipe_message(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "small.jsonl", coqa_rows(2))
    with pytest.raises(TrainError, match="at least 8"):
        train_in_child(tiny_config(), **paths(tiny_model, data, tmp_path / "out"))


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
            train_in_child(tiny_config(epochs=1000, early_stopping_patience=1000), **paths(tiny_model, data, out))
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
