"""deploy/kubernetes, checked without a cluster: every manifest (and the GPU overlay's result) against the
Kubernetes API schemas (kubernetes-validate, strict: an unknown field is an error), and the references
between the manifests and to the service itself: labels and selectors, ports, probe paths that are real
routes, the grace period against gunicorn's, the ingress timeouts against the heartbeat, the metric the
autoscaler reads against the one the service exports and the one the adapter serves."""
from __future__ import annotations

import copy
import runpy
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes release the manifests are meant for, and the newest the schemas know.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# Files in deploy/kubernetes that are not Kubernetes objects (kustomize's own, Helm values).
NOT_MANIFESTS = {"kustomization.yaml", "prometheus-adapter-values.yaml"}


def load_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifests() -> list[dict]:
    """Every object the base kustomization applies, in its order."""
    kustomization = load_docs(KUBE / "kustomization.yaml")[0]
    return [doc for name in kustomization["resources"] for doc in load_docs(KUBE / name)]


def find(kind: str, name: str, docs: list[dict] | None = None) -> dict:
    found = [d for d in (docs or manifests()) if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def gpu_deployment() -> dict:
    """The Deployment as the gpu/ overlay makes it (kustomize applies the same RFC 6902 patch)."""
    overlay = load_docs(KUBE / "gpu" / "kustomization.yaml")[0]
    assert overlay["resources"] == ["../"]
    (patch_ref,) = overlay["patches"]
    assert patch_ref["target"] == {"group": "apps", "version": "v1", "kind": "Deployment", "name": "rivulet"}
    patch = jsonpatch.JsonPatch(load_docs(KUBE / "gpu" / patch_ref["path"])[0])
    return patch.apply(copy.deepcopy(find("Deployment", "rivulet")))


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env(deployment: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container(deployment)["env"]}


@pytest.fixture(scope="module")
def gunicorn_conf() -> dict[str, Any]:
    return runpy.run_path(str(ROOT / "gunicorn.conf.py"))


def test_every_file_in_the_directory_is_applied_or_known_not_to_be_a_manifest():
    applied = set(load_docs(KUBE / "kustomization.yaml")[0]["resources"])
    assert {p.name for p in KUBE.glob("*.yaml")} == applied | NOT_MANIFESTS


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_and_the_gpu_variant_match_the_kubernetes_schemas(version):
    docs = manifests() + [gpu_deployment()]
    assert {d["kind"] for d in docs} == {"Secret", "Deployment", "Service", "Ingress", "PodDisruptionBudget",
                                           "HorizontalPodAutoscaler"}
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} is invalid for Kubernetes {version}: {exc}")


def test_the_validator_rejects_a_broken_manifest():
    broken = copy.deepcopy(find("Deployment", "rivulet"))
    container(broken)["readinessProbe"]["httpGet"]["prot"] = "http"  # a typo strict validation must catch
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def test_services_select_their_deployments_pods_on_a_port_they_declare():
    docs = manifests()
    for name in ("rivulet", "redis"):
        deployment, service = find("Deployment", name, docs), find("Service", name, docs)
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert service["spec"]["selector"].items() <= pod_labels.items()
        port_names = {p["name"] for p in container(deployment)["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    budget = find("PodDisruptionBudget", "rivulet", docs)["spec"]["selector"]["matchLabels"]
    assert budget.items() <= find("Deployment", "rivulet", docs)["spec"]["template"]["metadata"]["labels"].items()


def test_the_container_port_is_gunicorns(gunicorn_conf):
    (port,) = container(find("Deployment", "rivulet"))["ports"]
    assert port["containerPort"] == int(gunicorn_conf["bind"].rsplit(":", 1)[1])


def test_probes_hit_real_routes_readiness_on_ready_liveness_on_health(app):
    routes = {rule.rule for rule in app.url_map.iter_rules() if "GET" in rule.methods}
    rivulet = container(find("Deployment", "rivulet"))
    paths = {probe: rivulet[probe]["httpGet"]["path"] for probe in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert paths == {"readinessProbe": "/ready", "livenessProbe": "/health", "startupProbe": "/health"}
    assert set(paths.values()) <= routes
    assert all(rivulet[probe]["httpGet"]["port"] == "http" for probe in paths)


def test_the_grace_period_covers_the_prestop_pause_and_gunicorns_graceful_timeout(gunicorn_conf):
    for deployment in (find("Deployment", "rivulet"), gpu_deployment()):
        pod = deployment["spec"]["template"]["spec"]
        command = container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        pause = float(command[1])
        assert 0 < pause and pod["terminationGracePeriodSeconds"] > pause + gunicorn_conf["graceful_timeout"]


def test_the_ingress_streams_unbuffered_and_waits_longer_than_a_heartbeat(make_settings):
    ingress = find("Ingress", "rivulet")
    annotations = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert annotations[prefix + "proxy-buffering"] == "off"
    settings = make_settings()
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert float(annotations[prefix + timeout]) > settings.heartbeat_s
    body_size = annotations[prefix + "proxy-body-size"]
    assert body_size.endswith("m") and int(body_size[:-1]) * 1024 * 1024 >= settings.max_body_bytes
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    service = find("Service", backend["name"])
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


def test_keys_come_from_the_secret_and_the_store_is_the_redis_service():
    docs = manifests()
    deployment = find("Deployment", "rivulet", docs)
    secret = find("Secret", "rivulet-keys", docs)
    variables = env(deployment)
    ref = variables["RIVULET_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    (keys_volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "keys"]
    assert keys_volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert {item["key"] for item in keys_volume["secret"]["items"]} == {"access-keys", "app-keys"}
    redis = find("Service", "redis", docs)
    assert variables["RIVULET_STREAM_STORE"]["value"] == f"redis://{redis['metadata']['name']}:" \
                                                         f"{redis['spec']['ports'][0]['port']}/0"


def test_metrics_files_live_on_the_mounted_memory_volume():
    deployment = find("Deployment", "rivulet")
    directory = env(deployment)["PROMETHEUS_MULTIPROC_DIR"]["value"]
    mounts = {m["mountPath"]: m["name"] for m in container(deployment)["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts[directory]]["emptyDir"]["medium"] == "Memory"


def test_cpu_pods_ask_for_no_gpu_and_gpu_pods_for_one_each_with_one_worker_per_gpu():
    from service.devices import worker_count

    cpu, gpu = find("Deployment", "rivulet"), gpu_deployment()
    assert env(cpu)["RIVULET_DEVICE"]["value"] == "cpu"
    assert "nvidia.com/gpu" not in str(container(cpu)["resources"])
    resources = container(gpu)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    device = env(gpu)["RIVULET_DEVICE"]["value"]
    assert device == "cuda" and worker_count(device, gpu_count=lambda: resources["limits"]["nvidia.com/gpu"]) == 1
    assert container(gpu)["image"] != container(cpu)["image"]


def test_the_autoscaler_reads_the_queue_metric_the_service_exports_and_the_adapter_serves():
    from service.metrics import Metrics

    hpa = find("HorizontalPodAutoscaler", "rivulet")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "rivulet")
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name == "rivulet_requests_waiting"
    exported = {m.name for m in Metrics(running=lambda: 0, waiting=lambda: 0).registry.collect()}
    assert name in exported
    (rule,) = load_docs(KUBE / "prometheus-adapter-values.yaml")[0]["rules"]["custom"]
    assert rule["name"]["as"] == name and rule["seriesQuery"].startswith(name + "{")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert hpa["spec"]["minReplicas"] >= 2  # a replica stopping (rollout, node drain) never takes the service down
