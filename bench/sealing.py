"""The CPU cost of payload encryption per task: sealing and opening arguments and results.

A task's arguments are sealed at submit, opened by the worker, and its result sealed by the worker
(opening the result is on demand: ``wait()``, the coordinator, the CLI). Each call is timed alone,
on the keyring of a memory:// store (keys cached, as in a running process); best of 7 repeats, since
the machine is shared and only the fastest repeat is free of other jobs.

Usage: python bench/sealing.py [--calls N]
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import timeit
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker_q.master_key import MasterKey
from broker_q.payloads import Payloads
from broker_q.store import open_store

CASES: list[tuple[str, list[Any], dict[str, Any], Any]] = [
    ("add(1, 2) -> 3", [1, 2], {}, 3),
    ("1 KiB in, 1 KiB out", [], {"blob": "x" * 1024}, {"ok": True, "text": "y" * 1024}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    calls = parser.parse_args().calls
    logging.disable(logging.WARNING)
    store = open_store("memory://", master_key=MasterKey(bytes(range(32)), "bench"))
    payloads = Payloads(lambda: store.keys, sealing=True)
    task = uuid.uuid4()
    print("| payload | seal arguments us | open arguments us | seal result us | open result us "
          "| per task (seal, open, seal) us | sealed arguments, characters |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, args, kwargs, result in CASES:
        sealed = payloads.seal_arguments("default", task, args, kwargs)
        sealed_result = payloads.seal_result("default", task, result)
        timings = [min(timeit.repeat(functools.partial(call, "default", task, *given), number=calls, repeat=7))
                   / calls * 1e6 for call, given in (
                       (payloads.seal_arguments, (args, kwargs)), (payloads.open_arguments, (sealed,)),
                       (payloads.seal_result, (result,)), (payloads.open_result, (sealed_result,)))]
        print(f"| {label} | " + " | ".join(f"{t:.1f}" for t in timings)
              + f" | {sum(timings[:3]):.1f} | {len(sealed)} |")
    store.close()


if __name__ == "__main__":
    main()
