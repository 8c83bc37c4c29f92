"""The side-by-side benchmark (``python -m bench.peers``) at a size that proves it works: every task is
counted exactly once, broker_q's store holds every outcome, and the peers it can run are run.

broker_q and raw aio-pika always run (aio-pika is a runtime dependency); Dramatiq runs when the
``[bench]`` extra is installed and is skipped by the harness, by name, when it is not.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bench.peers.marks import mark, read_marks

ROOT = Path(__file__).resolve().parents[2]
TASKS = 50


def test_marks_count_every_write_from_threads_and_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marks = tmp_path / "marks"
    marks.touch()
    monkeypatch.setenv("BENCH_MARKS", str(marks))
    script = "from bench.peers.marks import mark\nfor _ in range(500): mark()"
    children = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
                for _ in range(3)]
    threads = [threading.Thread(target=lambda: [mark() for _ in range(500)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(child.wait(30) == 0 for child in children)
    times = read_marks(marks)
    assert len(times) == 3500
    assert all(t > 1e9 for t in times)  # whole records: no write was torn or interleaved


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
def test_the_harness_runs_broker_q_and_raw_aio_pika_and_counts_exactly_n(tmp_path: Path, amqp_url: str) -> None:
    out = tmp_path / "results.json"
    systems = "broker_q-sqlite,aio-pika,dramatiq"
    completed = subprocess.run(
        [sys.executable, "-m", "bench.peers", "--tasks", str(TASKS), "--runs", "1", "--systems", systems,
         "--latency-samples", "5", "--json", str(out)],
        cwd=ROOT, env={**os.environ, "BROKER_Q_AMQP_URL": amqp_url, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=110, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(out.read_text())
    expected = {"broker_q-sqlite", "aio-pika"}
    if importlib.util.find_spec("dramatiq") is not None and importlib.util.find_spec("pika") is not None:
        expected.add("dramatiq")
    else:
        assert report["skipped"] == ["dramatiq"]
    assert set(report["results"]) == expected
    for system, runs in report["results"].items():
        (run,) = runs
        assert run["tasks"] == TASKS, system
        assert run["marks"] == TASKS, system  # each task ran once, and the count saw each run
        assert run["e2e_rate"] > 0, system
        assert run["enqueue_rate"] > 0, system
        assert len(run["latency_ms"]) == 5, system
        assert all(0 < ms < 5000 for ms in run["latency_ms"]), system
    assert report["results"]["broker_q-sqlite"][0]["durable_lag_s"] is not None  # its store held N succeeded
    assert "| broker_q, sqlite store" in completed.stdout


def test_the_readme_section_is_replaced_in_place_and_the_others_kept(tmp_path: Path) -> None:
    from bench.peers.report import SECTION, replace_section

    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\n## First\n\none\n\n## Last\n\nlast\n")
    replace_section(readme, f"{SECTION}\n\nfigures 1\n")
    assert readme.read_text().endswith(f"## Last\n\nlast\n\n{SECTION}\n\nfigures 1\n")
    readme.write_text(readme.read_text().replace("## Last\n\nlast\n\n", "") + "\n## After\n\nafter\n")
    replace_section(readme, f"{SECTION}\n\nfigures 2\n")
    text = readme.read_text()
    assert text.count(SECTION) == 1
    assert f"{SECTION}\n\nfigures 2\n\n## After\n\nafter\n" in text
    assert text.startswith("# Benchmarks\n\n## First\n\none\n\n")
