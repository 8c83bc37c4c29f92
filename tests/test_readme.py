"""The README's examples run: its two set-up commands are the real ones, and its Python runs."""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from broker_q.cli import _parser, load_app
from tests.helpers import running

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_the_two_set_up_commands_are_the_main_job_and_the_tests() -> None:
    setup = README.split("## Set-up on a fresh machine")[1].split("## ")[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, flags=re.DOTALL)
    assert commands == ["pip install . && broker-q run broker_q.demo:app",
                        "pip install -e '.[dev]' && python -m pytest"]
    assert "python -m pytest" in (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    run = commands[0].split("&& broker-q ")[1].split()
    assert _parser().parse_args(run).app == "broker_q.demo:app"
    assert "add" in load_app("broker_q.demo:app").tasks


def test_every_cli_line_of_the_readme_parses() -> None:
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("broker-q "):
                words = [w.strip("'") for w in re.findall(r"'[^']*'|\S+", line[len("broker-q "):])]
                _parser().parse_args(words)


async def test_the_python_examples_run(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKER_Q_STORE", sqlite_url)
    monkeypatch.setenv("BROKER_Q_AMQP_URL", amqp_url)
    monkeypatch.setenv("BROKER_Q_NAMESPACE", namespace)
    define, use, *more = blocks("python")
    scope: dict[str, Any] = {}
    exec(compile(define, "README.md (define)", "exec"), scope)
    async with running(scope["app"]):
        # The example is synchronous code, as users write it: run it off the event loop.
        error: list[BaseException] = []

        def use_it() -> None:
            try:
                exec(compile(use, "README.md (use)", "exec"), scope)
                for index, block in enumerate(more):
                    exec(compile(block, f"README.md (python block {index + 3})", "exec"), scope)
            except BaseException as e:
                error.append(e)

        thread = threading.Thread(target=use_it)
        thread.start()
        await asyncio.to_thread(thread.join, 30)
        assert not thread.is_alive()
        if error:
            raise error[0]
