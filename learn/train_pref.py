"""The preference stages' data and losses: KTO rows (thumbs up/down) and DPO pairs -> token ids -> loss.

    rows = read_preferences("preferences.jsonl", kind="kto", max_tokens=384, count_tokens=counter)
    example = encode_answer(tokenizer, row["prompt"], row["completion"][0], max_length=384)
    kto_losses(logps, ref_logps, kl, desirable, beta=0.1, weights=(2.0, 1.0))      # per row
    dpo_losses(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)               # per pair

Formats (the snapshot contract, written by feedback/snapshot.py): a KTO row is TRL's unpaired
format `{"prompt": [messages], "completion": [{"role": "assistant", ...}], "label": bool, "meta"}`
(label true: thumbs up, desirable); a DPO row `{"prompt", "chosen": [{...}], "rejected": [{...}], "meta"}`.
Both are checked before anything loads, with the same line-numbered messages as `data check`.

Masking is the SFT recipe's (learn/train_data.py `encode`): the prompt's assistant messages are
context (weight 0), and the only scored tokens are the answer as the chat template renders it,
content plus end-of-turn token. A row's log-probability is the sum over those tokens.

Both answers a loss compares share their prompt (a DPO pair's chosen and rejected; a KTO row's
answer and, for the KL estimate, another row's answer to the same prompt), and the prompt is most
of the tokens. So `pack` puts the prompt once in a row, then each answer attending to the prompt
and to itself only (a block attention mask, each answer's positions continuing the prompt's):
one forward pass gives both answers' log-probabilities, the same numbers as two separate passes,
for little more than the cost of one (tests/learn/test_train_pref.py checks the equality).

The losses are the papers' (and TRL's) formulas, written here so the recipe keeps its own batching
and its LM head at the scored positions only:
- KTO (Ethayarajh et al. 2024, eq. 7): with r = log pi(y|x) - log ref(y|x) and z the batch's KL
  estimate from mismatched pairs (x_i, y_j), clamped at 0 and not back-propagated,
  desirable: w_D (1 - sigmoid(beta (r - z))), undesirable: w_U (1 - sigmoid(beta (z - r))).
  `class_weights` sets w_D n_D = w_U n_U: the weights follow the up:down ratio (the paper's
  eq. 8 range [1, 4/3] at its lower end).
- DPO (Rafailov et al. 2023): -log sigmoid(beta ((r_chosen) - (r_rejected))).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from feedback.check import CheckReport, Problem, TokenCounter, validate_messages
from learn.train_config import TrainError
from learn.train_data import IGNORE, encode, head_logits

KINDS = {"kto": ("completion",), "dpo": ("chosen", "rejected")}


# ---------------------------------------------------------------- reading and checking


def _row_problems(obj: object, kind: str) -> list[str]:
    """Format problems of one preference row (empty when it is fine)."""
    if not isinstance(obj, dict):
        return ["a line must be a JSON object"]
    answers = KINDS[kind]
    missing = [k for k in ("prompt", *answers) if k not in obj]
    if kind == "kto" and "label" not in obj:
        missing.append("label")
    if missing:
        return [f"missing {', '.join(f'`{k}`' for k in missing)}"]
    problems = []
    if kind == "kto" and not isinstance(obj["label"], bool):
        problems.append("`label` must be true (desirable) or false (undesirable)")
    if not isinstance(obj["prompt"], list) or not obj["prompt"]:
        return problems + ["`prompt` must be a non-empty list of messages"]
    for key in answers:
        answer = obj[key]
        if not (isinstance(answer, list) and len(answer) == 1 and isinstance(answer[0], dict) and answer[0].get("role") == "assistant"):
            problems.append(f"`{key}` must be a list of one assistant message")
            continue
        problems += [f"{key}: {p}" for p in validate_messages([*obj["prompt"], answer[0]])]
    return problems


def check_preferences(path: str | Path, *, kind: str, max_tokens: int | None = None,
                      count_tokens: TokenCounter | None = None) -> tuple[CheckReport, list[dict]]:
    """(report, rows) of a KTO (`kind="kto"`) or DPO (`"dpo"`) file; every problem with its line number.

    The rows are those without problems; a row longer than `max_tokens` (prompt plus its longer answer,
    chat template included) is a problem, as in `data check`.
    """
    # Seam: feedback/check.py gets the preference validators (issue 11, the data side); until then this
    # implements the snapshot contract's rules with the chat validator's messages and report type.
    report = CheckReport(path=str(path), max_tokens=max_tokens if count_tokens else None)
    rows: list[tuple[int, dict]] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, text in enumerate(f, 1):
            report.lines += 1
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                report.problems.append(Problem(lineno, f"not valid JSON ({exc.msg} at column {exc.colno})"))
                continue
            problems = _row_problems(obj, kind)
            report.problems += [Problem(lineno, p) for p in problems]
            if not problems:
                rows.append((lineno, obj))
    if report.max_tokens and rows:
        longest = [max((r["prompt"] + r[k] for k in KINDS[kind]), key=lambda m: len(m[-1]["content"])) for _, r in rows]
        counts = count_tokens(longest)
        report.problems += [Problem(n, f"{t} tokens, more than the limit of {max_tokens}") for (n, _), t in zip(rows, counts) if t > max_tokens]
        rows = [(n, r) for (n, r), t in zip(rows, counts) if t <= max_tokens]
    report.problems.sort(key=lambda p: p.line)
    report.bad_lines = len({p.line for p in report.problems})
    report.examples = len(rows)
    return report, [r for _, r in rows]


def read_preferences(path: str | Path, *, kind: str, max_tokens: int, count_tokens: TokenCounter) -> list[dict]:
    """The rows of a preference file that passes the check; else a TrainError with the problem lines."""
    report, rows = check_preferences(path, kind=kind, max_tokens=max_tokens, count_tokens=count_tokens)
    if not report.ok:
        raise TrainError(f"{path} does not pass the {kind.upper()} preference check ({report.bad_lines} bad line(s)):\n"
                         + "\n".join(report.problem_lines()))
    return rows


def kto_rows(preferences: list[dict], pairs: list[dict]) -> list[dict]:
    """Unpaired rows for KTO: the rated answers, plus both sides of each pair (a correction is a
    desirable answer: the KTO paper's decomposition of pairs), each (prompt, answer, label) once."""
    rows, seen = [], set()
    candidates = [*preferences]
    for p in pairs:
        meta = p.get("meta") or {}
        candidates.append({"prompt": p["prompt"], "completion": p["chosen"], "label": True, "meta": {**meta, "source": meta.get("source", "pair")}})
        candidates.append({"prompt": p["prompt"], "completion": p["rejected"], "label": False, "meta": {**meta, "rating": "down"}})
    for row in candidates:
        key = json.dumps([row["prompt"], row["completion"][0]["content"], row["label"]], sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


# ---------------------------------------------------------------- encoding


def encode_answer(tokenizer, prompt: list[dict], answer: dict, *, max_length: int) -> dict:
    """Token ids and labels of prompt + answer: only the answer's tokens are scored (the SFT masking rules)."""
    context = [{"role": m["role"], "content": m["content"], **({"weight": 0} if m["role"] == "assistant" else {})} for m in prompt]
    return encode(tokenizer, [*context, {"role": "assistant", "content": answer["content"]}], train_on_inputs=False, max_length=max_length)


def has_target(example: dict) -> bool:
    return any(t != IGNORE for t in example["labels"][1:])


def encode_kto(tokenizer, rows: list[dict], *, max_length: int, seed: int) -> list[dict]:
    """KTO examples: the row's sequence, its label, and a KL sequence (its prompt with another row's answer).

    The KL partner of each row is fixed here (a seeded rotation, never the row itself when there are
    two or more), so the reference log-probs of both sequences can be computed once, before training."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    partner = {order[k]: order[k - 1] for k in range(len(order))}
    examples = []
    for i, row in enumerate(rows):
        seq = encode_answer(tokenizer, row["prompt"], row["completion"][0], max_length=max_length)
        kl = encode_answer(tokenizer, row["prompt"], rows[partner[i]]["completion"][0], max_length=max_length)
        if has_target(seq) and has_target(kl):
            examples.append({"seq": seq, "kl": kl, "packed": pack(seq, kl), "label": bool(row["label"]), "source": _source(row)})
    return examples


def encode_dpo(tokenizer, rows: list[dict], *, max_length: int) -> list[dict]:
    """DPO examples: chosen and rejected sequences of the same prompt."""
    examples = []
    for row in rows:
        chosen = encode_answer(tokenizer, row["prompt"], row["chosen"][0], max_length=max_length)
        rejected = encode_answer(tokenizer, row["prompt"], row["rejected"][0], max_length=max_length)
        if has_target(chosen) and has_target(rejected):
            examples.append({"chosen": chosen, "rejected": rejected, "packed": pack(chosen, rejected), "source": _source(row, "pair")})
    return examples


# ---------------------------------------------------------------- one prompt, two answers, one pass


def pack(first: dict, second: dict) -> dict:
    """Two encoded sequences that share their prompt as one row: the shared tokens once, then the rest of each.

    `segment` is 0 for the shared prompt, 1 and 2 for each answer's tokens (which see the prompt and
    their own earlier tokens only); `positions` continue the prompt's in each answer; `targets[k]` lists
    (position of the predicting token, target id) for every scored token of sequence k."""
    a, b = first["input_ids"], second["input_ids"]
    scored = [t for seq in (first, second) for t in range(1, len(seq["labels"])) if seq["labels"][t] != IGNORE]
    shared = 0
    while shared < min(len(a), len(b), min(scored)) and a[shared] == b[shared]:
        shared += 1
    row = {"input_ids": a + b[shared:], "positions": list(range(len(a))) + list(range(shared, len(b))),
           "segment": [0] * shared + [1] * (len(a) - shared) + [2] * (len(b) - shared)}
    where_b = lambda i: i if i < shared else len(a) + i - shared  # noqa: E731  (index of b's token i in the row)
    row["targets"] = [[(t - 1, a[t]) for t in range(1, len(a)) if first["labels"][t] != IGNORE],
                      [(where_b(t - 1), b[t]) for t in range(1, len(b)) if second["labels"][t] != IGNORE]]
    return row


def collate_packed(rows: list[dict], pad_id: int, device) -> dict:
    """Right-padded packed rows with their block attention mask (additive, batch x 1 x width x width)."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], positions[i, :n], segment[i, :n] = (torch.tensor(r[k]) for k in ("input_ids", "positions", "segment"))
    q, k = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & (k >= 0) & ((k == 0) | (k == q)) | torch.eye(width, dtype=torch.bool)  # padding attends to itself
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    rows_of = [torch.tensor([[i, p, t] for i, r in enumerate(rows) for p, t in r["targets"][s]], dtype=torch.long) for s in (0, 1)]
    return {"input_ids": ids.to(device), "positions": positions.to(device), "mask": mask.to(device),
            "tokens": sum(len(r["input_ids"]) for r in rows), "cells": len(rows) * width,
            "targets": [t.to(device) for t in rows_of], "rows": len(rows)}


def mask_as(mask, dtype):
    """The additive mask in the dtype the attention runs in, its blocked cells at that dtype's lowest finite value.
    fp32's lowest is -inf in bf16, which CUDA's fused attention kernels are known to turn into NaN: the likely cause of
    the NaN KTO and DPO losses of bf16 LoRA on an H200. transformers builds its own masks the same way."""
    import torch

    if mask.dtype == dtype:
        return mask
    return mask.clamp(min=torch.finfo(dtype).min).to(dtype)


def packed_logps(model, batch: dict):
    """(log p(first answer), log p(second answer)) of each packed row: one decoder pass, the head at scored positions."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel

    lm = model.get_base_model() if isinstance(model, PeftModel) else model
    hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=mask_as(batch["mask"], lm.get_input_embeddings().weight.dtype),
                              position_ids=batch["positions"], use_cache=False).last_hidden_state
    out = []
    for targets in batch["targets"]:
        logits = head_logits(lm, hidden[targets[:, 0], targets[:, 1]])
        token_logps = -F.cross_entropy(logits, targets[:, 2], reduction="none")
        out.append(torch.zeros(batch["rows"], dtype=token_logps.dtype, device=token_logps.device).index_add(0, targets[:, 0], token_logps))
    return out[0], out[1]


def _source(row: dict, default: str = "rated") -> str:
    return (row.get("meta") or {}).get("source") or default


# ---------------------------------------------------------------- losses


def class_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(w_D, w_U) with w_D n_D = w_U n_U, the rarer class up-weighted; (1, 1) when a class is empty."""
    if not n_desirable or not n_undesirable:
        return 1.0, 1.0
    if n_desirable < n_undesirable:
        return n_undesirable / n_desirable, 1.0
    return 1.0, n_desirable / n_undesirable


def kto_losses(logps, ref_logps, kl, desirable, *, beta: float, weights: tuple[float, float]):
    """Per-row KTO loss; `kl` is the batch's (detached, clamped) KL estimate, `desirable` a bool tensor."""
    import torch

    ratio = logps - ref_logps
    chosen = weights[0] * (1 - torch.sigmoid(beta * (ratio - kl)))
    rejected = weights[1] * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, chosen, rejected)


def kl_estimate(kl_logps, ref_kl_logps, sum_over=None):
    """The KTO reference point z: the mean log-ratio of the mismatched pairs, clamped at 0, no gradient.
    `sum_over` (data-parallel runs): sums [total, count] over the processes, so z is the whole micro-batch's, as TRL gathers it."""
    shift = (kl_logps - ref_kl_logps).detach()
    if sum_over is None:
        return shift.mean().clamp(min=0)
    import torch

    total, count = sum_over([float(shift.sum()), shift.numel()])
    return torch.tensor(max(total / count, 0.0), dtype=shift.dtype, device=shift.device)


def dpo_losses(chosen, rejected, ref_chosen, ref_rejected, *, beta: float):
    """Per-pair DPO loss (sigmoid)."""
    import torch.nn.functional as F

    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))
