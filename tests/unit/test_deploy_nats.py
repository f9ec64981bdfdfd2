"""The deployment's NATS users are the code's: the committed server configuration is what
`fleet nats-config --from-env` makes, the real nats-server accepts it, and compose gives the
server every password it references and each service its own user."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from services.runtime.nats_users import FLEET_SERVICES, fleet_users, server_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
USERS_CONF = DEPLOY / "nats" / "users.conf"


K8S_USERS_CONF = DEPLOY / "k8s" / "dev-infra" / "nats" / "users.conf"  # kustomize's copy


def test_the_committed_nats_users_are_the_codes() -> None:
    for path in (USERS_CONF, K8S_USERS_CONF):
        assert path.read_text().strip() == server_config(fleet_users()).strip(), (
            f"regenerate: fleet nats-config --from-env > {path.relative_to(DEPLOY.parent)}"
        )


def test_nats_server_accepts_the_configuration_with_its_passwords() -> None:
    variables = set(re.findall(r"\$(\w+_NATS_PASSWORD)", USERS_CONF.read_text()))
    binary = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    env = {**os.environ, **{v: "pw" for v in variables}}
    checked = subprocess.run(
        [binary, "-c", str(USERS_CONF), "-t"], env=env, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    missing = subprocess.run(
        [binary, "-c", str(USERS_CONF), "-t"],
        env={k: v for k, v in env.items() if k != "STATS_NATS_PASSWORD"},
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "STATS_NATS_PASSWORD" in missing.stderr


def test_compose_gives_nats_every_password_and_each_service_its_user() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    variables = set(re.findall(r"\$(\w+_NATS_PASSWORD)", USERS_CONF.read_text()))
    assert set(services["nats"]["environment"]) == variables
    assert "/etc/nats/users.conf" in services["nats"]["command"]
    for name in FLEET_SERVICES:
        env = services[name]["environment"]
        assert env["NATS_USER"] == name
        assert (
            env["NATS_PASSWORD"] == services["nats"]["environment"][f"{name.upper()}_NATS_PASSWORD"]
        )
