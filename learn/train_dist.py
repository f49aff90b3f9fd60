"""Data-parallel training: what the processes of one run share, and how they split each step.

    ranks = join("cpu", processes=2)   # in each process of the run: its rank, the world size, its device
    ranks.shard(examples)              # this process's share of a micro-batch (or of the validation batches)
    ranks.sum_grads(params)            # after a step's backward passes: the whole step's gradient, in every process
    ranks.sum([loss, tokens])          # numbers summed over the processes (unchanged when alone)
    ranks.close()

With `learn.train.processes = N > 1`, train_in_child starts N processes of the recipe under
`accelerate launch` (learn/train_child.py); on CPU they talk over gloo, on CUDA each takes one GPU
and NCCL. `join` puts each process in the group (through accelerate's `PartialState`), and the
recipe (learn/train.py) calls the collectives below; alone (`SOLO`) each returns its input.

How a step is split. Every process reads the same data and cuts the same length-grouped batches in
the same seeded order, so an optimizer step is the same `grad_accum` micro-batches of `batch_size`
conversations as in one process; process r takes every N-th conversation of each micro-batch,
from the r-th (a micro-batch smaller than N leaves some without a share; they add nothing). Each
divides its loss by the whole step's units (scored tokens, or rows), and after the step's backward
passes the LoRA gradients are summed over the processes: each then holds the gradient one process
would have computed, clips it and makes the same AdamW update, so the weights stay equal. So
`batch_size` and `grad_accum` size the whole step, and the steps, the learning-rate schedule and the
examples seen are those of one process; N processes share each step's work, they do not make the
batch larger. The recipe does not wrap the model in DistributedDataParallel: its losses call the
decoder and the LM head directly (the head only at scored positions, the preference stages' packed
rows), which would bypass the wrapper's forward; one all-reduce of the LoRA gradients per step (a
few MB) is what DDP does over accumulated micro-batches under `no_sync`.

FSDP (`learn.train.fsdp`, a base model too large for one device): `shard_model` puts each decoder
layer under PyTorch's FSDP2 `fully_shard`, so every process keeps 1/N of the layers' weights (LoRA
matrices included) and gathers a layer only while it runs; the embeddings and the LM head stay
whole in each process. FSDP reduce-scatters the LoRA gradients itself, summed (not averaged, the
same as `sum_grads`), so the step is the same as without it. Each forward and backward pass of a
sharded layer is a collective, so the processes must make the same number of passes: where one has
no share of a micro-batch (or fewer validation or reference batches than another), `idle_passes`
says how many passes it makes on a stand-in batch whose result is discarded. `full_state` gathers
the adapter's weights whole for rank 0 to save.

Also shared: the validation loss (each process scores every N-th validation batch, the sums are
added, so all take the same early-stopping decision), the preference stages' reference log-probs
(the same way) and KTO's KL reference point (over the whole micro-batch, as TRL gathers it). Only
rank 0 writes the adapter, report.json, loss.png and the result file, and shows the progress bar;
every process leaves the process group at the end. When a process fails, torchrun stops the others
(SIGTERM: rank 0 removes its temporary folder) and the launcher exits non-zero, which train_in_child
turns into a TrainError. Threads: learn/cores.py gives each process its share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from learn.train_config import TrainError


@dataclass(frozen=True)
class Ranks:
    """This process's place in a training run; alone (the default), every collective returns its input."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    sharded: bool = False  # the model's layers are under FSDP: every pass is a collective (`shard_model`)

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes and reports."""
        return self.rank == 0

    @property
    def owner_pid(self) -> int:
        """The pid that names the temporary output folder: this process alone; under the launcher, the launcher,
        which is the process train_in_child started and whose folder it removes after a crash."""
        return os.getpid() if self.world == 1 else os.getppid()

    def shard(self, items, sharing: int | None = None):
        """This process's share: every world-th item, from the rank-th. `sharing` < world: only the first `sharing`
        processes take a share (every sharing-th item), the others none (learn/cores.py, on a busy CPU)."""
        sharing = sharing or self.world
        return items[self.rank::sharing] if self.rank < sharing else items[:0]

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the processes (float64)."""
        if self.world == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()

    def each(self, value: float) -> list[float]:
        """One value from every process, in rank order."""
        return self.sum([value if r == self.rank else 0.0 for r in range(self.world)])

    def idle_passes(self, n: int) -> int:
        """Under FSDP, the passes this process makes on a stand-in to keep step with the others when `n` items
        are shared out (`shard`): as many as the largest share has more than its own. Without FSDP: none."""
        if not self.sharded:
            return 0
        return -(-n // self.world) - len(range(self.rank, n, self.world))

    def shard_model(self, model) -> Ranks:
        """FSDP2: each decoder layer (the classes the model names in `_no_split_modules`) sharded over the
        processes, gradients summed; returns the Ranks that knows it."""
        from dataclasses import replace

        from torch.distributed.fsdp import fully_shard

        kinds = set(getattr(model.get_base_model(), "_no_split_modules", None) or ())
        layers = [m for m in model.modules() if type(m).__name__ in kinds]
        if not layers:
            raise TrainError(f"fsdp: the base model names no decoder layer class (_no_split_modules) to shard; "
                             f"train it with fsdp = false")
        for layer in layers:
            fully_shard(layer)
            layer.set_gradient_divide_factor(1.0)  # summed, as sum_grads does: the losses are already divided
            layer.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM (nor AVG)
        return replace(self, sharded=True)

    def full_state(self, state: dict) -> dict:
        """`state` (the adapter's weights) with every sharded tensor gathered whole; call it in every process."""
        if not self.sharded:
            return state
        from torch.distributed.tensor import DTensor

        return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}

    def sum_grads(self, params: list) -> None:
        """Replace each parameter's gradient by its sum over the processes (one all-reduce; no gradient: zeros).
        Under FSDP the sharded parameters' gradients are summed already: only the others are."""
        if self.world == 1:
            return
        if self.sharded:
            from torch.distributed.tensor import DTensor

            params = [p for p in params if not isinstance(p, DTensor)]
            if not params:
                return
        import torch
        import torch.distributed as dist

        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
        dist.all_reduce(flat)  # in fp32 whatever the parameters' dtype (bf16 on CUDA)
        for p, part in zip(params, flat.split([p.numel() for p in params])):
            p.grad = part.view_as(p).to(p.dtype, copy=True)

    def broadcast(self, params: list) -> None:
        """Rank 0's values of these parameters in every process (the seeded LoRA init already agrees; this makes sure)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in params:
            dist.broadcast(p.data, 0)

    def close(self) -> None:
        """Leave the process group (nothing to do alone)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


SOLO = Ranks()


def join(device: str, processes: int) -> Ranks:
    """This process's Ranks: alone, or its place in the group the launcher started (WORLD_SIZE, RANK, MASTER_PORT
    from torchrun). The config's `processes` and the launcher's count must agree."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != processes:
        if world == 1:
            raise TrainError(f"processes = {processes} needs a launcher: train through train_in_child (as the learner does) "
                             f"or `python -m learn.train --processes {processes} ...`, which start `accelerate launch`")
        raise TrainError(f"started as {world} processes but processes = {processes}: pass --processes {world}")
    if world == 1:
        return Ranks(device=device)
    import torch
    from accelerate import PartialState

    if device == "cuda" and torch.cuda.device_count() < world:
        raise TrainError(f"processes = {world} on CUDA needs a GPU each; {torch.cuda.device_count()} visible: "
                         f"set processes <= {torch.cuda.device_count()}")
    state = PartialState(cpu=device == "cpu")  # gloo on CPU, NCCL on CUDA; it also sets this process's GPU
    return Ranks(rank=state.process_index, world=state.num_processes, device="cpu" if device == "cpu" else str(state.device))
