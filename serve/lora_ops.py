"""vLLM's CPU LoRA path, made cheap: what lets an adapter answer near the base model's speed on CPU.

vLLM's CPU path (PunicaWrapperCPU over vllm/lora/ops/torch_ops) applies a LoRA by gathering each
token's adapter weights into a (tokens x out x in) tensor and contracting it with an einsum, in
about 14 calls per decoder layer of several small torch operations each. Measured with
bench/lora_serving.py (rank-16 adapter on all seven projections, same engine, quiet machine), an
adapter answered at 0.40x (CoQA-style turns, 8 in flight) to 0.67x the base model's speed. Two
changes, each checked against vLLM's own kernels (tests/serve/test_lora_ops.py):
  - the kernels group tokens by adapter: one matrix product per adapter present in the batch
    (0.40x -> 0.79x on CoQA turns at 8 in flight); tokens without an adapter (index -1) get
    nothing added, as vLLM's GPU kernels do (the gather read the last slot's weights for them);
  - when every token of a step uses one adapter (nearly always), the wrapper notes it once per
    step and applies each linear layer's LoRA as two products per output slice, without vLLM's
    buffers and per-call index handling (-> 0.88-0.91x on every workload of the bench).

vLLM loads this module as a general plugin (entry point `vllm.general_plugins` in pyproject.toml)
in each of its processes; `register()` patches only when the engine was started by tunewheel
with `TUNEWHEEL_LORA_OPS=grouped` (serve/engine_child.py engine_env; `engine.grouped_lora`), so
another vLLM run on the same machine is left alone. Nothing is imported at module level (the
gateway reads `ENV` from here without loading torch); the kernels take torch tensors.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("vllm.tunewheel_lora_ops")  # under vLLM's logger: its handler prints it in the engine log
ENV = "TUNEWHEEL_LORA_OPS"


def lora_matmul(inputs, weights, indices, dtype):
    """Row t of the result is inputs[t] @ weights[indices[t]].T, or zeros where indices[t] < 0.
    `weights`: (slots, out, in) or (slots, 1, out, in)."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    x = inputs.to(dtype)
    if indices.numel() == 0:
        return x.new_zeros(0, weights.shape[1])
    lo, hi = int(indices.min()), int(indices.max())
    if lo == hi and lo >= 0:  # one adapter for the whole batch: one product
        return x @ weights[lo].to(dtype).t()
    out = x.new_zeros(x.shape[0], weights.shape[1])
    for slot in indices.unique().tolist():
        if slot < 0:
            continue
        rows = (indices == slot).nonzero().squeeze(1)
        out.index_copy_(0, rows, x.index_select(0, rows) @ weights[slot].to(dtype).t())
    return out


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(outputs.shape[1], output_tensor.shape[1])  # the adapter and the model may pad differently
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int,
                      add_inputs: bool = True):
    outputs = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs


GROUPED = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}


def linear_one_slot(y, x, lora_a_stacked, lora_b_stacked, scale: float, output_slices, slot: int) -> None:
    """`add_lora_linear` for a batch whose every token uses adapter `slot`: per output slice,
    y[:, slice] += scale * (x @ A.T) @ B.T, two products and no temporary per token."""
    offset = 0
    for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices):
        a_w = a[slot, 0] if a.dim() == 4 else a[slot]
        b_w = b[slot, 0] if b.dim() == 4 else b[slot]
        y[:, offset: offset + size].addmm_(x.mm(a_w.t()), b_w.t(), alpha=scale)
        offset += size


def patch_wrapper(cls) -> None:
    """PunicaWrapperCPU: note once per step which adapter slot every token uses (None: several,
    -1: none), and apply a LoRA linear layer of such a batch with `linear_one_slot`. vLLM calls
    add_lora_linear about 14 times per decoder layer, so its per-call cost is what a LoRA answer
    pays over a base one."""
    update, linear = cls.update_metadata, cls.add_lora_linear

    def update_metadata(self, *args, **kwargs):
        update(self, *args, **kwargs)
        idx = self.token_lora_indices
        lo, hi = (int(idx.min()), int(idx.max())) if idx.numel() else (-1, -1)
        self.tunewheel_slot = lo if lo == hi else None

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
        slot = getattr(self, "tunewheel_slot", None)
        if slot is None or buffer is not None or x.dim() != 2 or y.dim() != 2 \
                or not all(w.dtype == x.dtype == y.dtype for w in (*lora_a_stacked, *lora_b_stacked)):
            return linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)
        if slot >= 0:  # -1: no token of this batch has an adapter, nothing to add
            linear_one_slot(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, slot)

    cls.update_metadata, cls.add_lora_linear = update_metadata, add_lora_linear


def register() -> None:
    """vLLM general plugin: put the grouped kernels in place of the gathering ones (CPU path only)."""
    if os.environ.get(ENV) != "grouped":
        return
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError as exc:  # a vLLM without the CPU LoRA path: nothing to replace
        log.warning("tunewheel LoRA kernels not installed: %s", exc)
        return
    for module in (lora_ops, punica_cpu):  # lora_ops' sgmv_* call these through the module; punica_cpu imported them
        for name, fn in GROUPED.items():
            if hasattr(module, name):
                setattr(module, name, fn)
    if not getattr(punica_cpu.PunicaWrapperCPU, "tunewheel_patched", False):  # plugins may load more than once
        patch_wrapper(punica_cpu.PunicaWrapperCPU)
        punica_cpu.PunicaWrapperCPU.tunewheel_patched = True
    log.info("tunewheel: LoRA applied with one matrix product per adapter in the batch (serve/lora_ops.py)")
