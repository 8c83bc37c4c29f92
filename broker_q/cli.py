"""The ``broker-q`` command. Errors are one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from broker_q.amqp.topology import Topology
from broker_q.app import App, _as_uuid
from broker_q.codec import loads
from broker_q.domain.access import Permission, Principal
from broker_q.domain.retry import RetryOverride
from broker_q.errors import BrokerQError, ConfigurationError, TaskFailed, Unauthenticated, ValidationError
from broker_q.payloads import Payloads
from broker_q.relay import Relay
from broker_q.rendering import history_row, status_view
from broker_q.scheduler import Scheduler
from broker_q.settings import MAX_WORK_BATCH
from broker_q.worker import Worker

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_TASK_FAILED = 3


def main(argv: Sequence[str] | None = None) -> int:
    return execute(_parser().parse_args(argv))


PERMISSIONS: dict[str, Permission | None] = {
    # Processes of the deployment: they hold the store's credentials themselves.
    "worker": None, "run": None, "relay": None, "scheduler": None, "projections run": None, "api": None,
    "submit": Permission.SUBMIT,
    "status": Permission.READ, "history": Permission.READ, "events": Permission.READ, "replay": Permission.READ,
    "state": Permission.READ, "queues": Permission.READ, "tasks": Permission.READ, "dlq list": Permission.READ,
    "schedules": Permission.READ, "breakers": Permission.READ,
    "projections status": Permission.READ, "breakers timeline": Permission.READ, "schedules list": Permission.READ,
    "schedules next": Permission.READ, "schedules history": Permission.READ, "workflow": Permission.READ,
    "cancel": Permission.CANCEL,
    "dlq replay": Permission.REPLAY,
    "audit": Permission.AUDIT,
    "schedules add": Permission.SCHEDULES, "schedules pause": Permission.SCHEDULES,
    "schedules resume": Permission.SCHEDULES, "schedules remove": Permission.SCHEDULES,
    "breakers open": Permission.SCHEDULES, "breakers close": Permission.SCHEDULES,
    "projections rebuild": Permission.VIEWS,
    "tokens create": Permission.TOKENS, "tokens list": Permission.TOKENS, "tokens revoke": Permission.TOKENS,
    "tenants create": Permission.TENANTS, "tenants list": Permission.TENANTS, "tenants quota": Permission.TENANTS,
    "keys list": Permission.KEYS, "keys rotate": Permission.KEYS, "keys shred": Permission.KEYS,
}
"""The permission each command needs (``None``: none, it runs a process of the deployment). A
command with ``--tenant`` needs it on that tenant; one on a task, on the task's tenant as well."""


def execute(options: argparse.Namespace) -> int:
    """Run the command chosen on the command line; a broker_q error is one line and an exit code."""
    try:
        _authorize(options)
        result: int = options.command(options)
        return result
    except BrokerQError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_TASK_FAILED if isinstance(e, TaskFailed) else EXIT_ERROR
    except TimeoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _authorize(options: argparse.Namespace) -> None:
    """Who runs this command, and whether they may: with a token (``--token`` or ``$BROKER_Q_TOKEN``),
    its principal; without one, the local operator, an admin (whoever can open the store's files
    can read them anyway), unless ``BROKER_Q_REQUIRE_TOKEN`` is set. A refusal is audited."""
    if options.path not in PERMISSIONS:  # refuse, rather than run a command nobody decided about
        raise ConfigurationError(f"the command {options.path!r} has no permission in broker_q.cli.PERMISSIONS")
    permission = PERMISSIONS[options.path]
    if permission is None:
        return
    app = _app(options)
    token = getattr(options, "token", None) or os.environ.get("BROKER_Q_TOKEN")
    if token:
        principal = app.access.authenticate(token)
    elif app.settings.require_token:
        raise Unauthenticated("this deployment requires a token: give --token or set BROKER_Q_TOKEN")
    else:
        principal = Principal.local(operator())
    tenant = app.access.authorize(principal, permission, getattr(options, "tenant", None), action=options.path)
    if hasattr(options, "tenant"):
        options.tenant = tenant  # a principal of one tenant sees that tenant only
    options.principal = principal


def authorize_task(options: argparse.Namespace, permission: Permission, tenant: str, action: str) -> None:
    """Check the command's principal on the tenant of the task it acts on (audited if refused)."""
    principal: Principal | None = getattr(options, "principal", None)
    if principal is not None:
        _app(options).access.authorize(principal, permission, tenant, action=action)


