"""`make demo`: the whole loop on the embedded model, from first chat to a promoted adapter.

    python -m serve.demo                      # what `make demo` runs (after `tunewheel model prepare`)
    python -m serve.demo --train-stories 100  # a quicker, weaker run
    TUNEWHEEL_ENGINE__URL=http://127.0.0.1:8101 python -m serve.demo   # attach to a running engine

Steps (data dir .tunewheel/demo, made fresh every run):
  1. data: `data synth-coqa` stories - variant A for the seed training set and the users,
     variant B (a different generator) for the held-out set
  2. `tunewheel serve` as a subprocess (engine + gateway), then a three-turn conversation
     through the official openai client (the last turn streamed) and the turns it logged
  3. before: held-out EM/F1 of `chat` (the base model) and simulated users who talk about
     their stories through the OpenAI API and rate every answer up or down (F1 against the
     gold answer >= 0.5 is a thumbs up)
  4. one learner cycle (learn/cycle.py): curate log + seeds, train a LoRA in a child
     process, score base and candidate on the held-out set, gate, promote or reject; the
     gateway hot-swaps a promoted adapter
  5. after: the same users again (answered by the promoted adapter through `chat`), and the
     held-out scores the cycle measured on that adapter; a before/after table
The server is stopped with SIGINT at the end (gateway, then engine), whatever happened.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

DEMO_DIR = Path(".tunewheel/demo")
UP_F1 = 0.5  # a simulated user gives a thumbs up when the answer's F1 against the gold is at least this


def say(text: str = "") -> None:
    print(text, flush=True)


def write_data(folder: Path, args) -> dict[str, Path]:
    from feedback.synth import synth_coqa

    files = {"seed": folder / "seed_train_coqa.json", "heldout": folder / "heldout_variant_b.json", "users": folder / "users_coqa.json"}
    plan = {"seed": (args.train_stories, 0, "A"), "heldout": (args.heldout_stories, 1, "B"), "users": (args.users, 2, "A")}
    for key, (stories, seed, variant) in plan.items():
        files[key].write_text(json.dumps(synth_coqa(stories=stories, seed=seed, variant=variant)))
    return files


def write_config(folder: Path, model: Path, files: dict[str, Path], port: int, args) -> Path:
    config = folder / "tunewheel.toml"
    config.write_text(f"""# written by serve.demo
data_dir = "{folder.resolve()}"

[serve]
port = {port}

[engine]
model = "{model.resolve()}"

[learn]
seed_files = ["{files['seed'].resolve()}"]
heldout_file = "{files['heldout'].resolve()}"

[learn.gate]
min_f1_gain = {args.min_f1_gain}

[learn.train]
rank = 16
learning_rate = 2e-4
batch_size = 4
max_length = 384
epochs = 1
""" + (f"max_steps = {args.max_steps}\n" if args.max_steps else ""))
    return config


def start_server(config: Path, log_path: Path, timeout_s: float = 900) -> tuple[subprocess.Popen, str]:
    from serve.settings import load_settings

    url = load_settings(config).gateway_url
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "serve", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    with httpx.Client(trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"`tunewheel serve` exited with {proc.returncode}; last lines of {log_path}:\n{tail(log_path)}")
            try:
                if client.get(f"{url}/ready", timeout=2).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            time.sleep(1)
    proc.send_signal(signal.SIGINT)
    raise RuntimeError(f"the gateway was not ready after {timeout_s:.0f} s; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    say(f"server stopped (exit code {proc.returncode})")


def tail(path: Path, n: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else ""


def three_turns(url: str, settings) -> None:
    """Issue 2's demo: a three-turn conversation through the openai client, then what was logged."""
    import openai
    from sqlmodel import Session

    from feedback.db import make_db
    from feedback.models import Turn
    from feedback.queries import conversation_turns

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="demo")
    messages = [{"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."}]
    last_id = None
    for i, question in enumerate(["Hi! My name is Ada. What is the capital of France?", "And the capital of Italy?", "What is my name?"]):
        messages.append({"role": "user", "content": question})
        say(f"  user: {question}")
        if i < 2:
            reply = client.chat.completions.create(model="chat", messages=messages, max_tokens=48, temperature=0)
            answer, last_id = reply.choices[0].message.content, reply.id
            say(f"  assistant: {answer}")
        else:
            print("  assistant (streamed): ", end="", flush=True)
            parts = []
            for chunk in client.chat.completions.create(model="chat", messages=messages, max_tokens=48, temperature=0, stream=True):
                last_id = chunk.id
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                    print(chunk.choices[0].delta.content, end="", flush=True)
            say()
            answer = "".join(parts)
        messages.append({"role": "assistant", "content": answer})
    db = make_db(settings.store_url)
    deadline = time.monotonic() + 30
    with Session(db) as s:
        while (turn := s.get(Turn, last_id)) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        turns = conversation_turns(s, turn.conversation_id) if turn else []
    say(f"  logged turns of conversation {turns[0].conversation_id if turns else '?'}:")
    for t in turns:
        say(f"    #{t.seq} {t.id[:22]}.. alias={t.alias} version={t.adapter_version} stream={t.stream} "
            f"tokens={t.prompt_tokens}+{t.completion_tokens} latency={t.latency_ms:.0f}ms finish={t.finish_reason} "
            f"answer={t.answer!r}")
    db.dispose()


