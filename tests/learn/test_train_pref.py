"""The KTO and DPO stages on the tiny random Llama (seconds): losses, reference model, data check, runs.

    pytest tests/learn/test_train_pref.py

What a user would notice: a KTO run raises the rated-up answers' probability against the rated-down
ones, a DPO run the chosen answer's against the rejected one; the reference is the model the stage
starts from (the base through `disable_adapter()`, or the starting adapter), never a second copy;
the class weights follow the up:down ratio; a malformed preference file is refused with line numbers
before any model loads; a stage without enough data is skipped and the report says why. Which tokens
are scored is tests/learn/test_masking.py; a real SmolLM2 run is tests/learn/test_train_real.py.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from learn.train import TrainConfig, TrainError, train, train_in_child
from learn.train_data import collate, encode, scored_logits, sequence_logps
from learn.train_pref import check_preferences, class_weights, dpo_losses, encode_answer, kto_losses, kto_rows
from tests.learn.chats import coqa_rows, preference_rows, write_jsonl


def tiny_config(**overrides) -> TrainConfig:
    settings = dict(rank=8, alpha=16, learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant", batch_size=4, max_length=128,
                    device="cpu", val_fraction=0.2)
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture
def files(tmp_path) -> dict:
    kto, pairs = preference_rows(24)
    return {"train_file": write_jsonl(tmp_path / "train.jsonl", coqa_rows(16)),
            "preference_file": write_jsonl(tmp_path / "preferences.jsonl", kto),
            "pair_file": write_jsonl(tmp_path / "preference_pairs.jsonl", pairs)}


def answer_logps(model_dir, adapter, rows: list[dict]) -> list[float]:
    """log p(answer | prompt) of each (prompt, answer) row under base + adapter (None: the base)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    batch = collate([encode_answer(tokenizer, p, a, max_length=128) for p, a in rows], tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        return sequence_logps(model, batch).tolist()


# ---------------------------------------------------------------- losses and weights


def test_losses_match_the_papers_at_the_reference_point():
    import torch

    zero = torch.zeros(2)
    kto = kto_losses(zero, zero, torch.tensor(0.0), torch.tensor([True, False]), beta=0.1, weights=(3.0, 1.0))
    assert kto.tolist() == pytest.approx([1.5, 0.5])  # w (1 - sigmoid(0))
    assert dpo_losses(zero, zero, zero, zero, beta=0.1).tolist() == pytest.approx([math.log(2)] * 2)


def test_losses_fall_as_the_policy_moves_the_right_way():
    import torch

    up = torch.tensor([True])
    better, worse = torch.tensor([1.0]), torch.tensor([-1.0])
    z, ref = torch.tensor(0.0), torch.zeros(1)
    assert kto_losses(better, ref, z, up, beta=0.5, weights=(1, 1)) < kto_losses(worse, ref, z, up, beta=0.5, weights=(1, 1))
    assert kto_losses(worse, ref, z, ~up, beta=0.5, weights=(1, 1)) < kto_losses(better, ref, z, ~up, beta=0.5, weights=(1, 1))
    assert dpo_losses(better, worse, ref, ref, beta=0.5) < dpo_losses(worse, better, ref, ref, beta=0.5)


@pytest.mark.parametrize(("up", "down", "weights"), [(10, 30, (3.0, 1.0)), (30, 10, (1.0, 3.0)), (5, 5, (1.0, 1.0)), (0, 9, (1.0, 1.0))])
def test_class_weights_follow_the_up_down_ratio(up, down, weights):
    assert class_weights(up, down) == weights
    if up and down:
        assert weights[0] * up == pytest.approx(weights[1] * down)  # lambda_D n_D = lambda_U n_U


def test_sequence_logps_are_the_answer_tokens_log_probabilities(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    kto, _ = preference_rows(3)
    batch = collate([encode_answer(tokenizer, r["prompt"], r["completion"][0], max_length=128) for r in kto], tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        ours = sequence_logps(model, batch)
        logp = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1], -1)
    labels = batch["labels"][:, 1:]
    full = (logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)).sum(-1)
    assert torch.allclose(ours, full, atol=1e-4)
    assert len(scored_logits(model, batch)[1]) == int((labels != -100).sum())


