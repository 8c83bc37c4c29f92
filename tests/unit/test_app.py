"""The application object on the in-memory store: registry, submit, idempotency, reads and settings."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pydantic
import pytest

from broker_q import App, Settings
from broker_q.domain import task as domain_task
from broker_q.domain.events import TaskSubmitted
from broker_q.domain.schedule import fire_key
from broker_q.domain.task import TaskState, TaskStatus
from broker_q.errors import (
    ConfigurationError,
    DomainError,
    SerializationError,
    StoreUnavailable,
    TaskNotFound,
    ValidationError,
)
from broker_q.payloads import reveal


@pytest.fixture
def app() -> Iterator[App]:
    app = App(store="memory://")
    yield app
    app.close()


def revealed(app: App, task_id: uuid.UUID) -> TaskState:
    """The task with its sealed arguments and result opened (encryption is on by default)."""
    return reveal(app.payloads, app.get_task(task_id))


def test_two_tasks_with_one_name_are_refused(app: App) -> None:
    @app.task(name="billing.charge")
    def charge(amount: int) -> int:
        return amount

    with pytest.raises(ConfigurationError, match=r"billing\.charge"):
        @app.task(name="billing.charge")
        def charge_again(amount: int) -> int:
            return amount

    assert app.tasks["billing.charge"].fn is charge.fn


def test_the_default_name_is_module_and_qualname(app: App) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    assert add.name == f"{__name__}.test_the_default_name_is_module_and_qualname.<locals>.add"
    assert app.tasks[add.name] is add


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((1,), {}), ((1, 2, 3), {}), ((1,), {"z": 2}), ((1, 2), {"x": 3}), ((), {})],
    ids=["missing", "too-many", "unknown-keyword", "twice", "none"],
)
def test_arguments_that_do_not_fit_the_handler_are_refused_naming_the_task(
    app: App, args: tuple[int, ...], kwargs: dict[str, int]
) -> None:
    @app.task(name="math.add")
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(ValidationError, match=r"math\.add"):
        app.submit("math.add", args, kwargs)
    assert app.store.max_position() == 0


def test_arguments_that_fit_are_recorded(app: App) -> None:
    @app.task(name="math.add", queue="maths", priority=7)
    def add(x: int, y: int = 0) -> int:
        return x + y

    handle = add.delay(1, y=2)
    state = revealed(app, handle.id)
    assert (state.task, state.queue, state.priority, state.args, state.kwargs) == ("math.add", "maths", 7, [1],
                                                                                   {"y": 2})


class Order(pydantic.BaseModel):
    sku: str
    quantity: int


@pytest.mark.parametrize(
    ("args", "kwargs", "wrong"),
    [(["s3cret", 1], {}, r"argument 'x' must be int"), ([1], {"y": "s3cret"}, r"argument 'y' must be int"),
     ([1.5, 2], {}, r"argument 'x' must be int"), ([None, 2], {}, r"argument 'x' must be int")],
    ids=["positional", "keyword", "fraction", "null"],
)
@pytest.mark.parametrize("how", ["submit", "submit_async"])
async def test_arguments_of_the_wrong_types_are_refused_naming_the_parameter_and_its_type(
    app: App, args: list[object], kwargs: dict[str, object], wrong: str, how: str
) -> None:
    calls: list[object] = []

    @app.task(name="math.add")
    def add(x: int, y: int) -> int:
        calls.append((x, y))
        return x + y

    async def submit() -> object:
        return app.submit("math.add", args, kwargs) if how == "submit" else await app.submit_async("math.add", args,
                                                                                                 kwargs)

    with pytest.raises(ValidationError, match=rf"math\.add.*{wrong}: Input should be a valid integer") as refused:
        await submit()
    assert "s3cret" not in str(refused.value)  # the value may be a secret: the reason names the parameter only
    assert app.store.max_position() == 0
    assert calls == []


def test_arguments_are_recorded_as_sent_and_validated_by_the_handler_s_type_hints(app: App) -> None:
    @app.task(name="ship")
    def ship(order: Order, when: datetime, count: int = 1, note=None) -> None:  # type: ignore[no-untyped-def]
        return None

    handle = app.submit("ship", [{"sku": "A-1", "quantity": "3"}, "2026-12-01T10:00:00Z"], {"count": "2",
                                                                                            "note": [1, {}]})
    state = revealed(app, handle.id)
    assert (state.args, state.kwargs) == ([{"sku": "A-1", "quantity": "3"}, "2026-12-01T10:00:00Z"],
                                          {"count": "2", "note": [1, {}]})
    # What the worker calls the handler with: the values as validated (the unannotated one unchanged).
    assert ship.parameters.values(state.args, state.kwargs) == (
        [Order(sku="A-1", quantity=3), datetime(2026, 12, 1, 10, tzinfo=UTC)], {"count": 2, "note": [1, {}]})
    with pytest.raises(ValidationError, match=r"argument 'order' at order\['quantity'\] must be .*Order"):
        app.submit("ship", [{"sku": "A-1", "quantity": "many"}, "2026-12-01T10:00:00Z"])
    with pytest.raises(ValidationError, match=r"argument 'when' must be datetime"):
        app.submit("ship", [{"sku": "A-1", "quantity": 1}, "next tuesday"])


def test_a_handler_without_annotations_takes_any_json_values(app: App) -> None:
    @app.task(name="echo")
    def echo(x, *rest, **options):  # type: ignore[no-untyped-def]
        return x

    handle = app.submit("echo", ["a", 1.5, None], {"k": {"nested": [True]}})
    assert revealed(app, handle.id).args == ["a", 1.5, None]
    assert echo.parameters.values(["a", 1.5], {"k": [1]}) == (["a", 1.5], {"k": [1]})


def test_variadic_parameters_are_validated_item_by_item(app: App) -> None:
    @app.task(name="total")
    def total(*amounts: int, **labels: str) -> int:
        return sum(amounts)

    assert total.parameters.values(["1", 2], {"a": "x"}) == ([1, 2], {"a": "x"})
    with pytest.raises(ValidationError, match=r"argument 'amounts' at amounts\[1\] must be int"):
        app.submit("total", [1, "two"])
    with pytest.raises(ValidationError, match=r"argument 'labels' at labels\['b'\] must be str"):
        app.submit("total", [1], {"b": 2})
    assert app.store.max_position() == 0


def test_a_task_that_receives_its_parents_results_is_checked_with_room_for_them_in_front(app: App) -> None:
    @app.task(name="scale")
    def scale(values: list[int], factor: int, *, label: str = "") -> list[int]:
        return [v * factor for v in values]

    @app.task(name="total")
    def total(*amounts: int) -> int:
        return sum(amounts)

    scale.check_arguments([3], {"label": "x"}, received=True)  # the results come first, as ``values``
    with pytest.raises(ValidationError, match="after the parents' results"):
        scale.check_arguments([[1], 3], {}, received=True)  # one argument too many once they are in front
    with pytest.raises(ValidationError, match="argument 'factor' must be int"):
        scale.check_arguments(["three"], {}, received=True)
    total.check_arguments([1, 2], {}, received=True)
    with pytest.raises(ValidationError, match=r"argument 'amounts' at amounts\[0\] must be int"):
        total.check_arguments(["x"], {}, received=True)  # the first of *amounts given, after the received one
    with pytest.raises(ValidationError):
        scale.check_arguments([3], {}, received=False)  # without them, 'factor' is missing


def test_a_replay_with_arguments_of_the_wrong_types_is_refused(app: App) -> None:
    @app.task(name="math.double")
    def double(x: int) -> int:
        return 2 * x

    handle = app.submit("math.double", [1])
    with pytest.raises(ValidationError, match=r"argument 'x' must be int"):
        app.replay_dead_letter(handle.id, reason="fixed", args=["two"])


def test_a_type_hint_pydantic_cannot_validate_is_refused_when_the_task_is_registered(app: App) -> None:
    with pytest.raises(ConfigurationError, match=r"bad\.hint.*type hints"):
        @app.task(name="bad.hint")
        def bad(event: threading.Event) -> None:
            return None


def test_a_type_hint_that_cannot_be_resolved_is_refused_on_first_use(app: App) -> None:
    @app.task(name="later")
    def later(thing: NotDefinedAnywhere) -> None:  # type: ignore[name-defined]  # noqa: F821
        return None

    with pytest.raises(ConfigurationError, match=r"later.*NotDefinedAnywhere"):
        app.submit("later", [1])
    assert app.store.max_position() == 0


@pytest.mark.parametrize("value", [object(), [1, object()], {"k": object()}], ids=["object", "in-list", "in-dict"])
def test_arguments_that_are_not_json_are_refused(app: App, value: object) -> None:
    with pytest.raises(SerializationError):
        app.submit("anything", [value])
    with pytest.raises(SerializationError):
        app.submit("anything", kwargs={"value": value})
    assert app.store.max_position() == 0


def test_a_datetime_argument_is_refused_rather_than_changed(app: App) -> None:
    with pytest.raises(SerializationError):
        app.submit("anything", [datetime(2024, 1, 1, tzinfo=UTC)])


@pytest.mark.parametrize("priority", [10, -1])
def test_a_priority_out_of_range_is_a_domain_error(app: App, priority: int) -> None:
    with pytest.raises(DomainError, match="priority"):
        app.submit("anything", priority=priority)
    assert app.store.max_position() == 0


def test_one_idempotency_key_twice_is_one_task_of_one_event(app: App) -> None:
    first = app.submit("anything", [1], idempotency_key="order-42")
    second = app.submit("anything", [1], idempotency_key="order-42")
    assert first.id == second.id
    assert [e.TYPE for e in app.history(first.id)] == ["submitted"]
    assert app.store.max_position() == 1
    resent = app.submit("anything", [2], idempotency_key="order-42")
    assert resent.id == first.id
    assert revealed(app, first.id).args == [1]  # the first submit stands


def test_a_schedules_idempotency_key_is_refused_so_no_client_takes_a_tick(app: App) -> None:
    schedule = uuid.uuid4()
    key = fire_key(schedule, datetime(2030, 1, 1, 2, tzinfo=UTC))
    with pytest.raises(DomainError, match="broker_q's own"):
        app.submit("anything", [1], idempotency_key=key)
    assert app.store.max_position() == 0


async def test_one_idempotency_key_twice_is_one_task_when_submitted_async(app: App) -> None:
    first = await app.submit_async("anything", [1], idempotency_key="order-42")
    second = await app.submit_async("anything", [1], idempotency_key="order-42")
    assert first.id == second.id
    assert len(app.history(first.id)) == 1
    assert app.store.max_position() == 1


def test_one_key_in_two_tenants_is_two_tasks(app: App) -> None:
    acme = app.submit("anything", idempotency_key="order-42", tenant="acme")
    globex = app.submit("anything", idempotency_key="order-42", tenant="globex")
    assert acme.id != globex.id
    assert (app.get_task(acme.id).tenant, app.get_task(globex.id).tenant) == ("acme", "globex")
    assert app.store.max_position() == 2


def test_without_a_key_every_submit_is_a_new_task(app: App) -> None:
    ids = {app.submit("anything").id for _ in range(3)}
    assert len(ids) == 3


def test_a_wait_on_a_task_that_no_worker_runs_times_out(app: App) -> None:
    handle = app.submit("anything")
    with pytest.raises(TimeoutError):
        handle.wait(timeout=0.05)


async def test_an_async_wait_on_a_task_that_no_worker_runs_times_out(app: App) -> None:
    handle = await app.submit_async("anything")
    with pytest.raises(TimeoutError):
        await handle.result(timeout=0.05)


def test_the_history_of_an_unknown_task_is_not_found(app: App) -> None:
    with pytest.raises(TaskNotFound):
        app.history(uuid.uuid4())
    with pytest.raises(TaskNotFound):
        app.get_task(str(uuid.uuid4()))


def test_a_task_id_that_is_not_a_uuid_is_a_validation_error(app: App) -> None:
    with pytest.raises(ValidationError):
        app.history("not-a-uuid")


def test_a_submitted_task_is_ready(app: App) -> None:
    handle = app.submit("anything", [1, "two"], {"three": 3.0}, queue="q1", priority=2, tenant="acme")
    state = app.get_task(handle.id)
    assert state.status is TaskStatus.READY
    assert (state.version, state.attempts, state.args, state.kwargs) == (1, 0, [], {})  # sealed
    assert (state.queue, state.priority, state.tenant) == ("q1", 2, "acme")
    assert handle.state() == state
    assert app.get_task(str(handle.id)) == state
    assert (revealed(app, handle.id).args, revealed(app, handle.id).kwargs) == ([1, "two"], {"three": 3.0})


def test_calling_a_task_definition_runs_the_function_here(app: App) -> None:
    calls: list[tuple[int, int]] = []

    @app.task(name="math.add")
    def add(x: int, y: int) -> int:
        calls.append((x, y))
        return x + y

    assert add(2, 3) == 5
    assert calls == [(2, 3)]
    assert app.store.max_position() == 0


def test_an_app_does_no_io_until_the_store_is_used() -> None:
    app = App(store="postgresql://postgres@127.0.0.1:1/test?schema=nowhere", amqp_url="amqp://127.0.0.1:1/",
              master_key="A" * 43 + "=")

    @app.task(name="noop")
    def noop() -> None:
        return None

    assert app.queues == ["default"]
    with pytest.raises(StoreUnavailable):  # the URL really is unreachable: only use touches it
        app.submit("noop")


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_Q_STORE", "memory://")
    monkeypatch.setenv("BROKER_Q_TENANT", "acme")
    assert Settings().store == "memory://"
    assert Settings().tenant == "acme"
    assert App().settings.store == "memory://"


def test_keyword_arguments_override_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BROKER_Q_STORE", "memory://")
    url = f"sqlite:///{tmp_path}/q.sqlite"
    assert Settings(store=url).store == url
    assert App(store=url).settings.store == url
    assert App(Settings(), store=url).settings.store == url


def test_settings_are_frozen_and_refuse_unknown_fields() -> None:
    settings = Settings(store="memory://")
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        settings.store = "sqlite:///x"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="no_such_setting"):
        Settings(no_such_setting=1)  # type: ignore[call-arg]


@pytest.mark.parametrize("overrides", [{"no_such_setting": 1}, {"default_priority": 10}, {"namespace": "a b"}],
                         ids=["unknown", "out-of-range", "bad-pattern"])
def test_a_bad_setting_is_a_configuration_error(overrides: dict[str, object]) -> None:
    app = App(store="memory://", **overrides)  # settings are read on first use, not at import
    with pytest.raises(ConfigurationError):
        app.settings  # noqa: B018


def test_settings_are_read_on_first_use_and_the_command_line_can_override_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = App()
    monkeypatch.setenv("BROKER_Q_STORE", "memory://")
    monkeypatch.setenv("BROKER_Q_DEFAULT_QUEUE", "from-env")

    @app.task(name="t")
    def t() -> None: ...

    assert t.queue == "from-env"
    app.configure(tenant="acme")
    assert app.settings.store == "memory://"
    assert app.settings.tenant == "acme"
    app.store.max_position()
    with pytest.raises(ConfigurationError, match="in use already"):
        app.configure(store="memory://")


def test_a_tenant_that_is_not_a_tenant_name_is_refused(app: App) -> None:
    with pytest.raises(DomainError, match="is not a tenant name"):
        app.submit("anything", tenant="Not A Tenant")


@pytest.mark.parametrize("queue", ["has space", "q" * 101, "slash/es"])
def test_a_queue_name_that_cannot_name_an_amqp_queue_is_refused(app: App, queue: str) -> None:
    with pytest.raises(DomainError, match="queue name"):
        app.submit("anything", queue=queue)


def test_the_id_of_a_refused_message_is_not_a_task(app: App) -> None:
    import hashlib
    import uuid
    from datetime import UTC, datetime

    from broker_q.domain.events import IngressRejected
    from broker_q.errors import TaskNotFound

    stream = uuid.uuid4()
    app.store.append([IngressRejected(
        stream_id=stream, version=1, timestamp=datetime.now(UTC), tenant="default", actor="test",
        correlation_id=stream, reason="bad", queue="default", message_id=None, size=1,
        sha256=hashlib.sha256(b"x").hexdigest())])
    with pytest.raises(TaskNotFound, match="is not a task"):
        app.get_task(stream)


def test_submit_options_travel_with_delay_and_unknown_ones_are_refused(app: App) -> None:
    @app.task(name="opt.add")
    def add(x: int, y: int) -> int:
        return x + y

    first = add.delay(1, 2)
    handle = add.options(countdown=30, priority=9, depends_on=[first]).delay(3, 4)
    state = revealed(app, handle.id)
    assert state.status is TaskStatus.BLOCKED
    assert state.priority == 9
    assert state.args == [3, 4]
    assert state.depends_on == (first.id,)
    assert state.due_at is not None
    assert 29 < (state.due_at - state.submitted_at).total_seconds() <= 30
    with pytest.raises(ValidationError, match=r"unknown submit option.*countdwn"):
        add.options(countdwn=3)


# -- encryption ------------------------------------------------------------------------------


def test_encryption_is_on_by_default_and_off_stores_arguments_plain(tmp_path: Path) -> None:
    sealed = App(store=f"sqlite:///{tmp_path}/on.sqlite")
    plain = App(store=f"sqlite:///{tmp_path}/off.sqlite", encryption=False)
    try:
        assert sealed.settings.encryption is True
        on = sealed.history(sealed.submit("anything", ["s3cret"]).id)[0]
        off = plain.history(plain.submit("anything", ["s3cret"]).id)[0]
        assert isinstance(on, TaskSubmitted)
        assert isinstance(off, TaskSubmitted)
        assert (on.args, on.sealed_arguments is not None) == ([], True)
        assert (off.args, off.sealed_arguments) == (["s3cret"], None)
        assert b"s3cret" not in (tmp_path / "on.sqlite").read_bytes() + (tmp_path / "on.sqlite-wal").read_bytes()
        assert not (tmp_path / "off.sqlite.master.key").exists()  # a store that never seals makes no key
    finally:
        sealed.close()
        plain.close()


def test_the_sqlite_master_key_file_is_made_beside_the_store_on_first_use_and_said_where(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = App(store=f"sqlite:///{tmp_path}/q.sqlite")
    try:
        assert not (tmp_path / "q.sqlite.master.key").exists()
        with caplog.at_level("WARNING", logger="broker_q.master_key"):
            app.submit("anything", [1])
        key_file = tmp_path / "q.sqlite.master.key"
        assert key_file.exists()
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        assert str(key_file) in caplog.text
        assert "Back it up" in caplog.text
    finally:
        app.close()


def test_the_master_key_comes_from_the_settings_or_a_file(tmp_path: Path) -> None:
    key = "".join(chr(65 + i % 26) for i in range(43)) + "="
    (tmp_path / "master.key").write_text(key + "\n")
    given = App(store="memory://", master_key=key)
    from_file = App(store="memory://", master_key_file=tmp_path / "master.key")
    assert given.master_key() is not None
    assert from_file.master_key() is not None
    assert given.master_key().key == from_file.master_key().key  # type: ignore[union-attr]
    assert "key file" in from_file.master_key().origin  # type: ignore[union-attr]
    with pytest.raises(ConfigurationError, match="cannot read the master key file"):
        App(store="memory://", master_key_file=tmp_path / "missing.key").master_key()


def test_a_postgresql_store_without_a_master_key_is_refused_when_encryption_is_on() -> None:
    url = "postgresql://postgres@127.0.0.1:1/test?schema=nowhere"
    with pytest.raises(ConfigurationError, match=r"BROKER_Q_MASTER_KEY.*BROKER_Q_ENCRYPTION=false"):
        App(store=url).submit("anything")
    assert App(store=url, encryption=False).master_key() is None


def test_a_replay_with_new_arguments_seals_the_whole_arguments_again(app: App) -> None:
    handle = app.submit("anything", [1, "s3cret"], {"keep": True})
    state = app.get_task(handle.id)
    started = domain_task.start(state, worker="w", now=datetime.now(UTC))
    dead = domain_task.dead_letter(domain_task.evolve(state, started), error_type="E", message="m", traceback=None,
                                   now=datetime.now(UTC))
    app.store.append([started, dead])
    replayed = app.replay_dead_letter(handle.id, reason="fixed", args=[2, "new"])
    assert (replayed.args, replayed.kwargs, replayed.sealed_arguments is not None) == ([], {}, True)
    assert app.payloads.arguments(replayed) == ([2, "new"], {"keep": True})


@pytest.mark.parametrize("how", ["submit", "submit_async"])
async def test_a_refused_submit_seals_nothing_and_makes_no_key(app: App, how: str) -> None:
    async def submit() -> object:
        if how == "submit":
            return app.submit("anything", ["s3cret"], tenant="Not A Tenant")
        return await app.submit_async("anything", ["s3cret"], tenant="Not A Tenant")

    with pytest.raises(DomainError, match="not a tenant name"):
        await submit()
    assert app.store.keys.keys_of("Not A Tenant") == []
    assert app.store.max_position() == 0
