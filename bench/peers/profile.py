"""Where broker_q's time per task goes: py-spy on the submitter, the relay and the worker.

    python -m bench.peers.profile --tasks 20000 [--store sqlite|postgres] [--rate 250] [--keep DIR]

Runs the peer benchmark's broker_q measurement once (enqueue N no-op tasks with the client, then
start ``broker-q relay`` and ``broker-q worker`` on the backlog) with ``py-spy record`` attached to
each process, and prints a Markdown summary: per process and thread, the sampled time per task, the
functions where the time is spent (self time, by library, and broker_q's own frames inclusive), next
to the process's CPU per task from /proc. Import-time samples are left out. Needs ``py-spy`` (the
``[bench]`` extra) and the right to trace processes (root, or CAP_SYS_PTRACE).

py-spy counts a sample for each thread that is not idle, so threads that wait for the GIL, for
SQLite's fsync (which releases it), or for a CPU on a busy machine are counted too: per-thread
figures can add up to more than the process's CPU. ``--gil`` samples only the thread that holds the
GIL: the shares are then those of Python's CPU, which the /proc figure beside them sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.peers.harness import STALL
from bench.peers.marks import RECORD
from bench.peers.procs import Workers, exit_on_sigterm, tree_cpu
from bench.peers.systems import PYTHON, BrokerQ, delete_amqp, new_context

PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
_IMPORTING = "_find_and_load"
IDLE = {
    "_worker (concurrent/futures/thread.py)",  # a pool thread waiting for work
    "EpollSelector.select (selectors.py)",  # the event loop waiting for I/O or a timer
    "Condition.wait (threading.py)",
    "Event.wait (threading.py)",
    "Thread._wait_for_tstate_lock (threading.py)",
    "Queue.get (queue.py)",
}
"""Leaf frames of threads that wait: py-spy counts them as active when the wait is a C call its idle
detection misses. They are left out and reported apart."""
WRAPPERS = ("broker_q/cli.py)", "bench/peers/client.py)")
"""Frames around everything (the command's entry points): not worth a row among broker_q's frames."""


@dataclass
class Profile:
    """Collapsed stacks of one process: (thread name, frames root first) -> samples."""

    name: str
    rate: int
    stacks: collections.Counter[tuple[str, tuple[str, ...]]] = field(default_factory=collections.Counter)
    idle: int = 0
    cpu_s: float = 0.0

    @classmethod
    def read(cls, name: str, path: Path, rate: int) -> Profile:
        profile = cls(name, rate)
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            thread, *frames = stack.split(";")
            if any(f.startswith(_IMPORTING) for f in frames) or not frames:
                continue
            thread_name = thread.split(": ", 1)[1] if ": " in thread else thread
            thread_name = re.sub(r"_\d+$", "", re.sub(r" \(.*\)$", "", thread_name))
            functions = tuple(_function(f) for f in frames)
            if functions[-1] in IDLE:
                profile.idle += int(count)
            else:
                profile.stacks[(thread_name, functions)] += int(count)
        return profile

    def us_per_task(self, samples: int, tasks: int) -> float:
        return samples / self.rate / tasks * 1e6


def _function(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "/lib/python3.11/", "/work/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['func']} ({path})"


def _library(function: str) -> str:
    path = function.rsplit("(", 1)[-1].rstrip(")")
    if path.startswith(("broker_q", "projections", "bench")) or "/broker_q/" in path:
        return "broker_q"
    top = path.split("/", 1)[0]
    return top.removesuffix(".py") if "/" in path or top.endswith(".py") else top


def entry(thread: str, frames: tuple[str, ...]) -> str:
    """What a sample was doing at the top: the coroutine the event loop was running (the frame after
    ``Handle._run``), the function a pool thread was running, or the loop's own scheduling."""
    for i, function in enumerate(frames[:-1]):
        if function.startswith("Handle._run ("):
            return frames[i + 1]
        if function.startswith("_WorkItem.run ("):
            return f"{frames[i + 1]} [in a thread]"
    if thread.startswith("broker_q-writer") or not any(f.startswith("BaseEventLoop.run_forever") for f in frames):
        return f"{frames[min(len(frames) - 1, 4)]} [{thread}]"
    return "the event loop's own scheduling"


def summarize(profile: Profile, tasks: int, top: int = 12) -> str:
    total = sum(profile.stacks.values())
    if not total:
        return f"### {profile.name}\n\nno samples\n"
    per_task = lambda n: f"{profile.us_per_task(n, tasks):,.1f}"  # noqa: E731
    pct = lambda n: f"{100 * n / total:.1f}%"  # noqa: E731
    lines = [f"### {profile.name}", "",
             f"{total:,} samples at {profile.rate} Hz = {per_task(total)} µs/task sampled in threads at work "
             f"(and {per_task(profile.idle)} µs/task in idle waits, left out); CPU of the process from /proc "
             f"{profile.cpu_s / tasks * 1e6:,.1f} µs/task.", "",
             "| thread | share | µs/task |", "|---|---:|---:|"]
    threads: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    libraries: collections.Counter[str] = collections.Counter()
    ours: collections.Counter[str] = collections.Counter()
    every: collections.Counter[str] = collections.Counter()
    entries: collections.Counter[str] = collections.Counter()
    for (thread, frames), n in profile.stacks.items():
        threads[thread] += n
        entries[entry(thread, frames)] += n
        self_time[frames[-1]] += n
        libraries[_library(frames[-1])] += n
        for function in set(frames):
            if not function.endswith(WRAPPERS):
                every[function] += n
                if _library(function) == "broker_q":
                    ours[function] += n
    lines += [f"| {t} | {pct(n)} | {per_task(n)} |" for t, n in threads.most_common()]
    lines += ["", "By what runs: the coroutine (asyncio task or callback) the event loop was running, or a thread's "
              "function:", "", "| runs | share | µs/task |", "|---|---:|---:|"]
    lines += [f"| `{f}` | {pct(n)} | {per_task(n)} |" for f, n in entries.most_common(top)]
    lines += ["", "Self time by library (the leaf frame's package):", "", "| library | share | µs/task |",
              "|---|---:|---:|"]
    lines += [f"| {lib} | {pct(n)} | {per_task(n)} |" for lib, n in libraries.most_common(top)]
    lines += ["", "Self time, top functions:", "", "| function | share | µs/task |", "|---|---:|---:|"]
    lines += [f"| `{f}` | {pct(n)} | {per_task(n)} |" for f, n in self_time.most_common(top)]
    lines += ["", "broker_q's own frames, inclusive (time in them and in what they call):", "",
              "| function | share | µs/task |", "|---|---:|---:|"]
    lines += [f"| `{f}` | {pct(n)} | {per_task(n)} |" for f, n in ours.most_common(top + 6)]
    lines += ["", "Every frame, inclusive, leaving out those in more than 60% of the samples (the event loop, "
              "a thread's entry):", "", "| function | share | µs/task |", "|---|---:|---:|"]
    lines += [f"| `{f}` | {pct(n)} | {per_task(n)} |"
              for f, n in [(f, n) for f, n in every.most_common() if n <= 0.6 * total][:top + 6]]
    return "\n".join(lines) + "\n"


def record(pid: int, out: Path, rate: int, gil: bool) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PY_SPY, "record", "--pid", str(pid), "--threads", "--format", "raw", "--rate",
                             str(rate), "--output", str(out), *(["--gil"] if gil else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_recording(recorder: subprocess.Popen[bytes]) -> None:
    recorder.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    recorder.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--gil", action="store_true",
                        help="sample only the thread holding the GIL: Python's CPU, without waits (and without "
                             "C code that releases the GIL, such as SQLite's own work and fsync)")
    parser.add_argument("--work-batch", type=int, default=1, help="the relay's --work-batch (default 1)")
    parser.add_argument("--keep", type=Path, help="keep py-spy's raw collapsed stacks in this folder")
    options = parser.parse_args()
    exit_on_sigterm()
    n, rate = options.tasks, options.rate
    system = BrokerQ(options.store, options.work_batch)
    ctx = new_context(system)
    scratch = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    profiles: list[Profile] = []
    try:
        client = subprocess.Popen([PYTHON, "-m", "bench.peers.client", "broker_q", "enqueue", str(n)], env=ctx.env,
                                  stdout=subprocess.PIPE)
        submitter = record(client.pid, scratch / "submitter.txt", rate, options.gil)
        out, _ = client.communicate(timeout=600)
        stop_recording(submitter)
        sent = json.loads(out.decode().strip().splitlines()[-1])
        seconds = sent["seconds"]
        print(f"submitted {n} in {seconds:.2f} s ({n / seconds:,.0f}/s)", file=sys.stderr)
        profiles.append(Profile.read("submitter (the client: `App.submit_async`, group-committed)",
                                     scratch / "submitter.txt", rate))
        profiles[-1].cpu_s = sent["cpu_seconds"]

        marks = scratch / "marks"
        marks.touch()
        workers = Workers(system.worker_commands(ctx), {**ctx.env, "BENCH_MARKS": str(marks)}, ctx.dir / "drain.log")
        worker_pid, relay_pid = workers.pids()
        recorders = [record(worker_pid, scratch / "worker.txt", rate, options.gil),
                     record(relay_pid, scratch / "relay.txt", rate, options.gil)]
        try:
            while marks.stat().st_size == 0:
                workers.check_alive()
                time.sleep(0.001)
            cpu0 = {pid: tree_cpu([pid]) for pid in (worker_pid, relay_pid)}
            first = progress_at = time.time()
            size = 0
            while size < n * RECORD.size or not system.durable_done(ctx, n):
                time.sleep(0.05)
                workers.check_alive()
                if marks.stat().st_size != size:
                    size, progress_at = marks.stat().st_size, time.time()
                elif time.time() - progress_at > STALL:
                    raise RuntimeError(f"stuck at {size // RECORD.size} of {n} tasks")
            elapsed = time.time() - first
            cpu1 = {pid: tree_cpu([pid]) for pid in (worker_pid, relay_pid)}
        finally:
            for recorder in recorders:
                stop_recording(recorder)
            workers.stop()
        print(f"drained {n} in {elapsed:.2f} s ({n / elapsed:,.0f}/s, profiled)", file=sys.stderr)
        for label, pid, path in [("worker (`broker-q worker`, concurrency 200)", worker_pid, "worker.txt"),
                                 ("relay (`broker-q relay`)", relay_pid, "relay.txt")]:
            profiles.append(Profile.read(label, scratch / path, rate))
            profiles[-1].cpu_s = cpu1[pid] - cpu0[pid]
        print(f"{n:,} no-op tasks, {options.store} store, py-spy at {rate} Hz"
              f"{' (GIL holder only)' if options.gil else ''}; submit {n / seconds:,.0f}/s, "
              f"drain {n / elapsed:,.0f}/s while profiled; load average {os.getloadavg()[0]:.2f}.\n")
        for profile in profiles:
            print(summarize(profile, n))
        if options.keep:
            options.keep.mkdir(parents=True, exist_ok=True)
            for path in scratch.glob("*.txt"):
                shutil.copy(path, options.keep / path.name)
    finally:
        system.cleanup(ctx)
        asyncio.run(delete_amqp(ctx))
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(ctx.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
