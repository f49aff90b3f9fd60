"""The training child process: only the environment it needs, a timeout, and it dies with its parent.

    pytest tests/learn/test_train_child.py

On the tiny random Llama (tests/learn/conftest.py): real training in a real child process, so the
two process tests are marked slow (about 30-45 s each on the shared 2-core machine, most of it the
child importing torch). The recipe itself is tests/learn/test_train.py.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from learn.children import child_env, mimalloc_library, with_allocator
from learn.train import TrainConfig, TrainError, train_in_child
from tests.learn.chats import coqa_rows, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def long_config() -> TrainConfig:
    return TrainConfig(rank=8, alpha=16, batch_size=4, max_length=128, device="cpu", epochs=1000, early_stopping_patience=1000)


def training_child_of(parent: int) -> int | None:
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and f"PPid:\t{parent}\n" in (entry / "status").read_text()
                    and b"learn.train" in (entry / "cmdline").read_bytes()):
                return int(entry.name)
        except OSError:
            continue
    return None


def wait_for(condition, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := condition()):
            return value
        time.sleep(0.1)
    return None


def test_a_child_gets_what_models_need_and_no_secrets():
    env = child_env({"PYTHONPATH": "/repo"}, base={
        "PATH": "/bin", "HOME": "/home/u", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HF_HOME": "/hf", "HF_TOKEN": "hf_x",
        "CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "2", "VLLM_CPU_KVCACHE_SPACE": "1", "https_proxy": "http://p:3128",
        "TUNEWHEEL_STORE__URL": "postgresql://learner:secret@db/tunewheel", "TUNEWHEEL_API_KEY": "k-123",
        "DATABASE_URL": "postgresql://x", "AWS_SECRET_ACCESS_KEY": "s", "GITHUB_TOKEN": "g",
        "PROMETHEUS_MULTIPROC_DIR": "/tmp/prom"})
    assert env == {"PATH": "/bin", "HOME": "/home/u", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HF_HOME": "/hf",
                   "HF_TOKEN": "hf_x", "CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "2", "VLLM_CPU_KVCACHE_SPACE": "1",
                   "https_proxy": "http://p:3128", "PYTHONPATH": "/repo"}


def mapped_libraries(env: dict[str, str]) -> str:
    """The shared objects a Python started with `env` has loaded."""
    return subprocess.run([sys.executable, "-c", "print(open('/proc/self/maps').read())"], env=env, capture_output=True,
                          text=True, check=True).stdout


def test_the_training_child_runs_on_mimalloc_unless_told_not_to():
    if mimalloc_library() is None:
        # a dependency wherever the wheel exists (pyproject.toml): on x86-64 Linux its absence is a broken install
        assert not (sys.platform == "linux" and platform.machine() == "x86_64"), "cmeel-mimalloc is not installed"
        pytest.skip("no mimalloc wheel for this platform")
    base = child_env()
    assert "libmimalloc" in mapped_libraries(with_allocator(base, "mimalloc"))
    assert "libmimalloc" not in mapped_libraries(with_allocator(base, "system"))
    assert with_allocator(base, "system") == base
    # it keeps freed memory for reuse, unless the operator tuned that, and goes before another preload
    env = with_allocator({**base, "MIMALLOC_PURGE_DELAY": "100", "LD_PRELOAD": "/opt/libother.so"}, "mimalloc")
    assert env["MIMALLOC_PURGE_DELAY"] == "100" and env["LD_PRELOAD"] == f"{mimalloc_library()}:/opt/libother.so"
    assert with_allocator(base, "mimalloc")["MIMALLOC_PURGE_DELAY"] == "-1"
    assert with_allocator(env, "mimalloc") == env  # preloaded once
    with pytest.raises(ValueError, match="allocator"):
        TrainConfig(allocator="jemalloc")


@pytest.mark.slow
def test_a_child_past_its_timeout_is_killed_and_leaves_nothing(tmp_path, tiny_model, monkeypatch, capfd):
    monkeypatch.setenv("TUNEWHEEL_STORE__URL", "postgresql://learner:secret@db/tunewheel")
    data, out = write_jsonl(tmp_path / "train.jsonl", coqa_rows(16)), tmp_path / "out"
    outcome: dict = {}

    def run():
        try:
            train_in_child(long_config(), base_model=str(tiny_model), train_file=data, out_dir=out, timeout=20, progress=True)
        except TrainError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=run)
    started = time.monotonic()
    thread.start()
    child = wait_for(lambda: training_child_of(os.getpid()))
    assert child is not None, "no training child appeared"
    environ = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{child}/environ").read_bytes().split(b"\0") if b"=" in kv)
    assert b"PATH" in environ and not any(k.startswith(b"TUNEWHEEL_") for k in environ)
    if mimalloc_library():  # learn.train.allocator's default: the real training child runs on mimalloc
        assert b"libmimalloc" in Path(f"/proc/{child}/maps").read_bytes()
    thread.join(120)
    assert "timed out after 20 s" in outcome["error"] and time.monotonic() - started < 90
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))
    # progress=True: the child's progress bar reached this process's stderr, and its log is still whole
    assert "sft:" in capfd.readouterr().err and "sft:" in outcome["error"]


PARENT = """
import sys
from learn.train import TrainConfig, train_in_child
config = TrainConfig(rank=8, alpha=16, batch_size=4, max_length=128, device="cpu", epochs=1000, early_stopping_patience=1000)
train_in_child(config, base_model=sys.argv[1], train_file=sys.argv[2], out_dir=sys.argv[3])
"""


@pytest.mark.slow
def test_a_child_dies_with_its_parent_and_cleans_up(tmp_path, tiny_model):
    data, out = write_jsonl(tmp_path / "train.jsonl", coqa_rows(16)), tmp_path / "out"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tiny_model), str(data), str(out)],
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        child = wait_for(lambda: training_child_of(parent.pid))
        assert child is not None, "no training child appeared"
        assert wait_for(lambda: list(tmp_path.glob("out.tmp-*"))), "training never started"
        parent.kill()  # SIGKILL: no cleanup in the parent at all, as an OOM kill
        parent.wait()
        assert wait_for(lambda: not Path(f"/proc/{child}").exists() or b"Z" in Path(f"/proc/{child}/stat").read_bytes().split(b")")[-1][:3],
                        timeout=60), "the training child outlived its parent"
        assert wait_for(lambda: not list(tmp_path.glob("out.tmp-*")), timeout=30), "the child left its temporary folder"
        assert not out.exists()
    finally:
        if parent.poll() is None:
            parent.kill()
        leftover = training_child_of(parent.pid)
        if leftover:
            os.kill(leftover, signal.SIGKILL)
