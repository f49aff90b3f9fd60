"""Deploys give the gateway time to drain its turn log, and alert on it.

    pytest tests/deploy/test_durability.py

On SIGTERM the gateway finishes requests in flight (uvicorn's graceful shutdown, set in
serve/cli_serve.py), then writes the turn spool to the database for `store.spool.drain_timeout_s`,
then stops a managed engine (serve/engine_child.py STOP_GRACE_S). Compose's `stop_grace_period`
and the Deployment's `terminationGracePeriodSeconds` must outlast all three, or the runtime
SIGKILLs a gateway that is still writing (nothing is lost: the rest stays in the spool, but
it waits for the next start).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from feedback.settings import SpoolSettings
from serve.engine_child import STOP_GRACE_S
from tests.deploy.test_files import COMPOSE_FILES, RULE_FILES, compose, k8s

ROOT = Path(__file__).resolve().parents[2]


def gateway_drain_s() -> float:
    graceful = max(int(s) for s in re.findall(r"timeout_graceful_shutdown=(\d+)", (ROOT / "serve/cli_serve.py").read_text()))
    return graceful + SpoolSettings().drain_timeout_s + STOP_GRACE_S


def seconds(duration: str) -> float:
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    return 60 * int(m.group(1) or 0) + int(m.group(2) or 0)


def test_compose_waits_longer_than_the_gateway_drains():
    for path in COMPOSE_FILES:
        gateway = compose(path)["services"]["gateway"]
        assert seconds(gateway["stop_grace_period"]) > gateway_drain_s(), path.name


def test_kubernetes_waits_longer_than_the_gateway_drains():
    pod = k8s("Deployment", "tunewheel-gateway")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > gateway_drain_s()


def test_alerts_watch_the_turn_log():
    rules = {r["alert"]: r for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"]
             for r in g["rules"] if "alert" in r}
    watched = {
        "TunewheelTurnLogBehind": "tunewheel_log_pending_writes",
        "TunewheelTurnLogWriteErrors": "tunewheel_log_write_errors_total",
        "TunewheelTurnSpoolFilling": "tunewheel_log_spool_bytes",
        "TunewheelTurnSpoolNearlyFull": "tunewheel_log_spool_capacity_bytes",
        "TunewheelTurnsQuarantined": "tunewheel_log_quarantined_turns_total",
    }
    for alert, series in watched.items():
        assert series in rules[alert]["expr"], alert
