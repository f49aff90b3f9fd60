"""Data-parallel training (`learn.train.processes`): the launch, the split of each step, and a run as 1 and as 2 processes.

    pytest tests/learn/test_train_distributed.py                 # the launch command, the config, the split: seconds
    pytest -m slow tests/learn/test_train_distributed.py         # real training under `accelerate launch` (gloo, 2 CPU processes)

The slow tests: the real SmolLM2-135M trains the same 16 chats as 1 and as 2 processes through
train_in_child, and both adapters answer through the real vLLM engine (about 2 minutes on 2 cores, most
of it the children importing torch and loading the model); on the tiny random Llama, SFT, KTO and DPO
with the layers sharded (FSDP) train as without, a process killed mid-run fails the whole run and
leaves nothing, and so does the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from learn.cores import CoreShare, usable_cores
from learn.train import TrainConfig, TrainError, argument_parser, train_in_child
from learn.train_child import launch_command, rank_failures
from learn.train_dist import SOLO, Ranks, join
from tests.learn.chats import coqa_rows, write_jsonl
from tests.learn.test_train_child import wait_for


def test_one_process_runs_the_recipe_directly():
    assert launch_command(TrainConfig(), ["--base", "B"]) == [sys.executable, "-m", "learn.train", "--base", "B"]


def test_two_processes_start_under_accelerate_launch_on_a_free_port():
    from accelerate.commands.launch import launch_command_parser

    command = launch_command(TrainConfig(processes=2), ["--base", "B", "--out", "D"])
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    args = launch_command_parser().parse_args(command[3:])  # accelerate's own parser reads it as meant
    assert (args.num_processes, args.num_machines, args.main_process_port) == (2, 1, 0)  # 0: accelerate picks a free port
    assert args.multi_gpu and not args.cpu  # `--cpu` would start one process; gloo comes from the recipe's PartialState(cpu=True)
    assert args.num_cpu_threads_per_process == max(1, usable_cores() // 2)
    assert args.module and args.training_script == "learn.train" and args.training_script_args == ["--base", "B", "--out", "D"]


def test_processes_is_a_checked_config_key_and_a_flag():
    assert TrainConfig().processes == 1 and TrainConfig(processes=2, batch_size=4).processes == 2
    with pytest.raises(ValidationError, match="processes must be >= 1"):
        TrainConfig(processes=0)
    with pytest.raises(ValidationError, match=r"batch_size \(2\) must be >= processes \(4\)"):
        TrainConfig(processes=4, batch_size=2)
    args = argument_parser().parse_args(["--processes", "2"])
    assert args.processes == 2
    assert "accelerate launch" in TrainConfig.model_fields["processes"].description


def test_several_processes_need_the_launcher_and_must_agree_with_it(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert join("cpu", 1) == SOLO
    with pytest.raises(TrainError, match="processes = 2 needs a launcher"):
        join("cpu", 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainError, match="started as 2 processes but processes = 3"):
        join("cpu", 3)


def test_each_process_takes_a_disjoint_share_and_together_all_of_it():
    batch = list(range(7))
    shares = [Ranks(rank=r, world=3).shard(batch) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]] and sorted(sum(shares, [])) == batch
    assert SOLO.shard(batch) == batch and SOLO.sum([1.5, 2]) == [1.5, 2] and SOLO.each(3) == [3]


class Sibling(Ranks):
    """Rank 0 of 2, in one process: its sibling's look is its own (the same CPU time, no clock or counter of its own)."""

    def sum(self, values):
        t, busy, own = values
        return [t, busy, 2 * own]


def test_processes_decide_together_and_sit_steps_out_while_the_cpu_is_busy(machine_clock):
    clock = machine_clock
    ranks = Sibling(rank=0, world=2)

    def run(share: CoreShare, seconds: float, each: float, others: float) -> tuple[int, int]:
        clock["t"] += seconds
        clock["own"] += each * seconds
        clock["busy"] += (2 * each + others) * seconds
        return share.step(ranks), share.sharing

    two = CoreShare(cores=2, processes=2, every_s=3.0)
    assert (two.current, two.sharing) == (1, 1)  # before any look: half the cores, so one process
    assert run(two, 1.0, each=0.5, others=0.0) == (1, 1)  # the first step only takes the shared look
    assert run(two, 1.0, each=0.5, others=0.0) == (1, 2)  # an idle engine: both processes, a thread each
    assert run(two, 3.0, each=0.5, others=1.0) == (1, 1)  # traffic: one process trains, the other waits
    assert run(two, 3.0, each=0.9, others=0.05) == (1, 2)  # quiet again
    assert two.steps_sharing == {1: 2, 2: 2} and two.steps_at == {1: 2, 2: 2}

    clock.update(t=0.0, busy=0.0, own=0.0)
    eight = CoreShare(cores=8, processes=2)
    assert (eight.current, eight.sharing) == (2, 2)  # half of 8 cores, split in two
    run(eight, 1.0, each=1.0, others=0.0)
    assert run(eight, 1.0, each=4.0, others=0.0) == (4, 2)
    assert run(eight, 3.0, each=3.0, others=1.0) == (3, 2)  # 7 cores free: 3 threads each

    clock.update(t=0.0, busy=0.0, own=0.0)
    cuda = CoreShare(cores=2, processes=2, yielding=False)  # CUDA or FSDP: every process makes every pass
    run(cuda, 1.0, each=0.5, others=0.0)
    assert run(cuda, 3.0, each=0.5, others=1.0) == (1, 2) and cuda.steps_sharing == {2: 2}
    assert (CoreShare(3, cores=2, processes=2).sharing, CoreShare(3, cores=2, processes=2).step(ranks)) == (2, 3)


