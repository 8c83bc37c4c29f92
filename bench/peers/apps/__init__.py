"""The no-op task of each system, each calling :func:`bench.peers.marks.mark`.

Celery, Dramatiq and Taskiq load a worker's tasks by importing a module, so these modules read their
settings (``BENCH_*``, set by the harness) from the environment at import.
"""
