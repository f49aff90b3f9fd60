"""The restyler on chat answers: style strength and content kept of base vs restyler, and the added latency.

    python bench/restyle.py                              # starts an engine, trains a pirate restyler, measures
    python bench/restyle.py --style scribe --engine-url http://127.0.0.1:8101
    python bench/restyle.py --gateway-url http://127.0.0.1:8000 --style pirate --data-dir .tunewheel/datasets/restyle/pirate

For a corpus and a set of answers, one run. Without `--gateway-url` it makes everything: the
synthetic corpus (`restyle synth`), the dataset (`restyle build --markers-only`) and a restyler
trained and gated (`restyle train`) on a fresh data dir, through a gateway on this engine. Then
the served model answers QUESTIONS (or `--answers FILE`, JSONL with a `text` field), and the
base model and the restyler rewrite each answer with the gateway's restyle request. Per model:
style strength (share called in-style by the style's classifier), content kept (chrF vs the
raw answer; share keeping every name and number), both at once, and the rewrite's latency per
answer (median, p95), which is what the restyle step adds to a styled answer. Rewrites run one
at a time, as a single user's answers would. Then (`--prompt-lookup 4`, the default; 0 skips it)
the same restyler rewrites the same answers on a second engine started with `engine.prompt_lookup`,
as a restyler engine of its own (`restyle.engine_url`) would run: its latency, and how many
rewrites are the same as the first engine's. Writes bench/results/restyle.json.
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

RESULTS = Path(__file__).parent / "results" / "restyle.json"
QUESTIONS = [  # unlike the synthetic corpora, and none is a gate PROBE_PROMPT
    "What is the largest planet in our solar system?", "How many minutes are in 2 hours?",
    "Who invented the telephone?", "What is 12 times 12?", "Name one benefit of drinking water.",
    "What language is spoken in Brazil?", "How many continents are there?", "What do bees collect from flowers?",
]


def cli(*args: str, env: dict[str, str]) -> str:
    from typer.testing import CliRunner

    from serve.cli import app

    result = CliRunner().invoke(app, list(args), env=env)
    print(result.output.rstrip())
    if result.exit_code != 0:
        raise SystemExit(f"tunewheel {' '.join(args[:2])} failed (exit {result.exit_code}): {result.exception!r}")
    return result.output


def train_one(engine_url: str, style: str, work: Path, servers: list) -> tuple[str, str, str, Path, dict]:
    """(gateway url, restyler version, its adapter folder, dataset folder, seconds per stage) on a fresh data
    dir; the gateway it starts is added to `servers` (the caller stops it)."""
    from learn.registry import Registry
    from learn.restyle_synth import synth_corpus
    from serve.cli_serve import ServerThread
    from serve.gateway.app import create_app, make_writer
    from serve.settings import load_settings

    # the model folder the engine serves (its tokenizer counts chunk and pair tokens)
    model = httpx.get(f"{engine_url}/v1/models", timeout=30).json()["data"][0]["root"]
    settings = load_settings(None, data_dir=work, engine={"url": engine_url, "model": model}, serve={"port": free_port()})
    writer = make_writer(settings)
    server = ServerThread(create_app(settings, writer=writer, registry=Registry(writer.engine)), "127.0.0.1",
                          settings.serve.port).start()
    servers.append(server)
    env = {"TUNEWHEEL_DATA_DIR": str(work), "TUNEWHEEL_ENGINE__URL": engine_url, "TUNEWHEEL_ENGINE__MODEL": model,
           "TUNEWHEEL_STORE__URL": settings.store_url}
    corpus = work / f"{style}.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in synth_corpus(60, seed=0, style=style)))
    seconds = {}
    t0 = time.perf_counter()
    cli("restyle", "build", "--style", style, "--texts", str(corpus), "--url", server.url, "--markers-only", env=env)
    seconds["build"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = cli("restyle", "train", "--style", style, "--url", server.url, env=env)
    seconds["train_and_gate"] = time.perf_counter() - t0
    version = Registry(writer.engine).prod("restyler", style)
    if version is None:
        raise SystemExit(f"the {style} restyler was not promoted:\n{out}")
    return server.url, version.name, version.path, settings.datasets_dir / "restyle" / style, seconds


async def measure(url: str, version: str, data_dir: Path, answers: list[str] | None) -> dict:
    from learn.restyle_gate import latency_summary, rewrite_all, score, served_answers
    from learn.restyle_style import StyleClassifier
    from serve.settings import load_settings

    config = load_settings(None).restyle
    raw_seconds = []  # the raw answer's own time, one at a time: what the restyle step is compared with
    if answers is None:
        answers = []
        for question in QUESTIONS:
            t0 = time.perf_counter()
            answers += await served_answers(url, [question], model="chat", max_tokens=config.gate.answer_max_tokens, concurrency=1)
            raw_seconds.append(time.perf_counter() - t0)
    classifier = StyleClassifier.load(data_dir)
    rows = {}
    for name, model in (("base", "base"), ("restyler", f"chat@{version}")):
        rewrites, seconds = await rewrite_all(url, config, model, answers, concurrency=1)
        s = score(model, answers, rewrites, classifier=classifier, samples=2)
        rows[name] = {"model": model, "style_strength": s.style_strength, "content_chrf": s.content_chrf,
                      "facts_kept": s.facts_kept, "styled_and_kept": s.transferred, "n": s.n,
                      "latency_s": latency_summary(seconds), "samples": s.samples, "rewrites": rewrites}
    return {"rows": rows, "answer_latency_s": latency_summary(raw_seconds) if raw_seconds else None, "answers": answers}


def with_prompt_lookup(tokens: int, version: str, path: str, answers: list[str], rewrites: list[str]) -> dict:
    """The restyler's rewrites of the same answers on a second engine started with engine.prompt_lookup =
    `tokens`, as a restyler engine of its own (restyle.engine_url) would run: latency, and how many rewrites
    are the same as the first engine's."""
    from learn.restyle_gate import latency_summary, rewrite_all
    from serve.engine import EngineManager
    from serve.settings import load_settings

    settings = load_settings(None, engine={"port": free_port(), "prompt_lookup": tokens})

    async def rewrite(url: str) -> tuple[list[str], list[float]]:
        from serve.adapters import EngineAdapters

        async with httpx.AsyncClient(trust_env=False) as http:
            await EngineAdapters(http, url).load(version, path)  # loaded and warmed, as the gateway loads it
        return await rewrite_all(url, settings.restyle, version, answers, concurrency=1)

    with EngineManager(settings) as engine:
        mine, seconds = asyncio.run(rewrite(engine.url))
    return {"tokens": tokens, "latency_s": latency_summary(seconds), "n": len(mine),
            "same_rewrites": sum(a == b for a, b in zip(mine, rewrites))}


