"""A real Prometheus server (Debian package `prometheus`) scraping a real gateway and engine.

    pytest -m engine tests/deploy/test_prometheus.py

One Prometheus per module, on a free loopback port, scrapes every second: the test gateway
(with two awkward aliases: one with quotes and a backslash, one with unicode and a unicode
style), the vLLM engine, and an engine address where nothing listens. It loads the shipped
recording and alert rules (evaluated every second here). After real chats and real ratings
through the OpenAI client and `POST /v1/feedback`, the tests query it over its HTTP API with
PromQL, run every Grafana panel query, and lint the gateway's exposition with
`promtool check metrics`. The first test needs no engine: the catalog's exposition of odd
label values, parsed back exactly.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from serve import metrics
from tests.deploy.test_files import DASHBOARD, RULE_FILES
from serve.engine_child import free_port
from tests.fixtures.gateway import start_gateway

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None,
                                      reason="prometheus/promtool missing (apt-get install prometheus; CI installs it)")
QUOTED = 'say "hi" \\ now'           # an alias with quotes and a backslash
UNICODE = "pirate-☠-ünï"             # an alias with unicode, restyled into a unicode style
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1s", "$__range": "1h"}
WAIT_S = 60.0


def samples(exposition: str) -> list:
    return [s for family in text_string_to_metric_families(exposition) for s in family.samples]


def promtool_check_metrics(exposition: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, capture_output=True, text=True)


def test_odd_label_values_survive_the_exposition():
    """Quotes, backslashes, newlines and unicode in label values come back exactly."""
    odd = {"alias": 'a "quoted"\\alias\nwith newline', "version": "stíl-☕-v0001", "status": "200"}
    metrics.REQUESTS.labels(**odd).inc()
    metrics.ACTIVE_VERSION.labels(alias=odd["alias"], version=odd["version"]).set(1)
    try:
        body = metrics.render()[0].decode()
        found = [s for s in samples(body) if s.name == "tunewheel_requests_total" and s.labels == odd]
        assert len(found) == 1 and found[0].value >= 1
        info = [s for s in samples(body) if s.name == "tunewheel_active_version_info" and s.labels["alias"] == odd["alias"]]
        assert info[0].labels["version"] == "stíl-☕-v0001"
        if PROMTOOL:
            out = promtool_check_metrics(body)
            assert out.returncode == 0, out.stdout + out.stderr
    finally:
        metrics.REQUESTS.remove(odd["alias"], odd["version"], odd["status"])
        metrics.ACTIVE_VERSION.remove(odd["alias"], odd["version"])


# --- the real Prometheus --------------------------------------------------------------------

class Prometheus:
    """A Prometheus server process with its config and data in `workdir`."""

    def __init__(self, workdir: Path, scrape_configs: list[dict]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        rules = []
        for f in RULE_FILES:  # the shipped rules, evaluated every second instead of every minute
            doc = yaml.safe_load(f.read_text())
            for group in doc["groups"]:
                group["interval"] = "1s"
            (workdir / f.name).write_text(yaml.safe_dump(doc))
            rules.append(str(workdir / f.name))
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                  "rule_files": rules, "scrape_configs": scrape_configs}
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=10, trust_env=False)
        self.wait(lambda: self.http.get("/-/ready").status_code == 200, "Prometheus to be ready")

    def wait(self, check, what: str, timeout: float = WAIT_S):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.log.read_text()[-2000:]}")
            try:
                result = check()
                if result:
                    return result
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.5)

    def query(self, expr: str) -> list[dict]:
        """Instant query; any PromQL error fails the test with Prometheus's message."""
        body = self.http.get("/api/v1/query", params={"query": expr}).json()
        assert body["status"] == "success", f"{expr!r}: {body.get('error')}"
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, expr: str, predicate=lambda v: v >= 1) -> float:
        def check():
            v = self.value(expr)
            return v is not None and predicate(v) and (v,)
        return self.wait(check, f"{expr} to hold")[0]

    def stop(self) -> None:
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def hostport(url: str) -> str:
    return urlsplit(url).netloc


