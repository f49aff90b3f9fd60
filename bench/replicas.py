"""Engine replicas behind one gateway: throughput with one and with two vLLM replicas, and the time a
promotion takes to reach every replica.

    python bench/replicas.py                    # starts one engine, then two (embedded model)
    python bench/replicas.py --engine-urls http://127.0.0.1:8101 http://127.0.0.1:8102

Starts (or attaches to) vLLM engines on the same model, makes two real LoRA adapters (peft,
random weights, no training) and, through a gateway built as `tunewheel serve` builds it with
`engine.urls`:

1. one replica: the gateway on one engine (started on every core), v1 promoted; `--requests`
   chat completions of `--max-tokens` tokens (`chat`, answered by v1), `--concurrency` in flight:
   requests/s, tokens/s;
2. two replicas: the same through a gateway on two engines (started each on half of the cores);
   the ratio two/one is the figure. On one machine the two replicas split the same cores, so
   expect no gain on 2 cores: the figure is there for machines where each replica has cores (or
   a GPU) of its own;
3. a promotion under 8 streams through the two-replica gateway: the admin call (it returns once
   every replica has loaded and warmed the version), the time until both replicas list it, the
   first answer by it, and the requests that failed (target 0).

Writes bench/results/replicas.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.hotswap import ADMIN_KEY, Load, free_port, make_random_adapter  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "replicas.json"
HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def throughput(url: str, requests: int, concurrency: int, max_tokens: int) -> dict:
    """`requests` non-streamed completions of `chat`, `concurrency` at a time: requests/s and tokens/s."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    tokens, failed = [0], [0]

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            r = await client.post("/v1/chat/completions", json={
                "model": "chat", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "user", "content": f"Request {i}: tell me about the sea."}]})
            if r.status_code == 200:
                tokens[0] += r.json()["usage"]["completion_tokens"]
            else:
                failed[0] += 1

    async with httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=600, trust_env=False) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"requests": requests, "failed": failed[0], "wall_s": wall, "req_per_s": requests / wall,
            "tokens_per_s": tokens[0] / wall}


def gateway(urls: list[str], data_dir: Path):
    """A started gateway (registry, reconciler, engine pool) on `urls`, and its registry."""
    from learn.registry import Registry
    from serve.cli_serve import ServerThread
    from serve.gateway.app import create_app, make_writer
    from serve.settings import hash_key, load_settings

    settings = load_settings(None, data_dir=data_dir, engine={"urls": urls},
                             serve={"port": free_port(), "admin_keys": [hash_key(ADMIN_KEY)]})
    writer = make_writer(settings)
    registry = Registry(writer.engine)
    server = ServerThread(create_app(settings, writer=writer, registry=registry), "127.0.0.1", settings.serve.port).start()
    return server, registry, settings


async def listed_everywhere(urls: list[str], version: str, since: float, timeout: float = 120) -> float | None:
    async with httpx.AsyncClient(trust_env=False) as c:
        while time.perf_counter() - since < timeout:
            models = [await c.get(f"{u}/v1/models") for u in urls]
            if all(version in {m["id"] for m in r.json()["data"]} for r in models):
                return time.perf_counter() - since
            await asyncio.sleep(0.02)
    return None


async def bench(setups, args) -> dict:
    """`setups`: async context managers giving engine URLs, the one-replica setup then the two-replica one."""
    data_dir = Path(tempfile.mkdtemp(prefix="tunewheel-replicas-"))
    result: dict = {"concurrency": args.concurrency, "max_tokens": args.max_tokens}
    adapters: list[Path] = []
    for setup in setups:
        async with setup as urls:
            if not adapters:
                async with httpx.AsyncClient(trust_env=False) as c:
                    base_model = (await c.get(f"{urls[0]}/v1/models")).json()["data"][0]["root"]
                adapters = [make_random_adapter(base_model, data_dir / "made" / f"v{seed}", seed=seed) for seed in (1, 2)]
            result.update(await phase(urls, adapters, data_dir / f"gw{len(urls)}", args))
    result["ratio_two_to_one"] = result["replicas_2"]["req_per_s"] / result["replicas_1"]["req_per_s"]
    return result