def test_a_process_that_sits_a_step_out_takes_no_share():
    batch = list(range(5))
    assert Ranks(rank=0, world=2).shard(batch, 1) == batch and Ranks(rank=1, world=2).shard(batch, 1) == []
    assert [Ranks(rank=r, world=2).shard(batch, 2) for r in (0, 1)] == [[0, 2, 4], [1, 3]]


def one_step(rank: int, port: int, out: str, sharing: int) -> None:
    """In a process of a 2-process gloo group (joined as under the launcher): this rank's share of a 5-row batch, one step
    (`sharing` 1: rank 1 sits it out)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    ranks = join("cpu", 2)
    torch.manual_seed(0)
    model, x, y = torch.nn.Linear(4, 1), torch.randn(5, 4), torch.randn(5, 1)
    if rank == 1:
        torch.nn.init.zeros_(model.weight)  # rank 0's weights win
    ranks.broadcast(list(model.parameters()))
    mine = ranks.shard(list(range(5)), sharing)
    loss = ((model(x[mine]) - y[mine]) ** 2).sum() / 5  # divided by the whole batch's units, as the recipe does
    loss.backward()
    ranks.sum_grads(list(model.parameters()))
    total = ranks.sum([loss.item(), len(mine)])
    ranks.close()
    torch.save({"grads": [p.grad for p in model.parameters()], "loss": total[0], "rows": total[1]}, f"{out}/{rank}.pt")


@pytest.mark.parametrize("sharing", [2, 1])
def test_two_gloo_processes_sum_their_shares_into_the_whole_batch_gradient(tmp_path, sharing):
    import multiprocessing
    import socket

    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=one_step, args=(rank, port, str(tmp_path), sharing)) for rank in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    torch.manual_seed(0)
    model, x, y = torch.nn.Linear(4, 1), torch.randn(5, 4), torch.randn(5, 1)
    loss = ((model(x) - y) ** 2).sum() / 5
    loss.backward()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert got["rows"] == 5 and got["loss"] == pytest.approx(loss.item(), rel=1e-6)
        for mine, whole in zip(got["grads"], (p.grad for p in model.parameters())):
            assert torch.allclose(mine, whole, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- slow: real training


def chats(n: int) -> list[dict]:
    from tests.learn.test_train_real import coqa_chats

    return coqa_chats(n)


async def answer_through_engine(engine_url: str, name: str, folder: Path) -> str:
    """Load the adapter into the real engine (checked and warmed, as the reconciler does), ask it once, unload it."""
    import httpx

    from serve.adapters import EngineAdapters
    from tests.fixtures.engine import engine_settings

    async with httpx.AsyncClient(trust_env=False) as http:
        adapters = EngineAdapters(http, engine_url, max_rank=engine_settings().lora_capacity)
        assert await adapters.load(name, folder)
        try:
            r = await http.post(f"{engine_url}/v1/chat/completions", timeout=120, json={
                "model": name, "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "system", "content": "Answer briefly from the story.\nTom baked forty loaves."},
                             {"role": "user", "content": "Who baked?"}]})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]
        finally:
            await adapters.unload(name)


@pytest.mark.slow
def test_two_processes_train_like_one_and_both_adapters_serve(tmp_path, model_dir, engine_url):
    data = write_jsonl(tmp_path / "train.jsonl", chats(16))
    runs = {}
    for n in (1, 2):
        config = TrainConfig(rank=8, alpha=16, max_length=256, batch_size=4, epochs=1, learning_rate=1e-3, warmup_ratio=0.0,
                             device="cpu", processes=n, threads=1)  # a fixed count: both processes share every step
        started = time.monotonic()
        result = train_in_child(config, base_model=str(model_dir), train_file=data, out_dir=tmp_path / f"chat-{n}p")
        runs[n] = (result, json.loads((result.out_dir / "report.json").read_text()), time.monotonic() - started)
        assert not list(tmp_path.glob(f"chat-{n}p.tmp-*"))
    (one, report1, s1), (two, report2, s2) = runs[1], runs[2]

    print(f"\n1 process: {s1:.0f} s, train loss {one.metrics['train_loss']:.4f}, {one.metrics['tokens_per_s']:.0f} tokens/s"
          f"\n2 processes: {s2:.0f} s, train loss {two.metrics['train_loss']:.4f}, {two.metrics['tokens_per_s']:.0f} tokens/s")

    assert (report1["processes"], report2["processes"], report2["config"]["processes"]) == (1, 2, 2)
    assert report1["examples_seen"] == report2["examples_seen"] == 15  # 16 chats, 1 held out for validation, one epoch
    assert report1["stages"]["sft"]["examples_seen_per_process"] == [15]
    seen_by = report2["stages"]["sft"]["examples_seen_per_process"]
    assert sum(seen_by) == 15 and min(seen_by) >= 7  # each process took its half of every step
    assert report1["steps"] == report2["steps"] == 4 and report1["tokens"] == report2["tokens"]
    assert abs(two.metrics["train_loss"] - one.metrics["train_loss"]) <= 0.05 * one.metrics["train_loss"]
    assert abs(two.metrics["val_loss"] - one.metrics["val_loss"]) <= 0.05 * one.metrics["val_loss"]

    for n, (result, _, _) in runs.items():
        answer = asyncio.run(answer_through_engine(engine_url, f"dist-{n}p-{uuid.uuid4().hex[:8]}", result.out_dir))
        assert answer.strip()


def assert_same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    one, other = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert sorted(one) == sorted(other) and all(one[k].shape == other[k].shape for k in one)
    # Adam amplifies float rounding (the two sum the gradients in a different order): equal to 1% of the weights
    for k in one:
        assert float((one[k] - other[k]).norm()) <= 0.01 * float(one[k].norm()) + 1e-6, k


@pytest.mark.slow
def test_fsdp_trains_the_preference_stages_like_plain_data_parallel(tmp_path, tiny_model):
    """SFT, KTO and DPO with the decoder layers sharded (FSDP): the same losses and adapter as plain data-parallel,
    and the processes keep step where one has no share of a micro-batch (17 training chats in batches of 4) or
    fewer validation and reference batches than the other. (On SmolLM2, SFT with FSDP gave the same adapter as
    without it to 2e-8: measured once, not part of the suite, to keep `make test` within its time.)"""
    from tests.learn.chats import preference_rows

    kto, pairs = preference_rows(21)
    files = {"train_file": write_jsonl(tmp_path / "train.jsonl", coqa_rows(21)),
             "preference_file": write_jsonl(tmp_path / "preferences.jsonl", kto),
             "pair_file": write_jsonl(tmp_path / "pairs.jsonl", pairs)}
    results = {}
    for fsdp in (False, True):
        config = TrainConfig(rank=8, alpha=16, learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant", batch_size=4,
                             max_length=128, device="cpu", val_fraction=0.2, processes=2, fsdp=fsdp, dropout=0.0,
                             threads=1)  # fixed: both split every step the same way (adaptive, a busy CPU would differ)
        results[fsdp] = train_in_child(config, base_model=str(tiny_model), stages=("sft", "kto", "dpo"),
                                       out_dir=tmp_path / f"fsdp-{fsdp}", **files)
    plain, sharded = results[False], results[True]
    for stage in ("sft", "kto", "dpo"):
        assert sharded.metrics["stages"][stage]["train_loss"] == pytest.approx(plain.metrics["stages"][stage]["train_loss"], rel=1e-4)
        assert sharded.metrics["stages"][stage]["examples_seen"] == plain.metrics["stages"][stage]["examples_seen"]
    assert_same_weights(plain.out_dir, sharded.out_dir)


def test_fsdp_needs_several_processes_and_no_qlora():
    with pytest.raises(ValidationError, match="set processes > 1"):
        TrainConfig(fsdp=True)
    with pytest.raises(ValidationError, match="fsdp and qlora"):
        TrainConfig(fsdp=True, processes=2, qlora=True, device="cuda")


def rank_processes() -> dict[int, int]:
    """rank -> pid of the recipe's processes that a launcher started by this test process started."""
    def parent(pid) -> int:
        return int(Path(f"/proc/{pid}/status").read_text().split("PPid:")[1].split()[0])

    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"learn.train" in (entry / "cmdline").read_bytes() and parent(parent(entry.name)) == os.getpid():
                env = dict(kv.split(b"=", 1) for kv in (entry / "environ").read_bytes().split(b"\0") if b"=" in kv)
                if b"RANK" in env:
                    found[int(env[b"RANK"])] = int(entry.name)
        except (OSError, ValueError, IndexError):
            continue
    return found