@pytest.fixture(scope="module")
def stack(engine_url, tmp_path_factory):
    """(gateway, prometheus): a gateway with odd aliases, scraped with the engine and a dead engine."""
    if PROMETHEUS is None or PROMTOOL is None:
        pytest.skip("prometheus/promtool missing (apt-get install prometheus; CI installs it)")
    gw = start_gateway(tmp_path_factory.mktemp("gateway"), engine_url, serve={"aliases": {
        "chat": {}, QUOTED: {"adapter": "base"}, UNICODE: {"adapter": "base", "style": "pirate ☠ «ü»"}}})
    dead_engine = f"127.0.0.1:{free_port()}"
    prom = Prometheus(tmp_path_factory.mktemp("prometheus"), [
        {"job_name": "tunewheel-gateway", "static_configs": [{"targets": [hostport(gw.url)]}]},
        {"job_name": "vllm", "static_configs": [{"targets": [hostport(engine_url)]}]},
        {"job_name": "vllm-unreachable", "static_configs": [{"targets": [dead_engine]}]},
    ])
    try:
        yield gw, prom
    finally:
        prom.stop()
        gw.stop()


def chat(gw, model: str = "chat"):
    """One real chat through the OpenAI client: (completion id, version that answered)."""
    raw = gw.client().chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=0)
    return raw.parse().id, raw.headers["x-tunewheel-adapter"]


def rate(gw, completion_id: str, rating: str) -> None:
    r = httpx.post(f"{gw.url}/v1/feedback", json={"completion_id": completion_id, "rating": rating}, trust_env=False)
    assert r.status_code == 201, r.text


@pytest.mark.engine
@needs_prometheus
def test_chat_and_rating_reach_prometheus(stack):
    gw, prom = stack
    answered = 'sum(tunewheel_requests_total{job="tunewheel-gateway", alias="chat", status="ok"})'
    thumbs_up = 'sum(tunewheel_feedback_total{job="tunewheel-gateway", rating="up"})'
    prom.wait_value('up{job="tunewheel-gateway"}')
    # The catalog is process-wide: other tests may have counted already, so compare with now.
    answered_before, up_before = prom.value(answered) or 0, prom.value(thumbs_up) or 0
    first, version = chat(gw)
    second, _ = chat(gw)
    rate(gw, first, "up")
    sel = f'job="tunewheel-gateway", version={json.dumps(version)}'
    prom.wait_value(answered, lambda v: v >= answered_before + 2)
    prom.wait_value(thumbs_up, lambda v: v >= up_before + 1)
    assert prom.value(f'sum(tunewheel_feedback_total{{{sel}, rating="up"}})') >= 1
    # The version's rating series were exported at 0 before any rating, so the recording rule
    # counts this very first thumbs-up: the 1 h ratio of the version is 1.
    ratio = f'tunewheel:feedback_up_ratio:1h{{version={json.dumps(version)}}}'
    assert prom.wait_value(ratio, lambda v: v > 0) == 1.0
    rate(gw, second, "down")
    assert prom.wait_value(ratio, lambda v: v < 1) == pytest.approx(0.5)
    assert prom.value(f'sum(tunewheel_completion_tokens_total{{{sel}}})') >= 1
    assert prom.value(f'sum(tunewheel_request_latency_seconds_count{{{sel}, alias="chat"}})') >= 2
    assert prom.value('max(tunewheel_active_version_info{job="tunewheel-gateway", alias="chat"})') == 1
    # vLLM's own series, scraped from the engine.
    assert prom.wait_value('sum(vllm:generation_tokens_total{job="vllm"})') >= 1


