"""The docs that users code against, docs/wire-format.md and docs/events.md, must match the code."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from broker_q.domain.events import TOPICS, Event
from broker_q.wire import envelope_json_schema

DOCS = Path(__file__).resolve().parents[2] / "docs"
WIRE_FORMAT = DOCS / "wire-format.md"
BLOCK = re.compile(
    r"^<!-- envelope-schema:start -->\n```json\n(?P<schema>.*?)\n```\n<!-- envelope-schema:end -->$",
    re.DOTALL | re.MULTILINE,
)
COMMON_FIELDS = {field.name for field in dataclasses.fields(Event)}


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_wire_schema", DOCS / "gen_wire_schema.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_documented_envelope_schema_is_the_one_the_code_validates_with() -> None:
    blocks = BLOCK.findall(WIRE_FORMAT.read_text(encoding="utf-8"))
    assert len(blocks) == 1, "docs/wire-format.md needs exactly one fenced envelope-schema block"
    assert blocks[0] == envelope_json_schema(), "stale schema: run python docs/gen_wire_schema.py"


def test_the_generator_leaves_an_up_to_date_doc_unchanged(generator: ModuleType) -> None:
    text = WIRE_FORMAT.read_text(encoding="utf-8")
    assert generator.render(text, envelope_json_schema()) == text


def test_the_generator_rewrites_a_stale_block_and_nothing_else(generator: ModuleType) -> None:
    stale = "# Title\n\n<!-- envelope-schema:start -->\n```json\n{}\n```\n<!-- envelope-schema:end -->\n"
    stale += "\nAfter.\n"
    rendered = generator.render(stale, envelope_json_schema())
    assert rendered.startswith("# Title\n\n")
    assert rendered.endswith("\n\nAfter.\n")
    assert BLOCK.findall(rendered) == [envelope_json_schema()]


def test_the_generator_refuses_a_doc_without_the_markers(generator: ModuleType) -> None:
    with pytest.raises(ValueError, match="expected one"):
        generator.render("no markers here\n", envelope_json_schema())


def test_the_event_catalogue_lists_every_topic_type_and_field() -> None:
    catalogue = (DOCS / "events.md").read_text(encoding="utf-8")
    for topic, cls in TOPICS.items():
        heading = f"### `{topic}` (type `{cls.TYPE}`, class `{cls.__name__}`)"
        assert heading in catalogue, f"docs/events.md has no section {heading!r}"
        section = catalogue.split(heading, 1)[1].split("\n### ", 1)[0]
        for field in dataclasses.fields(cls):
            if field.name not in COMMON_FIELDS:
                assert f"| `{field.name}` |" in section, f"docs/events.md: {topic} does not describe {field.name!r}"
    for name in COMMON_FIELDS:
        assert f"| `{name}` |" in catalogue, f"docs/events.md does not describe the common field {name!r}"
