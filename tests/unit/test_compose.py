"""docker-compose.yml stays runnable: its services, URLs, dependencies and commands are checked here,
since the file cannot be run in CI (no Docker engine there)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker_q.cli import _parser

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
STORE_URL_PREFIX = "postgresql://"
STORE_HOST = "@postgres:5432/"
AMQP_URL = "amqp://guest:guest@rabbitmq:5672/"


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def broker_q_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services that run the image built from this repository."""
    return {name: service for name, service in services.items() if "build" in service}


def command_words(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(word) for word in command]


def test_the_services_are_the_broker_and_the_store_and_the_broker_q_processes(
    services: dict[str, dict[str, Any]],
) -> None:
    assert set(services) == {"rabbitmq", "postgres", "relay", "worker", "scheduler", "projections", "api"}
    assert set(broker_q_services(services)) == {"relay", "worker", "scheduler", "projections", "api"}
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.13-management")
    assert services["postgres"]["image"].startswith("postgres:16")
    for name in ("rabbitmq", "postgres"):
        assert "healthcheck" in services[name], f"{name} needs a healthcheck for depends_on to wait on"


def test_every_broker_q_service_uses_the_postgres_store_and_the_rabbitmq_broker(
    services: dict[str, dict[str, Any]],
) -> None:
    postgres_env = services["postgres"]["environment"]
    for name, service in broker_q_services(services).items():
        environment = service["environment"]
        store = environment["BROKER_Q_STORE"]
        credentials = f"{postgres_env['POSTGRES_USER']}:{postgres_env['POSTGRES_PASSWORD']}@"
        assert store.startswith(STORE_URL_PREFIX), f"{name}: {store}"
        assert STORE_HOST in store, f"{name}: {store}"
        assert store.endswith(f"/{postgres_env['POSTGRES_DB']}"), f"{name}: {store}"
        assert credentials in store, f"{name}: {store}"
        assert environment["BROKER_Q_AMQP_URL"] == AMQP_URL, name


def test_depends_on_names_existing_services_and_waits_for_them_to_be_healthy(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on must name a condition per service"
        for dependency, options in depends_on.items():
            assert dependency in services, f"{name} depends on {dependency!r}, which is not a service"
            assert dependency != name
            assert options == {"condition": "service_healthy"}, f"{name} -> {dependency}: {options}"
    for name in broker_q_services(services):
        assert set(services[name]["depends_on"]) == {"rabbitmq", "postgres"}, name


def test_every_broker_q_command_is_one_the_cli_accepts(services: dict[str, dict[str, Any]]) -> None:
    parser = _parser()
    for name, service in broker_q_services(services).items():
        program, *argv = command_words(service)
        assert program == "broker-q", f"{name}: {service['command']!r} does not run broker-q"
        try:
            options = parser.parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{name}: broker-q refuses {shlex.join(argv)!r} (exit {e.code})")
        assert callable(options.command), name
