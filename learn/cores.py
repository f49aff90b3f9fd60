"""How many CPU threads a training step may use: the cores nobody else is using right now.

    cores = CoreShare(config.threads)        # None: adaptive; a number: fixed
    torch.set_num_threads(cores.current)
    for step in steps:
        cores.apply()                        # cheap; looks at the machine every `every_s`
        ...
    cores.steps_at                           # {threads: steps trained with that many}
    cores.sharing                            # data-parallel: the processes that take a share of the step

On a CPU box the trainer shares the cores with the vLLM engine. A busy engine keeps every core it
was given (its OpenMP threads spin), and torch threads waiting on those cores made each step
10-20x slower; so while anyone else is busy the trainer keeps to half the cores (at least one),
as it always did. But an idle engine uses almost nothing (measured: 0.03 of a core on 2 cores),
and in the demo or on a quiet night the other half sat idle. So before each step, at most every
`every_s`, CoreShare reads how busy its cores were since its last look (/proc/stat) minus what
this process used itself (its own CPU time), and gives torch every core the others left free:
all of them on an idle machine or a training node of its own, half again within a few seconds
of traffic coming back. torch lets the thread count change between steps.

The cores it counts: this process's CPU affinity, capped by a cgroup v2 CPU quota (a container
limited to 2 CPUs on a 64-core host gets 2). Where /proc/stat cannot be read (not Linux), the
count stays at half.

Data-parallel training (`CoreShare(processes=N)`, learn/train_dist.py) runs N such processes in
lockstep, and they decide together: before each step one small all-reduce (about a millisecond)
gives every process rank 0's clock and machine counter and the run's CPU time summed over all of
them, so each reaches the same thread count T for the whole run. On CPU (`yielding`), T cores
means min(N, T) processes take a share of the step with T // that many threads each, and the rest
wait at the step's all-reduce, which blocks without using a core: two processes on 2 idle cores,
one while the engine is busy, as one process would. Elsewhere (CUDA, FSDP, where every process
must make every pass) all N keep their share and 1/N of T threads each.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from pathlib import Path

SLACK = 0.25  # others busy on less than a quarter of a core count as idle (the gateway, a probe)


def usable_cores() -> int:
    """This process's CPU affinity, capped by the cgroup v2 quota (`cpu.max`) when there is one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def machine_busy_s(cpus: set[int] | None = None) -> float | None:
    """CPU seconds the cores `cpus` (default: this process's affinity) have spent busy since boot
    (None where unknown). Busy cores outside the affinity (other pods on the host) do not count."""
    if cpus is None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    busy = 0
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            name, *values = line.split()
            if not name.startswith("cpu") or name == "cpu" or (cpus is not None and int(name[3:]) not in cpus):
                continue
            fields = [int(x) for x in values[:8]]
            busy += sum(fields) - fields[3] - fields[4]  # all but idle and iowait; guest time is already in user
    except (OSError, ValueError, IndexError):
        return None
    return busy / os.sysconf("SC_CLK_TCK")


class CoreShare:
    """The thread count for the next training step; see the module docstring."""

    def __init__(self, fixed: int | None = None, *, cores: int | None = None, every_s: float = 3.0, processes: int = 1,
                 yielding: bool = True):
        """`processes`: the run's data-parallel processes; `yielding`: whether some of them may sit a step out."""
        self.cores = cores or usable_cores()
        self.floor = max(1, self.cores // 2)
        self.fixed = fixed
        self.every_s = every_s
        self.processes = processes
        self.yielding = yielding and fixed is None
        self.steps_at: Counter[int] = Counter()
        self.steps_sharing: Counter[int] = Counter()  # {processes that took a share: steps}
        self.sharing = processes
        """How many of the run's processes take a share of the step about to run (ranks 0 to sharing - 1)."""
        self.current = fixed or self.split(self.floor)
        self._last = self._look() if processes == 1 else None  # several: the first step's shared look
        self._window_s = 0.5  # the first look (after loading data and model) may come early

    @staticmethod
    def _look() -> tuple[float, float | None, float]:
        return time.monotonic(), machine_busy_s(), time.process_time()

    def others_busy(self, before: tuple, after: tuple) -> float | None:
        """Cores the rest of the machine kept busy between two looks (the own CPU time: the whole run's)."""
        (t0, busy0, own0), (t1, busy1, own1) = before, after
        if busy0 is None or busy1 is None or t1 <= t0:
            return None
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)

    def want(self, others: float | None) -> int:
        """Every core the others leave free, never fewer than half of them."""
        if others is None:
            return self.floor
        return min(self.cores, max(self.floor, self.cores - math.ceil(others - SLACK)))

    def split(self, threads: int) -> int:
        """A thread count for the whole run shared out: sets `sharing`, returns each sharing process's threads."""
        self.sharing = min(self.processes, threads) if self.yielding else self.processes
        return max(1, threads // self.sharing)

    def step(self, ranks=None) -> int:
        """The thread count for the step about to run (counted in `steps_at`, over the sharing processes).
        `ranks` (learn/train_dist.py; several processes): a collective, so every process calls it before every step."""
        if self.fixed is None:
            now = self._look() if self.processes == 1 else self._shared_look(ranks)
            if self._last is None:
                self._last = now
            elif now[0] - self._last[0] >= self._window_s:
                self.current, self._last = self.split(self.want(self.others_busy(self._last, now))), now
                self._window_s = self.every_s
        self.steps_at[self.current * self.sharing] += 1
        self.steps_sharing[self.sharing] += 1
        return self.current

    @classmethod
    def _shared_look(cls, ranks) -> tuple[float, float | None, float]:
        """The same look in every process: rank 0's clock and machine counter, the CPU time of them all."""
        t, busy, own = cls._look()
        main = ranks.rank == 0
        t, busy, own = ranks.sum([t if main else 0.0, (-1.0 if busy is None else busy) if main else 0.0, own])
        return t, None if busy < 0 else busy, own

    def apply(self, ranks=None) -> int:
        """`step(ranks)`, with torch's thread count set to it when it changed."""
        import torch

        if self.step(ranks) != torch.get_num_threads():
            torch.set_num_threads(self.current)
        return self.current