def test_one_packed_pass_gives_both_answers_log_probs_as_two_passes_do(tiny_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from learn.train_pref import collate_packed, encode_dpo, packed_logps

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights="gaussian")).eval()
    _, pairs = preference_rows(5)
    pairs[1]["chosen"][0]["content"] = "Nobody keeps goats, I think; Ben does."  # shares its first tokens with the rejected answer
    examples = encode_dpo(tokenizer, pairs, max_length=128)
    with torch.no_grad():
        chosen, rejected = packed_logps(model, collate_packed([e["packed"] for e in examples], tokenizer.pad_token_id, "cpu"))
        for key, packed in (("chosen", chosen), ("rejected", rejected)):
            separate = sequence_logps(model, collate([e[key] for e in examples], tokenizer.pad_token_id, "cpu"))
            assert torch.allclose(packed, separate, atol=1e-4), key
    lengths = [len(e["packed"]["input_ids"]) for e in examples]
    assert all(n < len(e["chosen"]["input_ids"]) + len(e["rejected"]["input_ids"]) - 20 for n, e in zip(lengths, examples))  # the prompt once


def test_the_packed_mask_reaches_attention_finite_and_in_the_models_dtype(tiny_model):
    """An fp32 mask's lowest value is -inf in bf16, the likely cause of NaN KTO and DPO losses on CUDA (learn/train_pref.py mask_as)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from learn.train_pref import collate_packed, encode_dpo, packed_logps

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    examples = encode_dpo(tokenizer, preference_rows(3)[1], max_length=128)
    batch = collate_packed([e["packed"] for e in examples], tokenizer.pad_token_id, "cpu")
    logps = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype).eval()
        seen = []
        model.get_decoder().register_forward_pre_hook(lambda m, a, kw: seen.append(kw["attention_mask"]), with_kwargs=True)
        with torch.no_grad():
            logps[dtype] = packed_logps(model, batch)
        assert seen[0].dtype == dtype and bool(torch.isfinite(seen[0]).all())
        assert bool((seen[0] == torch.finfo(dtype).min).any())  # the blocked cells are still blocked
    for fp32, bf16 in zip(logps[torch.float32], logps[torch.bfloat16]):
        assert torch.allclose(fp32, bf16.float(), rtol=0.05)


def test_pairs_become_unpaired_rows_once():
    kto, pairs = preference_rows(6)
    rows = kto_rows(kto, pairs)
    # each pair adds its chosen answer as desirable; its rejected answer is already a down-rated row, or added once
    keys = [(json.dumps(r["prompt"]), r["completion"][0]["content"], r["label"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert sum(r["label"] for r in rows) == 6 and sum(not r["label"] for r in rows) == 6


# ---------------------------------------------------------------- data check


def test_a_malformed_preference_file_is_refused_with_line_numbers(tmp_path, tiny_model, files):
    kto, _ = preference_rows(10)
    lines = [json.dumps(r) for r in kto[:8]]
    lines.append("{not json")
    lines.append(json.dumps({**kto[8], "label": "yes"}))
    lines.append(json.dumps({**kto[9], "completion": [{"role": "user", "content": "hi"}]}))
    lines.append(json.dumps({"prompt": kto[0]["prompt"], "label": True}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    report, rows = check_preferences(bad, kind="kto")
    assert [p.line for p in report.problems] == [9, 10, 11, 12] and len(rows) == 8
    with pytest.raises(TrainError) as err:
        train(tiny_config(), base_model=str(tiny_model), preference_file=bad, stages=("kto",), out_dir=tmp_path / "out")
    assert all(f"{bad}:{n}:" in str(err.value) for n in (9, 10, 11, 12))
    assert not (tmp_path / "out").exists()


def test_a_stage_without_enough_data_is_skipped_and_reported(tmp_path, tiny_model, files):
    few = write_jsonl(tmp_path / "few_pairs.jsonl", preference_rows(3)[1])
    result = train(tiny_config(max_steps=1), base_model=str(tiny_model), train_file=files["train_file"], pair_file=few,
                   stages=("sft", "dpo"), out_dir=tmp_path / "out")
    assert list(result.metrics["stages"]) == ["sft"]
    assert "3 preference pairs" in result.metrics["skipped_stages"]["dpo"] and "min_examples" in result.metrics["skipped_stages"]["dpo"]
    with pytest.raises(TrainError, match="nothing to train.*dpo: .*3 preference pairs"):
        train(tiny_config(), base_model=str(tiny_model), pair_file=few, stages=("dpo",), out_dir=tmp_path / "out2")


# ---------------------------------------------------------------- runs


def test_kto_raises_up_rated_answers_against_down_rated_ones(tmp_path, tiny_model, files):
    out = tmp_path / "kto"
    result = train(tiny_config(epochs=3, max_steps=12, early_stopping_patience=3, beta=0.5), base_model=str(tiny_model),
                   preference_file=files["preference_file"], stages=("kto",), out_dir=out)
    kto = result.metrics["stages"]["kto"]
    assert kto["examples"]["desirable"] + kto["examples"]["undesirable"] == kto["examples"]["train"]
    assert kto["examples"]["weights"]["desirable"] == pytest.approx(kto["examples"]["undesirable"] / kto["examples"]["desirable"])
    rows = [json.loads(line) for line in files["preference_file"].read_text().splitlines()]
    prompt, right = rows[0]["prompt"], rows[0]["completion"][0]
    wrong = rows[1]["completion"][0]
    before = answer_logps(tiny_model, None, [(prompt, right), (prompt, wrong)])
    after = answer_logps(tiny_model, out, [(prompt, right), (prompt, wrong)])
    assert after[0] - after[1] > before[0] - before[1] + 1.0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["stages"] == ["kto"] and len(report["train_loss_per_step"]) == kto["steps"]
    assert (out / "loss.png").is_file() and (out / "adapter_model.safetensors").is_file()


def test_sft_then_dpo_continues_one_adapter_and_prefers_the_chosen_answer(tmp_path, tiny_model, files):
    out = tmp_path / "sft-dpo"
    result = train(tiny_config(epochs=2, max_steps=6, beta=0.5), base_model=str(tiny_model), train_file=files["train_file"],
                   pair_file=files["pair_file"], stages=("sft", "dpo"), out_dir=out)
    stages = result.metrics["stages"]
    assert list(stages) == ["sft", "dpo"] and stages["dpo"]["first_step"] == stages["sft"]["steps"]
    assert result.metrics["steps"] == stages["sft"]["steps"] + stages["dpo"]["steps"]
    assert stages["dpo"]["examples"]["sources"] == {"pair": 24}
    pair = json.loads(files["pair_file"].read_text().splitlines()[0])
    after = answer_logps(tiny_model, out, [(pair["prompt"], pair["chosen"][0]), (pair["prompt"], pair["rejected"][0])])
    assert after[0] > after[1]
    report = json.loads((out / "report.json").read_text())
    assert [e["stage"] for e in report["epochs_log"]][0] == "sft" and report["epochs_log"][-1]["stage"] == "dpo"


def test_reference_is_the_base_through_disable_adapter_or_the_starting_adapter(tmp_path, tiny_model, files):
    import torch

    from learn.train import load_model
    from learn.train_stages import KTOStage

    first = tmp_path / "first"
    train(tiny_config(max_steps=3), base_model=str(tiny_model), train_file=files["train_file"], out_dir=first)
    kto, _ = preference_rows(8)
    config = tiny_config()
    for start, from_base in ((None, True), (first, False)):
        model, tokenizer = load_model(config, str(tiny_model), "cpu", start)
        stage = KTOStage(config=config, rows=kto, val_rows=kto[:2], sources=Counter(), pad_id=tokenizer.pad_token_id)
        stage.encode(tokenizer)
        if from_base:  # a LoRA that is not the identity: only disable_adapter() gives the base model's figures
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.add_(0.05)
        stage.prepare(model, from_base=from_base)
        pairs = [(r["prompt"], r["completion"][0]) for r in kto]
        expected = answer_logps(tiny_model, start, pairs)
        assert len(stage.train_set) == len(kto)  # encoded in row order
        assert [e["ref_seq"] for e in stage.train_set] == pytest.approx(expected, abs=1e-4)


def test_training_continues_from_a_starting_adapter_in_the_child(tmp_path, tiny_model, files):
    first = tmp_path / "first"
    train(tiny_config(max_steps=2, rank=4), base_model=str(tiny_model), train_file=files["train_file"], out_dir=first)
    result = train_in_child(tiny_config(max_steps=2), base_model=str(tiny_model), preference_file=files["preference_file"],
                            pair_file=files["pair_file"], stages=("kto", "dpo"), start_adapter=first, out_dir=tmp_path / "second")
    assert list(result.metrics["stages"]) == ["kto", "dpo"]
    assert json.loads((result.out_dir / "adapter_config.json").read_text())["r"] == 4  # the starting adapter's own rank
    assert json.loads((result.out_dir / "report.json").read_text())["config"]["start_adapter"] == str(first)