@contextlib.contextmanager
def training_in_thread(tiny_model, data, out, **kwargs):
    """A 2-process run through train_in_child in a thread: (thread, outcome); every rank killed afterwards, whatever happened."""
    config = TrainConfig(rank=8, alpha=16, batch_size=4, max_length=128, device="cpu", epochs=1000, early_stopping_patience=1000,
                         processes=2)
    outcome: dict = {}

    def run():
        try:
            train_in_child(config, base_model=str(tiny_model), train_file=data, out_dir=out, **kwargs)
        except TrainError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield thread, outcome
    finally:
        for pid in rank_processes().values():
            os.kill(pid, signal.SIGKILL)
        thread.join(30)


def gone(ranks: dict[int, int]) -> bool:
    """Every rank process has exited (within 30 s)."""
    return bool(wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in ranks.values()), timeout=30))


def test_a_failure_names_the_killed_process_first_whichever_torchrun_saw_first(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    # CI's case: rank 0 failed on its peer's closed connection (an error file, an early timestamp: torchrun's root
    # cause, with a traceback longer than the last lines) after rank 1 was killed
    error_file = tmp_path / "error.json"
    callstack = "Traceback (most recent call last):\n" + "".join(f'  File "x.py", line {i}, in f\n' for i in range(30))
    error_file.write_text(json.dumps({"message": {"message": "RuntimeError: Connection closed by peer",
                                                  "extraInfo": {"py_callstack": callstack + "RuntimeError: GLHF!", "timestamp": "1"}}}))
    summary = str(ChildFailedError("learn.train", {0: ProcessFailure(0, 101, 1, str(error_file)),
                                                   1: ProcessFailure(1, 102, -signal.SIGKILL, "<N/A>")}))
    assert summary.index("rank      : 1") < summary.index("Root Cause") < summary.index("rank      : 0")
    assert rank_failures("launcher output\n" + summary) == ["rank 1 was killed by SIGKILL (out of memory, or killed)",
                                                              "rank 0 exited with status 1"]
    assert rank_failures("no torchrun summary here") == []
    stopped = str(ChildFailedError("learn.train", {0: ProcessFailure(0, 101, -signal.SIGTERM, "<N/A>"),
                                                   1: ProcessFailure(1, 102, -signal.SIGKILL, "<N/A>")}))
    assert rank_failures(stopped) == ["rank 1 was killed by SIGKILL (out of memory, or killed)", "rank 0 was stopped (SIGTERM)"]


@pytest.mark.slow
def test_a_process_killed_mid_run_fails_the_run_and_leaves_nothing(tmp_path, tiny_model):
    data, out = write_jsonl(tmp_path / "train.jsonl", coqa_rows(16)), tmp_path / "out"
    with training_in_thread(tiny_model, data, out) as (thread, outcome):
        ranks = wait_for(lambda: (r := rank_processes()) and len(r) == 2 and list(tmp_path.glob("out.tmp-*")) and r)
        assert ranks, "the two training processes never started"
        time.sleep(2)  # training steps now
        os.kill(ranks[1], signal.SIGKILL)  # as an out-of-memory kill of one process
        thread.join(120)
        assert "error" in outcome, "the run did not fail"
        # the killed process is named first, whichever failure torchrun saw first (rank 0's, when its peer's
        # closed connection failed it before torchrun's poll: CI saw that once, rank 1 then cut from the last lines)
        assert re.search(r"2 processes\) exited with status \d+ \(rank 1 was killed by SIGKILL", outcome["error"]), outcome["error"]
        assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))
        assert gone(ranks), "a process outlived the run"


@pytest.mark.slow
def test_a_timeout_stops_every_process_and_leaves_nothing(tmp_path, tiny_model):
    data, out = write_jsonl(tmp_path / "train.jsonl", coqa_rows(16)), tmp_path / "out"
    with training_in_thread(tiny_model, data, out, timeout=25) as (thread, outcome):
        ranks = wait_for(lambda: (r := rank_processes()) and len(r) == 2 and r)
        assert ranks, "the two training processes never started"
        thread.join(120)
        assert "timed out after 25 s" in outcome["error"]
        assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))
        assert gone(ranks), "a process outlived the run"
