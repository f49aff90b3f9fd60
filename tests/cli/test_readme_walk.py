"""The README's "The first hour", step by step, on a fresh data dir, with API keys on; then its
"Monitoring" queries against a real Prometheus.

    PYTHONPATH=$PWD flock /tmp/tunewheel-engine.lock python -m pytest -m engine tests/cli/test_readme_walk.py

Every `tunewheel` command runs as its own process from one folder, as a user types it; each
command line is first looked up in the README (so the two cannot drift apart) and each outcome
the README states is checked. Departures from the README, all to keep the test cheap:
- the gateway attaches to the session's engine (TUNEWHEEL_ENGINE__URL) instead of starting its
  own vLLM child, on a free port instead of 8000, and the data dir's model folder is a link to
  the prepared test model (so `model prepare` has nothing to do, as on its second run);
- smaller data (8 seed stories, 1 held-out story), `max_steps = 2`, 8-token eval answers, and
  a gate that promotes whatever trains, so that rollback and promote have something to move;
- Prometheus evaluates the shipped rules every second instead of every minute.
Cost: 162 s for the walk itself (206 s with the session's engine start, which `make test` shares
with every engine test), measured on the shared 2-core machine under a load average of 5-12.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from serve.engine_child import free_port
from tests.deploy.test_prometheus import PROMETHEUS, PROMTOOL, Prometheus, hostport

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
pytestmark = [pytest.mark.engine, pytest.mark.slow]


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 3)
    return README[start:end if end > 0 else None]


FIRST_HOUR, MONITORING = section("The first hour"), section("Monitoring")


class Walk:
    """The folder the user works in, their environment, and `tunewheel` as they type it."""

    def __init__(self, folder: Path, engine_url: str):
        self.folder = folder
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "TUNEWHEEL_ENGINE__URL": engine_url, "NO_COLOR": "1",
                    "COLUMNS": "200", "TUNEWHEEL_API_KEY": ""}
        self.env.pop("TUNEWHEEL_DATA_DIR", None)

    def readme(self, line: str) -> list[str]:
        """The arguments of a command line the README's first hour shows (checked to be there)."""
        assert line in FIRST_HOUR, f"the README's first hour no longer shows `{line}`"
        return shlex.split(line)

    def run(self, args: list[str], *, env: dict[str, str] | None = None, ok: bool = True) -> subprocess.CompletedProcess:
        assert args[0] == "tunewheel"
        done = subprocess.run([sys.executable, "-m", "serve.cli", *args[1:]], cwd=self.folder, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=900)
        assert "Traceback" not in done.stderr, done.stderr
        if ok:
            assert done.returncode == 0, f"{' '.join(args)}: {done.stdout}\n{done.stderr}"
        return done


def wait_for(check, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.3)


def keys_new(walk: Walk) -> tuple[str, str]:
    out = walk.run(walk.readme("tunewheel keys new")).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return fields["key"].strip(), fields["hash"].strip()


