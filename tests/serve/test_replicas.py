"""Two real vLLM engines behind one gateway (`engine.urls`): promotion reaches both, a replica that
dies costs only its own requests in flight, and one that comes back gets the adapters first.

    PYTHONPATH=$PWD pytest -m engine tests/serve/test_replicas.py

Replica A is the session's engine; replica B is started here (about 40 s on 2 cores), killed with
SIGKILL in the middle of 8 concurrent streams, and started again as an orchestrator would restart
it. The pool's logic with stand-in engines: tests/serve/test_pool.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from serve.engine_child import free_port
from serve.settings import hash_key, load_settings

pytestmark = pytest.mark.engine

ADMIN = "replicas-test-admin"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
STREAMS = 8


@pytest.fixture(scope="module")
def replica_b(model_dir, tmp_path_factory):
    """A second vLLM engine on the same model: the EngineManager that runs it (killed and restarted by the test)."""
    from serve.engine import EngineManager

    settings = load_settings(None, data_dir=tmp_path_factory.mktemp("replica-b"),
                             engine={"port": free_port(), "model": str(model_dir)})
    manager = EngineManager(settings)
    manager.__enter__()
    yield manager
    manager.__exit__(None, None, None)


@pytest.fixture(scope="module")
def loras(model_dir, tmp_path_factory) -> list[Path]:
    """Two real (randomly initialised) rank-8 peft LoRAs for the base model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        folder = tmp_path_factory.mktemp("lora") / f"lora{seed}"
        model = AutoModelForCausalLM.from_pretrained(str(model_dir))
        get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])).save_pretrained(str(folder))
        out.append(folder)
    return out


@pytest.fixture
def gw(make_gateway, engine_url, replica_b, model_dir, tmp_path):
    gw = make_gateway(data_dir=tmp_path / "data", serve={"admin_keys": [hash_key(ADMIN)]},
                      engine={"url": None, "urls": [engine_url, replica_b.url], "model": str(model_dir)})
    yield gw
    for url in (engine_url, replica_b.url):  # leave the shared engine as we found it
        try:
            for m in httpx.get(f"{url}/v1/models", trust_env=False).json()["data"]:
                if str(gw.settings.data_dir) in (m.get("root") or ""):
                    httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": m["id"]}, trust_env=False)
        except httpx.HTTPError:
            pass


def register(gw, folder: Path) -> str:
    name = gw.registry.new_version_name("chat")
    shutil.copytree(folder, gw.settings.adapters_dir / name)
    gw.registry.register(name, kind="chat", path=gw.settings.adapters_dir / name)
    return name


def loaded(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{url}/v1/models", trust_env=False, timeout=30).json()["data"]}


@dataclass
class Traffic:
    """STREAMS threads streaming `chat` through the gateway until stopped; every request's outcome."""

    url: str
    results: list[tuple[float, float, bool, str, str, str]] = field(default_factory=list)  # start, end, ok, adapter, why, text
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, seconds_max: float = 600) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._worker, args=(i, seconds_max), daemon=True) for i in range(STREAMS)]
        for t in threads:
            t.start()
        return threads

    def _worker(self, i: int, seconds_max: float) -> None:
        deadline = time.monotonic() + seconds_max
        with httpx.Client(base_url=self.url, headers=HEADERS, timeout=300, trust_env=False) as client:
            n = 0
            while not self.stop.is_set() and time.monotonic() < deadline:
                n += 1
                text = f"Stream {i}, request {n}: name a colour."
                body = {"model": "chat", "stream": True, "max_tokens": 12, "messages": [{"role": "user", "content": text}]}
                start = time.monotonic()
                try:
                    with client.stream("POST", "/v1/chat/completions", json=body) as r:
                        answer = r.read().decode()
                        adapter = r.headers.get("x-tunewheel-adapter", "")
                    ok = r.status_code == 200 and answer.rstrip().endswith("data: [DONE]") and '"error"' not in answer
                    why = "" if ok else f"{r.status_code} {answer[-300:]}"
                except httpx.HTTPError as exc:
                    ok, adapter, why = False, "", f"{type(exc).__name__}: {exc}"
                self.results.append((start, time.monotonic(), ok, adapter, why, text))

    def failures(self) -> list[tuple[float, float, bool, str, str, str]]:
        return [r for r in self.results if not r[2]]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.2)


