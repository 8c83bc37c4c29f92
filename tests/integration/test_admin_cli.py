"""``broker-q tokens|tenants`` and the permission check of every command, in a subprocess on an SQLite file."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker_q import App
from broker_q.cli import PERMISSIONS, _parser
from broker_q.domain.events import AccessDenied, QuotaExceeded

ROOT = Path(__file__).resolve().parents[2]


def cli(url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_Q_")}
    return subprocess.run([sys.executable, "-m", "broker_q.cli", "--store", url, *args], cwd=ROOT,
                          env={**environment, "PYTHONPATH": str(ROOT), **(env or {})}, capture_output=True,
                          text=True, timeout=60, check=False)


def ok(url: str, *args: str, env: dict[str, str] | None = None) -> str:
    done = cli(url, *args, env=env)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    return done.stdout


def refused(url: str, *args: str, env: dict[str, str] | None = None) -> str:
    done = cli(url, *args, env=env)
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr
    return done.stderr


def paths(parser: argparse.ArgumentParser) -> list[str]:
    """Every command's path, as the CLI names it for its permission check (groups that run a command too)."""
    found = [parser.get_default("path")] if parser.get_default("path") else []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += paths(sub)
    return found


def test_every_command_has_a_permission_decided() -> None:
    commands = paths(_parser())
    assert len(commands) > 30
    assert {"schedules", "schedules list", "dlq replay", "submit"} <= set(commands)
    assert sorted(set(commands) - PERMISSIONS.keys()) == []


def test_tokens_are_made_listed_and_revoked_and_a_role_is_held_to_its_permissions(sqlite_url: str) -> None:
    app = App(store=sqlite_url)
    acme = app.submit("anything", [1], tenant="acme").id
    globex = app.submit("anything", [2], tenant="globex").id
    token = ok(sqlite_url, "tokens", "create", "--name", "dash", "--role", "viewer", "--tenant", "acme").splitlines()[0]
    assert token.startswith("bq_")
    listed = ok(sqlite_url, "tokens", "list")
    assert "dash" in listed
    assert "active" in listed
    assert token not in listed
    as_viewer = {"BROKER_Q_TOKEN": token}
    assert "ready" in ok(sqlite_url, "status", str(acme), env=as_viewer)
    assert "may not cancel" in refused(sqlite_url, "cancel", str(acme), env=as_viewer)
    assert "bound to tenant 'acme'" in refused(sqlite_url, "status", str(globex), env=as_viewer)
    assert "needs the tokens permission" in refused(sqlite_url, "--token", token, "tokens", "list")
    token_id = listed.split()[0]
    ok(sqlite_url, "tokens", "revoke", token_id)
    assert "revoked" in refused(sqlite_url, "status", str(acme), env=as_viewer)
    denials = [r.event for r in app.store.read_log(0, 1000) if isinstance(r.event, AccessDenied)]
    assert [(d.permission, d.tenant) for d in denials] == [("cancel", "acme"), ("read", "globex"), ("tokens", "acme")]
    app.close()


def test_a_deployment_can_require_a_token_for_every_command(sqlite_url: str) -> None:
    stderr = refused(sqlite_url, "tenants", "list", env={"BROKER_Q_REQUIRE_TOKEN": "1"})
    assert "requires a token" in stderr
    assert "unknown token" in refused(sqlite_url, "--token", "bq_" + "0" * 32 + "_" + "A" * 43, "tenants", "list")


def test_a_quota_set_from_the_cli_refuses_a_submission_from_the_cli(sqlite_url: str) -> None:
    ok(sqlite_url, "tenants", "create", "acme", "--description", "ACME")
    assert "max_payload_bytes=20" in ok(sqlite_url, "tenants", "quota", "acme", "--max-payload-bytes", "20")
    assert "max_payload_bytes=20" in ok(sqlite_url, "tenants", "list")
    stderr = refused(sqlite_url, "submit", "anything", "--tenant", "acme", "--args", '["' + "x" * 30 + '"]')
    assert "over tenant 'acme''s quota max_payload_bytes=20" in stderr
    ok(sqlite_url, "submit", "anything", "--tenant", "acme", "--args", '["small"]')
    assert "no quota" in ok(sqlite_url, "tenants", "quota", "acme", "--max-payload-bytes", "none")
    app = App(store=sqlite_url)
    assert [e.event.quota for e in app.store.read_log(0, 100) if isinstance(e.event, QuotaExceeded)] == [
        "max_payload_bytes"]
    app.close()


@pytest.mark.parametrize("command", [["tokens", "create", "--name", "x", "--role", "viewer", "--expires-in", "0d"],
                                     ["tenants", "quota", "acme", "--submit-rate", "fast"]])
def test_bad_input_is_one_line_and_no_traceback(sqlite_url: str, command: list[str]) -> None:
    done = cli(sqlite_url, *command)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