@pytest.mark.engine
@needs_prometheus
def test_learner_series_exist_before_any_cycle(stack):
    _, prom = stack
    prom.wait_value('up{job="tunewheel-gateway"}')
    outcomes = {r["metric"]["outcome"] for r in prom.query('tunewheel_learner_cycles_total{job="tunewheel-gateway"}')}
    assert {"promoted", "rejected", "failed"} <= outcomes
    scores = {(r["metric"]["role"], r["metric"]["metric"])
              for r in prom.query('tunewheel_learner_eval_score{job="tunewheel-gateway"}')}
    assert {("candidate", "f1"), ("champion", "f1"), ("candidate", "em"), ("champion", "em")} <= scores
    for name in ("tunewheel_learner_last_cycle_timestamp_seconds", "tunewheel_learner_dataset_examples",
                 "tunewheel_learner_training_duration_seconds", "tunewheel_promotions_total", "tunewheel_rollbacks_total"):
        assert prom.query(f'{name}{{job="tunewheel-gateway"}}'), f"{name} is not exposed"


@pytest.mark.engine
@needs_prometheus
def test_every_dashboard_query_and_rule_runs(stack):
    gw, prom = stack
    chat(gw)
    # The rate panels need two scrapes of the counter: run alone, this test would otherwise ask too early.
    prom.wait_value('sum(rate(tunewheel_requests_total{job="tunewheel-gateway"}[1m]))', lambda v: v >= 0)
    dash = json.loads(DASHBOARD.read_text())
    queries = {t["expr"]: p["title"] for p in dash["panels"] for t in p.get("targets", [])}
    queries |= {a["expr"]: a["name"] for a in dash["annotations"]["list"] if "expr" in a}
    answered = set()
    for expr, title in queries.items():
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        if prom.query(expr):  # fails on any PromQL error
            answered.add(title)
    for title in ("Requests/s by alias and status", "Tokens/s", "Latency p50 / p95 by alias", "In flight",
                  "Active version per alias", "Engine up", "Held-out EM / F1 (candidate vs champion)",
                  "Gateway event loop: lag p99, holds over 0.5 s per second"):
        assert title in answered, f"panel {title!r} shows no data after traffic"

    # Every shipped recording and alert rule evaluates without error on this data.
    def evaluated():
        groups = prom.http.get("/api/v1/rules").json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return len(rules) >= 12 and all(r["health"] != "unknown" for r in rules) and rules
    for rule in prom.wait(evaluated, "every rule to be evaluated"):
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"


@pytest.mark.engine
@needs_prometheus
def test_unreachable_engine_is_down_and_gateway_still_scraped(stack):
    gw, prom = stack
    prom.wait_value('count(up{job="vllm-unreachable"} == 0)')
    assert prom.value('up{job="tunewheel-gateway"}') == 1
    assert prom.value('up{job="vllm"}') == 1
    assert prom.value('max(tunewheel_engine_up{job="tunewheel-gateway"})') == 1
    targets = prom.http.get("/api/v1/targets").json()["data"]["activeTargets"]
    dead = [t for t in targets if t["labels"]["job"] == "vllm-unreachable"]
    assert dead[0]["health"] == "down" and dead[0]["lastError"]


@pytest.mark.engine
@needs_prometheus
def test_odd_aliases_through_gateway_and_prometheus(stack):
    gw, prom = stack
    _, version = chat(gw, QUOTED)
    assert version == "base"
    client = gw.client()
    try:  # the unicode alias is restyled; with no restyler trained the answer may be an error
        client.chat.completions.create(model=UNICODE, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    except Exception:
        pass
    exposition = httpx.get(f"{gw.url}/metrics", trust_env=False).text
    aliases = {s.labels.get("alias") for s in samples(exposition) if s.name == "tunewheel_requests_total"}
    assert QUOTED in aliases and UNICODE in aliases
    out = promtool_check_metrics(exposition)
    assert out.returncode == 0, out.stdout + out.stderr
    # Prometheus scraped the same exact label values; PromQL finds them by equality.
    for alias in (QUOTED, UNICODE):
        expr = f'tunewheel_requests_total{{job="tunewheel-gateway", alias={json.dumps(alias, ensure_ascii=False)}}}'
        prom.wait(lambda: prom.query(expr), f"{alias!r} in Prometheus")
        assert {r["metric"]["alias"] for r in prom.query(expr)} == {alias}
    assert prom.value('up{job="tunewheel-gateway"}') == 1
    assert not math.isnan(prom.value(f'sum(tunewheel_requests_total{{alias={json.dumps(QUOTED)}, status="ok"}})'))
