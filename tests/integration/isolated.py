"""Plain handler functions that tests register with ``isolation="process"`` (the child imports them by name)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def stuck(marker: str) -> None:
    """Records its process id, then sleeps far past any time limit."""
    Path(marker).write_text(str(os.getpid()))
    time.sleep(60)


def pid() -> int:
    return os.getpid()