def table(rows: dict) -> str:
    head = f"{'':10} {'style strength':>14} {'content chrF':>12} {'facts kept':>10} {'styled+kept':>11} {'latency median':>14} {'p95':>6}"
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lat = r["latency_s"]
        lines.append(f"{name:10} {r['style_strength']:>14.0%} {r['content_chrf']:>12.1f} {r['facts_kept']:>10.0%} "
                     f"{r['styled_and_kept']:>11.0%} {lat['median']:>13.1f}s {lat['p95']:>5.1f}s")
    return "\n".join(lines)


def run(args) -> dict:
    answers = None
    if args.answers:
        answers = [json.loads(x)["text"] for x in Path(args.answers).read_text().splitlines() if x.strip()]
    if args.gateway_url:
        if not args.data_dir or not args.version:
            raise SystemExit("--gateway-url needs --data-dir (the style's dataset folder) and --version (the restyler)")
        return asyncio.run(measure(args.gateway_url, args.version, Path(args.data_dir), answers))
    from serve.engine import EngineManager
    from serve.model import prepare_model
    from serve.settings import load_settings

    work = Path(tempfile.mkdtemp(prefix="tunewheel-restyle-"))
    manager, servers = None, []
    engine_url = args.engine_url
    if not engine_url:
        settings = load_settings(None, engine={"port": free_port()})
        prepare_model(settings)
        manager = EngineManager(settings).__enter__()
        engine_url = manager.url
    try:
        url, version, path, data_dir, seconds = train_one(engine_url, args.style, work, servers)
        result = {"version": version, "seconds": seconds, **asyncio.run(measure(url, version, data_dir, answers))}
        if args.prompt_lookup:
            if manager is not None:  # one engine at a time on these cores
                manager.__exit__(None, None, None)
                manager = None
            result["prompt_lookup"] = with_prompt_lookup(args.prompt_lookup, version, path, result["answers"],
                                                         result["rows"]["restyler"]["rewrites"])
        return result
    finally:
        for server in servers:
            server.stop()
        if manager is not None:
            manager.__exit__(None, None, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--style", default="pirate", help="synthetic style to train: pirate or scribe")
    parser.add_argument("--engine-url", help="attach to this vLLM server instead of starting one")
    parser.add_argument("--gateway-url", help="measure a restyler already promoted behind this gateway (no training)")
    parser.add_argument("--data-dir", help="with --gateway-url: the style's dataset folder (its classifier.json)")
    parser.add_argument("--version", help="with --gateway-url: the restyler version")
    parser.add_argument("--answers", help="JSONL of answers (`text`) to restyle; default: the served model's answers to QUESTIONS")
    parser.add_argument("--prompt-lookup", type=int, default=4,
                        help="then the restyler on a second engine with engine.prompt_lookup = N, the same answers (0: skip)")
    args = parser.parse_args()
    started = time.perf_counter()
    result = {"style": args.style, **run(args), "wall_s": None}
    result["wall_s"] = time.perf_counter() - started
    print(f"\nrestyler {result.get('version', args.version)} ({args.style}) on {result['rows']['base']['n']} chat answers, one run:")
    print(table(result["rows"]))
    added = result["rows"]["restyler"]["latency_s"]
    raw = result.get("answer_latency_s")
    print(f"added latency per styled answer: median {added['median']:.1f} s, p95 {added['p95']:.1f} s"
          + (f"; the raw answer's own time: median {raw['median']:.1f} s (target: added <= raw)" if raw else ""))
    lookup = result.get("prompt_lookup")
    if lookup:
        print(f"with engine.prompt_lookup = {lookup['tokens']} (a restyler engine of its own, restyle.engine_url): median "
              f"{lookup['latency_s']['median']:.1f} s, p95 {lookup['latency_s']['p95']:.1f} s; "
              f"{lookup['same_rewrites']} of {lookup['n']} rewrites the same as without it")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
