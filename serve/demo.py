"""`make demo`: the whole loop on the embedded model: users talk and rate, the learner learns from them.

    python -m serve.demo                      # what `make demo` runs (after `tunewheel model prepare`)
    python -m serve.demo --users 12 --cycles 3
    python -m serve.demo --seeded             # the older run: 200 seed stories, one cycle, no corrections
    TUNEWHEEL_ENGINE__URL=http://127.0.0.1:8101 python -m serve.demo   # attach to a running engine

Steps (data dir .tunewheel/demo, made fresh every run):
  1. data: `data synth-coqa` stories - variant A for the users (a new set each round), variant B
     (a different generator) for the operator's held-out set (`learn.heldout_file`); no seed stories
  2. `tunewheel serve` as a subprocess (engine + gateway), then a three-turn conversation
     through the official openai client (the last turn streamed) and the turns it logged
  3. before: held-out EM/F1 of the base model (kept for cycle 1, which reads it back as its champion's)
  4. cycles, back to back: a round of simulated users (serve/demo_users.py) talk about their
     stories through the OpenAI API and rate every answer (thumbs up when its F1 against the gold
     answer is >= 0.5), writing the gold answer as a correction on one thumbs-down in three; then one
     learner cycle (learn/cycle.py) curates the log (none of it held out: the operator's file is
     the gate), trains through the policy's stages in a child process from the champion adapter
     (what is new since its snapshot, plus a replay share; at most 24 steps a stage), scores
     champion and candidate on the held-out set, gates and promotes or rejects; the gateway
     hot-swaps a promoted adapter
  5. after: a last round of new users answered by the final champion; the table: one column per
     cycle with the candidate's held-out EM and F1, the gate's decision, the live thumbs-up rate of
     the users who came after it, and its training examples by source
The server is stopped with SIGINT at the end (gateway, then engine), whatever happened.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from serve.demo_users import table, users_round

DEMO_DIR = Path(".tunewheel/demo")
RESULTS_DIR = Path(".tunewheel/demo-results")  # the last default and seeded run's figures
BASELINE_LABEL = "step 2 of the demo"  # cycle 1's champion line: "scored in step 2 of the demo on the same items"


def say(text: str = "") -> None:
    print(text, flush=True)


def write_data(folder: Path, args) -> dict[str, Path]:
    """The held-out set (variant B), one users file per round (variant A; the seeded run: the same users
    before and after) and, for the seeded run, the seed stories."""
    from feedback.synth import synth_coqa

    plan = {"heldout": (args.heldout_stories, 1, "B")}
    for k in range(args.cycles + 1):
        after = k == args.cycles and not args.seeded  # the last round only shows the live thumbs-up rate
        plan[f"users-{k}"] = (args.after_users if after else args.users, 2 if args.seeded else 2 + k, "A")
    if args.seeded:
        plan["seed"] = (args.train_stories, 0, "A")
    files = {}
    for key, (stories, seed, variant) in plan.items():
        files[key] = folder / f"{key}_{variant}.json"
        files[key].write_text(json.dumps(synth_coqa(stories=stories, seed=seed, variant=variant)))
    return files


def write_config(folder: Path, model: Path, files: dict[str, Path], port: int, args) -> Path:
    config = folder / "tunewheel.toml"
    seeds = f'["{files["seed"].resolve()}"]' if "seed" in files else "[]"
    stages = '["sft"]' if args.seeded else json.dumps(args.stages)
    config.write_text(f"""# written by serve.demo
data_dir = "{folder.resolve()}"

[serve]
port = {port}

[engine]
model = "{model.resolve()}"

[learn]
seed_files = {seeds}
heldout_file = "{files['heldout'].resolve()}"
# the operator's held-out file is the gate: holding users' conversations out too would only take training data away
heldout_fraction = 0.0

[learn.policy]
stages = {stages}
start = "{args.start}"

[learn.gate]
min_f1_gain = {args.min_f1_gain}

[learn.train]
rank = 16
learning_rate = {args.learning_rate or (2e-4 if args.seeded else 6e-4)}
batch_size = 4
max_length = {args.max_length}
epochs = {args.epochs}
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