def test_promotion_and_a_dying_replica_under_eight_streams(gw, engine_url, replica_b, loras, monkeypatch):
    pool = gw.app.state.gateway.engine
    sent_to: dict[str, str] = {}  # request text -> the replica that answered it (the last one tried)
    pick = pool.pick

    def recording_pick(affinity=None, exclude=()):
        replica = pick(affinity, exclude)
        if replica is not None and affinity is not None:
            sent_to[next(t for t in affinity.split('"') if t.startswith("Stream "))] = replica.url
        return replica

    monkeypatch.setattr(pool, "pick", recording_pick)
    replicas = {r.url: r for r in pool.replicas.values()}
    assert set(replicas) == {engine_url, replica_b.url} and all(r.ready for r in replicas.values())
    admin = httpx.Client(base_url=gw.url, headers=HEADERS, timeout=300, trust_env=False)
    first, second = register(gw, loras[0]), register(gw, loras[1])
    assert admin.post(f"/admin/adapters/{first}/promote").status_code == 200
    assert first in loaded(engine_url) and first in loaded(replica_b.url)

    # a promotion under 8 concurrent streams: both replicas serve the new version, nothing fails
    traffic = Traffic(gw.url)
    threads = traffic.run()
    wait_for(lambda: len(traffic.results) >= 2 * STREAMS, 300, "the streams are answered")
    r = admin.post(f"/admin/adapters/{second}/promote")
    assert r.status_code == 200, r.text
    promoted = time.monotonic()
    assert second in loaded(engine_url) and second in loaded(replica_b.url)
    wait_for(lambda: sum(1 for x in traffic.results if x[0] > promoted) >= 2 * STREAMS, 300, "streams after the promotion")
    traffic.stop.set()
    for t in threads:
        t.join(300)
    assert not traffic.failures(), traffic.failures()[:3]
    after = [x for x in traffic.results if x[0] > promoted]
    assert after and all(x[3] == second for x in after), {x[3] for x in after}
    assert {x[3] for x in traffic.results if x[1] < promoted} <= {first}
    gw.writer.flush()
    assert turns(gw) == len(traffic.results)

    # replica B dies mid-run: only the requests in flight on it fail, each with a clear 502/503
    traffic = Traffic(gw.url)
    threads = traffic.run()
    wait_for(lambda: len(traffic.results) >= STREAMS and replicas[replica_b.url].outstanding > 0, 300, "B answers streams")
    kill = time.monotonic()
    os.killpg(replica_b.pid, signal.SIGKILL)
    killed = time.monotonic()  # a stream broken by the kill may end before this line runs
    wait_for(lambda: sum(1 for x in traffic.results if x[0] > killed + 1) >= 2 * STREAMS, 300, "streams after the kill")
    traffic.stop.set()
    for t in threads:
        t.join(300)
    at_kill = [x for x in traffic.results if x[0] < killed and x[1] > kill]
    on_b = {x[5] for x in at_kill if sent_to[x[5]] == replica_b.url}
    failed = traffic.failures()
    assert on_b and len(on_b) < len(at_kill)  # the kill hit requests on B while A had some too
    assert {x[5] for x in failed} <= on_b, [(x[0] - killed, sent_to[x[5]], x[4]) for x in failed]  # only B's, in flight
    # each a clear error: 502/503 before the answer began, else the stream's error event (engine_error, 502)
    assert all(x[4].startswith(("502", "503")) or re.search(r'"type":\s*"engine_error"', x[4]) for x in failed), failed
    assert not replicas[replica_b.url].ready and pool.ready

    # B comes back (an orchestrator restarts it): it gets the adapters before it takes requests
    asyncio.run(replica_b.start())
    wait_for(lambda: replicas[replica_b.url].ready, 120, "B back in rotation")
    assert {second, first} <= loaded(replica_b.url)  # prod, and the version a rollback would flip to
    r = httpx.get(f"{gw.url}/ready", trust_env=False).json()
    assert r["replicas"] == {engine_url: "ready", replica_b.url: "ready"}, r
    before = replicas[replica_b.url].outstanding
    assert before == 0
    traffic = Traffic(gw.url)
    threads = traffic.run()
    wait_for(lambda: replicas[replica_b.url].outstanding > 0, 120, "B takes requests again")
    traffic.stop.set()
    for t in threads:
        t.join(300)
    assert not traffic.failures(), traffic.failures()[:3]


def turns(gw) -> int:
    from sqlmodel import Session, func, select

    from feedback.models import Turn

    with Session(gw.db) as s:
        return s.exec(select(func.count()).select_from(Turn)).one()
