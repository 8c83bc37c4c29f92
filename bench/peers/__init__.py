"""broker_q beside Celery, Dramatiq, Taskiq and raw aio-pika, in one run: ``python -m bench.peers``.

Modules: :mod:`~bench.peers.marks` (how tasks say they ran), :mod:`~bench.peers.systems` (each
system's workers, queues and cleanup), :mod:`~bench.peers.client` (each system's client, run in a
process of its own), :mod:`~bench.peers.procs` (worker processes and their CPU),
:mod:`~bench.peers.harness` (one measurement), :mod:`~bench.peers.report` (tables), and ``apps/``
(the no-op task of each system).
"""
