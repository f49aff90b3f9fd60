"""Token counts of training examples with the base model's own tokenizer and chat template.

    count = load_token_counter(model_dir)
    count([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]])   # [n]

feedback/check.py re-exports both names: the validator, curation and the trainer count alike.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

# Token counts of whole examples: a batch of message lists -> one count per list.
TokenCounter = Callable[[list[list[dict]]], list[int]]


def load_token_counter(model_path: str | Path) -> TokenCounter:
    """Token counts with the model's own tokenizer and chat template, batch-encoded for speed.

    Applying the Jinja chat template to every example is slow, so the template's cost is
    measured once: the tokens around a message of each role (they differ: "assistant" is two
    tokens in SmolLM2's vocabulary, "user" one), plus the system message's, or the default
    system prompt the template inserts when an example has none. Contents are then
    batch-encoded and the overheads added; the special tokens around each message keep this
    equal to the templated count (give or take a token where a content starts with whitespace).
    """
    from transformers import AutoTokenizer

    local = Path(model_path)
    if not local.exists() and (local.is_absolute() or str(model_path).startswith(".") or str(model_path).count("/") > 1):
        raise FileNotFoundError(f"no model folder at {model_path}: run `tunewheel model prepare` first (or pass --max-tokens 0)")
    try:
        tok = AutoTokenizer.from_pretrained(str(model_path))
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"cannot load the tokenizer of {model_path}: run `tunewheel model prepare` first "
                                f"(or turn the token limit off) — {exc}") from exc

    def templated(messages: list[dict]) -> int:
        return len(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    def plain(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    s, u, a = {"role": "system", "content": "story"}, {"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}
    u2 = {"role": "user", "content": "again"}
    overhead = {"assistant": templated([u, a]) - templated([u]) - plain("world"),
                "user": templated([u, a, u2]) - templated([u, a]) - plain("again")}
    with_system = templated([s, u]) - plain("story") - plain("hello") - overhead["user"]
    without_system = templated([u]) - plain("hello") - overhead["user"]

    backend = tok.backend_tokenizer  # the Rust tokenizer: no per-text Python conversion

    def count(batch: list[list[dict]]) -> list[int]:
        # Examples of one conversation repeat their context: encode each distinct text once.
        lengths = dict.fromkeys(m["content"] for msgs in batch for m in msgs)
        texts = list(lengths)
        for text, encoding in zip(texts, backend.encode_batch_fast(texts, add_special_tokens=False) if texts else []):
            lengths[text] = len(encoding)
        out = []
        for msgs in batch:
            n = sum(lengths[m["content"]] + overhead.get(m["role"], 0) for m in msgs)
            out.append(n + (with_system if msgs and msgs[0]["role"] == "system" else without_system))
        return out

    return count
