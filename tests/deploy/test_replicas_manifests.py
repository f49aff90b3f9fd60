"""Static checks of the scaled-out deployment: vLLM replicas behind a headless Service, the two
kustomize overlays, and compose's second-engine option.

    pytest tests/deploy/test_replicas_manifests.py

Each size is built the way `kubectl apply -k` builds it: `kustomize()` below reads the
kustomization files (resources, strategic-merge patches, replicas, images, namespace: the
features these overlays use, and it refuses any other), so the checks run where kubectl is not
installed; where it is, `test_reading_matches_kubectl_kustomize` holds the two to the same
output. `compose_stack()` merges compose files by compose's rules for what the replicas files
use (extends from a file, !reset, !override). Configuration a pod or the gateway gets is loaded
through `load_settings`, as the process in the container would load it. No cluster and no
docker daemon are needed; the replicas running for real are tests/serve/test_replicas.py.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from serve.settings import load_settings
from tests.deploy.test_files import DEPLOY, EXAMPLE_ENV, interpolate

K8S = DEPLOY / "k8s"
SIZES = {"base": K8S / "base", "one-node": K8S / "overlays" / "one-node", "gpu-nodes": K8S / "overlays" / "gpu-nodes"}
GPU = "nvidia.com/gpu"
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "replicas", "images", "namespace"}
# Strategic merge: lists of these are merged item by item on the key; any other list is replaced.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}


# --- kustomize ----------------------------------------------------------------------------------

def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def find(docs: list[dict], kind: str | tuple[str, ...], name: str) -> dict:
    kinds = (kind,) if isinstance(kind, str) else kind
    found = [d for d in docs if d["kind"] in kinds and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {'/'.join(kinds)} {name}, found {len(found)}"
    return found[0]


def strategic_merge(base: dict, patch: dict) -> None:
    for key, value in patch.items():
        if value is None:  # `key: null` deletes it
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            strategic_merge(base[key], value)
        elif key in MERGE_KEYS and isinstance(base.get(key), list):
            on = MERGE_KEYS[key]
            for item in value:
                match = next((b for b in base[key] if b[on] == item[on]), None)
                if match is None:
                    base[key].append(copy.deepcopy(item))
                else:
                    strategic_merge(match, item)
        else:
            base[key] = copy.deepcopy(value)


def containers(doc: dict) -> list[dict]:
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    return pod.get("initContainers", []) + pod.get("containers", [])


def kustomize(folder: Path) -> list[dict]:
    """What `kubectl kustomize folder` prints, as documents."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(kust) <= KUSTOMIZATION_FIELDS, f"{folder}: this reader does not know {set(kust) - KUSTOMIZATION_FIELDS}"
    docs: list[dict] = []
    for res in kust.get("resources", []):
        path = folder / res
        assert path.exists(), f"{folder}/kustomization.yaml lists missing {res}"
        docs += kustomize(path) if path.is_dir() else load_all(path)
    for patch in kust.get("patches", []):
        assert set(patch) == {"path"}, "patches name their target inside the patch file"
        for p in load_all(folder / patch["path"]):
            strategic_merge(find(docs, p["kind"], p["metadata"]["name"]), p)
    for r in kust.get("replicas", []):
        find(docs, ("Deployment", "StatefulSet"), r["name"])["spec"]["replicas"] = r["count"]
    for image in kust.get("images", []):
        for c in (c for d in docs for c in containers(d)):
            if c["image"].rsplit(":", 1)[0] == image["name"]:
                c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    if "namespace" in kust:
        for d in docs:
            if d["kind"] != "Namespace":
                d["metadata"]["namespace"] = kust["namespace"]
    return docs


