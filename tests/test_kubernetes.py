"""The Kubernetes manifests are wired together: names, images, env, ports, probes and the KEDA
scaler all point at what really exists (checked by parsing them, no cluster needed)."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
import yaml

from core.contract import QUEUES
from receiver.rules import parse_rules
from tests.conftest import ROOT

K8S = ROOT / "deploy" / "kubernetes"


@pytest.fixture(scope="module")
def docs() -> dict[tuple[str, str], dict]:
    """Every manifest document by (kind, name)."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def container(deployment: dict) -> dict:
    [c] = deployment["spec"]["template"]["spec"]["containers"]
    return c


def test_kustomization_lists_every_manifest():
    """kustomization.yaml includes every manifest file in the folder."""
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_receiver_and_worker_share_one_image_and_config(docs):
    """Both roles run the same image, with the ConfigMap and Secret that exist."""
    receiver = container(docs[("Deployment", "cvat-hooks-receiver")])
    worker = container(docs[("Deployment", "cvat-hooks-worker")])
    assert receiver["image"] == worker["image"]
    assert receiver["args"][0] == "serve" and worker["args"] == ["worker"]
    for c in (receiver, worker):
        refs = {(next(iter(r)), next(iter(r.values()))["name"]) for r in c["envFrom"]}
        assert refs == {("configMapRef", "cvat-hooks"), ("secretRef", "cvat-hooks")}
        assert ("ConfigMap", "cvat-hooks") in docs and ("Secret", "cvat-hooks") in docs


def test_receiver_probes_and_service_ports(docs):
    """Probes hit /healthz and /readyz on the container's port; the Service targets that port and
    the port the receiver is told to listen on."""
    receiver = container(docs[("Deployment", "cvat-hooks-receiver")])
    ports = {p["name"]: p["containerPort"] for p in receiver["ports"]}
    assert receiver["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert receiver["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe"):
        assert receiver[probe]["httpGet"]["port"] in ports
    args = receiver["args"]
    assert int(args[args.index("--port") + 1]) == ports["http"]
    assert args[args.index("--host") + 1] == "0.0.0.0"
    service = docs[("Service", "cvat-hooks-receiver")]
    assert service["spec"]["selector"] == docs[("Deployment", "cvat-hooks-receiver")]["spec"]["selector"][
        "matchLabels"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)


def test_redis_url_points_at_the_redis_service(docs):
    """CVAT_HOOKS_REDIS_URL names the Redis Service and its port."""
    url = urlsplit(docs[("ConfigMap", "cvat-hooks")]["data"]["CVAT_HOOKS_REDIS_URL"])
    service = docs[("Service", url.hostname)]
    assert url.port in {p["port"] for p in service["spec"]["ports"]}
    redis = docs[("StatefulSet", "cvat-hooks-redis")]
    assert "--appendonly" in container(redis)["args"]


def test_keda_scales_the_worker_on_the_real_rq_queues(docs):
    """The ScaledObject targets the worker Deployment and watches the Redis lists RQ really uses."""
    from redis import Redis
    from rq import Queue

    scaled = docs[("ScaledObject", "cvat-hooks-worker")]
    assert ("Deployment", scaled["spec"]["scaleTargetRef"]["name"]) in docs
    assert scaled["spec"]["scaleTargetRef"]["name"] == "cvat-hooks-worker"
    lists = {t["metadata"]["listName"] for t in scaled["spec"]["triggers"] if t["type"] == "redis"}
    assert lists == {Queue(q, connection=Redis()).key for q in QUEUES}
    url = urlsplit(docs[("ConfigMap", "cvat-hooks")]["data"]["CVAT_HOOKS_REDIS_URL"])
    assert {t["metadata"]["address"] for t in scaled["spec"]["triggers"]} == {f"{url.hostname}:{url.port}"}


def test_rules_in_the_configmap_are_valid_and_mounted_where_the_env_says(docs):
    """The ConfigMap's rules.yaml loads, and CVAT_HOOKS_RULES points at its mount."""
    parse_rules(docs[("ConfigMap", "cvat-hooks")]["data"]["rules.yaml"], "configmap rules.yaml")
    for name in ("cvat-hooks-receiver", "cvat-hooks-worker"):
        c = container(docs[("Deployment", name)])
        rules_path = next(e["value"] for e in c["env"] if e["name"] == "CVAT_HOOKS_RULES")
        mount = next(m for m in c["volumeMounts"] if rules_path.startswith(m["mountPath"] + "/"))
        volume = next(v for v in docs[("Deployment", name)]["spec"]["template"]["spec"]["volumes"]
                      if v["name"] == mount["name"])
        assert volume["configMap"]["items"][0]["path"] == rules_path.rsplit("/", 1)[1]


def test_containers_run_as_non_root_with_read_only_root(docs):
    """Receiver and worker run as the image's unprivileged user with a read-only root filesystem."""
    for name in ("cvat-hooks-receiver", "cvat-hooks-worker"):
        deployment = docs[("Deployment", name)]
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        assert container(deployment)["securityContext"]["readOnlyRootFilesystem"] is True
        assert any(m["mountPath"] == "/data" for m in container(deployment)["volumeMounts"])


def _redis_is_durable_with(args: list[str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Run a real redis-server with a deploy file's arguments; it must neither evict nor forget on restart."""
    import subprocess
    import time

    from redis import Redis

    from core.redis_conn import check_durability
    from tests.conftest import free_port, redis_binary

    assert args[0] == "redis-server"
    # Explicit, not the image's default: another image or redis.conf may evict (e.g. a cache preset).
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--appendonly") + 1] == "yes"
    port = free_port()
    proc = subprocess.Popen([redis_binary(), *args[1:], "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = Redis(port=port)
    try:
        for _ in range(200):
            try:
                client.ping()
                break
            except Exception:
                time.sleep(0.02)
        verdict = check_durability(client)
        assert verdict.policy == "noeviction" and verdict.evicting is False
        assert verdict.aof is True and verdict.persistent is True
    finally:
        client.close()
        proc.kill()
        proc.wait(10)


def test_the_kubernetes_redis_neither_evicts_nor_forgets(docs, tmp_path):
    """The StatefulSet's redis-server arguments give AOF and maxmemory-policy noeviction (checked on a real one)."""
    _redis_is_durable_with(container(docs[("StatefulSet", "cvat-hooks-redis")])["args"], tmp_path)


def test_the_compose_redis_neither_evicts_nor_forgets(tmp_path):
    """docker-compose.yml's redis-server command gives AOF and maxmemory-policy noeviction (on a real one)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    _redis_is_durable_with(compose["services"]["redis"]["command"], tmp_path)
