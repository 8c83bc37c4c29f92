"""Rewrite the envelope's JSON Schema in docs/wire-format.md from ``broker_q.wire.envelope_json_schema()``.

Usage: ``python docs/gen_wire_schema.py`` rewrites the block; ``--check`` only reports whether it is
stale (exit status 1). ``tests/unit/test_wire_doc.py`` fails while the block is stale.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from broker_q.wire import envelope_json_schema

DOC = Path(__file__).resolve().parent / "wire-format.md"
START = "<!-- envelope-schema:start -->"
END = "<!-- envelope-schema:end -->"
_BLOCK = re.compile(rf"^{re.escape(START)}\n.*?^{re.escape(END)}$", re.DOTALL | re.MULTILINE)


def render(text: str, schema: str) -> str:
    """``text`` with the block between the markers replaced by ``schema`` in a fenced JSON block."""
    blocks = _BLOCK.findall(text)
    if len(blocks) != 1:
        raise ValueError(f"expected one {START} ... {END} block, found {len(blocks)}")
    return _BLOCK.sub(lambda _: f"{START}\n```json\n{schema}\n```\n{END}", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the block is stale; change nothing")
    options = parser.parse_args(argv)
    text = DOC.read_text(encoding="utf-8")
    updated = render(text, envelope_json_schema())
    if updated == text:
        print(f"{DOC.name}: the envelope schema is up to date")
        return 0
    if options.check:
        print(f"{DOC.name}: the envelope schema is stale: run python docs/gen_wire_schema.py",
              file=sys.stderr)
        return 1
    DOC.write_text(updated, encoding="utf-8")
    print(f"{DOC.name}: the envelope schema was rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
