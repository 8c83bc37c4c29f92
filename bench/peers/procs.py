"""Worker processes: started in sessions of their own, measured from /proc, stopped by their ids."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["Workers", "exit_on_sigterm", "tree_cpu"]

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of a live process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def tree_cpu(roots: Iterable[int]) -> float:
    """User + system CPU seconds of the processes ``roots`` and all their live descendants (Celery's
    prefork children, Dramatiq's and Taskiq's worker processes)."""
    stats = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            stats[int(entry.name)] = stat
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [pid for pid in roots if pid in stats]
    while todo:
        pid = todo.pop()
        total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


def exit_on_sigterm() -> None:
    """Make SIGTERM (``timeout``, a CI stop) raise SystemExit, so that the ``finally`` blocks stop the
    workers, which run in sessions of their own and would outlive this process."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


class Workers:
    """The processes of one system's workers, each in a session of its own so that stopping one
    reaches its children and nothing else."""

    def __init__(self, commands: Sequence[Sequence[str]], env: dict[str, str], log: Path) -> None:
        self._log = log.open("ab")
        self.processes = [subprocess.Popen(list(command), env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
                          for command in commands]

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def cpu(self) -> float:
        return tree_cpu(self.pids())

    def cpu_each(self) -> list[float]:
        """:meth:`cpu` of each command's process tree apart, in the order of the commands."""
        return [tree_cpu([pid]) for pid in self.pids()]

    def check_alive(self) -> None:
        for process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(f"worker {process.args} exited with {process.returncode}: see {self._log.name}")

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (a graceful stop in every system here), then SIGKILL to the process group."""
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            with contextlib.suppress(ProcessLookupError):  # children left behind by a parent that exited
                os.killpg(process.pid, signal.SIGKILL)
        self._log.close()
