"""Child processes that die with their parent and get only the environment they need.

    subprocess.Popen(cmd, env=child_env({"PYTHONPATH": here}), preexec_fn=functools.partial(die_with_parent, os.getpid()))

The training child (learn/train.py) and the vLLM engine child (serve/engine_child.py) both start
this way. `die_with_parent` runs in the child between fork and exec and asks Linux to send it
SIGTERM when the process that started it dies, however it dies (SIGKILL, an OOM kill): no trainer
or engine keeps running, holding memory or a GPU, after its learner or gateway is gone.

`child_env` passes on what a Python, PyTorch, Hugging Face or vLLM process reads: paths, locale,
time zone, temp dirs, proxies and CA bundles, caches, and the HF_* / VLLM_* / CUDA_* / OMP_* ...
families (HF_TOKEN included: it is how a gated base model is downloaded). Nothing else: no
TUNEWHEEL_* variable (the database URL, API keys), no cloud credentials, no other service's
tokens, no PROMETHEUS_MULTIPROC_DIR (vLLM would write its metrics into the gateway's folder).
A child that needs one more variable gets it through `extra`. `with_allocator` preloads mimalloc into
the training child (learn.train.allocator): 30% less memory than the C library's allocator, as fast.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import signal
from collections.abc import Mapping
from pathlib import Path

PASSED = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR", "TEMP", "TMP",
    "PYTHONPATH", "PYTHONHOME", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONWARNINGS", "PYTHONHASHSEED",
    "VIRTUAL_ENV", "LD_LIBRARY_PATH", "LD_PRELOAD", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
    "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR", "TOKENIZERS_PARALLELISM", "MPLCONFIGDIR",
    "HUGGING_FACE_HUB_TOKEN", "NUMBA_CACHE_DIR",
})
PASSED_PREFIXES = ("LC_", "HF_", "TRANSFORMERS_", "VLLM_", "CUDA_", "NCCL_", "NVIDIA_", "OMP_", "KMP_", "GOMP_", "MKL_",
                   "OPENBLAS_", "ONEDNN_", "DNNL_", "MIMALLOC_", "TORCH", "PYTORCH_", "TRITON_", "ACCELERATE_", "BNB_", "ROCM_", "HIP_")


def child_env(extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables of `base` (default: this process's environment) that a model child needs, plus `extra`."""
    base = os.environ if base is None else base
    env = {k: v for k, v in base.items() if k in PASSED or k.startswith(PASSED_PREFIXES)}
    return {**env, **(extra or {})}


def mimalloc_library() -> Path | None:
    """libmimalloc as the cmeel-mimalloc wheel installs it (<site-packages>/cmeel.prefix/lib), or None."""
    try:
        files = importlib.metadata.files("cmeel-mimalloc") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = sorted(Path(f.locate()) for f in files if f.name.startswith("libmimalloc.so"))
    return next((p for p in found if p.is_file()), None)


def preload_first(env: Mapping[str, str], library: Path) -> dict[str, str]:
    """`env` with `library` first in LD_PRELOAD, before whatever it preloads already (the engine's Intel OpenMP,
    the training child's mimalloc)."""
    preload = env.get("LD_PRELOAD")
    return {**env, "LD_PRELOAD": f"{library}:{preload}" if preload else str(library)}


def with_allocator(env: Mapping[str, str], allocator: str) -> dict[str, str]:
    """`env` with mimalloc preloaded when `allocator` is 'mimalloc', it is installed and nothing preloads it yet;
    MIMALLOC_PURGE_DELAY=-1 keeps freed memory for reuse: a training step frees and allocates the same sizes again,
    and handing them back to the kernel made every step fault its pages in anew (steps 22-46% slower, measured)."""
    lib = mimalloc_library() if allocator == "mimalloc" else None
    if lib is None or "mimalloc" in env.get("LD_PRELOAD", ""):
        return dict(env)
    return {**preload_first(env, lib), "MIMALLOC_PURGE_DELAY": env.get("MIMALLOC_PURGE_DELAY", "-1")}


def die_with_parent(parent: int | None = None) -> None:
    """In the child before exec: SIGTERM it when the process that started it dies (Linux; elsewhere a no-op).
    `parent`: that process's pid, taken before the fork (`functools.partial(die_with_parent, os.getpid())`),
    so that a parent that died before this ran is noticed too."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:  # orphaned before prctl took effect: nobody would signal us
        os.kill(os.getpid(), signal.SIGTERM)