def heldout_scores(settings, url: str, heldout: Path) -> dict:
    """The base model's held-out scores, kept where the learner keeps its scores (learn/evaluate.py
    `scored_once`): cycle 1 scores the same base model on the same items with the same settings as
    its champion, and reads them back instead of scoring them again (about 25 s on 2 cores)."""
    from learn.evaluate import evaluate, load_heldout, scored_once

    return scored_once(evaluate, load_heldout(heldout), settings.learn_dirs.scores, model="base",
                       base=settings.base_model_path(), label=BASELINE_LABEL, url=url,
                       max_tokens=settings.learn.eval_max_tokens, concurrency=settings.learn.eval_concurrency,
                       timeout=settings.serve.request_timeout_s, progress=False).to_dict()


def run_cycle_with_progress(settings, url: str):
    """One learner cycle in this process, its training steps and evaluation turns as progress bars."""
    from learn.cycle import cycle_runner

    say("  learner cycle: curate the log into a snapshot, train (a child process), score champion and candidate")
    run = cycle_runner(settings, gateway_url=url, progress=True)  # the server is another process: its reconciler polls the registry
    return run("demo")


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


def learn_once(settings, url: str, k: int) -> dict:
    """One learner cycle; waits for the gateway to serve a promoted candidate. Its column of the table."""
    report = run_cycle_with_progress(settings, url)
    say(report.text())
    if report.outcome == "failed":
        raise RuntimeError(f"learner cycle {k} failed: {report.error}")
    if report.outcome == "promoted":
        say(f"  hot-swap: waiting for the gateway to serve `chat` from {report.version} ...")
        if not wait_for_alias(url, report.version):
            raise RuntimeError(f"the gateway did not switch to {report.version}; see {DEMO_DIR / 'serve.log'}")
    data = (report.train_metrics or {}).get("data") or {}
    return {"version": report.version, "outcome": report.outcome, "heldout": report.candidate_scores, "counts": data.get("counts"),
            "seconds": sum((report.timings or {}).values()), "report": report.model_dump(mode="json")}


def say_round(label: str, r: dict) -> None:
    say(f"  {label}: {r['users']} users, {r['up']}/{r['total']} thumbs up, {r['corrections']} corrections, answered by {r['versions']}")