async def phase(urls: list[str], adapters: list[Path], data_dir: Path, args) -> dict:
    """Throughput through a gateway on `urls` (and, with two, a promotion under load)."""
    n, out = len(urls), {}
    server, registry, settings = gateway(urls, data_dir)
    try:
        names = []
        for folder in adapters:
            name = registry.new_version_name("chat")
            registry.register(name, kind="chat", path=folder)
            names.append(name)
        async with httpx.AsyncClient(base_url=server.url, headers=HEADERS, timeout=300, trust_env=False) as admin:
            assert (await admin.post(f"/admin/adapters/{names[0]}/promote")).status_code == 200
            await throughput(server.url, args.concurrency, args.concurrency, 4)  # warm every replica
            out[f"replicas_{n}"] = figures = await throughput(server.url, args.requests, args.concurrency, args.max_tokens)
            print(f"{n} replica{'s' if n > 1 else ' '}: {figures['req_per_s']:6.2f} req/s  "
                  f"{figures['tokens_per_s']:7.1f} tokens/s  ({args.requests} requests, {figures['failed']} failed, "
                  f"{figures['wall_s']:.1f} s)")
            if n > 1:
                out["promotion"] = await promotion(server.url, admin, urls, names[1])
    finally:
        server.stop()
        async with httpx.AsyncClient(trust_env=False) as c:  # leave attached engines as we found them
            for u in urls:
                for m in (await c.get(f"{u}/v1/models")).json()["data"]:
                    if str(data_dir.parent) in (m.get("root") or ""):
                        await c.post(f"{u}/v1/unload_lora_adapter", json={"lora_name": m["id"]})
    return out


async def promotion(url: str, admin: httpx.AsyncClient, urls: list[str], version: str) -> dict:
    load = Load(url, ADMIN_KEY, streams=8)
    task = asyncio.create_task(load.run())
    try:
        await asyncio.sleep(3)
        t0 = time.perf_counter()
        r = await admin.post(f"/admin/adapters/{version}/promote")
        admin_s = time.perf_counter() - t0
        everywhere = await listed_everywhere(urls, version, t0)
        await load._one(admin)
        first = await load.first_answer_by(version, t0)
        await asyncio.sleep(3)
    finally:
        load.stop()
        await task
    out = {"status": r.status_code, "admin_call_s": admin_s, "on_every_replica_s": everywhere, "first_answer_s": first,
           "requests_ok": load.ok, "requests_failed": len(load.failures), "failures": load.failures[:5]}
    print(f"promotion under 8 streams: admin call {admin_s * 1000:.0f} ms, on both replicas "
          f"{'never' if everywhere is None else f'{everywhere * 1000:.0f} ms'}, first answer by it "
          f"{'never' if first is None else f'{first * 1000:.0f} ms'} after the call; "
          f"{load.ok} requests ok, {len(load.failures)} failed (target 0)")
    return out


async def main_async(args) -> dict:
    if args.engine_urls:
        urls = [u.rstrip("/") for u in args.engine_urls]
        return await bench([attached(urls[:1]), attached(urls)], args)
    import os

    from serve.model import prepare_model
    from serve.settings import load_settings

    settings = load_settings(None)
    await asyncio.to_thread(prepare_model, settings)
    cores = sorted(os.sched_getaffinity(0))
    halves = [cores[: max(1, len(cores) // 2)], cores[len(cores) // 2:] or cores]
    # one replica on every core, then two on half of them each: the same machine either way
    return await bench([engines(settings, [cores]), engines(settings, halves)], args)


@contextlib.asynccontextmanager
async def attached(urls: list[str]):
    yield urls


@contextlib.asynccontextmanager
async def engines(settings, core_sets: list[list[int]]):
    """Engines on the embedded model, each bound to its own cores; their URLs."""
    from serve.engine import EngineManager
    from serve.settings import load_settings

    managers = [EngineManager(load_settings(None, data_dir=Path(tempfile.mkdtemp(prefix="tunewheel-engine-")),
                                            engine={"port": free_port(), "model": str(settings.model_dir),
                                                    "cpu_threads_bind": ",".join(map(str, cores))}))
                for cores in core_sets]
    try:
        await asyncio.gather(*(m.start() for m in managers))
        yield [m.url for m in managers]
    finally:
        await asyncio.gather(*(m.stop() for m in managers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine-urls", nargs=2, metavar="URL", help="attach to these two vLLM servers instead of starting them")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    p = result["promotion"]
    print(f"\ntwo replicas / one: {result['ratio_two_to_one']:.2f}x requests/s (no gain expected when both share "
          f"the same cores); promotion on every replica {p['on_every_replica_s'] and round(p['on_every_replica_s'], 3)} s, "
          f"{p['requests_failed']} failed requests (target 0)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
