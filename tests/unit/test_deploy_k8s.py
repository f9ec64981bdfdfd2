"""The Kubernetes manifests as the cluster would get them: `kubectl kustomize deploy/k8s`
rendered, every object valid against the Kubernetes schemas (strict: an unknown or
misplaced field fails) and the ScaledObjects against KEDA's CRD schema, and the topology the
scale-out asks for: a three-node NATS cluster behind a headless Service, the users of the
event catalog, a disruption budget, an autoscaler per consumer, network policies and a
read-only root filesystem everywhere."""

from __future__ import annotations

import base64
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from contracts.catalog import stream_for
from services.runtime.nats_users import (
    FLEET_SERVICES,
    fleet_users,
    password_variable,
    server_config,
)
from services.stack import SERVICES

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
NAMESPACE = "llm-fleet"
NAMESPACE_LABEL = "kubernetes.io/metadata.name"
KEDA_SCHEMA = K8S / "schemas" / "keda-scaledobject-v1alpha1.json"
CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject"): KEDA_SCHEMA}


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: `make tools` installs it"
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


@cache
def rendered() -> tuple[dict[str, Any], ...]:
    return tuple(kustomize(K8S))


def objects(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in rendered() if doc["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    (found,) = [doc for doc in objects(kind) if doc["metadata"]["name"] == name]
    return found


def workloads() -> Iterator[dict[str, Any]]:
    for kind in ("Deployment", "StatefulSet", "Job"):
        yield from objects(kind)


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    pod = workload["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def strictly(schema: Any) -> Any:
    """A CRD schema as the API server's strict field validation reads it: an object with
    properties has those and no others, unless it says it keeps unknown fields."""
    if isinstance(schema, dict):
        schema = {key: strictly(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strictly(item) for item in schema]
    return schema


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """Why `doc` is not a valid object (empty when it is): the Kubernetes schemas of the
    newest version kubernetes-validate knows, strict, or a checked-in CRD schema."""
    crd = CRD_KINDS.get((doc["apiVersion"], doc["kind"]))
    if crd is not None:
        schema = strictly(json.loads(crd.read_text()))
        validator = jsonschema.Draft7Validator(schema)
        return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
    version = kubernetes_validate.latest_version()
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{list(exc.path)}: {exc.message}"]
    return []


# --- rendered and valid --------------------------------------------------------------------


def test_every_rendered_object_is_valid_strictly() -> None:
    docs = rendered()
    assert len(docs) > 30
    kinds = {doc["kind"] for doc in docs}
    assert {"StatefulSet", "ScaledObject", "NetworkPolicy", "PodDisruptionBudget"} <= kinds
    failures = {
        f"{doc['kind']}/{doc['metadata']['name']}": errors
        for doc in docs
        if (errors := schema_errors(doc))
    }
    assert failures == {}


def test_the_validation_catches_a_misplaced_field_and_a_wrong_type() -> None:
    deployment = json.loads(json.dumps(named("Deployment", "stats")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
    assert schema_errors(deployment), "a misspelt field must fail strict validation"
    scaled = json.loads(json.dumps(named("ScaledObject", "stats")))
    scaled["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 1000
    assert schema_errors(scaled), "KEDA's trigger metadata are strings"
    scaled = json.loads(json.dumps(named("ScaledObject", "stats")))
    scaled["spec"]["minReplicas"] = 2
    assert schema_errors(scaled), "an unknown ScaledObject field must fail"


def test_base_renders_alone_for_a_managed_nats_and_postgres() -> None:
    docs = kustomize(K8S / "base")
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("StatefulSet", "nats") not in names and ("StatefulSet", "postgres") not in names
    assert {("Deployment", name) for name in SERVICES} <= names
    assert all(doc["metadata"].get("namespace", NAMESPACE) == NAMESPACE for doc in docs)


def test_everything_is_in_the_namespace() -> None:
    for doc in rendered():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]


# --- StatefulSets and NATS -----------------------------------------------------------------


def test_every_statefulset_is_governed_by_a_headless_service() -> None:
    sets = objects("StatefulSet")
    assert {s["metadata"]["name"] for s in sets} >= {"nats", "postgres", "loki"}
    for statefulset in sets:
        service = named("Service", statefulset["spec"]["serviceName"])
        assert service["spec"].get("clusterIP") == "None", service["metadata"]["name"]
        labels = statefulset["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()


def nats_config() -> str:
    configmap = named("ConfigMap", next(iter(nats_volume_sources()["configMap"])))
    text: str = configmap["data"]["nats.conf"]
    return text


def nats_volume_sources() -> dict[str, set[str]]:
    pod = named("StatefulSet", "nats")["spec"]["template"]["spec"]
    (config,) = [v for v in pod["volumes"] if v["name"] == "config"]
    sources: dict[str, set[str]] = {}
    for source in config["projected"]["sources"]:
        for kind, ref in source.items():
            sources.setdefault(kind, set()).add(ref["name"])
    return sources


def test_nats_is_a_three_node_jetstream_cluster_with_routes_to_every_pod() -> None:
    nats = named("StatefulSet", "nats")
    replicas = nats["spec"]["replicas"]
    assert replicas == 3
    assert nats["spec"]["podManagementPolicy"] == "Parallel"
    headless = named("Service", nats["spec"]["serviceName"])
    assert headless["spec"]["publishNotReadyAddresses"] is True
    text = nats_config()
    assert re.search(r"^server_name: \$POD_NAME$", text, re.M)
    assert re.search(r"^jetstream \{[^}]*store_dir: /data", text, re.M | re.S)
    (cluster,) = re.findall(r"^cluster \{(.*?)^\}", text, re.M | re.S)
    assert re.search(r"^\s+name: \w+", cluster, re.M)
    routes = re.findall(r"nats://([\w.-]+):(\d+)", cluster)
    cluster_port = re.search(r"listen: 0\.0\.0\.0:(\d+)", cluster)
    assert cluster_port
    hosts = [f"nats-{i}.{headless['metadata']['name']}" for i in range(replicas)]
    assert routes == [(host, cluster_port.group(1)) for host in hosts]
    (container,) = nats["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["cluster"] == int(cluster_port.group(1))
    assert {p["port"] for p in headless["spec"]["ports"]} >= {ports["client"], ports["cluster"]}
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert named("PodDisruptionBudget", "nats")["spec"]["maxUnavailable"] == 1


def test_nats_users_come_from_a_secret_equal_to_the_codes() -> None:
    assert "include users.conf" in nats_config()
    (secret_name,) = nats_volume_sources()["secret"]
    secret = named("Secret", secret_name)
    users = base64.b64decode(secret["data"]["users.conf"]).decode()
    assert users.strip() == server_config(fleet_users()).strip(), (
        "regenerate: fleet nats-config --from-env > deploy/k8s/dev-infra/nats/users.conf"
    )
    (container,) = named("StatefulSet", "nats")["spec"]["template"]["spec"]["containers"]
    from_secrets = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    referenced = set(re.findall(r"\$(\w+_NATS_PASSWORD)", users))
    assert set(from_secrets) == referenced
    assert all(
        ref["name"] == "fleet-secrets" and ref["key"] == var for var, ref in from_secrets.items()
    )


def test_the_nats_config_is_accepted_by_nats_server(tmp_path: Path) -> None:
    """The real nats-server checks the pod's configuration (mounted side by side)."""
    (tmp_path / "nats.conf").write_text(nats_config())
    (secret_name,) = nats_volume_sources()["secret"]
    users = base64.b64decode(named("Secret", secret_name)["data"]["users.conf"]).decode()
    (tmp_path / "users.conf").write_text(users)
    binary = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    env = {
        **os.environ,
        "POD_NAME": "nats-0",
        **{v: "pw" for v in re.findall(r"\$(\w+_NATS_PASSWORD)", users)},
    }
    checked = subprocess.run(
        [binary, "-c", str(tmp_path / "nats.conf"), "-t"], env=env, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr


# --- the services --------------------------------------------------------------------------


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("name", FLEET_SERVICES)
def test_each_service_connects_as_its_own_nats_user_with_its_password_only(name: str) -> None:
    (container,) = named("Deployment", name)["spec"]["template"]["spec"]["containers"]
    env = env_of(container)
    assert env["NATS_USER"]["value"] == name
    ref = env["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "fleet-secrets", "key": password_variable(name)}
    nats_keys = {
        e["valueFrom"]["secretKeyRef"]["key"]
        for e in env.values()
        if "secretKeyRef" in e.get("valueFrom", {})
        and e["valueFrom"]["secretKeyRef"]["key"].endswith("_NATS_PASSWORD")
    }
    assert nats_keys == {password_variable(name)}
    assert not any("secretRef" in source for source in container.get("envFrom", []))


def example_keys() -> set[str]:
    text = (DEPLOY / ".env.example").read_text()
    return set(re.findall(r"^([A-Z][A-Z0-9_]*)=", text, re.M))


def test_every_secret_a_pod_reads_is_a_key_of_the_env_example() -> None:
    """fleet-secrets is made from deploy/.env (`kubectl create secret generic fleet-secrets
    --from-env-file=deploy/.env`), so each key a pod reads must be one gen-env.sh writes."""
    read = set()
    for workload in workloads():
        for container in containers(workload):
            for e in container.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] == "fleet-secrets":
                    read.add(ref["key"])
    assert {"POSTGRES_PASSWORD", "ADMIN_NATS_PASSWORD", "STATS_NATS_PASSWORD"} <= read
    assert read <= example_keys()
    assert not [s for s in objects("Secret") if s["metadata"]["name"].startswith("fleet-")], (
        "no password is generated from the repository"
    )


def test_no_committed_manifest_holds_a_password() -> None:
    for path in K8S.rglob("*.yaml"):
        text = path.read_text()
        assert not re.search(r"(?i)(password|secret)[\w-]*=(?!\$)\S", text), path
        assert "change-me" not in text, path


def test_every_container_runs_read_only_as_non_root() -> None:
    checked = 0
    for workload in workloads():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, workload["metadata"]["name"]
        for container in containers(workload):
            where = f"{workload['metadata']['name']}/{container['name']}"
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            checked += 1
    assert checked >= 11


def test_each_service_has_a_disruption_budget_and_two_replicas_at_least() -> None:
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in objects("ScaledObject")}
    for name in SERVICES:
        deployment = named("Deployment", name)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        budgets = [
            b
            for b in objects("PodDisruptionBudget")
            if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(budgets) == 1, name
        assert budgets[0]["spec"].get("maxUnavailable") == 1
        if name in scaled:
            assert "replicas" not in deployment["spec"], f"{name}: KEDA sets its replicas"
            spec = scaled[name]["spec"]
            assert spec["minReplicaCount"] >= 2
            assert spec["fallback"]["replicas"] == spec["minReplicaCount"]
        else:
            assert deployment["spec"]["replicas"] >= 2, name


def durable_consumers(service: str) -> set[tuple[str, str]]:
    spec = importlib.import_module(f"services.{service}.app").build()
    return {(stream_for(c.event.subject).name, c.name) for c in spec.consumers}


@pytest.mark.parametrize("name", SERVICES)
def test_each_durable_consumer_has_a_trigger_on_its_pending_messages(name: str) -> None:
    consumers = durable_consumers(name)
    scaled = [s for s in objects("ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == name]
    if not consumers:
        assert scaled == [], f"{name} consumes nothing to scale on"
        return
    (scaledobject,) = scaled
    triggers = scaledobject["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"nats-jetstream"}
    assert {(t["metadata"]["stream"], t["metadata"]["consumer"]) for t in triggers} == consumers
    headless = named("Service", named("StatefulSet", "nats")["spec"]["serviceName"])
    monitor = {p["name"]: p["port"] for p in headless["spec"]["ports"]}["monitor"]
    endpoint = f"{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{monitor}"
    for trigger in triggers:
        assert trigger["metadata"]["natsServerMonitoringEndpoint"] == endpoint
        assert trigger["metadata"]["account"] == "$G"  # users without accounts
        assert int(trigger["metadata"]["lagThreshold"]) > 0


def test_the_durable_consumers_are_declared_at_deploy_time_as_admin() -> None:
    job = named("Job", "fleet-declare")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["declare"]
    assert (
        container["image"]
        == named("Job", "fleet-migrate")["spec"]["template"]["spec"]["containers"][0]["image"]
    )
    env = env_of(container)
    assert env["NATS_USER"]["value"] == "admin"
    assert env["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == password_variable("admin")
    assert job["spec"]["backoffLimit"] >= 5  # NATS may still be electing its leaders


# --- network policies ----------------------------------------------------------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels", "matchExpressions"}, selector
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        value = labels.get(expression["key"])
        if expression["operator"] == "In" and value not in expression["values"]:
            return False
        if expression["operator"] == "NotIn" and value in expression["values"]:
            return False
    return True


def pod_labels(kind: str, name: str) -> dict[str, str]:
    labels: dict[str, str] = named(kind, name)["spec"]["template"]["metadata"]["labels"]
    return labels


def policies_for(labels: dict[str, str], direction: str) -> list[dict[str, Any]]:
    return [
        p
        for p in objects("NetworkPolicy")
        if direction in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], labels)
    ]


def egress_peers(labels: dict[str, str]) -> list[tuple[dict[str, Any], set[Any]]]:
    """(peer, ports) of every egress rule that applies to pods with these labels."""
    found = []
    for policy in policies_for(labels, "Egress"):
        for rule in policy["spec"].get("egress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            for peer in rule.get("to", [{}]):
                found.append((peer, ports))
    return found


def may_reach(source: dict[str, str], target: dict[str, str], port: int | str) -> bool:
    """Whether a pod may open a connection to another of the namespace on `port`, by the
    egress policies of the one and the ingress policies of the other."""

    def admits(peer: dict[str, Any], labels: dict[str, str], ports: set[Any]) -> bool:
        if ports and port not in ports:
            return False
        if "ipBlock" in peer:
            return True
        namespaces = peer.get("namespaceSelector")
        if namespaces is not None and not selects(namespaces, {NAMESPACE_LABEL: NAMESPACE}):
            return False
        return selects(peer.get("podSelector", {}), labels)

    out = any(admits(peer, target, ports) for peer, ports in egress_peers(source))
    into = False
    for policy in policies_for(target, "Ingress"):
        for rule in policy["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            into |= any(admits(peer, source, ports) for peer in rule.get("from", [{}]))
    return out and into


def test_everything_not_allowed_is_denied() -> None:
    deny = named("NetworkPolicy", "default-deny")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


@pytest.mark.parametrize("name", SERVICES)
def test_a_service_reaches_nats_postgres_and_the_collector_only(name: str) -> None:
    me = pod_labels("Deployment", name)
    nats = pod_labels("StatefulSet", "nats")
    postgres = pod_labels("StatefulSet", "postgres")
    assert may_reach(me, nats, 4222)
    assert may_reach(me, postgres, 5432)
    assert not may_reach(me, nats, 6222), "the cluster's routes are the nodes' own"
    assert not may_reach(me, pod_labels("StatefulSet", "loki"), 3100)
    peers = {json.dumps(peer, sort_keys=True) for peer, _ in egress_peers(me)}
    collector = {
        "namespaceSelector": {},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "otel-collector"}},
    }
    assert json.dumps(collector, sort_keys=True) in peers
    others = [s for s in SERVICES if s != name]
    reaches_others = any(may_reach(me, pod_labels("Deployment", o), "http") for o in others)
    assert reaches_others == (name == "guardian"), "only guardian probes the others"
    internet = [ports for peer, ports in egress_peers(me) if "ipBlock" in peer]
    if name in ("sync", "benchmark"):  # OpenRouter, Ollama devices, model servers
        assert internet and all(ports == {443, 11434} for ports in internet)
    else:
        assert internet == [], f"{name} needs no address outside the cluster"


def test_the_apis_take_requests_and_nats_postgres_only_from_the_fleet() -> None:
    anyone = {"app.kubernetes.io/name": "some-ingress-controller"}
    assert may_reach_from_anywhere(pod_labels("Deployment", "stats"), "http")
    assert not may_reach(anyone, pod_labels("StatefulSet", "postgres"), 5432)
    nats = pod_labels("StatefulSet", "nats")
    assert may_reach(nats, nats, 6222)
    assert may_reach(pod_labels("Job", "fleet-declare"), nats, 4222)
    assert may_reach(
        pod_labels("Job", "fleet-migrate"), pod_labels("StatefulSet", "postgres"), 5432
    )
    assert may_reach(pod_labels("Deployment", "alloy"), pod_labels("StatefulSet", "loki"), 3100)


def may_reach_from_anywhere(labels: dict[str, str], port: int | str) -> bool:
    return any(
        not rule.get("from") and port in {p["port"] for p in rule.get("ports", [])}
        for policy in policies_for(labels, "Ingress")
        for rule in policy["spec"].get("ingress", [])
    )