def payloads_for(options: argparse.Namespace, tenant: str,
                 payloads: Payloads) -> tuple[Payloads | None, str | None]:
    """``payloads`` if the command's principal may see the opened arguments and results of ``tenant``'s
    tasks (the ``read_payloads`` permission), else None and why. Without it the task is still shown,
    its payloads sealed: the command itself was allowed, so this is not a refusal."""
    principal: Principal | None = getattr(options, "principal", None)
    if principal is not None and not principal.can(Permission.READ_PAYLOADS, tenant):
        return None, f"{principal.describe()} lacks the {Permission.READ_PAYLOADS} permission"
    return payloads, None


def actor_of(options: argparse.Namespace) -> str:
    """The actor recorded for what the command does: its principal (with a token), else the operator."""
    principal: Principal | None = getattr(options, "principal", None)
    return principal.name if principal is not None and principal.token_id is not None else operator()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker-q", description="broker_q: an event-sourced task queue on RabbitMQ")
    parser.add_argument("--store", help="event store URL (default: $BROKER_Q_STORE or sqlite:///broker_q.sqlite)")
    parser.add_argument("--amqp-url", help="RabbitMQ URL (default: $BROKER_Q_AMQP_URL or the local server)")
    parser.add_argument("--token", help="an API token to act as (default: $BROKER_Q_TOKEN; none: the local operator)")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(command=fn)
        return sub

    for name, fn, text in (
        ("worker", _worker, "consume queues and run the app's task handlers"),
        ("run", _run, "run the relay, a worker and a scheduler in one process: the main job"),
    ):
        sub = command(name, fn, text)
        sub.add_argument("app", metavar="MODULE:APP", help="where the App is, e.g. myproject.tasks:app")
        sub.add_argument("--queues", help="comma-separated queues (default: the queues of the app's tasks)")
        sub.add_argument("--concurrency", type=_positive_int, help="handlers running at once")
        sub.add_argument("--prefetch", type=_positive_int,
                         help="messages held unacked (default 2 x concurrency); a work batch is one message")
        sub.add_argument("-v", "--verbose", action="store_true")
        if name == "run":
            _work_batch_option(sub)
            sub.add_argument("--no-projections", action="store_true", help="do not keep the views up to date here")
            sub.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")

    sub = command("relay", _relay, "publish recorded events and ready tasks to RabbitMQ")
    _work_batch_option(sub)
    sub.add_argument("-v", "--verbose", action="store_true")

    sub = command("submit", _submit, "record a new task and print its id")
    sub.add_argument("task", metavar="NAME")
    sub.add_argument("--args", default="[]", help="positional arguments as a JSON array")
    sub.add_argument("--kwargs", default="{}", help="keyword arguments as a JSON object")
    sub.add_argument("--queue")
    sub.add_argument("--priority", type=int)
    sub.add_argument("--idempotency-key")
    sub.add_argument("--tenant", help="the tenant the task belongs to (default: $BROKER_Q_TENANT or default)")
    sub.add_argument("--max-attempts", type=_positive_int, help="attempts in all, overriding the task's own")
    sub.add_argument("--time-limit", type=float, help="hard time limit in seconds, overriding the task's own")
    sub.add_argument("--soft-time-limit", type=float, help="soft time limit in seconds, overriding the task's own")
    sub.add_argument("--retry-backoff", type=float, metavar="S", help="seconds before the first retry")
    sub.add_argument("--retry-backoff-max", type=float, metavar="S", help="the longest wait between attempts")
    sub.add_argument("--retry-factor", type=float, metavar="F", help="each retry waits F times longer")
    sub.add_argument("--no-retry-jitter", action="store_const", const=False, dest="retry_jitter",
                     help="wait the full backoff, not a draw from half of it to all of it")
    sub.add_argument("--retry-on", action="append", metavar="NAME",
                     help="an error retried, by qualified class name, e.g. builtins.ConnectionError (repeat)")
    sub.add_argument("--dont-retry-on", action="append", metavar="NAME",
                     help="an error never retried, by qualified class name (repeat)")
    sub.add_argument("--eta", type=_aware_time, help="not before this time (ISO 8601 with a UTC offset)")
    sub.add_argument("--countdown", type=float, help="not before this many seconds from now")
    sub.add_argument("--depends-on", action="append", default=[], metavar="ID",
                     help="a task that must succeed first (repeat for several)")
    sub.add_argument("--wait", action="store_true", help="wait for the outcome and print the result as JSON")
    sub.add_argument("--timeout", type=float, default=60.0, help="seconds --wait waits (default 60)")

    sub = command("status", _status, "show a task's current state")
    sub.add_argument("id")
    sub.add_argument("--json", action="store_true")

    sub = command("history", _history, "show every event of a task, in order")
    sub.add_argument("id")
    sub.add_argument("--json", action="store_true")

    sub = command("cancel", _cancel, "cancel a task: it never starts, or its running attempt is stopped")
    sub.add_argument("id")
    sub.add_argument("--reason", default="cancelled by an operator", help="kept in the task's history")

    sub = command("api", _api, "serve the HTTP API (bearer tokens; OpenAPI at /openapi.json)")
    sub.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sub.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    sub.add_argument("--app", metavar="MODULE:APP", help="check submitted arguments against this App's tasks")
    sub.add_argument("--public-metrics", action="store_true", default=None,
                     help="serve /metrics without a token (default: $BROKER_Q_API_PUBLIC_METRICS or off)")

    from broker_q.admin import add_commands as add_admin_commands
    from broker_q.breakers import add_commands as add_breaker_commands
    from broker_q.keys import add_commands as add_key_commands
    from broker_q.schedules import add_commands as add_schedule_commands
    from broker_q.workflows import add_commands as add_workflow_commands
    from projections.cli import add_commands
    from projections.commands import add_view_commands

    add_commands(commands)
    add_view_commands(commands, _serve)
    add_breaker_commands(commands)
    add_schedule_commands(commands, _serve)
    add_workflow_commands(commands)
    add_key_commands(commands)
    add_admin_commands(commands)
    name_commands(parser)
    return parser