def answered_by(url: str, key: str) -> str:
    """The version that answers `chat` now (the x-tunewheel-adapter header)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "Hi!"}], max_tokens=4, temperature=0)
    return raw.headers["x-tunewheel-adapter"]


def promtool_value(prom_url: str, expr: str) -> float:
    """Run a README query with promtool, as the README does; the sum of the values it prints."""
    out = subprocess.run([PROMTOOL, "query", "instant", prom_url, expr], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return sum(float(v) for v in re.findall(r"=> ([0-9.eE+-]+) @", out.stdout))


@pytest.fixture
def walk(tmp_path, engine_url, model_dir):
    folder = tmp_path / "work"
    (folder / ".tunewheel" / "models").mkdir(parents=True)
    (folder / ".tunewheel" / "models" / "SmolLM2-135M-Instruct").symlink_to(model_dir)
    return Walk(folder, engine_url)


def test_the_first_hour_then_monitoring(walk, engine_url, tmp_path):
    if PROMETHEUS is None or PROMTOOL is None:
        pytest.skip("prometheus/promtool missing (apt-get install prometheus; CI installs it)")
    started = time.monotonic()
    # 1. keys and the config file
    (key, key_hash), (admin, admin_hash) = keys_new(walk), keys_new(walk)
    port = free_port()
    config = walk.folder / "tunewheel.toml"
    config.write_text(f'[serve]\napi_keys = ["{key_hash}"]\nadmin_keys = ["{admin_hash}"]\nport = {port}\n')
    shown = walk.run(walk.readme("tunewheel config show --config tunewheel.toml")).stdout
    assert re.search(rf'^serve\.api_keys = \["{key_hash}"\] +# file tunewheel\.toml$', shown, re.M), shown
    # 2. the model
    prepared = walk.run(walk.readme("tunewheel model prepare")).stdout.strip()
    assert prepared == ".tunewheel/models/SmolLM2-135M-Instruct"
    # 3. serve
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen([sys.executable, "-m", "serve.cli", *walk.readme("tunewheel serve --config tunewheel.toml")[1:]],
                             cwd=walk.folder, env=walk.env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    prom = None
    try:
        ready = wait_for(lambda: _ready(url, serve), "the gateway's /ready", timeout=180)
        assert ready == {"status": "ready", "aliases": {"chat": "base"}}
        local = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.local.yml").read_text())
        targets = {"127.0.0.1:8000": hostport(url), "127.0.0.1:8001": hostport(engine_url)}
        for job in local["scrape_configs"]:
            for static in job["static_configs"]:
                static["targets"] = [targets[t] for t in static["targets"]]
        prom = Prometheus(tmp_path, local["scrape_configs"])
        _chat_rate_and_curate(walk, url, key, prom)
        _learn_promote_rollback(walk, url, key, admin)
        _monitoring_queries(prom)
    finally:
        if prom is not None:
            prom.stop()
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(60)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert "Uvicorn running on" in (tmp_path / "serve.log").read_text()
    print(f"\nREADME walk: {time.monotonic() - started:.0f} s")


def _ready(url: str, serve: subprocess.Popen):
    assert serve.poll() is None, "tunewheel serve exited"
    try:
        r = httpx.get(f"{url}/ready", timeout=2)
    except httpx.TransportError:
        return None
    return r.json() if r.status_code == 200 else None


def _chat_rate_and_curate(walk: Walk, url: str, key: str, prom: Prometheus) -> None:
    """Steps 4-8: chat (plain and streamed), rate, export, check, curate."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="chat", messages=[{"role": "user", "content": "Hi!"}],
                                                          max_tokens=16)
    reply = raw.parse()
    assert reply.id.startswith("chatcmpl-") and raw.headers["x-tunewheel-adapter"] == "base"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="chat", stream=True, max_tokens=16, messages=[{"role": "user", "content": "Count to three."}]) if c.choices)
    assert streamed
    for wrong in ("", "not-a-key"):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key=wrong or "x", max_retries=0).chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "Hi!"}], max_tokens=4)
    # The rating series start at 0 with the version's first answer; increase() in the up-ratio rule
    # counts the first rating only once Prometheus has seen that 0 (a scrape after the answer).
    prom.wait(lambda: prom.query('tunewheel_feedback_total{rating="up", version="base"}'), "the rating series at 0")
    rated = httpx.post(f"{url}/v1/feedback", headers={"Authorization": f"Bearer {key}"},
                       json={"completion_id": reply.id, "rating": "up"})
    assert rated.status_code == 201, rated.text

    def exported():
        out = walk.run(walk.readme("tunewheel data export --config tunewheel.toml --out curated.jsonl")).stdout
        return "from 2 turns" in out and out
    out = wait_for(exported, "both turns in the log", timeout=30)
    assert out.strip() == ("curated.jsonl: 1 example(s) from 2 turns (1 rated up, 0 rated down, 0 rated but incomplete "
                           "or failed, 1 unrated, 0 corrected); removed: none"), out
    example = json.loads((walk.folder / "curated.jsonl").read_text())
    assert example["messages"][-1] == {"role": "assistant", "content": reply.choices[0].message.content}
    checked = walk.run(walk.readme("tunewheel data check --config tunewheel.toml curated.jsonl")).stdout
    assert re.search(r"^curated\.jsonl: 1 valid example\(s\), .*; OK$", checked, re.M), checked
    curated = walk.run(walk.readme("tunewheel data curate --config tunewheel.toml"))
    assert json.loads(curated.stdout)["counts"]["rated_up"] == 1
    assert re.search(r"snapshot snap-\w+ at \.tunewheel/datasets/snapshots/snap-\w+", curated.stderr), curated.stderr


