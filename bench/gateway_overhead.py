"""What the gateway costs: the same load straight to vLLM and through the gateway (turn log on).

    python bench/gateway_overhead.py --engine-url http://127.0.0.1:8101
    python bench/gateway_overhead.py                       # starts its own engine (embedded model)

Every request asks for exactly 64 tokens (`ignore_eos`, greedy), non-streamed, at 1 and then 8
concurrent requests. Direct and gateway rounds alternate (and swap order each round) so that
drift in a shared engine's load hits both alike. The gateway runs as its own process, like
`tunewheel serve` does, with the turn log on SQLite and the registry's reconciler running.
Prints output tokens/s and median/p95 latency of both and the gateway/direct ratios; writes
bench/results/gateway_overhead.json. Targets (issue 15): throughput ratio >= 0.95 at 8 concurrent
on the real engine; against the stub engine, <= 1 ms added median latency and >= 1,000 req/s
through one gateway process at 8 concurrent, turn log on.

On a small shared CPU machine the engine's own jitter (hundreds of ms per answer) hides a few
ms of gateway cost, so the run also repeats the comparison against a stub engine that answers
every request at once with a canned 64-token completion (`--stub-requests`, 0 to skip): that
isolates what the gateway itself adds per request (parsing, auth, logging, relaying);
`--stub-only` measures only that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from serve.engine_child import free_port

RESULTS = Path(__file__).parent / "results" / "gateway_overhead.json"
PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and the sea."}]


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


async def one_round(url: str, model: str, concurrency: int, requests: int, tokens: int) -> dict:
    """`requests` completions, `concurrency` at a time; tokens/s over the round's wall time."""
    latencies: list[float] = []
    produced = 0
    queue = list(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal produced
        while queue:
            queue.pop()
            t0 = time.perf_counter()
            r = await client.post("/v1/chat/completions", json={
                "model": model, "messages": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
            latencies.append(time.perf_counter() - t0)
            r.raise_for_status()
            produced += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "tokens": produced, "wall_s": wall}


def summarize(rounds: list[dict]) -> dict:
    latencies = [x for r in rounds for x in r["latencies"]]
    tokens, wall = sum(r["tokens"] for r in rounds), sum(r["wall_s"] for r in rounds)
    return {"requests": len(latencies), "requests_per_s": len(latencies) / wall, "tokens_per_s": tokens / wall,
            "median_latency_ms": 1000 * statistics.median(latencies),
            "p95_latency_ms": 1000 * p95(latencies), "completion_tokens": tokens}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(engine_url: str, gateway_url: str, *, concurrencies: list[int], rounds: int, batches: int,
                  tokens: int, gateway_pid: int) -> dict:
    """Alternating direct/gateway rounds at each concurrency; `batches` x concurrency requests a round. Also
    the gateway process's own CPU time per request: against the stub engine, what one gateway process could
    serve on a core of its own (1000 / ms), which req/s cannot show where the client and the stub share its
    cores. Against the real engine it is mostly the gateway's background work spread over slow answers."""
    targets = {"direct": (engine_url, "base"), "gateway": (gateway_url, "chat")}
    for name, (url, model) in targets.items():  # warm both paths (connections, first-request costs)
        await one_round(url, model, 1, 1, 4)
    out = {}
    for concurrency in concurrencies:
        runs: dict[str, list[dict]] = {"direct": [], "gateway": []}
        gateway_cpu = 0.0
        for i in range(rounds):
            order = ["direct", "gateway"] if i % 2 == 0 else ["gateway", "direct"]
            for name in order:
                url, model = targets[name]
                cpu = cpu_seconds(gateway_pid)
                runs[name].append(await one_round(url, model, concurrency, concurrency * batches, tokens))
                if name == "gateway":
                    gateway_cpu += cpu_seconds(gateway_pid) - cpu
        direct, gateway = summarize(runs["direct"]), summarize(runs["gateway"])
        gateway["cpu_ms_per_request"] = 1000 * gateway_cpu / gateway["requests"]
        out[str(concurrency)] = {
            "direct": direct, "gateway": gateway,
            "throughput_ratio": gateway["tokens_per_s"] / direct["tokens_per_s"],
            "added_median_ms": gateway["median_latency_ms"] - direct["median_latency_ms"],
            "added_p95_ms": gateway["p95_latency_ms"] - direct["p95_latency_ms"],
        }
        print(f"{concurrency} concurrent:", flush=True)
        for name, s in (("direct", direct), ("gateway", gateway)):
            print(f"  {name:8s} {s['tokens_per_s']:7.1f} tok/s   median {s['median_latency_ms']:8.1f} ms   "
                  f"p95 {s['p95_latency_ms']:8.1f} ms   ({s['requests']} requests)", flush=True)
        r = out[str(concurrency)]
        print(f"  ratio gateway/direct {r['throughput_ratio']:.3f}   added median {r['added_median_ms']:+.2f} ms   "
              f"gateway {gateway['requests_per_s']:.1f} req/s   gateway process CPU {gateway['cpu_ms_per_request']:.2f} ms "
              "per request (its background work included)", flush=True)
    return out


def start_gateway(engine_url: str, data_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return start_child(["--child-gateway", engine_url, str(port), data_dir], f"{url}/ready"), url


async def stub_engine(scope, receive, send) -> None:
    """A zero-latency stand-in for vLLM: /health, /v1/models and a canned 64-token completion."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    if scope["path"] == "/v1/models":
        body = json.dumps({"object": "list", "data": [{"id": "base", "object": "model"}]}).encode()
    elif scope["path"] == "/v1/chat/completions":
        body = STUB_ANSWER
    else:
        body = b"{}"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


STUB_ANSWER = json.dumps({
    "id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": "base",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": " word" * 64}, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 20, "completion_tokens": 64, "total_tokens": 84},
}).encode()


def start_child(args: list[str], url: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, __file__, *args])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{args[0]} exited during startup")
        try:
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"{args[0]} did not become ready in 120 s")


def child_gateway(engine_url: str, port: int, data_dir: str) -> None:
    """The gateway process: as `tunewheel serve` builds it, attached to the engine."""
    import uvicorn

    from serve.gateway.app import create_app
    from serve.cli_serve import _build_store
    from serve.settings import load_settings

    settings = load_settings(None, data_dir=Path(data_dir), engine={"url": engine_url}, serve={"port": port})
    writer, registry = _build_store(settings)
    app = create_app(settings, writer=writer, registry=registry)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine-url", help="a running vLLM server serving `base`; default: start one")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=4, help="alternating direct/gateway rounds per concurrency")
    parser.add_argument("--batches", type=int, default=2, help="requests per round = concurrency x batches")
    parser.add_argument("--stub-requests", type=int, default=1600, help="requests per concurrency against the stub engine")
    parser.add_argument("--stub-only", action="store_true", help="only the stub engine: the gateway's own cost")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child-gateway", nargs=3, metavar=("ENGINE_URL", "PORT", "DATA_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--child-stub", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_gateway:
        return child_gateway(args.child_gateway[0], int(args.child_gateway[1]), args.child_gateway[2])
    if args.child_stub:
        import uvicorn

        return uvicorn.run(stub_engine, host="127.0.0.1", port=args.child_stub, log_level="warning")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: no orphan gateway
    report = {"tokens_per_request": args.tokens, "rounds": args.rounds, "batches": args.batches, "cpu_count": os.cpu_count(),
              "targets": TARGETS}
    if not args.stub_only:
        report["engine"] = real_engine(args, report)
    if args.stub_requests:
        port = free_port()
        stub = start_child(["--child-stub", str(port)], f"http://127.0.0.1:{port}/health")
        try:
            print(f"== stub engine (answers at once): the gateway's own cost, {args.stub_requests} requests each", flush=True)
            report["stub"] = compare(f"http://127.0.0.1:{port}", concurrencies=args.concurrency, rounds=4,
                                     batches=max(1, args.stub_requests // (4 * max(args.concurrency))), tokens=args.tokens)
        finally:
            stub.terminate()
            stub.wait(30)
    report["met"] = met(report)
    print("targets:")
    for name, ok in report["met"].items():
        print(f"  {name:34s} target {TARGETS[name]:>6}   {'met' if ok else 'NOT met' if ok is not None else 'not measured'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")


# Issue 15's figures: the real engine through the gateway keeps >= 0.95 of direct throughput at 8
# in flight; against the stub engine the gateway adds <= 1 ms median at 1 in flight and serves >= 1,000 req/s at 8.
TARGETS = {"engine_throughput_ratio_at_8": 0.95, "stub_added_median_ms": 1.0, "stub_requests_per_s_at_8": 1000}


def met(report: dict) -> dict[str, bool | None]:
    engine, stub = report.get("engine", {}), report.get("stub", {})
    return {
        "engine_throughput_ratio_at_8":
            None if "8" not in engine else engine["8"]["throughput_ratio"] >= TARGETS["engine_throughput_ratio_at_8"],
        # at 1 in flight, as the issue measures it (at 8 the added median is queueing: the req/s target covers that)
        "stub_added_median_ms":
            None if "1" not in stub else stub["1"]["added_median_ms"] <= TARGETS["stub_added_median_ms"],
        "stub_requests_per_s_at_8":
            None if "8" not in stub else stub["8"]["gateway"]["requests_per_s"] >= TARGETS["stub_requests_per_s_at_8"],
    }


def real_engine(args: argparse.Namespace, report: dict) -> dict:
    """The comparison on the real engine (`--engine-url`, or one started here on the embedded model)."""
    manager = None
    engine_url = args.engine_url
    if engine_url is None:
        from serve.engine import EngineManager
        from serve.model import prepare_model
        from serve.settings import load_settings

        settings = load_settings(None, engine={"port": free_port()})
        prepare_model(settings)
        manager = EngineManager(settings).__enter__()
        engine_url = manager.url
    report["engine_url"] = engine_url = engine_url.rstrip("/")
    try:
        print(f"== real engine {engine_url}: {args.tokens}-token answers", flush=True)
        return compare(engine_url, concurrencies=args.concurrency, rounds=args.rounds, batches=args.batches,
                       tokens=args.tokens)
    finally:
        if manager is not None:
            manager.__exit__(None, None, None)


def compare(engine_url: str, **kwargs) -> dict:
    """One gateway process (fresh SQLite log) in front of `engine_url`, measured against it."""
    with tempfile.TemporaryDirectory(prefix="tunewheel-bench-") as data_dir:
        gateway, gateway_url = start_gateway(engine_url, data_dir)
        try:
            return asyncio.run(measure(engine_url, gateway_url, gateway_pid=gateway.pid, **kwargs))
        finally:
            gateway.terminate()
            gateway.wait(30)


if __name__ == "__main__":
    main()