def users_round(url: str, users_file: Path, concurrency: int = 8) -> dict:
    """Each simulated user talks through one story, asking its questions in order, rating every answer."""
    import openai

    from feedback.coqa import parse_record, to_heldout
    from learn.evaluate import SYSTEM_PROMPT
    from learn.metrics import score_turn

    stories = [to_heldout(parse_record(r)) for r in json.loads(users_file.read_text())["data"]]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="demo", max_retries=2)
    http = httpx.Client(base_url=url, trust_env=False, timeout=60)
    versions: set[str] = set()

    def talk(story: dict) -> list[str]:
        messages = [{"role": "system", "content": SYSTEM_PROMPT.format(story=story["story"])}]
        ratings = []
        for turn in story["turns"]:
            messages.append({"role": "user", "content": turn["question"]})
            raw = client.chat.completions.with_raw_response.create(model="chat", messages=messages, max_tokens=32, temperature=0)
            versions.add(raw.headers.get("x-tunewheel-adapter", "?"))
            reply = raw.parse()
            answer = reply.choices[0].message.content or ""
            rating = "up" if score_turn(answer, turn["answers"])[1] >= UP_F1 else "down"
            http.post("/v1/feedback", json={"completion_id": reply.id, "rating": rating}).raise_for_status()
            ratings.append(rating)
            messages.append({"role": "assistant", "content": answer})
        return ratings

    with ThreadPoolExecutor(concurrency) as pool:
        ratings = [r for rs in pool.map(talk, stories) for r in rs]
    http.close()
    up = ratings.count("up")
    return {"up": up, "total": len(ratings), "rate": up / max(1, len(ratings)), "versions": sorted(versions)}


def heldout_scores(settings, url: str, heldout: Path) -> dict:
    from learn.evaluate import evaluate

    return evaluate(heldout, model="chat", url=url, max_tokens=settings.learn.eval_max_tokens, concurrency=settings.learn.eval_concurrency,
                    timeout=settings.serve.request_timeout_s, progress=False).to_dict()


def run_cycle_with_progress(settings, url: str):
    from learn.cycle import cycle_runner

    result: dict = {}
    run = cycle_runner(settings, gateway_url=url)  # the server is another process: its reconciler polls the registry
    worker = threading.Thread(target=lambda: result.setdefault("report", run("demo")))
    started = time.monotonic()
    worker.start()
    while worker.is_alive():
        worker.join(30)
        if worker.is_alive():
            say(f"  ... learner cycle running for {time.monotonic() - started:.0f} s (curate, train in a child process, evaluate)")
    return result["report"]


def wait_for_alias(url: str, version: str, timeout_s: float = 120) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=5, trust_env=False).json().get("aliases", {}).get("chat") == version:
                return True
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    return False