def canonical(value):
    """Merge-keyed lists sorted by their key: kustomize puts items a patch adds first."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [canonical(v) for v in value]
        key = next((k for k in ("name", "mountPath") if items and all(isinstance(i, dict) and k in i for i in items)), None)
        return sorted(items, key=lambda i: str(i[key])) if key else items
    return value


@pytest.fixture(scope="module", params=list(SIZES))
def size(request) -> tuple[str, list[dict]]:
    return request.param, kustomize(SIZES[request.param])


def pod_spec(docs, kind, name) -> dict:
    return find(docs, kind, name)["spec"]["template"]["spec"]


def container(docs, kind, name) -> dict:
    (c,) = pod_spec(docs, kind, name)["containers"]
    return c


def settings_of(docs: list[dict], workload: str, tmp_path: Path, monkeypatch):
    """The settings a tunewheel container of `workload` loads: the ConfigMap's file, the Secret's
    variables and its own env."""
    c = container(docs, "Deployment", workload)
    (tmp_path / "tunewheel.toml").write_text(find(docs, "ConfigMap", "tunewheel-config")["data"]["tunewheel.toml"])
    for ref in c["envFrom"]:
        for key, value in find(docs, "Secret", ref["secretRef"]["name"])["stringData"].items():
            monkeypatch.setenv(key, value)
    for var in c.get("env", []):
        if "value" in var:
            monkeypatch.setenv(var["name"], var["value"])
    return load_settings(tmp_path / "tunewheel.toml")


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl missing: the overlays are read by kustomize() only")
@pytest.mark.parametrize("name", list(SIZES))
def test_reading_matches_kubectl_kustomize(name):
    out = subprocess.run([KUBECTL, "kustomize", str(SIZES[name])], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    theirs = {(d["kind"], d["metadata"]["name"]): canonical(d) for d in yaml.safe_load_all(out.stdout) if d}
    ours = {(d["kind"], d["metadata"]["name"]): canonical(d) for d in kustomize(SIZES[name])}
    assert ours == theirs


# --- every size ---------------------------------------------------------------------------------

def test_headless_service_fronts_the_vllm_statefulset(size):
    _, docs = size
    sts = find(docs, "StatefulSet", "vllm")
    svc = find(docs, "Service", sts["spec"]["serviceName"])
    # Headless, ready replicas only: DNS gives the gateways one address per replica that passes /health.
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is False
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    c = container(docs, "StatefulSet", "vllm")
    assert {p["name"] for p in c["ports"]} >= {p["targetPort"] for p in svc["spec"]["ports"]}
    assert c["readinessProbe"]["httpGet"]["path"] == c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in c["env"]
    # No other Deployment or StatefulSet carries the engine's label.
    assert [d["metadata"]["name"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")
            and svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()] == ["vllm"]


def test_gateways_attach_to_every_replica_of_the_headless_service(size, tmp_path, monkeypatch):
    _, docs = size
    settings = settings_of(docs, "tunewheel-gateway", tmp_path, monkeypatch)
    svc = find(docs, "Service", find(docs, "StatefulSet", "vllm")["spec"]["serviceName"])
    url = urlsplit(settings.engine.url)
    assert settings.engine.dns is True and not settings.engine.urls
    assert url.hostname == svc["metadata"]["name"] and url.port == svc["spec"]["ports"][0]["port"]


def test_adapters_are_on_one_volume_at_one_path_for_engines_gateways_and_learner(size, tmp_path, monkeypatch):
    name, docs = size
    settings = settings_of(docs, "tunewheel-learner", tmp_path, monkeypatch)
    claims = set()
    for kind, workload in (("StatefulSet", "vllm"), ("Deployment", "tunewheel-gateway"), ("Deployment", "tunewheel-learner")):
        pod = pod_spec(docs, kind, workload)
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if settings.adapters_dir.is_relative_to(m["mountPath"])]
        assert Path(mount["mountPath"]) == settings.data_dir and not mount.get("readOnly"), workload
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        claims.add(volume["persistentVolumeClaim"]["claimName"])
    (claim,) = claims
    modes = find(docs, "PersistentVolumeClaim", claim)["spec"]["accessModes"]
    # Pods on several nodes mount it at once; on one node a per-node (RWO) volume is shared too.
    assert modes == (["ReadWriteOnce"] if name == "one-node" else ["ReadWriteMany"])


def test_engine_serves_what_the_gateway_asks_for(size, tmp_path, monkeypatch):
    _, docs = size
    settings = settings_of(docs, "tunewheel-gateway", tmp_path, monkeypatch)
    args = dict(a.removeprefix("--").split("=", 1) for a in container(docs, "StatefulSet", "vllm")["args"] if "=" in a)
    assert args["model"] == settings.engine.model and args["served-model-name"] == settings.engine.served_name
    assert int(args["max-lora-rank"]) >= settings.lora_capacity  # the adapters the learner trains fit


def test_one_learner_on_a_database_lock(size):
    _, docs = size
    learner = find(docs, "Deployment", "tunewheel-learner")["spec"]
    assert learner["replicas"] == 1 and learner["strategy"]["type"] == "Recreate"


# --- the two overlays ---------------------------------------------------------------------------

def gpus(c: dict) -> tuple:
    return c["resources"]["requests"].get(GPU), c["resources"]["limits"].get(GPU)


def test_one_node_runs_the_cpu_engine_without_gpus():
    docs = kustomize(SIZES["one-node"])
    assert find(docs, "StatefulSet", "vllm")["spec"]["replicas"] == 1
    assert find(docs, "Deployment", "tunewheel-gateway")["spec"]["replicas"] == 1
    assert all(GPU not in str(c["resources"]) for d in docs for c in containers(d))
    assert all(not d["spec"]["template"]["spec"].get("nodeSelector") for d in docs if containers(d))
    vllm = container(docs, "StatefulSet", "vllm")
    assert vllm["image"] == "tunewheel:cpu" and vllm["command"] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert "--dtype=float32" in vllm["args"]
    assert pod_spec(docs, "StatefulSet", "vllm")["securityContext"]["runAsUser"] == 10001  # our image's user
    learner = container(docs, "Deployment", "tunewheel-learner")
    assert learner["image"] == "tunewheel:cpu"
    assert "TUNEWHEEL_LEARN__TRAIN__PROCESSES" not in {e["name"] for e in learner["env"]}  # one process


def test_gpu_nodes_spread_engines_and_training_over_gpus():
    docs = kustomize(SIZES["gpu-nodes"])
    assert find(docs, "StatefulSet", "vllm")["spec"]["replicas"] >= 2
    assert find(docs, "Deployment", "tunewheel-gateway")["spec"]["replicas"] >= 2
    assert gpus(container(docs, "StatefulSet", "vllm")) == (1, 1)
    learner = container(docs, "Deployment", "tunewheel-learner")
    processes = {e["name"]: e.get("value") for e in learner["env"]}["TUNEWHEEL_LEARN__TRAIN__PROCESSES"]
    assert int(processes) > 1 and gpus(learner) == (int(processes), int(processes))  # one GPU per process
    assert {"name": "shm", "mountPath": "/dev/shm"} in learner["volumeMounts"]  # NCCL between the processes
    for kind, name in (("StatefulSet", "vllm"), ("Deployment", "tunewheel-learner")):
        pod = pod_spec(docs, kind, name)
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {c["image"] for d in docs for c in containers(d)} == {"tunewheel:gpu", "vllm/vllm-openai:v0.11.0"}


def test_gpu_nodes_learner_trains_with_one_process_per_gpu(tmp_path, monkeypatch):
    docs = kustomize(SIZES["gpu-nodes"])
    settings = settings_of(docs, "tunewheel-learner", tmp_path, monkeypatch)
    assert settings.learn.train.processes == gpus(container(docs, "Deployment", "tunewheel-learner"))[1] > 1


# --- compose: a second engine -------------------------------------------------------------------

class Reset:
    """compose's `!reset`: the key is removed from what the earlier files set."""


