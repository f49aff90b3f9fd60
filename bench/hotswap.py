"""Zero-downtime hot-swap: promote adapter versions while 8 streams run through the gateway.

    python bench/hotswap.py --engine-url http://127.0.0.1:8101
    python bench/hotswap.py                     # starts its own engine (embedded model)

Makes two real LoRA adapters for the base model (peft, randomly initialised, no training),
registers them, starts a gateway (registry + reconciler, as `tunewheel serve` builds it) and
8 client streams that send streamed chat completions back to back. Then, through the admin
API: promote v1 (base -> v1), promote v2 (v1 -> v2), roll back (v2 -> v1). For each swap it
measures the time from the admin call to the first answer whose `x-tunewheel-adapter`
header names the new version (from the streams, or from one extra request sent as soon as the
admin call returns: the streams only start new requests as their current ones end), and counts failed requests over the whole run (any non-200,
transport error, or a stream that ends without [DONE]). Targets (issue 15): 0 failed, <= 1 s per swap.
Writes bench/results/hotswap.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx

from serve.engine_child import free_port

RESULTS = Path(__file__).parent / "results" / "hotswap.json"
ADMIN_KEY = "bench-admin"
PROMPT = [{"role": "user", "content": "Name three colours."}]
TARGET_S = 1.0  # admin call -> first answer by the new version


def make_random_adapter(base_model: str, out_dir: Path, *, rank: int = 8, seed: int = 0, alpha: int | None = None,
                        target_modules: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A LoRA adapter folder for `base_model` with random weights, B included (peft's "gaussian"
    init leaves B at zero, an adapter that changes nothing), so it really changes answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=list(target_modules), init_lora_weights="gaussian")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


class Load:
    """`streams` clients sending streamed chat completions back to back; records who answered when."""

    def __init__(self, url: str, key: str, streams: int = 8, max_tokens: int = 16):
        self.url, self.key, self.streams, self.max_tokens = url, key, streams, max_tokens
        self.answers: list[tuple[float, str]] = []  # (time the headers arrived, version)
        self.ttfb: list[float] = []  # request sent -> headers back, for comparison with the swap times
        self.failures: list[str] = []
        self.ok = 0
        self._stop = False

    async def _one(self, client: httpx.AsyncClient) -> None:
        body = {"model": "chat", "messages": PROMPT, "max_tokens": self.max_tokens, "temperature": 0, "stream": True}
        try:
            sent = time.perf_counter()
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                at = time.perf_counter()
                self.ttfb.append(at - sent)
                if r.status_code != 200:
                    self.failures.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                    return
                self.answers.append((at, r.headers.get("x-tunewheel-adapter", "?")))
                done = False
                async for line in r.aiter_lines():
                    done = done or line.strip() == "data: [DONE]"
                if not done:
                    self.failures.append("stream ended without [DONE]")
                    return
                self.ok += 1
        except httpx.HTTPError as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")

    async def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        async with httpx.AsyncClient(base_url=self.url, headers=headers, timeout=300, trust_env=False) as client:
            async def worker() -> None:
                while not self._stop:
                    await self._one(client)

            await asyncio.gather(*(worker() for _ in range(self.streams)))

    def stop(self) -> None:
        self._stop = True

    async def first_answer_by(self, version: str, since: float, timeout: float = 120.0) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [at for at, v in list(self.answers) if v == version and at >= since]
            if hits:
                return min(hits) - since
            await asyncio.sleep(0.01)
        return None


async def swap(client: httpx.AsyncClient, load: Load, what: str, path: str, version: str) -> dict:
    t0 = time.perf_counter()
    r = await client.post(path)
    admin_s = time.perf_counter() - t0
    if r.status_code != 200:
        raise SystemExit(f"{what}: admin call failed: HTTP {r.status_code} {r.text}")
    # The 8 streams only start new requests as their current ones end, so one more client asks
    # right away too: the first answer by the new version is the earlier of the two.
    await load._one(client)
    first = await load.first_answer_by(version, t0)
    print(f"{what:<22} admin call {admin_s * 1000:7.0f} ms   first answer by {version}: "
          f"{'never' if first is None else f'{first * 1000:.0f} ms'} after the call")
    return {"swap": what, "version": version, "admin_call_s": admin_s, "first_answer_s": first}


async def bench(engine_url: str, data_dir: Path, streams: int, warmup_s: float) -> dict:
    from learn.registry import Registry
    from serve.gateway.app import create_app, make_writer
    from serve.cli_serve import ServerThread
    from serve.settings import hash_key, load_settings

    settings = load_settings(None, data_dir=data_dir, engine={"url": engine_url},
                             serve={"port": free_port(), "admin_keys": [hash_key(ADMIN_KEY)]})
    base_model = settings.base_model_path()
    if not Path(base_model, "config.json").is_file():  # attached engine: use the model folder it serves
        async with httpx.AsyncClient(trust_env=False) as c:
            base_model = (await c.get(f"{engine_url}/v1/models")).json()["data"][0]["root"]
    writer = make_writer(settings)
    registry = Registry(writer.engine)
    versions = []
    for seed in (1, 2):
        name = registry.new_version_name("chat")
        make_random_adapter(base_model, settings.adapters_dir / name, seed=seed)
        registry.register(name, kind="chat", path=settings.adapters_dir / name)
        versions.append(name)
    v1, v2 = versions
    server = ServerThread(create_app(settings, writer=writer, registry=registry), "127.0.0.1", settings.serve.port).start()
    load = Load(server.url, ADMIN_KEY, streams=streams)
    task = asyncio.create_task(load.run())
    swaps = []
    try:
        await asyncio.sleep(warmup_s)
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                                     timeout=300, trust_env=False) as admin:
            swaps.append(await swap(admin, load, "promote base -> v1", f"/admin/adapters/{v1}/promote", v1))
            await asyncio.sleep(warmup_s)
            swaps.append(await swap(admin, load, "promote v1 -> v2", f"/admin/adapters/{v2}/promote", v2))
            await asyncio.sleep(warmup_s)
            swaps.append(await swap(admin, load, "rollback v2 -> v1", "/admin/adapters/rollback", v1))
            await asyncio.sleep(warmup_s)
    finally:
        load.stop()
        await task
        async with httpx.AsyncClient(trust_env=False) as c:  # leave a shared engine as we found it
            for v in versions:
                await c.post(f"{engine_url}/v1/unload_lora_adapter", json={"lora_name": v})
        server.stop()
    times = [s["first_answer_s"] for s in swaps]
    ttfb = sorted(load.ttfb)
    return {
        "median_ttfb_s": ttfb[len(ttfb) // 2] if ttfb else None,
        "streams": streams, "requests_ok": load.ok, "requests_failed": len(load.failures), "failures": load.failures[:20],
        "swaps": swaps, "max_first_answer_s": None if None in times else max(times),
        "targets": {"failed": 0, "first_answer_s": TARGET_S},
    }


async def main_async(args) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="tunewheel-hotswap-"))
    if args.engine_url:
        return await bench(args.engine_url, data_dir, args.streams, args.warmup_s)
    from serve.settings import load_settings
    from serve.engine import EngineManager
    from serve.model import prepare_model

    settings = load_settings(None, engine={"port": free_port()})
    await asyncio.to_thread(prepare_model, settings)
    engine = EngineManager(settings)
    await engine.start()
    try:
        return await bench(engine.url, data_dir, args.streams, args.warmup_s)
    finally:
        await engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine-url", help="attach to this vLLM server instead of starting one")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--warmup-s", type=float, default=3.0, help="load time before, between and after the swaps")
    args = parser.parse_args()
    import logging

    logging.basicConfig(format="  %(name)s: %(message)s")  # the reconciler's load/warm times per version
    logging.getLogger("tunewheel.reconcile").setLevel(logging.INFO)
    result = asyncio.run(main_async(args))
    ok = result["requests_failed"] == 0 and result["max_first_answer_s"] is not None and result["max_first_answer_s"] <= TARGET_S
    print(f"\n{result['requests_ok']} requests ok, {result['requests_failed']} failed; slowest swap to first answer: "
          f"{result['max_first_answer_s'] if result['max_first_answer_s'] is None else round(result['max_first_answer_s'], 3)} s "
          f"-> {'meets' if ok else 'misses'} the target (0 failed, <= 1 s)")
    if result["median_ttfb_s"] is not None:
        print(f"for comparison, the median time from sending a request to its response headers under this load: "
              f"{result['median_ttfb_s'] * 1000:.0f} ms")
    for f in result["failures"][:5]:
        print("  failure:", f)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
