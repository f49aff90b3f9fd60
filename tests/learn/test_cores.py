"""CoreShare: the trainer takes the cores others leave idle, and half of them while others are busy."""

from __future__ import annotations

import pytest

from learn.cores import CoreShare, machine_busy_s, usable_cores


@pytest.mark.parametrize("n, others, want", [
    (2, 0.0, 2), (2, 0.2, 2), (2, 0.6, 1), (2, 1.9, 1), (2, None, 1),
    (8, 0.0, 8), (8, 1.0, 7), (8, 2.6, 5), (8, 7.5, 4), (1, 0.9, 1),
])
def test_every_core_the_others_leave_free_never_fewer_than_half(n, others, want):
    assert CoreShare(cores=n).want(others) == want


def test_others_are_the_machine_minus_this_process():
    share = CoreShare(cores=2)
    # 10 s apart: the machine was busy for 14 CPU-seconds, 9 of them ours -> others kept 0.5 cores busy
    assert share.others_busy((0.0, 100.0, 5.0), (10.0, 114.0, 14.0)) == pytest.approx(0.5)
    assert share.others_busy((0.0, None, 5.0), (10.0, 114.0, 14.0)) is None


def test_threads_follow_the_load_between_steps(machine_clock):
    clock = machine_clock
    share = CoreShare(cores=2, every_s=3.0)
    assert share.current == 1  # before any look: half

    def run(seconds: float, ours: float, others: float) -> int:
        clock["t"] += seconds
        clock["own"] += ours * seconds
        clock["busy"] += (ours + others) * seconds
        return share.step()

    assert run(1.0, ours=1.0, others=0.0) == 2  # the first look comes early: an idle engine
    assert run(1.0, ours=2.0, others=0.0) == 2
    assert run(3.0, ours=0.3, others=1.7) == 1  # traffic: the engine's threads take the cores
    assert run(3.0, ours=1.0, others=1.0) == 1
    assert run(3.0, ours=1.0, others=0.05) == 2  # quiet again
    assert share.steps_at == {2: 3, 1: 2}


def test_a_fixed_count_is_kept(monkeypatch):
    share = CoreShare(3, cores=2)
    assert share.current == 3 and [share.step() for _ in range(3)] == [3, 3, 3]


def test_the_machine_can_be_read_here():
    assert usable_cores() >= 1
    busy = machine_busy_s()
    assert busy is None or busy > 0
    if busy is not None:  # only the cores this process may run on count
        assert machine_busy_s({0}) <= machine_busy_s() + 0.1 and machine_busy_s(set()) == 0


def test_apply_sets_torch_to_the_count_of_the_step():
    import torch

    before = torch.get_num_threads()
    try:
        share = CoreShare(1, cores=2)
        torch.set_num_threads(2)
        assert share.apply() == 1 and torch.get_num_threads() == 1 and share.steps_at == {1: 1}
    finally:
        torch.set_num_threads(before)
