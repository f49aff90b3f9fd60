"""engine.intel_openmp: the CPU engine runs on Intel's OpenMP runtime (libiomp5), as vLLM's CPU guide advises.

    pytest tests/serve/test_engine_openmp.py              # fast: the child's environment
    pytest tests/serve/test_engine_openmp.py -m engine    # also the session's real engine
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest

from serve.engine_child import engine_env, intel_openmp_library
from serve.settings import load_settings

X86_LINUX = sys.platform == "linux" and platform.machine() == "x86_64"


@pytest.mark.skipif(not X86_LINUX, reason="intel-openmp is installed on x86-64 Linux only")
def test_the_cpu_extra_installs_intel_openmp_and_the_engine_preloads_it():
    iomp = intel_openmp_library()
    assert iomp is not None and iomp.name == "libiomp5.so", "tunewheel[cpu] should install intel-openmp into <prefix>/lib"
    settings = load_settings(None)
    assert engine_env(settings, "cpu", base={})["LD_PRELOAD"] == str(iomp)
    # what the caller preloads stays, after it
    assert engine_env(settings, "cpu", base={"LD_PRELOAD": "/x/libfoo.so"})["LD_PRELOAD"] == f"{iomp}:/x/libfoo.so"


def test_no_preload_when_turned_off_on_gpu_or_when_an_openmp_runtime_is_already_chosen():
    off = load_settings(None, engine={"intel_openmp": False})
    assert "LD_PRELOAD" not in engine_env(off, "cpu", base={})
    assert "LD_PRELOAD" not in engine_env(load_settings(None), "gpu", base={})
    for chosen in ("/usr/lib/x86_64-linux-gnu/libgomp.so.1", "/opt/intel/lib/libiomp5.so"):
        # vLLM refuses GNU and Intel OpenMP preloaded together; a runtime the operator chose is kept as is
        assert engine_env(load_settings(None), "cpu", base={"LD_PRELOAD": chosen})["LD_PRELOAD"] == chosen


@pytest.mark.engine
@pytest.mark.skipif(not X86_LINUX, reason="intel-openmp is installed on x86-64 Linux only")
def test_the_real_engine_computes_on_intel_openmp(engine_url):
    """The session engine's processes have libiomp5 loaded, and vLLM recognised it: its worker got
    the thread settings vLLM gives Intel OpenMP (KMP_BLOCKTIME=5: threads sleep 5 ms after a step)."""
    port = urlsplit(engine_url).port
    servers = [p for p in psutil.process_iter(["cmdline"]) if f"--port {port}" in " ".join(p.info["cmdline"] or [])]
    assert servers, f"no vLLM process serves port {port}"
    tree = [servers[0], *servers[0].children(recursive=True)]
    loaded = [p for p in tree if "libiomp5" in Path(f"/proc/{p.pid}/maps").read_text()]
    assert len(loaded) == len(tree), "every engine process should have Intel OpenMP loaded"
    environs = [Path(f"/proc/{p.pid}/environ").read_bytes().split(b"\0") for p in tree]
    assert any(b"KMP_BLOCKTIME=5" in env for env in environs), "vLLM did not set up its worker for Intel OpenMP"