def table(before: dict, after: dict, version: str) -> str:
    rows = [("held-out EM (variant B)", f"{before['heldout']['em']:.3f}", f"{after['heldout']['em']:.3f}"),
            ("held-out F1 (variant B)", f"{before['heldout']['f1']:.3f}", f"{after['heldout']['f1']:.3f}"),
            ("live thumbs-up rate", f"{before['users']['rate']:.0%} ({before['users']['up']}/{before['users']['total']})",
             f"{after['users']['rate']:.0%} ({after['users']['up']}/{after['users']['total']})")]
    head = ("", "before (base)", f"after ({version})")
    lines = [f"  {head[0]:<26}{head[1]:>18}{head[2]:>24}", "  " + "-" * 68]
    lines += [f"  {a:<26}{b:>18}{c:>24}" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.demo", description="The whole tunewheel loop on the embedded model.")
    parser.add_argument("--train-stories", type=int, default=200, help="seed training conversations (synthetic CoQA, variant A)")
    parser.add_argument("--heldout-stories", type=int, default=8, help="held-out stories (variant B, ~14 questions each)")
    parser.add_argument("--users", type=int, default=6, help="simulated users, one story each")
    parser.add_argument("--max-steps", type=int, default=None, help="cap the training steps (a quick smoke run)")
    parser.add_argument("--min-f1-gain", type=float, default=0.01, help="the gate's required F1 gain (learn.gate.min_f1_gain)")
    args = parser.parse_args(argv)

    from serve.engine_child import free_port
    from serve.model import prepare_model
    from serve.settings import load_settings

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below: stop the server
    t_start = time.monotonic()
    if DEMO_DIR.exists():
        shutil.rmtree(DEMO_DIR)
    DEMO_DIR.mkdir(parents=True)
    say("== tunewheel demo: serve -> talk -> rate -> learn -> promote -> talk again")
    model = prepare_model(load_settings())  # the embedded model, prepared once under .tunewheel/models
    files = write_data(DEMO_DIR, args)
    config = write_config(DEMO_DIR, model, files, free_port(), args)
    settings = load_settings(config)
    say(f"config {config}; data: {args.train_stories} seed stories (A), {args.heldout_stories} held-out stories (B), {args.users} users (A)")
    say("starting `tunewheel serve` (engine + gateway) ...")
    proc, url = start_server(config, DEMO_DIR / "serve.log")
    say(f"gateway ready at {url} ({time.monotonic() - t_start:.0f} s)")
    try:
        say("\n== 1. a three-turn conversation through the openai client")
        three_turns(url, settings)

        say("\n== 2. before learning")
        before = {"heldout": heldout_scores(settings, url, files["heldout"]), "users": users_round(url, files["users"])}
        say(f"  held-out: EM {before['heldout']['em']:.3f}  F1 {before['heldout']['f1']:.3f} ({before['heldout']['n_turns']} turns)")
        say(f"  users: {before['users']['up']}/{before['users']['total']} thumbs up, answered by {before['users']['versions']}")

        say("\n== 3. one learner cycle")
        report = run_cycle_with_progress(settings, url)
        say(report.text())
        if report.outcome != "promoted":
            say(f"\nthe gate did not promote ({report.outcome}); production stays on the base model.")
            return 0 if report.outcome != "failed" else 1
        say(f"  hot-swap: waiting for the gateway to serve `chat` from {report.version} ...")
        if not wait_for_alias(url, report.version):
            say(f"  the gateway did not switch to {report.version}; see {DEMO_DIR / 'serve.log'}")
            return 1

        say("\n== 4. after learning: the same users again")
        # The held-out set was scored in the cycle, greedily, on this same adapter (as chat@version);
        # scoring it again through `chat` would give the same numbers and cost minutes on a CPU.
        after = {"heldout": report.candidate_scores, "users": users_round(url, files["users"])}
        say(f"  users: {after['users']['up']}/{after['users']['total']} thumbs up, answered by {after['users']['versions']}")
        say("\n" + table(before, after, report.version))
        (DEMO_DIR / "demo_result.json").write_text(json.dumps({"before": before, "after": after, "cycle": report.model_dump(mode="json")}, indent=2, default=str))
        say(f"\ndemo finished in {(time.monotonic() - t_start) / 60:.1f} min; results in {DEMO_DIR / 'demo_result.json'}")
        return 0
    except Exception:
        say(f"\nthe demo failed; last lines of {DEMO_DIR / 'serve.log'}:\n{tail(DEMO_DIR / 'serve.log')}")
        raise
    finally:
        stop_server(proc)


if __name__ == "__main__":
    sys.exit(main())