class Override:
    """compose's `!override`: the value replaces the earlier one instead of merging into it."""

    def __init__(self, value):
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def construct_override(loader: ComposeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_mapping(node, deep=True))


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())
ComposeLoader.add_constructor("!override", construct_override)
REPLACED = ("command", "entrypoint", "test")  # compose replaces these sequences; others are appended


def compose_merge(base, over, key=""):
    """`over` (a later file, or a service that extends `base`) merged onto `base`: mappings key by
    key, sequences appended except commands, `!reset` removes, `!override` replaces."""
    if isinstance(over, Override):
        return over.value
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for k, v in over.items():
            if isinstance(v, Reset):
                merged.pop(k, None)
            else:
                merged[k] = compose_merge(base[k], v, k) if k in base else compose_merge(None, v, k)
        return merged
    if isinstance(base, list) and isinstance(over, list) and key not in REPLACED:
        return base + over
    if isinstance(over, dict):  # a new key: resolve the tags inside it
        return compose_merge({}, over, key)
    return over


def compose_file(path: Path, env: dict[str, str]) -> dict:
    doc = yaml.load(interpolate(path.read_text(), env), ComposeLoader)
    for name, svc in doc["services"].items():
        if "extends" in svc:
            ext = svc.pop("extends")
            base = compose_file(path.parent / ext["file"], env)["services"][ext["service"]]
            doc["services"][name] = compose_merge(copy.deepcopy(base), svc)
    return doc


