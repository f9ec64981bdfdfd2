"""Logs in Grafana, kept consistent with the code: Alloy (compose and Kubernetes) reads the
fields services/runtime/logs.py writes and gives the labels the dashboard's LogQL selects on;
Loki's datasource turns a real log line's trace_id into a Tempo link, and Tempo's spans link
back to the lines of their service. Neither Loki nor Alloy runs on this machine, so their
files are checked against each other and the code, not by the programs themselves."""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from services.runtime.logs import JsonFormatter
from services.stack import SERVICES

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ALLOY = {
    "compose": DEPLOY / "alloy" / "config.alloy",
    "k8s": DEPLOY / "k8s" / "observability" / "config.alloy",
}
LEVELS = {"debug", "info", "warning", "error", "critical"}  # logging's, lower case


def block(text: str, header: str) -> str:
    """A top-level Alloy block (from its header to the brace closing it, at column 0)."""
    match = re.search(rf"^{re.escape(header)} \{{\n(.*?)^\}}", text, re.M | re.S)
    assert match, f"no {header} block"
    return match.group(1)


def stage_values(process: str, stage: str) -> dict[str, str]:
    match = re.search(rf"stage\.{stage} \{{\s*(?:values|expressions) = \{{(.*?)\}}", process, re.S)
    assert match, f"no stage.{stage}"
    return dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', match.group(1)))


def alloy_labels(text: str) -> dict[str, str | None]:
    """label -> its one value when static, None when it comes from the line or the target."""
    process = block(text, 'loki.process "fleet"')
    labels: dict[str, str | None] = dict(stage_values(process, "static_labels"))
    labels |= dict.fromkeys(stage_values(process, "labels"))
    relabel = block(text, 'discovery.relabel "fleet"')
    labels |= dict.fromkeys(re.findall(r'target_label\s*=\s*"(\w+)"', relabel))
    return labels


def a_log_line(message: str = "applied a batch", level: int = logging.ERROR) -> tuple[str, str]:
    """A line as a service writes it inside a span, and that span's trace id."""
    tracer = TracerProvider().get_tracer("test")
    record = logging.LogRecord("stats.consumer", level, __file__, 1, message, None, None)
    with tracer.start_as_current_span("apply") as span:
        line = JsonFormatter("stats").format(record)
        trace_id = format(span.get_span_context().trace_id, "032x")
    assert trace.get_current_span().get_span_context().is_valid is False
    return line, trace_id


@pytest.fixture(scope="module")
def datasources() -> dict[str, dict[str, Any]]:
    path = DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yaml"
    return {ds["uid"]: ds for ds in yaml.safe_load(path.read_text())["datasources"]}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    return services


def loki_queries() -> list[tuple[str, str]]:
    queries = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                if target.get("datasource", {}).get("type") == "loki":
                    queries.append((f"{path.name}: {panel['title']}", target["expr"]))
    return queries


def selectors(expr: str) -> list[tuple[str, str, str]]:
    """(label, operator, value) of every stream selector's matchers."""
    found = []
    for inner in re.findall(r"\{([^}]*)\}", expr):
        found += re.findall(r'(\w+)\s*(=~|!=|!~|=)\s*"([^"]*)"', inner)
    assert found, f"no stream selector in {expr!r}"
    return found


# --- Alloy ---------------------------------------------------------------------------------------


def test_compose_and_kubernetes_process_the_lines_the_same_way() -> None:
    compose_text, k8s_text = (path.read_text() for path in ALLOY.values())
    assert block(compose_text, 'loki.process "fleet"') == block(k8s_text, 'loki.process "fleet"')
    # the same labels, and on Kubernetes the pod's name besides
    assert alloy_labels(k8s_text) == alloy_labels(compose_text) | {"pod": None}
    for text in (compose_text, k8s_text):
        keep = re.search(r'regex\s*=\s*"([\w|]+)"\s*\n\s*action\s*=\s*"keep"', text)
        assert keep and set(keep.group(1).split("|")) == set(SERVICES)


def test_alloy_reads_fields_the_services_write() -> None:
    line, trace_id = a_log_line()
    fields = json.loads(line)
    process = block(ALLOY["compose"].read_text(), 'loki.process "fleet"')
    extracted = stage_values(process, "json")
    assert set(extracted.values()) <= fields.keys(), "a field logs.py does not write"
    assert fields[extracted["trace_id"]] == trace_id
    assert fields[extracted["level"]] == "error"
    stage = re.search(r"stage\.timestamp \{(.*?)\}", process, re.S)
    assert stage
    timestamp = dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', stage.group(1)))
    assert timestamp["format"] == "RFC3339" and timestamp["source"] in extracted
    assert datetime.fromisoformat(fields[timestamp["source"]]).utcoffset() is not None
    for name in ("labels", "structured_metadata"):
        assert set(stage_values(process, name)) <= extracted.keys()
    assert "trace_id" not in stage_values(process, "labels"), "a label per trace: too many"


