"""serve/lora_ops.py: the grouped CPU LoRA kernels give vLLM's results, and are installed only when asked."""

import pytest
import torch

from serve import lora_ops

lora_ops_vllm = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")
VLLM = {name: getattr(lora_ops_vllm, name) for name in lora_ops.GROUPED}  # before any test patches them


def slots(n: int, out: int, inp: int, *, four_d: bool) -> torch.Tensor:
    w = torch.randn(n, out, inp)
    return w.unsqueeze(1) if four_d else w


@pytest.mark.parametrize("indices", [[2, 2, 2, 2, 2], [0, 1, 1, 3, 0], [1]])
@pytest.mark.parametrize("four_d", [True, False])
def test_grouped_kernels_match_vllms_for_tokens_with_an_adapter(indices, four_d):
    torch.manual_seed(0)
    idx = torch.tensor(indices)
    x, a, b = torch.randn(len(indices), 64), slots(4, 8, 64, four_d=four_d), slots(4, 96, 8, four_d=four_d)
    for name, args in (("bgmv_shrink", (x, a, torch.zeros(len(indices), 8), idx, 0.5)),
                       ("bgmv_expand", (torch.randn(len(indices), 8), b, torch.randn(len(indices), 96), idx, True)),
                       ("bgmv_expand_slice", (torch.randn(len(indices), 8), b, torch.randn(len(indices), 200), idx, 32, 96, True))):
        ours, theirs = [t.clone() if torch.is_tensor(t) else t for t in args], [t.clone() if torch.is_tensor(t) else t for t in args]
        lora_ops.GROUPED[name](*ours)
        VLLM[name](*theirs)
        torch.testing.assert_close(ours[2], theirs[2], rtol=1e-5, atol=1e-5)


def test_a_token_without_an_adapter_gets_nothing_added():
    """vLLM's gather read the last slot's weights for index -1; its GPU kernels (and ours) add nothing."""
    torch.manual_seed(0)
    idx = torch.tensor([-1, 1, -1, 0])
    x, b = torch.randn(4, 8), slots(2, 16, 8, four_d=True)
    before = torch.randn(4, 16)
    out = before.clone()
    lora_ops.bgmv_expand(x, b, out, idx, add_inputs=True)
    torch.testing.assert_close(out[[0, 2]], before[[0, 2]])
    torch.testing.assert_close(out[1], before[1] + x[1] @ b[1, 0].t())
    torch.testing.assert_close(out[3], before[3] + x[3] @ b[0, 0].t())
    shrunk = torch.full((4, 16), 7.0)
    lora_ops.bgmv_shrink(torch.randn(4, 8), b.transpose(-1, -2), shrunk, torch.tensor([-1, -1, -1, -1]))
    assert torch.count_nonzero(shrunk[:, :8]) == 0  # a batch without adapters: zeros, as vLLM's buffers start


@pytest.mark.parametrize("four_d", [True, False])
def test_a_batch_on_one_adapter_gets_what_the_per_slice_kernels_give(four_d):
    """A packed q/k/v layer: three slices, each x @ A.T then @ B.T into its part of the output."""
    torch.manual_seed(0)
    slices, x, y = (64, 16, 16), torch.randn(5, 64), torch.randn(5, 96)
    a = tuple(slots(3, 8, 64, four_d=four_d) for _ in slices)
    b = tuple(slots(3, n, 8, four_d=four_d) for n in slices)
    ours, theirs = y.clone(), y.clone()
    lora_ops.linear_one_slot(ours, x, a, b, 0.5, slices, 1)
    offset, idx = 0, torch.full((5,), 1)
    for a_i, b_i, n in zip(a, b, slices):
        buffer = torch.zeros(5, 8)
        VLLM["bgmv_shrink"](x, a_i, buffer, idx, 0.5)
        VLLM["bgmv_expand_slice"](buffer, b_i, theirs, idx, offset, n, True)
        offset += n
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_register_patches_only_engines_started_with_the_variable(monkeypatch):
    from vllm.lora.punica_wrapper import punica_cpu

    for module in (lora_ops_vllm, punica_cpu):
        for name in lora_ops.GROUPED:
            monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    wrapper = punica_cpu.PunicaWrapperCPU
    for name in ("update_metadata", "add_lora_linear"):
        monkeypatch.setattr(wrapper, name, getattr(wrapper, name))
    monkeypatch.setattr(wrapper, "tunewheel_patched", False, raising=False)
    monkeypatch.delenv(lora_ops.ENV, raising=False)
    lora_ops.register()
    assert punica_cpu.bgmv_shrink is not lora_ops.bgmv_shrink and lora_ops_vllm.bgmv_expand is VLLM["bgmv_expand"]
    monkeypatch.setenv(lora_ops.ENV, "grouped")
    lora_ops.register()
    assert punica_cpu.bgmv_shrink is lora_ops.bgmv_shrink and lora_ops_vllm.bgmv_expand is lora_ops.bgmv_expand
    patched = wrapper.add_lora_linear
    lora_ops.register()  # vLLM may load a plugin twice: the wrapper is not wrapped again
    assert wrapper.tunewheel_patched and wrapper.add_lora_linear is patched


def test_the_engine_child_asks_for_the_grouped_kernels_on_cpu_unless_turned_off():
    from serve.engine_child import engine_env
    from serve.settings import load_settings

    assert engine_env(load_settings(None), "cpu", base={})[lora_ops.ENV] == "grouped"
    assert lora_ops.ENV not in engine_env(load_settings(None, engine={"grouped_lora": False}), "cpu", base={})
    assert lora_ops.ENV not in engine_env(load_settings(None), "gpu", base={})
