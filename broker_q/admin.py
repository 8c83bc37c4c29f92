"""``broker-q tokens`` and ``broker-q tenants``: who may act, and what each tenant may put in the queue.

``tokens create`` prints the token once: only the hash of its secret is stored, so a lost token
cannot be shown again, only revoked and replaced.
"""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from broker_q.domain.access import Role, TokenInfo
from broker_q.domain.tenants import Quota, TenantInfo
from broker_q.errors import ValidationError

__all__ = ["add_commands"]

Command = Callable[[argparse.Namespace], int]


def add_commands(commands: Any) -> None:
    tokens = commands.add_parser("tokens", help="API tokens: create, list, revoke",
                                 description="API tokens: create, list, revoke")
    tokens_commands = tokens.add_subparsers(required=True, metavar="ACTION")

    def command(parent: Any, name: str, fn: Command, help: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        sub.set_defaults(command=fn)
        return sub

    sub = command(tokens_commands, "create", _create_token, "make a token; it is printed once, store it safely")
    sub.add_argument("--name", required=True, help="who or what will hold it")
    sub.add_argument("--role", action="append", required=True, choices=[str(r) for r in Role],
                     help="a role (repeat for several)")
    sub.add_argument("--tenant", help="the one tenant it may act on (default: every tenant; admins only)")
    sub.add_argument("--expires-in", type=_duration, metavar="DURATION",
                     help="e.g. 30d, 12h, 90m (default: never)")
    sub.add_argument("--json", action="store_true")
    sub = command(tokens_commands, "list", _list_tokens, "every token: id, name, roles, tenant, state")
    sub.add_argument("--json", action="store_true")
    sub = command(tokens_commands, "revoke", _revoke_token, "stop a token from authenticating anyone")
    sub.add_argument("id", help="the token's id (from `tokens list`)")
    sub.add_argument("--reason", default="revoked by an operator")

    tenants = commands.add_parser("tenants", help="tenants and their quotas",
                                  description="tenants and their quotas")
    tenants_commands = tenants.add_subparsers(required=True, metavar="ACTION")
    sub = command(tenants_commands, "create", _create_tenant, "create a tenant")
    sub.add_argument("tenant", metavar="NAME")
    sub.add_argument("--description", default="")
    sub = command(tenants_commands, "list", _list_tenants, "every tenant created or given a quota, with its quotas")
    sub.add_argument("--json", action="store_true")
    sub = command(tenants_commands, "quota", _quota, "show a tenant's quotas, or change those given ('none': no limit)")
    sub.add_argument("tenant", metavar="NAME")
    for flag, kind, metavar, text in (("--max-waiting", int, "N", "tasks waiting at most"),
                                      ("--submit-rate", float, "PER_SECOND", "submissions a second"),
                                      ("--submit-burst", int, "N", "submissions at once above the rate"),
                                      ("--max-payload-bytes", int, "BYTES", "size of a task's arguments")):
        sub.add_argument(flag, type=_limit(kind), metavar=metavar, default=_NOT_GIVEN, help=text)
    sub.add_argument("--clear", action="store_true", help="remove every quota not given here")
    sub.add_argument("--json", action="store_true")


_NOT_GIVEN: Any = object()


def _limit(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number (or 'none')") from None

    return parse


def _duration(text: str) -> timedelta:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value, unit = float(text[:-1]), units[text[-1]]
    except (ValueError, KeyError, IndexError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30d, 12h, 90m or 45s") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration")
    return timedelta(seconds=value * unit)


def _create_token(options: argparse.Namespace) -> int:
    from broker_q.cli import _app, actor_of

    expires_at = None if options.expires_in is None else datetime.now(UTC) + options.expires_in
    token, info = _app(options).access.create_token(name=options.name, roles=options.role, tenant=options.tenant,
                                                    expires_at=expires_at, actor=actor_of(options))
    if options.json:
        print(json.dumps({"token": token, **_token_json(info)}, indent=2))
    else:
        print(token)
        print(f"# token {info.token_id} for {info.name}: shown once, only its hash is stored", flush=True)
    return 0


def _list_tokens(options: argparse.Namespace) -> int:
    from broker_q.cli import _app

    now = datetime.now(UTC)
    tokens = _app(options).access.tokens()
    if options.json:
        print(json.dumps([_token_json(t) for t in tokens], indent=2))
        return 0
    for t in tokens:
        state = "revoked" if t.revoked_at else "expired" if not t.active(now) else "active"
        expires = t.expires_at.isoformat(timespec="seconds") if t.expires_at else "never"
        print(f"{t.token_id}  {state:<8} {t.name:<24} {','.join(sorted(t.roles)):<24} "
              f"tenant={t.tenant or '*'}  expires={expires}")
    return 0


def _revoke_token(options: argparse.Namespace) -> int:
    from broker_q.cli import _app, actor_of

    try:
        token_id = uuid.UUID(options.id)
    except ValueError:
        raise ValidationError(f"{options.id!r} is not a token id (see `broker-q tokens list`)") from None
    info = _app(options).access.revoke(token_id, actor=actor_of(options), reason=options.reason)
    print(f"token {info.token_id} ({info.name}) revoked")
    return 0


def _token_json(info: TokenInfo) -> dict[str, Any]:
    return {"id": str(info.token_id), "name": info.name, "roles": sorted(info.roles), "tenant": info.tenant,
            "created_at": info.created_at.isoformat(), "created_by": info.created_by,
            "expires_at": info.expires_at.isoformat() if info.expires_at else None,
            "revoked_at": info.revoked_at.isoformat() if info.revoked_at else None}


def _create_tenant(options: argparse.Namespace) -> int:
    from broker_q.cli import _app, actor_of

    info = _app(options).tenants.create(options.tenant, description=options.description, actor=actor_of(options))
    print(f"tenant {info.name} created")
    return 0


def _list_tenants(options: argparse.Namespace) -> int:
    from broker_q.cli import _app

    tenants = _app(options).tenants.list()
    if options.json:
        print(json.dumps([_tenant_json(t) for t in tenants], indent=2))
        return 0
    for t in tenants:
        print(f"{t.name:<24} {_quota_text(t.quota)}")
    return 0


def _quota(options: argparse.Namespace) -> int:
    from broker_q.cli import _app, actor_of

    tenants = _app(options).tenants
    changes = {name: getattr(options, name) for name in Quota().as_dict() if getattr(options, name) is not _NOT_GIVEN}
    if changes or options.clear:
        quota = tenants.set_quota(options.tenant, actor=actor_of(options), clear=options.clear, **changes)
    else:
        quota = tenants.quota(options.tenant)
    print(json.dumps(quota.as_dict(), indent=2) if options.json else f"{options.tenant}: {_quota_text(quota)}")
    return 0


def _tenant_json(info: TenantInfo) -> dict[str, Any]:
    return {"name": info.name, "created_at": info.created_at.isoformat() if info.created_at else None,
            "description": info.description, "quota": info.quota.as_dict()}


def _quota_text(quota: Quota) -> str:
    given = [f"{name}={value:g}" for name, value in quota.as_dict().items() if value is not None]
    return ", ".join(given) or "no quota"