def _learn_promote_rollback(walk: Walk, url: str, key: str, admin: str) -> None:
    """Steps 9-13: seed and held-out data, eval, one tiny cycle, list, rollback, promote."""
    walk.readme("tunewheel data synth-coqa --stories 30 --seed 0 --out seed.json")
    walk.run(["tunewheel", "data", "synth-coqa", "--stories", "8", "--seed", "0", "--out", "seed.json"])
    walk.readme("tunewheel data synth-coqa --stories 2 --seed 1 --variant B --out heldout.json")
    walk.run(["tunewheel", "data", "synth-coqa", "--stories", "1", "--seed", "1", "--variant", "B", "--out", "heldout.json"])
    assert 'seed_files = ["seed.json"]' in FIRST_HOUR and 'heldout_file = "heldout.json"' in FIRST_HOUR
    with (walk.folder / "tunewheel.toml").open("a") as f:  # the README's max_steps is 20; the gate here promotes anything
        f.write('[learn]\nseed_files = ["seed.json"]\nheldout_file = "heldout.json"\neval_max_tokens = 8\n'
                '[learn.train]\nmax_steps = 2\n[learn.gate]\nmin_f1_gain = -1.0\nmax_em_drop = 1.0\n')

    evaluated = walk.run(walk.readme("tunewheel eval --config tunewheel.toml --model chat --data heldout.json --api-key $KEY")
                         [:-1] + [key]).stdout
    assert "overall" in evaluated and re.search(r"report: \.tunewheel/runs/eval-chat-[0-9-]+\.json", evaluated), evaluated

    walk.readme("TUNEWHEEL_API_KEY=$ADMIN tunewheel learn run --config tunewheel.toml")
    cycle = walk.run(["tunewheel", "learn", "run", "--config", "tunewheel.toml"], env={"TUNEWHEEL_API_KEY": admin}).stdout
    first = cycle.splitlines()[0]
    assert re.match(r"learner cycle 1: (PROMOTED|REJECTED) - ", first), cycle
    assert first.startswith("learner cycle 1: PROMOTED - chat: prod base -> chat-v0001"), cycle
    data = walk.folder / ".tunewheel"
    assert {p.name for p in (data / "runs" / "cycle-0001").iterdir()} >= {"cycle.json", "cycle.txt"}
    assert {"report.json", "loss.png"} <= {p.name for p in (data / "adapters" / "chat-v0001").iterdir()}
    steps = json.loads((data / "runs" / "cycle-0001" / "cycle.json").read_text())["train_metrics"]["steps"]
    assert 1 <= steps <= 2, "max_steps is an upper bound"
    wait_for(lambda: answered_by(url, key) == "chat-v0001", "the gateway to serve the promoted version", timeout=30)

    listed = walk.run(walk.readme("tunewheel adapters list --config tunewheel.toml")).stdout
    row = next(line for line in listed.splitlines() if "chat-v0001" in line)
    assert "*" in row and "promoted" in row, listed

    out = walk.run(walk.readme("tunewheel adapters rollback --config tunewheel.toml")).stdout.strip()
    assert out == "rolled back chat: prod chat-v0001 -> base (chat-v0001 is retired)"
    seconds = _switch_time(url, key, "base")
    out = walk.run(walk.readme("tunewheel adapters promote chat-v0001 --config tunewheel.toml")).stdout.strip()
    assert out == "promoted chat: prod base -> chat-v0001"
    seconds = max(seconds, _switch_time(url, key, "chat-v0001"))
    assert seconds < 15, f"the gateway took {seconds:.1f} s to follow a CLI promotion (its poll is 3 s)"


def _switch_time(url: str, key: str, version: str) -> float:
    started = time.monotonic()
    wait_for(lambda: answered_by(url, key) == version, f"the gateway to serve {version}", timeout=30)
    return time.monotonic() - started


def _monitoring_queries(prom: Prometheus) -> None:
    """The Monitoring section's queries, run with promtool as it shows them, after the cycle,
    one CLI rollback and one CLI promotion."""
    queries = re.findall(r"promtool query instant http://127\.0\.0\.1:9090 '([^']+)'", MONITORING)
    assert len(queries) >= 8
    needed = {"tunewheel_learner_cycles_total": 1, "tunewheel_promotions_total": 2, "tunewheel_rollbacks_total": 1,
              "tunewheel_feedback_total": 1, "tunewheel:feedback_up_ratio:1h": 1}
    for expr in queries:
        least = needed.get(expr, 0)
        value = prom.wait(lambda: (v := promtool_value(prom.url, expr)) >= least and (v,), f"{expr} >= {least}")[0]
        assert value >= least, expr
    assert set(needed) <= set(queries)
