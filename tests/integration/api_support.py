"""Calling the HTTP API in tests: in process (httpx over ASGI), with a token per role and tenant."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from broker_q import App
from broker_q.access import Role
from broker_q.api import create_api
from tests.helpers import catch_up_views


class Api:
    """An httpx client on the API of an App, which makes tokens as a test asks for them."""

    def __init__(self, app: App, client: httpx.AsyncClient) -> None:
        self.app = app
        self.client = client
        self._tokens: dict[tuple[Role, str | None], str] = {}

    def token(self, role: Role | str = Role.ADMIN, tenant: str | None = None) -> str:
        """A token of ``role`` bound to ``tenant`` (``None``: every tenant), made once per test."""
        key = (Role(role), tenant)
        if key not in self._tokens:
            name = f"{role}-{tenant or 'all'}"
            self._tokens[key], _ = self.app.access.create_token(name=name, roles=[Role(role)], tenant=tenant,
                                                                    actor="test")
        return self._tokens[key]

    async def call(self, method: str, path: str, *, role: Role | str | None = Role.ADMIN,
                   tenant: str | None = None, token: str | None = None, **kwargs: Any) -> httpx.Response:
        """``method path`` with a token of ``role`` and ``tenant`` (or ``token``; none if ``role`` is None)."""
        headers = dict(kwargs.pop("headers", {}))
        if token is None and role is not None:
            token = await asyncio.to_thread(self.token, role, tenant)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return await self.client.request(method, path, headers=headers, **kwargs)

    async def ok(self, method: str, path: str, *, status: int = 200, **kwargs: Any) -> Any:
        """The JSON body of a call that must answer ``status``."""
        response = await self.call(method, path, **kwargs)
        assert response.status_code == status, (response.status_code, response.text)
        return response.json()


@asynccontextmanager
async def api_for(app: App, **options: Any) -> AsyncIterator[Api]:
    """The API of ``app``, called in process."""
    api = create_api(app, **options)
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield Api(app, client)
    api.state.context.close()


def catch_up(app: App) -> None:
    """Bring every view up to the store's head (what `broker-q projections run` does continuously)."""
    catch_up_views(app.store, app.settings.store)