def name_commands(parser: argparse.ArgumentParser, path: Sequence[str] = ()) -> None:
    """Give every command its path (``dlq replay``) as ``options.path``: what :data:`PERMISSIONS` is keyed by."""
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if path and (not subcommands or parser.get_default("command") is not None):
        parser.set_defaults(path=" ".join(path))  # a command, or a group that runs one when given none
    for action in subcommands:
        for name, sub in action.choices.items():
            name_commands(sub, [*path, name])


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _app(options: argparse.Namespace, app: App | None = None) -> App:
    """The command's App: ``app`` configured from the options, or one made from them (once per command)."""
    overrides = {k: v for k in ("store", "amqp_url") if (v := getattr(options, k, None))}
    if app is None:
        made: App | None = getattr(options, "app_instance", None)
        if made is None:
            made = options.app_instance = App(**overrides)
        return made
    if overrides:
        app.configure(**overrides)
    return app


def load_app(reference: str) -> App:
    """The :class:`App` named by ``module:attribute``."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"{reference!r} is not MODULE:APP, e.g. myproject.tasks:app")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigurationError(f"cannot import {module_name!r}: {e}") from e
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        raise ConfigurationError(f"{reference!r} is not a broker_q App")
    return app


def _json_arg(text: str, kind: type, name: str) -> Any:
    try:
        value = loads(text)
    except ValidationError as e:
        raise ValidationError(f"{name} must be JSON: {e}") from e
    if not isinstance(value, kind):
        raise ValidationError(f"{name} must be a JSON {'array' if kind is list else 'object'}")
    return value


def _aware_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    if value.utcoffset() is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no UTC offset (write e.g. {text}+00:00)")
    return value


def _submit(options: argparse.Namespace) -> int:
    app = _app(options)
    args = _json_arg(options.args, list, "--args")
    kwargs = _json_arg(options.kwargs, dict, "--kwargs")
    # Each --retry-* option replaces that one field of the task's retry policy, for this task.
    retry = RetryOverride(backoff=options.retry_backoff, backoff_max=options.retry_backoff_max,
                          factor=options.retry_factor, jitter=options.retry_jitter,
                          retry_on=None if options.retry_on is None else tuple(options.retry_on),
                          dont_retry_on=None if options.dont_retry_on is None else tuple(options.dont_retry_on))
    handle = app.submit(options.task, args, kwargs, queue=options.queue, priority=options.priority,
                        tenant=options.tenant,
                        idempotency_key=options.idempotency_key, max_attempts=options.max_attempts,
                        time_limit=options.time_limit, soft_time_limit=options.soft_time_limit,
                        eta=options.eta, countdown=options.countdown, depends_on=options.depends_on,
                        retry=retry if retry.to_json() else None)
    print(handle.id, flush=True)
    if options.wait:
        print(json.dumps(handle.wait(timeout=options.timeout)))
    return 0


def _status(options: argparse.Namespace) -> int:
    app = _app(options)
    state = app.get_task(_as_uuid(options.id))
    authorize_task(options, Permission.READ, state.tenant, f"status {state.task_id}")
    payloads, withheld = payloads_for(options, state.tenant, app.payloads)
    view = status_view(state, payloads, withheld=withheld)
    if options.json:
        print(json.dumps(view, indent=2))
    else:
        for key, value in view.items():
            if value is not None:
                print(f"{key:>12}: {value if not isinstance(value, (list, dict)) else json.dumps(value)}")
    return 0


def _history(options: argparse.Namespace) -> int:
    events = _app(options).history(_as_uuid(options.id))
    authorize_task(options, Permission.READ, events[0].tenant, f"history {events[0].stream_id}")
    rows = [history_row(e) for e in events]
    if options.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        details = ", ".join(f"{k}={json.dumps(v)}" for k, v in row["data"].items() if v not in (None, [], {}))
        print(f"{row['time']}  v{row['version']:<3} {row['type']:<10} {row['actor']:<40} {details}")
    return 0


def _cancel(options: argparse.Namespace) -> int:
    app = _app(options)
    task_id = _as_uuid(options.id)
    authorize_task(options, Permission.CANCEL, app.get_task(task_id).tenant, f"cancel {task_id}")
    state = app.cancel(task_id, reason=options.reason, actor=actor_of(options))
    print(f"{state.task_id} cancelled at v{state.version}: {state.cancel_reason}")
    return 0


def _api(options: argparse.Namespace) -> int:
    from broker_q.api import serve

    app = _app(options, load_app(options.app) if options.app else None)
    serve(app, host=options.host, port=options.port, public_metrics=options.public_metrics)
    return 0


def operator() -> str:
    """The actor of a command typed by a person: ``operator:<user>@<host>``."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"operator:{user}@{socket.gethostname()}"


