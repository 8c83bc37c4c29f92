"""``task.s(...)`` and ``task.si(...)`` are type-checked against the handler (mypy, as users run it)."""

from __future__ import annotations

import re
from pathlib import Path

from mypy import api

SNIPPET = '''
from broker_q import App

app = App()


@app.task(name="add")
def add(x: int, y: int = 0) -> int:
    return x + y


add.s(1)            # every argument
add.s(y=2)          # all but the first, which the step receives
add.si(1, y=2)
reveal_type(add.s(1))
add.s("one")        # error: not an int
add.s(1, 2, 3)      # error: too many
add.si(y=2)         # error: .si() receives nothing, so x is missing
'''


def test_signatures_are_checked_against_the_handler_s_parameters(tmp_path: Path) -> None:
    source = tmp_path / "snippet.py"
    source.write_text(SNIPPET)
    stdout, _, _ = api.run([str(source), "--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"),
                            "--follow-imports", "silent"])
    errors = {int(number) for number in re.findall(r"snippet\.py:(\d+): error:", stdout)}
    expected = {number for number, line in enumerate(SNIPPET.splitlines(), 1) if "# error" in line}
    assert errors == expected, stdout
    assert re.findall(r'Revealed type is "([^"]+)"', stdout) == ["broker_q.canvas.Signature[int]"], stdout