def arguments(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m serve.demo", description="The whole tunewheel loop on the embedded model.")
    parser.add_argument("--users", type=int, default=None, help="simulated users per round, one story each (default 20; seeded: 6)")
    parser.add_argument("--cycles", type=int, default=None, help="learner cycles, each after a new round of users (default 2; seeded: 1)")
    parser.add_argument("--after-users", type=int, default=10,
                        help="simulated users of the last round, after learning (it teaches nothing; its thumbs-up rate is shown)")
    parser.add_argument("--heldout-stories", type=int, default=8, help="held-out stories (variant B, ~14 questions each)")
    parser.add_argument("--stages", nargs="+", default=["sft"], choices=["sft", "kto", "dpo"], help="learn.policy.stages")
    parser.add_argument("--start", default=None, choices=["base", "champion"],
                        help="learn.policy.start (default champion: each cycle goes on from the adapter users rated, on "
                             "what is new plus a replay share; --seeded: base)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="learn.train.learning_rate (default 6e-4: cycles of 10-30 steps learn little at the usual 2e-4; "
                             "bench/preference.py's sft row went from F1 0.306 to 0.443 on the same snapshot; --seeded: 2e-4)")
    parser.add_argument("--epochs", type=int, default=1, help="learn.train.epochs")
    parser.add_argument("--max-length", type=int, default=384, help="learn.train.max_length (tokens per training example)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="learn.train.max_steps: cap the training steps per stage (default 24, which keeps two cycles "
                             "within 25 minutes on 2 cores as the users' data grows; --seeded: no cap; 0: no cap)")
    parser.add_argument("--min-f1-gain", type=float, default=0.01, help="the gate's required F1 gain (learn.gate.min_f1_gain)")
    parser.add_argument("--seeded", action="store_true", help="the older run: seed stories, one cycle, the same users before and after, "
                                                              "no corrections")
    parser.add_argument("--train-stories", type=int, default=200, help="with --seeded: seed training conversations (variant A)")
    args = parser.parse_args(argv)
    args.users = args.users or (6 if args.seeded else 20)
    args.cycles = args.cycles or (1 if args.seeded else 2)
    args.start = args.start or ("base" if args.seeded else "champion")
    if args.max_steps is None:
        args.max_steps = 0 if args.seeded else 24
    return args


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    from serve.engine_child import free_port
    from serve.model import prepare_model
    from serve.settings import load_settings

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below: stop the server
    t_start = time.monotonic()
    if DEMO_DIR.exists():
        shutil.rmtree(DEMO_DIR)
    DEMO_DIR.mkdir(parents=True)
    say("== tunewheel demo: serve -> users talk and rate -> learn -> promote -> new users talk, and again")
    model = prepare_model(load_settings())  # the embedded model, prepared once under .tunewheel/models
    files = write_data(DEMO_DIR, args)
    config = write_config(DEMO_DIR, model, files, free_port(), args)
    settings = load_settings(config)
    seeds = f"{args.train_stories} seed stories (A), " if args.seeded else "no seed stories, "
    say(f"config {config}; data: {seeds}{args.heldout_stories} held-out stories (B), {args.users} users (A) per round, "
        f"{args.cycles} cycle(s), policy {'+'.join(settings.learn.policy.stages)} from {settings.learn.policy.start}")
    say("starting `tunewheel serve` (engine + gateway) ...")
    proc, url = start_server(config, DEMO_DIR / "serve.log")
    say(f"gateway ready at {url} ({time.monotonic() - t_start:.0f} s)")
    correct_every = 0 if args.seeded else 3
    try:
        say("\n== 1. a three-turn conversation through the openai client")
        three_turns(url, settings)

        say("\n== 2. before learning: the base model on the held-out set")
        base = heldout_scores(settings, url, files["heldout"])
        say(f"  held-out: EM {base['em']:.3f}  F1 {base['f1']:.3f} ({base['n_turns']} turns)")
        rounds, cycles = [], []
        for k in range(1, args.cycles + 1):
            say(f"\n== {k + 2}. users round {k}, then learner cycle {k}")
            rounds.append(users_round(url, files[f"users-{k - 1}"], correct_every=correct_every))
            say_round(f"round {k}", rounds[-1])
            cycles.append(learn_once(settings, url, k))
        say(f"\n== {args.cycles + 3}. after learning: {'the same' if args.seeded else 'new'} users")
        rounds.append(users_round(url, files[f"users-{args.cycles}"], correct_every=correct_every))
        say_round(f"round {args.cycles + 1}", rounds[-1])
        say("\n" + table(base, rounds, cycles))
        minutes = (time.monotonic() - t_start) / 60
        best = max((c["heldout"]["f1"] for c in cycles if c["outcome"] == "promoted"), default=base["f1"])
        result = json.dumps({"base": base, "rounds": rounds, "cycles": cycles, "minutes": minutes, "gain_f1": best - base["f1"],
                             "finished_at": time.time(), "args": vars(args)}, indent=2, default=str)
        (DEMO_DIR / "demo_result.json").write_text(result)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)  # kept across demos, for bench/summary.py
        (RESULTS_DIR / f"{'seeded' if args.seeded else 'default'}.json").write_text(result)
        say(f"\nheld-out F1 {base['f1']:.3f} (base) -> {best:.3f} (served now, {best - base['f1']:+.3f}); "
            f"{sum(c['outcome'] == 'promoted' for c in cycles)} of {len(cycles)} cycle(s) promoted")
        say(f"demo finished in {minutes:.1f} min; results in {DEMO_DIR / 'demo_result.json'}")
        return 0
    except Exception:
        say(f"\nthe demo failed; last lines of {DEMO_DIR / 'serve.log'}:\n{tail(DEMO_DIR / 'serve.log')}")
        raise
    finally:
        stop_server(proc)


if __name__ == "__main__":
    sys.exit(main())