def _worker(options: argparse.Namespace) -> int:
    app = _app(options, load_app(options.app))
    return _serve(options, lambda stop: [_worker_for(app, options).run(stop)])


def _run(options: argparse.Namespace) -> int:
    app = _app(options, load_app(options.app))

    def components(stop: asyncio.Event) -> list[Any]:
        parts = [_relay_for(app, options).run(stop), _worker_for(app, options).run(stop),
                 Scheduler(app.store, payloads=app.payloads).run(stop)]
        if not options.no_projections:
            from projections.commands import run_projections

            parts.append(run_projections(app, stop, metrics_port=options.metrics_port))
        return parts

    print(f"broker_q: store {app.settings.store}, queues {options.queues or ','.join(app.queues)}", file=sys.stderr)
    return _serve(options, components)


def _relay(options: argparse.Namespace) -> int:
    app = _app(options)
    return _serve(options, lambda stop: [_relay_for(app, options).run(stop)])


def _work_batch(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_WORK_BATCH:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_WORK_BATCH}")
    return value


def _work_batch_option(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--work-batch", type=_work_batch, metavar="N",
        help="pack up to N ready tasks of one queue and priority into one work message (default: "
             "$BROKER_Q_WORK_BATCH or 1). Fewer AMQP messages per task, but a worker may then hold up to "
             "prefetch x N tasks: for short tasks only")


def _relay_for(app: App, options: argparse.Namespace) -> Relay:
    settings = app.settings
    work_batch = options.work_batch or settings.work_batch
    return Relay(app.store, settings.amqp_url, Topology(settings.namespace), page_size=settings.relay_page_size,
                 poll_interval=settings.relay_poll_interval, store_url=settings.store, work_batch=work_batch)


def _worker_for(app: App, options: argparse.Namespace) -> Worker:
    queues = [q.strip() for q in options.queues.split(",") if q.strip()] if options.queues else None
    return Worker(app, queues, concurrency=options.concurrency, prefetch=options.prefetch)


def _serve(options: argparse.Namespace, components: Callable[[asyncio.Event], list[Any]]) -> int:
    logging.basicConfig(level=logging.DEBUG if options.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("aiormq").setLevel(logging.WARNING)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tasks = [asyncio.create_task(c) for c in components(stop)]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                stop.set()
                with contextlib.suppress(Exception):
                    await asyncio.wait(tasks, timeout=10)
                raise task.exception()  # type: ignore[misc]
        await asyncio.gather(*tasks)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(serve())
    finally:
        _close(loop)
    return 0


def _close(loop: asyncio.AbstractEventLoop, grace: float = 5.0) -> None:
    """Close ``loop`` like ``asyncio.run`` does, but give up on tasks that ignore cancellation.

    An async handler that swallows every ``CancelledError`` was abandoned at its hard time limit
    (``broker_q.limits``); waiting for it here would keep the process from ever exiting.
    """
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        _, stuck = loop.run_until_complete(asyncio.wait(pending, timeout=grace))
        if stuck:
            logging.getLogger(__name__).warning("exiting with %d task(s) that ignored cancellation", len(stuck))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()


if __name__ == "__main__":
    sys.exit(main())