def compose_stack(*paths: Path, env: dict[str, str] = EXAMPLE_ENV) -> dict:
    """`docker compose -f a -f b config` with `env` as deploy/.env, for what our files use."""
    merged: dict = {}
    for path in paths:
        merged = compose_merge(merged, compose_file(path, env))
    return merged


REPLICA_FILES = [(DEPLOY / "docker-compose.yml", DEPLOY / "docker-compose.replicas.yml"),
                 (DEPLOY / "docker-compose.cpu.yml", DEPLOY / "docker-compose.cpu.replicas.yml")]


@pytest.mark.parametrize("files", REPLICA_FILES, ids=lambda f: f[1].name)
def test_compose_replicas_option_puts_a_second_engine_behind_the_gateway(files, monkeypatch):
    services = compose_stack(*files)["services"]
    one, two = services["vllm"], services["vllm-2"]
    for key in ("image", "command", "healthcheck", "expose"):
        assert two[key] == one[key], key
    assert "ports" not in two and two["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    for svc in (one, two, services["gateway"], services["learner"]):
        assert "data:/data" in svc["volumes"]  # adapters where the learner wrote them
    gateway = services["gateway"]
    assert {gateway["depends_on"][s]["condition"] for s in ("vllm", "vllm-2")} == {"service_healthy"}
    for key, value in gateway["environment"].items():
        monkeypatch.setenv(key, str(value))
    settings = load_settings(None)
    assert settings.engine.url is None and not settings.engine.dns
    assert settings.engine.replica_urls == ["http://vllm:8000", "http://vllm-2:8000"]
    assert {urlsplit(u).hostname for u in settings.engine.replica_urls} <= set(services)


def test_compose_replicas_on_gpu_use_two_gpus():
    services = compose_stack(*REPLICA_FILES[0])["services"]
    (one,) = services["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    (two,) = services["vllm-2"]["deploy"]["resources"]["reservations"]["devices"]
    assert one["count"] == 1 and two["device_ids"] == ["1"]  # docker hands count: 1 the first GPU, 0
    assert two["driver"] == "nvidia" and "gpu" in two["capabilities"]


def test_compose_replicas_on_cpu_can_bind_each_engine_to_its_own_cores():
    env = dict(EXAMPLE_ENV, VLLM_CPU_OMP_THREADS_BIND="0-3", VLLM_2_CPU_OMP_THREADS_BIND="4-7")
    services = compose_stack(*REPLICA_FILES[1], env=env)["services"]
    assert services["vllm"]["environment"]["VLLM_CPU_OMP_THREADS_BIND"] == "0-3"
    assert services["vllm-2"]["environment"]["VLLM_CPU_OMP_THREADS_BIND"] == "4-7"
