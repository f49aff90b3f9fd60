"""The learner can evaluate in every shipped deployment: it has a key the gateway accepts as an
admin key (candidates are pinned as chat@<version>) and the gateway's service address, not its
own loopback.

    pytest tests/deploy/test_learner_access.py
"""

from __future__ import annotations

import pytest

from serve.settings import hash_key, load_settings
from tests.deploy.test_files import COMPOSE_FILES, EXAMPLE_ENV, compose, k8s


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_learner_has_its_key_and_the_gateway_service_address(path, monkeypatch):
    services = compose(path)["services"]
    learner_env = services["learner"]["environment"]
    for key, value in learner_env.items():
        monkeypatch.setenv(key, str(value))
    settings = load_settings(None)
    assert settings.gateway_url == "http://gateway:8000"
    assert learner_env["TUNEWHEEL_API_KEY"] == EXAMPLE_ENV["TUNEWHEEL_LEARNER_KEY"]
    gateway_port = services["gateway"]["ports"][0].split(":")[-1]
    assert settings.gateway_url.endswith(f":{gateway_port}")
    assert EXAMPLE_ENV["TUNEWHEEL_LEARNER_KEY_SHA256"] in settings.serve.admin_keys  # what the gateway gets too
    assert services["gateway"]["environment"]["TUNEWHEEL_SERVE__ADMIN_KEYS"] == learner_env["TUNEWHEEL_SERVE__ADMIN_KEYS"]


def test_k8s_learner_key_comes_from_a_secret_the_gateway_accepts(tmp_path, monkeypatch):
    (c,) = k8s("Deployment", "tunewheel-learner")["spec"]["template"]["spec"]["containers"]
    [key_env] = [e for e in c["env"] if e["name"] == "TUNEWHEEL_API_KEY"]
    ref = key_env["valueFrom"]["secretKeyRef"]
    learner_key = k8s("Secret", ref["name"])["stringData"][ref["key"]]
    gateway_secret = k8s("Secret", "tunewheel-secrets")["stringData"]
    monkeypatch.setenv("TUNEWHEEL_SERVE__ADMIN_KEYS", gateway_secret["TUNEWHEEL_SERVE__ADMIN_KEYS"])
    (tmp_path / "tunewheel.toml").write_text(k8s("ConfigMap", "tunewheel-config")["data"]["tunewheel.toml"])
    settings = load_settings(tmp_path / "tunewheel.toml")
    assert "admin" in settings.serve.key_scopes()[hash_key(learner_key)]
    gateway = k8s("Service", "tunewheel-gateway")
    assert settings.gateway_url == f"http://{gateway['metadata']['name']}:{gateway['spec']['ports'][0]['port']}"
    gw_pod = k8s("Deployment", "tunewheel-gateway")["spec"]["template"]["spec"]
    assert all(e.get("secretRef", {}).get("name") != ref["name"] for e in gw_pod["containers"][0].get("envFrom", []))
