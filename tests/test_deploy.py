"""What CI can check of the deployment without a Docker engine: schema, kinds, settings, secrets."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import jsonschema
import psutil
import pytest
import redis
import yaml

from pupyl_queue.settings import Settings
from pupyl_queue.stack import free_port, redis_server_binary
from tests.conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"
MANIFESTS = ROOT / "deploy" / "k8s" / "pupyl-queue.yaml"
SETTING = re.compile(r"\bPUPYL_[A-Z0-9_]+\b")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_follows_the_compose_specification() -> None:
    schema = json.loads((ROOT / "deploy" / "compose-spec.schema.json").read_text())
    jsonschema.validate(compose(), schema)


def test_compose_stack_has_every_part() -> None:
    services = compose()["services"]
    assert {
        "redis",
        "minio",
        "minio-init",
        "flower",
        "api",
        "ingest",
        "embed",
        "embed-cpu",
        "search",
        "maintenance",
        "beat",
    } <= set(services)
    assert "appendonly yes" in services["redis"]["command"][-1]  # password: see the test below
    gpu = services["embed"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and services["embed"]["profiles"] == ["gpu"]
    assert services["embed-cpu"]["profiles"] == ["cpu"]
    flower = services["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == (
        "${FLOWER_USER:?set FLOWER_USER in .env}:${FLOWER_PASSWORD:?set FLOWER_PASSWORD in .env}"
    )  # basic auth from .env, in the environment: never on a command line, where `ps` shows it
    command_line = " ".join(flower["entrypoint"] + flower["command"])
    assert "flower" in command_line and "basic-auth" not in command_line and "PASSWORD" not in command_line
    assert flower["environment"]["PUPYL_REDIS_URL"] == services["ingest"]["environment"]["PUPYL_REDIS_URL"]
    for name, service in services.items():
        if name != "minio-init":
            assert service.get("restart") == "unless-stopped", name
    for name in ("redis", "minio", "api"):
        assert "healthcheck" in services[name], name
    assert set(compose()["volumes"]) >= {"redis-data", "minio-data"}


def test_kubernetes_manifests() -> None:
    docs = [d for d in yaml.safe_load_all(MANIFESTS.read_text()) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap"] + ["Deployment"] * 6 + ["ScaledObject", "Service"]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for container in pod["containers"]:
            assert container["image"].startswith("pupyl-queue:"), name
            assert container["resources"]["requests"], name
    embed = deployments["pupyl-embed"]["spec"]["template"]["spec"]["containers"][0]
    assert embed["resources"]["limits"]["nvidia.com/gpu"] == 1
    scaler = next(d for d in docs if d["kind"] == "ScaledObject")
    assert scaler["spec"]["scaleTargetRef"]["name"] == "pupyl-embed"
    assert scaler["spec"]["triggers"][0]["type"] == "redis"
    assert scaler["spec"]["triggers"][0]["metadata"]["listName"] == "embed"
    service = next(d for d in docs if d["kind"] == "Service")
    assert service["spec"]["selector"] == {"app": "pupyl-api"}


def test_every_setting_passed_is_read_and_every_setting_is_documented() -> None:
    known = set(Settings.names())
    passed = set()
    for path in (COMPOSE, MANIFESTS, ROOT / ".env.example", ROOT / "deploy" / "Dockerfile"):
        passed |= set(SETTING.findall(path.read_text()))
    assert passed <= known, f"unknown settings: {sorted(passed - known)}"
    documented = set(SETTING.findall((ROOT / ".env.example").read_text()))
    assert known <= documented, f"settings missing from .env.example: {sorted(known - documented)}"
    readme = set(SETTING.findall((ROOT / "README.md").read_text()))
    assert known <= readme, f"settings missing from the README table: {sorted(known - readme)}"


def test_no_secret_is_committed() -> None:
    text = COMPOSE.read_text()
    for key in (
        "REDIS_PASSWORD",
        "MINIO_ROOT_PASSWORD",
        "FLOWER_PASSWORD",
        "FLOWER_BASIC_AUTH",
        "PUPYL_API_TOKENS",
        "PUPYL_FLOWER_PASSWORD",
        "PUPYL_S3_SECRET_KEY",
    ):
        for line in text.splitlines():
            if line.strip().startswith(f"{key}:"):
                assert "${" in line, line  # always from the environment / .env
    for line in (ROOT / ".env.example").read_text().splitlines():
        if re.match(r"^(REDIS_PASSWORD|MINIO_ROOT_PASSWORD|FLOWER_PASSWORD|PUPYL_API_TOKENS)=", line):
            assert line.split("=", 1)[1].startswith("set-"), line
    assert not (ROOT / ".env").exists() or ".env" in (ROOT / ".gitignore").read_text()


def test_dockerfile_builds_both_flavours_as_non_root() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "ARG FLAVOR=cpu" in text and '".[${FLAVOR}]"' in text
    assert re.search(r"^USER pupyl$", text, re.M)


def test_readme_links_the_compose_quick_start() -> None:
    assert "docker compose" in (ROOT / "README.md").read_text()
    assert Path(ROOT / "deploy" / "README.md").is_file()


def test_compose_redis_takes_its_password_from_stdin_not_argv(tmp_path: Path) -> None:
    """The compose command itself, run with a real redis-server: auth is required, argv shows no password."""
    password = "compose-redis-secret-7f3a"
    command = compose()["services"]["redis"]["command"]
    assert command[:2] == ["sh", "-c"]
    port = free_port()
    script = (
        command[2].replace("$$", "$").replace("redis-server -", f"{redis_server_binary()} - --port {port}")
    )
    proc = subprocess.Popen(
        ["sh", "-c", script], cwd=tmp_path, env={**os.environ, "REDIS_PASSWORD": password}
    )
    try:
        client = redis.Redis(port=port, password=password)
        deadline = time.monotonic() + 20
        while True:
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        assert client.config_get("appendonly")["appendonly"] == "yes"
        argvs = [
            p.cmdline()
            for p in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
        ]
        assert any("redis-server" in " ".join(argv) for argv in argvs)
        assert not any(password in " ".join(argv) for argv in argvs)
    finally:  # the shell and redis-server under it (a pipeline's exec replaces a subshell, not sh)
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for member in family:
            member.terminate()
        _, alive = psutil.wait_procs(family, timeout=10)
        for member in alive:
            member.kill()
