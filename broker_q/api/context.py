"""What every endpoint works with: the App, and the view databases, opened once per API.

Every access of the API to a view's database goes through this module: :func:`open_view` is the one
place a view's database is opened; :meth:`Context.view` hands out each view's handle, shared by the
requests (a handle serialises its transactions); :meth:`Context.metrics` and
:meth:`Context.view_status` read the views' positions.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from broker_q.app import App
from projections.database import ViewDatabase, open_view_database
from projections.metrics import registry_for
from projections.queries import ViewStatus, status
from projections.runner import ProjectionRunner
from projections.views import VIEWS

__all__ = ["Context", "open_view"]


def open_view(store_url: str, view: str) -> ViewDatabase:
    """The database that holds ``view`` (a name of :data:`projections.views.VIEWS`) of the store at
    ``store_url``. Today every view of a store shares one database."""
    return open_view_database(store_url)


@dataclass
class Context:
    app: App
    public_metrics: bool = False
    """Serve ``/metrics`` without a token (for a Prometheus that scrapes without one)."""
    _views: dict[str, ViewDatabase] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def view(self, name: str) -> ViewDatabase:
        """The database of view ``name``, its tables created if no projection has run yet (so that
        a query finds the view empty rather than missing)."""
        with self._lock:
            database = self._views.get(name)
            if database is None:
                database = open_view(self.app.settings.store, name)
                ProjectionRunner(self.app.store, database, [VIEWS[name]]).setup()
                self._views[name] = database
            return database

    def metrics(self) -> CollectorRegistry:
        """The projection metrics, read from the views at each collection (as ``--metrics-port`` serves them)."""
        return registry_for(self.view("tasks"), self.app.store)

    def view_status(self) -> list[ViewStatus]:
        """Each view's position and lag (as ``broker-q projections status`` shows them)."""
        return status(self.view("tasks"), self.app.store)

    def close(self) -> None:
        with self._lock:
            for database in self._views.values():
                database.close()
            self._views.clear()
