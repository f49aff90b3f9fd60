"""The training recipe in a child process: `train_in_child(...)`, alone or under accelerate's launcher.

    result = train_in_child(config, base_model=B, train_file=F, out_dir=D, timeout=3600, progress=True)
    launch_command(config, ["--base", B, "--train", F, "--out", D])   # the child's command line

The learner trains this way, so a crash or an out-of-memory kill cannot touch the caller (the serving
gateway). The child is `python -m learn.train` (learn/train.py) with the config as JSON; it writes its
result, or its error, to a file this process reads. The child gets only the environment a trainer
needs (learn/children.py), dies with this process, and is stopped (SIGTERM, then SIGKILL) at the
timeout; a failure is a TrainError with the recipe's own message or the child's last output, and
leaves neither the temporary folder nor `out_dir`.

With `learn.train.processes = N > 1` the child is accelerate's launcher (`accelerate launch`, torchrun
underneath), which starts N processes of the recipe on this machine (learn/train_dist.py: how they
split the work). The launcher gets `--multi_gpu` on CPU too: with `--cpu` it starts a single process
(its simple launcher; accelerate issue #2741), while the multi-GPU launcher starts N workers, to which
accelerate's `PartialState(cpu=True)` gives the gloo backend. `--main_process_port 0` lets accelerate
pick a free port, so two runs never collide on torchrun's default 29500. When one process fails,
torchrun stops the others and the launcher exits non-zero: the run fails as one, and its error names
every process that failed (one killed by a signal first: the others failed because it left).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from learn.children import child_env, die_with_parent, with_allocator
from learn.cores import usable_cores
from learn.train_config import TrainConfig, TrainError, TrainResult, check_paths


def launch_command(config: TrainConfig, recipe_args: list[str]) -> list[str]:
    """The training child's command: `python -m learn.train ARGS`, under `accelerate launch` when processes > 1."""
    if config.processes == 1:
        return [sys.executable, "-m", "learn.train", *recipe_args]
    threads = max(1, usable_cores() // config.processes)  # the first count; learn/cores.py adjusts it before each step
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(config.processes),
            "--num_machines", "1", "--main_process_port", "0", "--num_cpu_threads_per_process", str(threads),
            "--mixed_precision", "no", "--dynamo_backend", "no",  # the recipe picks its dtypes; no accelerate config applies
            "-m", "learn.train", *recipe_args]


def train_in_child(config: TrainConfig, *, base_model: str, out_dir: str | Path, train_file: str | Path | None = None,
                   val_file: str | Path | None = None, preference_file: str | Path | None = None, pair_file: str | Path | None = None,
                   stages: tuple[str, ...] | list[str] = ("sft",), start_adapter: str | Path | None = None,
                   timeout: float | None = None, progress: bool = False) -> TrainResult:
    """`train(...)` in a child Python process; a crash, kill or timeout is a TrainError with its last output.
    `timeout`: seconds before the child is killed (the learner passes what is left of learn.cycle_timeout_s).
    `progress`: also copy the child's output (its progress bar: steps, loss, tokens/s) to this process's stderr.
    The child gets SIGTERM when this process dies (and then removes its temporary folder). With `config.processes` > 1
    the child is accelerate's launcher, which starts that many processes of the recipe (learn/train_dist.py); one that
    fails fails the run."""
    check_paths(base_model=str(base_model), out_dir=out_dir, start_adapter=start_adapter, train_file=train_file, val_file=val_file,
                preference_file=preference_file, pair_file=pair_file)
    paths = {"--base": base_model, "--train": train_file, "--out": out_dir, "--val": val_file, "--preferences": preference_file,
             "--pairs": pair_file, "--start-adapter": start_adapter}
    with tempfile.TemporaryDirectory(prefix="tunewheel-train-") as work:
        result_path, log_path = Path(work) / "result.json", Path(work) / "train.log"
        command = launch_command(config, ["--config-json", config.model_dump_json(), "--result-json", str(result_path),
                                          *(str(x) for flag, path in paths.items() if path is not None for x in (flag, path)),
                                          "--stages", *stages])
        # the child imports this checkout of learn/, whatever the caller's working directory; it gets only
        # the environment a trainer needs (no database URL, no keys), mimalloc where configured, and dies with this process
        env = with_allocator(child_env({"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                                    os.environ.get("PYTHONPATH")]))}),
                             config.allocator)
        with open(log_path, "wb") as log:
            child = subprocess.Popen(command, stdout=subprocess.PIPE if progress else log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, preexec_fn=functools.partial(die_with_parent, os.getpid()))
            tee = threading.Thread(target=_tee, args=(child.stdout, log), daemon=True) if progress else None
            if tee:
                tee.start()
            why = None
            try:
                child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                why = f"timed out after {timeout:.0f} s (the rest of learn.cycle_timeout_s)"
            finally:
                if child.poll() is None:  # timeout, or the caller was interrupted: never leave the child running
                    _stop(child)
                if tee:
                    tee.join(10)  # the log is complete before it is read below
        shutil.rmtree(f"{out_dir}.tmp-{child.pid}", ignore_errors=True)
        result = json.loads(result_path.read_text()) if result_path.is_file() else {}
        if why is None and child.returncode == 0 and "metrics" in result:
            return TrainResult(out_dir=Path(result["out_dir"]), metrics=result["metrics"])
        if "error" in result:
            raise TrainError(result["error"])
        why = why or exit_reason(child.returncode)
        log = log_path.read_text(errors="replace")
        lines = [s for s in log.replace("\r", "\n").splitlines() if s.strip()]
        who = "training child" if config.processes == 1 else f"training launcher ({config.processes} processes)"
        failed = "; ".join(rank_failures(log))
        raise TrainError(f"{who} {why}" + (f" ({failed})" if failed else "") + f"; nothing was written to {out_dir}. "
                         "Last output:\n" + "\n".join(lines[-15:]))


_FAILURE = re.compile(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+) \(pid: \d+\)")


def rank_failures(log: str) -> list[str]:
    """The processes torchrun's failure summary names, as 'rank 1 was killed by SIGKILL (...)': those killed by a
    signal first, then those that exited with an error, then those torchrun stopped (SIGTERM). torchrun's 'root cause'
    is the failure it saw first, and a peer that failed because a killed process closed its connection can come first,
    with a traceback long enough to push the killed one out of the last lines."""
    failures = {}
    for rank, code in ((int(r), int(c)) for r, c in _FAILURE.findall(log)):
        if code == -signal.SIGTERM:
            failures[rank] = (2, f"rank {rank} was stopped (SIGTERM)")
        else:
            failures[rank] = (0 if code < 0 else 1, f"rank {rank} {exit_reason(code)}")
    return [text for _, text in sorted(failures.values())]


def exit_reason(code: int) -> str:
    """How a process ended, from its return code (negative: the signal that killed it)."""
    if code >= 0:
        return f"exited with status {code}"
    name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
    return f"was killed by {name}" + (" (out of memory, or killed)" if -code == signal.SIGKILL else "")


def _stop(child: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM first (the recipe removes its temporary folder; accelerate's launcher stops its processes), then SIGKILL."""
    child.terminate()
    try:
        child.wait(grace_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _tee(pipe, log) -> None:
    """Copy the child's output to its log and to stderr, as it comes (a progress bar's \\r updates included)."""
    for chunk in iter(lambda: os.read(pipe.fileno(), 4096), b""):
        log.write(chunk)
        log.flush()
        try:
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):  # no byte stderr (captured), or closed: the log still has it
            pass
    pipe.close()
