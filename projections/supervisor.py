"""A process per view database, kept running by the process that started them.

On an SQLite store each view has a file of its own (docs/decisions/0009), and so its own writer:
two runners can apply their batches at the same time, but in one process they would share one
interpreter, and the Python half of their work one core. ``broker-q projections run`` on such a
store therefore starts ``broker-q projections run --view NAME`` for each view and supervises them:

- **A child that exits by itself is started again**, at once the first time, then after a pause
  that doubles up to 8 s. Its views lose nothing: a batch's rows and position commit together, so
  the new process resumes where the last commit left off. A child that exits ``max_exits`` times
  within ``window`` seconds is failing, not unlucky: :meth:`Supervisor.run` then stops the others
  and raises :class:`ProjectionProcessesFailing`, and ``broker-q`` exits non-zero for the process
  manager to see. Views are never left behind without a word.
- **Stopping** (``stop`` set, e.g. on SIGTERM or SIGINT of the parent) sends SIGTERM to every
  child, each finishes the batch in hand, and any child still running after ``grace`` seconds is
  killed (a batch cut short rolls back).
- **Children in a session of their own**: a Ctrl-C at the terminal reaches the parent alone, which
  stops them as above. A parent that dies without stopping them (SIGKILL) closes their stdin, and
  each child, started with ``--supervised``, stops when its stdin closes (:func:`stop_when_stdin_closes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence

from broker_q.errors import BrokerQError

__all__ = ["ProjectionProcessesFailing", "Supervisor", "stop_when_stdin_closes"]

log = logging.getLogger(__name__)


class ProjectionProcessesFailing(BrokerQError):
    """A projections process kept exiting: its views no longer follow the log (see its output)."""


class Supervisor:
    def __init__(
        self,
        commands: Mapping[str, Sequence[str]],
        *,
        max_exits: int = 3,
        window: float = 60.0,
        grace: float = 10.0,
    ) -> None:
        """Keep a process running per command (by name, e.g. the view it runs).

        ``max_exits``: how many exits of one child within ``window`` seconds make it failing.
        ``grace``: seconds a child has to stop after SIGTERM before it is killed.
        """
        self.commands = {name: list(command) for name, command in commands.items()}
        self.max_exits = max_exits
        self.window = window
        self.grace = grace
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        """The running child of each name (replaced when it is started again)."""
        self.started = asyncio.Event()
        """Set once every child has been started."""

    async def run(self, stop: asyncio.Event) -> None:
        """Run the children until ``stop`` is set; raise :class:`ProjectionProcessesFailing` if one keeps exiting."""
        halt = asyncio.Event()
        keepers = [asyncio.create_task(self._keep(name, halt)) for name in self.commands]
        stopping = asyncio.create_task(stop.wait())
        try:
            # A keeper returns only once halted, or raises when its child is failing.
            await asyncio.wait([stopping, *keepers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            halt.set()  # on stop, on a failing child, or if this task is cancelled: stop every child
            stopping.cancel()
            results = await asyncio.gather(*keepers, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _keep(self, name: str, halt: asyncio.Event) -> None:
        exits: list[float] = []
        while True:
            process = await self._start(name)
            if len(self.processes) == len(self.commands):
                self.started.set()
            halted = asyncio.create_task(halt.wait())
            exited = asyncio.create_task(process.wait())
            try:
                await asyncio.wait([halted, exited], return_when=asyncio.FIRST_COMPLETED)
            finally:
                halted.cancel()
                if not exited.done():
                    await self._stop(name, process)
                await exited
            if halt.is_set():
                return
            now = time.monotonic()
            exits = [t for t in exits if now - t < self.window] + [now]
            status = _exit_status(process.returncode)
            if len(exits) >= self.max_exits:
                raise ProjectionProcessesFailing(
                    f"the projections process of view {name} exited {len(exits)} times within {self.window:.0f}s "
                    f"(last with {status}): its view no longer follows the log; see its output")
            pause = 0.0 if len(exits) == 1 else min(8.0, 0.5 * 2 ** (len(exits) - 2))
            log.error("projections process %s exited with %s: starting it again%s", name, status,
                      f" in {pause:.1f}s" if pause else "")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(halt.wait(), pause)
            if halt.is_set():
                return

    async def _start(self, name: str) -> asyncio.subprocess.Process:
        # stdin is a pipe that this process never writes to: it closes when this process dies, however it
        # dies, and the child stops then (stop_when_stdin_closes).
        process = await asyncio.create_subprocess_exec(*self.commands[name], stdin=asyncio.subprocess.PIPE,
                                                       start_new_session=True)
        self.processes[name] = process
        log.info("projections process %s started (pid %d)", name, process.pid)
        return process

    async def _stop(self, name: str, process: asyncio.subprocess.Process) -> None:
        try:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), self.grace)
            except TimeoutError:
                log.warning("projections process %s still running %.0fs after SIGTERM: killing it", name, self.grace)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        except asyncio.CancelledError:
            # Not waited for any longer: kill it rather than leave it behind (a batch cut short rolls back).
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise
        if process.returncode not in (0, -signal.SIGTERM):
            log.warning("projections process %s stopped with %s", name, _exit_status(process.returncode))


def _exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


async def stop_when_stdin_closes(stop: asyncio.Event) -> None:
    """Set ``stop`` when stdin reaches its end (the supervising process is gone); return when ``stop`` is set."""
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            log.warning("the supervising process is gone: stopping")
            loop.remove_reader(fd)
            stop.set()

    loop.add_reader(fd, readable)
    try:
        await stop.wait()
    finally:
        loop.remove_reader(fd)
