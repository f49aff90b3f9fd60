"""The training recipe's data path: checked chat JSONL -> labelled token ids -> padded batches -> loss.

    from learn.train_data import read_checked, encode, length_grouped_batches, collate, scored_loss
    rows = read_checked("train.jsonl", max_tokens=384, count_tokens=load_token_counter(model_dir))
    example = encode(tokenizer, rows[0], train_on_inputs=False, max_length=384)

`read_checked` runs the one chat-JSONL validator (feedback/check.py, what `tunewheel data check`
runs) and refuses a file with problems with the very lines `data check` prints. `encode` renders
a conversation with the model's chat template and labels the assistant turns (or every token).
Batches group similar lengths so dynamic padding stays small, and `scored_loss` applies the LM
head only where a label is scored. learn/train.py puts these together; tests/learn/test_masking.py
and tests/learn/test_train.py pin their behaviour down.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from feedback.check import TokenCounter, check_file
from learn.train_config import TrainError

IGNORE = -100  # label of a position that is not scored


def read_checked(path: str | Path, *, max_tokens: int, count_tokens: TokenCounter) -> list[list[dict]]:
    """The conversations of a chat JSONL file that passes `data check` with this token limit; else a TrainError."""
    report = check_file(path, max_tokens=max_tokens, count_tokens=count_tokens)
    if not report.ok:
        raise TrainError(f"{path} does not pass the chat JSONL check ({report.bad_lines} bad line(s); "
                         "`tunewheel data check` lists the same):\n" + "\n".join(report.problem_lines()))
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["messages"] for line in f]


def encode(tokenizer, messages: list[dict], *, train_on_inputs: bool, max_length: int) -> dict:
    """Token ids and labels of one conversation rendered by the chat template, cut to max_length.

    Labels are IGNORE except on targets. With train_on_inputs false the targets are the assistant
    messages (weight != 0) as the template renders them: each one's span is found by rendering the
    conversation up to the message with the generation prompt (where its content starts) and up to
    and including it (where it ends), minus the trailing whitespace after the end-of-turn token.
    The cut only matters where the validator's token count (a fast estimate) is off by a token.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if train_on_inputs or m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        head = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(head) and text.startswith(upto) and upto.startswith(head)):
            raise TrainError("the chat template renders a conversation differently from its prefixes, so assistant "
                             "turns cannot be located: set train_on_inputs=true for this model")
        spans.append((len(head), len(upto.rstrip())))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_length]
    if train_on_inputs:
        labels = list(ids)
    else:
        starts = [start for start, _ in enc["offset_mapping"][:max_length]]
        labels = [t if any(a <= s < b for a, b in spans) else IGNORE for t, s in zip(ids, starts)]
    return {"input_ids": ids, "labels": labels}


def split_validation(conversations: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded shuffle, then `fraction` (at least one) off the end."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(order)))
    return [conversations[i] for i in order[:-n_val]], [conversations[i] for i in order[-n_val:]]


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches of similar length, so dynamic padding stays small, in random order.

    As transformers' LengthGroupedSampler: shuffle, cut into mega-batches of 50 batches, sort each
    mega-batch by length, cut it into batches, then shuffle the batches.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * 50
    batches = []
    for start in range(0, len(order), mega):
        group = sorted(order[start: start + mega], key=lambda i: -lengths[i])
        batches += [group[j: j + batch_size] for j in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[dict], pad_id: int, device) -> dict:
    """Right-padded tensors: input_ids, attention_mask, labels (IGNORE on padding)."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def scored_count(batch: dict) -> int:
    """Positions whose next-token label is scored."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def head_logits(lm, hidden):
    """The LM head on `hidden`, as fp32 logits. Under bf16 autocast (CPU training) the head itself runs in fp32, so
    the log-probabilities the losses compare keep fp32 precision; it runs on the scored positions only, so it costs little."""
    import torch

    head = lm.get_output_embeddings()
    if not torch.is_autocast_enabled(hidden.device.type):
        return head(hidden).float()
    with torch.autocast(hidden.device.type, enabled=False):
        return head(hidden.float())


def scored_logits(model, batch: dict):
    """(logits, targets, scored mask) at the positions whose next token is scored, the LM head applied only there.

    The decoder runs on the whole batch; the 49k-vocab head only on hidden states whose next token is a
    label. Works on a plain causal LM and on a peft-wrapped one (inside `disable_adapter()` too).
    """
    from peft import PeftModel

    lm = model.get_base_model() if isinstance(model, PeftModel) else model
    hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE
    return head_logits(lm, hidden[:, :-1][scored]), targets[scored], scored


def scored_loss(model, batch: dict):
    """Summed cross-entropy over the scored positions: the model's own loss times the number of scored
    tokens, without building the (batch, length, vocab) logits."""
    import torch.nn.functional as F

    logits, targets, _ = scored_logits(model, batch)
    return F.cross_entropy(logits, targets, reduction="sum")


def sequence_logps(model, batch: dict):
    """Per row, the summed log-probability of its scored tokens (the answer): what KTO and DPO compare."""
    import torch
    import torch.nn.functional as F

    logits, targets, scored = scored_logits(model, batch)
    token_logps = -F.cross_entropy(logits, targets, reduction="none")
    rows = scored.nonzero()[:, 0]
    return torch.zeros(scored.shape[0], dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)


def validation_loss(model, examples: list[dict], batch_size: int, pad_id: int, device: str) -> float:
    """Mean loss per scored token over `examples` (no dropout, no gradients)."""
    import torch

    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    total, count = 0.0, 0
    with torch.no_grad():
        for j in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[j: j + batch_size]], pad_id, device)
            total += float(scored_loss(model, batch))
            count += scored_count(batch)
    model.train()
    return total / max(count, 1)
