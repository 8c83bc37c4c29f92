"""What every endpoint works with: the App, and the view databases, opened once per API.

Every access of the API to the views goes through this module: :func:`open_views` is the one place
the views' databases are opened; :meth:`Context.views` hands them out, shared by the requests (a
database's handle serialises its transactions); :meth:`Context.metrics` and
:meth:`Context.view_status` read the views' positions.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from broker_q.app import App
from projections.database import ViewDatabases, open_view_databases
from projections.metrics import registry_for
from projections.queries import ViewStatus, status
from projections.runner import runners
from projections.views import VIEWS

__all__ = ["Context", "open_views"]


def open_views(store_url: str) -> ViewDatabases:
    """The databases of every view of :data:`projections.views.VIEWS` of the store at ``store_url``
    (on SQLite a file per view, elsewhere one database for all)."""
    return open_view_databases(store_url, VIEWS)


@dataclass
class Context:
    app: App
    public_metrics: bool = False
    """Serve ``/metrics`` without a token (for a Prometheus that scrapes without one)."""
    _views: ViewDatabases | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def views(self) -> ViewDatabases:
        """The views' databases, their tables created if no projection has run yet (so that a query
        finds a view empty rather than missing)."""
        with self._lock:
            if self._views is None:
                databases = open_views(self.app.settings.store)
                for runner in runners(self.app.store, databases):
                    runner.setup()
                self._views = databases
            return self._views

    def metrics(self) -> CollectorRegistry:
        """The projection metrics, read from the views at each collection (as ``--metrics-port`` serves them)."""
        return registry_for(self.views, self.app.store)

    def view_status(self) -> list[ViewStatus]:
        """Each view's position and lag (as ``broker-q projections status`` shows them)."""
        return status(self.views, self.app.store)

    def close(self) -> None:
        with self._lock:
            if self._views is not None:
                self._views.close()
                self._views = None
