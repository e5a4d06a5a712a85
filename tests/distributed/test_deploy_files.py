"""Dockerfile and docker-compose.yml describe the layout the distributed tests run: the same
commands, settings the settings class knows, healthchecks, no secrets. (No Docker needed.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from app.config import Settings
from app.jobs.celery_queue import WORKER_ALIVE_FILE, WORKER_COMMAND

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[2]
API_COMMAND = ["uvicorn", "app.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]
SETTING_ENV_NAMES = {f"MONOQUANT_{name.upper()}" for name in Settings.model_fields}
APP_SERVICES = ("api", "worker", "worker-gpu")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, heredoc bodies skipped."""
    instructions: list[tuple[str, str]] = []
    lines = iter((REPO / "Dockerfile").read_text().splitlines())
    for line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        while stripped.endswith("\\"):
            stripped = stripped[:-1] + " " + next(lines).strip()
        keyword, _, arguments = stripped.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        heredoc = re.search(r"<<-?'?(\w+)'?", arguments)
        if heredoc:
            for body in lines:
                if body.strip() == heredoc.group(1):
                    break
    return instructions


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def test_compose_has_the_services_and_shared_volume(compose: dict) -> None:
    services = compose["services"]
    assert {"api", "worker", "redis", "postgres"} <= set(services)
    assert services["api"]["command"] == API_COMMAND
    for name in ("worker", "worker-gpu"):
        assert services[name]["command"] == list(WORKER_COMMAND)
        # scalable with --scale worker=N: no fixed name, no published port
        assert "container_name" not in services[name] and "ports" not in services[name]
    volumes = {name: services[name]["volumes"] for name in APP_SERVICES}
    assert all("monoquant-data:/data" in mounts for mounts in volumes.values())
    assert "monoquant-data" in compose["volumes"]
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    assert "whl/cu" in services["worker-gpu"]["build"]["args"]["TORCH_INDEX_URL"]
    assert services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_compose_settings_are_settings_fields(compose: dict) -> None:
    for name in APP_SERVICES:
        env = _env(compose["services"][name])
        unknown = {key for key in env if key.startswith("MONOQUANT_")} - SETTING_ENV_NAMES
        assert not unknown, f"{name}: {sorted(unknown)} are not fields of app.config.Settings"
        assert env["MONOQUANT_QUEUE"] == "celery"
        assert env["MONOQUANT_BROKER_URL"].startswith("redis://redis:6379/")
        assert env["MONOQUANT_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["MONOQUANT_DATA_DIR"] == "/data"
    # API and workers must agree on everything (same store, broker, data, limits)
    api = compose["services"]["api"]
    assert _env(api) == _env(compose["services"]["worker"])
    # and the values are valid settings (variables substituted by their defaults)
    substituted = {key: re.sub(r"\$\{\w+:?[-?]([^}]*)\}", r"\1", value) for key, value in _env(api).items()}
    values = {key.removeprefix("MONOQUANT_").lower(): value for key, value in substituted.items() if value}
    settings = Settings(**values)
    assert settings.queue == "celery"


def test_distributed_tests_use_the_compose_settings(compose: dict) -> None:
    conftest = (REPO / "tests" / "distributed" / "conftest.py").read_text()
    used = set(re.findall(r'"(MONOQUANT_[A-Z_]+)"', conftest))
    assert used <= SETTING_ENV_NAMES
    assert {"MONOQUANT_QUEUE", "MONOQUANT_BROKER_URL", "MONOQUANT_DATABASE_URL", "MONOQUANT_DATA_DIR"} <= used
    assert used - {"MONOQUANT_JOB_TIMEOUT_S"} <= set(_env(compose["services"]["worker"]))
    assert "WORKER_COMMAND" in conftest and '"app.main:create_app", "--factory"' in conftest


def test_compose_healthchecks_and_startup_order(compose: dict) -> None:
    services = compose["services"]
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
    for name in APP_SERVICES:
        depends = services[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["postgres"]["condition"] == "service_healthy"
    for name in ("worker", "worker-gpu"):
        assert services[name]["depends_on"]["api"]["condition"] == "service_healthy"
        assert str(WORKER_ALIVE_FILE) in " ".join(services[name]["healthcheck"]["test"])
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])


def test_compose_bakes_in_no_secret(compose: dict) -> None:
    password = compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD:\?[^}]*\}", password)
    assert "${POSTGRES_PASSWORD:?" in _env(compose["services"]["api"])["MONOQUANT_DATABASE_URL"]
    assert _env(compose["services"]["api"])["MONOQUANT_API_KEYS"] == "${MONOQUANT_API_KEYS:-}"
    text = (REPO / "docker-compose.yml").read_text()
    assert not re.search(r"(?i)(password|secret|token)\s*[:=]\s*[\"']?[A-Za-z0-9]{6,}", text)


def test_dockerfile_layout(dockerfile: list[tuple[str, str]]) -> None:
    keywords = [keyword for keyword, _ in dockerfile]
    stages = [arguments for keyword, arguments in dockerfile if keyword == "FROM"]
    assert len(stages) >= 2 and any(" AS build" in stage for stage in stages)
    final = len(keywords) - keywords[::-1].index("FROM")
    final_stage = dockerfile[final:]
    # CPU torch by default, the index a build argument (CUDA builds)
    args = dict(arguments.split("=", 1) for keyword, arguments in dockerfile if keyword == "ARG" and "=" in arguments)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["TORCH_VERSION"] == "2.13.0"
    runs = [arguments for keyword, arguments in dockerfile if keyword == "RUN"]
    assert any('"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in run for run in runs)
    # dependencies are installed before the code is copied
    position = {entry: index for index, entry in enumerate(dockerfile)}
    code_copies = [entry for entry in dockerfile if entry[0] == "COPY" and re.search(r"\b(app|mono_quant)\b", entry[1])]
    deps_install = next(entry for entry in dockerfile if entry[0] == "RUN" and "python - <<" in entry[1])
    pyproject_copy = next(entry for entry in dockerfile if entry[0] == "COPY" and "pyproject.toml" in entry[1])
    assert code_copies and position[pyproject_copy] < position[deps_install] < min(map(position.get, code_copies))
    # the runtime stage: non-root, a healthcheck, the API command as in docker-compose.yml
    users = [arguments for keyword, arguments in final_stage if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(keyword == "HEALTHCHECK" for keyword, _ in final_stage)
    [cmd] = [arguments for keyword, arguments in final_stage if keyword == "CMD"]
    assert json.loads(cmd) == API_COMMAND  # exec form, as docker-compose.yml
    envs = " ".join(arguments for keyword, arguments in dockerfile if keyword == "ENV")
    assert set(re.findall(r"\b(MONOQUANT_[A-Z_]+)=", envs)) <= SETTING_ENV_NAMES


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in lines and {"!app/", "!mono_quant/", "!pyproject.toml", "!README.md"} <= set(lines)
