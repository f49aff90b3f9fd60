"""learn/dropout.py: LoRA dropout on CPU from 64-bit draws behaves as torch's dropout does."""

from __future__ import annotations

import pytest
import torch

from learn.dropout import MaskDropout, cheap_cpu_dropout


def test_it_drops_the_share_p_and_keeps_the_expected_value():
    torch.manual_seed(0)
    drop = MaskDropout(0.05).train()
    x = torch.ones(1000, 1000)
    y = drop(x)
    dropped = float((y == 0).float().mean())
    assert dropped == pytest.approx(3277 / 65536, abs=5 * (0.05 * 0.95 / 1e6) ** 0.5)  # 5 sigma
    values = torch.unique(y).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(65536 / (65536 - 3277))
    assert float(y.mean()) == pytest.approx(1.0, abs=0.002)  # inverted dropout: the mean is kept
    rows = (y == 0).float().mean(dim=1)  # no position is favoured: every row drops about p
    assert float(rows.min()) > 0.02 and float(rows.max()) < 0.085


def test_the_mask_is_fresh_each_call_and_fixed_by_the_seed():
    drop = MaskDropout(0.3).train()
    x = torch.ones(64, 48)
    torch.manual_seed(1)
    a, b = drop(x), drop(x)
    torch.manual_seed(1)
    assert torch.equal(drop(x), a) and not torch.equal(a, b)


def test_eval_mode_and_p_zero_are_the_identity_and_bad_p_is_refused():
    x = torch.randn(5, 7)
    assert MaskDropout(0.5).eval()(x) is x and MaskDropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        MaskDropout(1.0)


def test_the_gradient_is_the_mask_scaled():
    torch.manual_seed(2)
    drop = MaskDropout(0.25).train()
    x = torch.randn(32, 16, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    kept = y.detach() != 0
    assert torch.allclose(x.grad, kept.float() * (65536 / (65536 - 16384)))


def test_each_lora_dropout_of_a_peft_model_is_replaced():
    from peft import LoraConfig, get_peft_model

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.v_proj(self.q_proj(x))

    model = get_peft_model(Tiny(), LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    assert cheap_cpu_dropout(model) == 2
    drops = [m for m in model.modules() if isinstance(m, MaskDropout)]
    assert len(drops) == 2 and all(d.p == 0.1 for d in drops)
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    model.train()
    model(torch.randn(3, 8)).sum().backward()  # trains through them
    assert cheap_cpu_dropout(get_peft_model(Tiny(), LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0,
                                                               target_modules=["q_proj"]))) == 0
