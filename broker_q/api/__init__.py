"""The HTTP API (FastAPI): everything the command line does, over HTTP, with bearer tokens.

``broker-q api --host H --port P`` serves it; :func:`create_api` builds it for an App, to serve it
with any ASGI server or to call it in tests. OpenAPI at ``/openapi.json``. One module per resource:

- :mod:`~broker_q.api.tasks`: ``/v1/tasks`` submit, state, history, cancel;
- :mod:`~broker_q.api.queues`: ``/v1/queues``, ``/v1/dead-letters`` (and their replay);
- :mod:`~broker_q.api.schedules`: ``/v1/schedules``;
- :mod:`~broker_q.api.workflows`: ``/v1/workflows``;
- :mod:`~broker_q.api.audit`: ``/v1/audit``;
- :mod:`~broker_q.api.replay`: ``/v1/events``, ``/v1/state``;
- :mod:`~broker_q.api.breakers`: ``/v1/breakers``;
- :mod:`~broker_q.api.admin`: ``/v1/tokens``, ``/v1/tenants``;
- :mod:`~broker_q.api.health`: ``/healthz``, ``/readyz``, ``/metrics``, ``/v1/views``;
- :mod:`~broker_q.api.activity`: ``/v1/activity`` (throughput, workers seen, recent tasks and workflows);

and around them :mod:`~broker_q.api.auth` (tokens, permissions, tenants, payloads),
:mod:`~broker_q.api.errors` (errors to statuses), :mod:`~broker_q.api.models` (the bodies),
:mod:`~broker_q.api.context` (the App and the view databases).
"""

from __future__ import annotations

from broker_q.api.server import create_api, serve

__all__ = ["create_api", "serve"]
