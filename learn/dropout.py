"""LoRA dropout on CPU without torch's slow Bernoulli draws.

    model = cheap_cpu_dropout(model)     # in place: each peft LoRA dropout becomes a MaskDropout (same p)

peft puts `nn.Dropout(p)` in front of every adapted projection, so each forward pass draws a fresh mask
over each one's input: 7 per decoder layer of SmolLM2 (all linear projections), 210 masks of 576 to
1536 values per token. On CPU torch draws every one of those values with its own Bernoulli sample from
the serial mt19937 generator (about 4 ns a value, on one thread whatever torch's thread count):
torch.profiler gave `bernoulli_` 9% of a training step's time at 1 thread and 15% at 2 (4 micro-batches
of 4 CoQA chats, SmolLM2-135M, Zen 4), the largest part of the step that did not get faster with a
second core. MaskDropout takes 64 bits at a time from the same generator (so `TrainConfig.seed` still
fixes every mask) and cuts each draw into three 16-bit values (the top bit of torch's int64 draw is
always 0, so the fourth is not used); a value drops its position when it falls below round(p * 65536),
so p is kept to 1/131072 (0.05 drops 3277 of 65536: 0.050003), and the kept values are scaled by
1 / (1 - that share), as torch's inverted dropout does. The compare and the scaling run on every thread.
In eval mode, or with p = 0, it returns its input. CUDA keeps torch's dropout (its Philox draws are fast).
"""

from __future__ import annotations

import torch

LEVELS = 1 << 16  # a 16-bit draw per position


class MaskDropout(torch.nn.Module):
    """Inverted dropout with masks cut from 64-bit draws (see the module docstring)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p
        self.cut = round(p * LEVELS)  # draws below it drop their position
        self.scale = LEVELS / (LEVELS - self.cut)

    def keep_mask(self, shape: torch.Size) -> torch.Tensor:
        """A bool mask of `shape`: each position kept with probability 1 - cut / 65536."""
        numel = shape.numel()
        words = torch.empty(-(-numel // 3), dtype=torch.int64).random_()  # 63 random bits each
        values = words.view(torch.int16).view(-1, 4)[:, :3].reshape(-1)[:numel]  # the three low 16-bit quarters
        return (values >= self.cut - LEVELS // 2).view(shape)  # int16 runs from -32768: the lowest `cut` values drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.cut == 0:
            return x
        return x.mul(self.keep_mask(x.shape)).mul_(self.scale)  # autograd keeps the bool mask, as dropout does

    def extra_repr(self) -> str:
        return f"p={self.p}"


def cheap_cpu_dropout(model) -> int:
    """Replace each peft LoRA layer's `nn.Dropout` by a MaskDropout of the same p; returns how many were replaced."""
    replaced = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
                drops[name] = MaskDropout(drop.p)
                replaced += 1
    return replaced