def test_alloy_pushes_to_the_loki_grafana_reads(
    compose: dict[str, Any], datasources: dict[str, dict[str, Any]]
) -> None:
    loki = yaml.safe_load((DEPLOY / "loki" / "loki.yaml").read_text())
    port = loki["server"]["http_listen_port"]
    for text in (path.read_text() for path in ALLOY.values()):
        url = re.search(r'url\s*=\s*"([^"]+)"', block(text, 'loki.write "loki"'))
        assert url and url.group(1) == f"http://loki:{port}/loki/api/v1/push"
    assert datasources["loki"]["url"] == f"http://loki:{port}"
    check = " ".join(compose["loki"]["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/ready" in check
    k8s = yaml.safe_load((DEPLOY / "k8s" / "observability" / "loki.yaml").read_text())
    assert k8s == loki, "Loki runs with the same configuration under compose and Kubernetes"
    # structured metadata (trace_id) needs it allowed and a v13 TSDB schema
    assert loki["limits_config"]["allow_structured_metadata"] is True
    assert all(
        c["schema"] == "v13" and c["store"] == "tsdb" for c in loki["schema_config"]["configs"]
    )


def test_compose_alloy_reads_this_projects_containers(compose: dict[str, Any]) -> None:
    project = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["name"]
    discovery = block(ALLOY["compose"].read_text(), 'discovery.docker "containers"')
    assert f'"com.docker.compose.project={project}"' in discovery
    mounts = compose["alloy"]["volumes"]
    assert "/var/run/docker.sock:/var/run/docker.sock:ro" in mounts
    assert "./alloy/config.alloy:/etc/alloy/config.alloy:ro" in mounts


def test_kubernetes_alloy_reads_the_services_pods() -> None:
    text = ALLOY["k8s"].read_text()
    discovery = block(text, 'discovery.kubernetes "pods"')
    selector = re.search(r'label\s*=\s*"([\w./-]+)=(\w+)"', discovery)
    assert selector
    for name in SERVICES:
        manifest = DEPLOY / "k8s" / "base" / "services" / f"{name}.yaml"
        pod = yaml.safe_load_all(manifest.read_text()).__next__()["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert labels[selector.group(1)] == selector.group(2)
        assert labels["app.kubernetes.io/name"] == name  # what becomes `service`
    assert "__meta_kubernetes_pod_label_app_kubernetes_io_name" in block(
        text, 'discovery.relabel "fleet"'
    )


# --- Grafana -------------------------------------------------------------------------------------


def test_a_log_lines_trace_id_links_to_its_trace(datasources: dict[str, dict[str, Any]]) -> None:
    (derived,) = datasources["loki"]["jsonData"]["derivedFields"]
    assert datasources[derived["datasourceUid"]]["type"] == "tempo"
    line, trace_id = a_log_line()
    match = re.search(derived["matcherRegex"], line)
    assert match and match.group(1) == trace_id
    outside, _ = a_log_line()
    assert re.search(derived["matcherRegex"], outside.replace("trace_id", "span")) is None
    # provisioning expands $VARIABLES: Grafana must receive ${__value.raw} itself
    assert derived["url"] == "$${__value.raw}"


def test_a_span_links_back_to_the_lines_of_its_service(
    datasources: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    links = datasources["tempo"]["jsonData"]["tracesToLogsV2"]
    assert datasources[links["datasourceUid"]]["type"] == "loki"
    assert links["filterByTraceID"] is True
    (tag,) = links["tags"]
    assert tag["key"] == "service.name" and tag["value"] in alloy_labels(
        ALLOY["compose"].read_text()
    )
    for name in SERVICES:  # the span's service.name is the label's value
        assert compose[name]["environment"]["OTEL_SERVICE_NAME"] == name


def test_the_dashboard_has_the_logs_and_their_labels_exist() -> None:
    queries = loki_queries()
    titles = " ".join(title for title, _ in queries)
    assert "Errors by service" in titles and "guardian: errors" in titles
    labels = alloy_labels(ALLOY["compose"].read_text())
    board = json.loads((DEPLOY / "grafana" / "dashboards" / "fleet.json").read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    level_options = set(variables["level"]["query"].split(","))
    assert level_options <= LEVELS
    for where, expr in queries:
        for label, operator, value in selectors(expr):
            assert label in labels, f"{where}: no line has the label {label!r}"
            if labels[label] is not None:  # static
                assert operator == "=" and value == labels[label], where
            elif label == "service" and operator == "=":
                assert value in SERVICES, where
            elif label == "level" and operator == "=":
                assert value in LEVELS, where
            for variable in re.findall(r"\$(\w+)", value):
                assert variable in variables, f"{where}: no variable ${variable}"
    counting = [expr for _, expr in queries if "count_over_time" in expr]
    assert counting and all(re.search(r"sum by \(service\)", e) for e in counting)


def test_the_log_levels_are_the_formatters() -> None:
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL):
        line, _ = a_log_line(level=level)
        assert json.loads(line)["level"] in LEVELS
