"""What every set-up of broker_q's tables on PostgreSQL shares."""

from __future__ import annotations

__all__ = ["SETUP_LOCK"]

SETUP_LOCK = 0x62726F6B65727121
"""PostgreSQL advisory lock held while tables are created: ``CREATE ... IF NOT EXISTS`` is not safe
against itself, and two processes opening a new store at once failed on the catalog's unique keys."""
