"""``broker-q api`` as an operator runs it: a process serving HTTP on a port, a token made with
``broker-q tokens create``, a task submitted with a plain HTTP client; SIGTERM stops it cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_it_answers(client: httpx.Client, server: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while server.poll() is None:
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"the API did not answer within {timeout}s")
        time.sleep(0.1)
    raise AssertionError(f"the API exited with {server.returncode}: {server.communicate()[0]}")


def test_the_api_command_serves_the_api_on_a_port(sqlite_url: str, amqp_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BROKER_Q_STORE": sqlite_url, "BROKER_Q_AMQP_URL": amqp_url}
    made = subprocess.run([sys.executable, "-m", "broker_q.cli", "tokens", "create", "--name", "ops", "--role",
                           "producer", "--role", "viewer", "--tenant", "acme", "--json"],
                          env=env, capture_output=True, text=True, timeout=60, check=True)
    token = json.loads(made.stdout)["token"]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "broker_q.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            wait_until_it_answers(client, server)
            headers = {"Authorization": f"Bearer {token}"}
            submitted = client.post("/v1/tasks", headers=headers, json={"task": "add", "args": [1, 2]})
            assert submitted.status_code == 201, submitted.text
            assert submitted.json()["tenant"] == "acme"
            read = client.get(f"/v1/tasks/{submitted.json()['id']}", headers=headers)
            assert (read.status_code, read.json()["state"]) == (200, "ready")
            assert client.get("/readyz").json()["status"] == "ready"
            assert client.get("/v1/queues").status_code == 401
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
    assert server.returncode == 0, output
    assert "Application shutdown complete" in output
