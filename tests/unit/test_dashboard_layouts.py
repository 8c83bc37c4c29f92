"""The dashboard's drawings, laid out without a browser: the workflow graph and the throughput chart."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from broker_q.dashboard.charts import throughput_chart
from broker_q.dashboard.graph import NODE_HEIGHT, NODE_WIDTH, layout


@dataclass(frozen=True)
class Step:
    name: str
    parents: list[str] = field(default_factory=list)
    waiting_for: list[str] = field(default_factory=list)
    state: str = "blocked"
    task_id: uuid.UUID = field(default_factory=uuid.uuid4)


def test_each_step_is_right_of_its_parents_and_no_two_boxes_overlap() -> None:
    steps = [Step("a", state="succeeded"), Step("b", state="started"), Step("c", ["a"]), Step("d", ["a", "b"], ["b"]),
             Step("e", ["c", "d"], ["c", "d"])]
    graph = layout(steps)
    nodes = {node.name: node for node in graph.nodes}
    for step in steps:
        for parent in step.parents:
            assert nodes[parent].x + NODE_WIDTH < nodes[step.name].x
    boxes = [(n.x, n.y) for n in graph.nodes]
    for i, (x1, y1) in enumerate(boxes):
        for x2, y2 in boxes[i + 1:]:
            assert abs(x1 - x2) >= NODE_WIDTH or abs(y1 - y2) >= NODE_HEIGHT
    assert all(n.x + NODE_WIDTH <= graph.width and n.y + NODE_HEIGHT <= graph.height for n in graph.nodes)
    blocking = {(e.parent, e.child) for e in graph.edges if e.blocking}
    assert blocking == {("b", "d"), ("c", "e"), ("d", "e")}
    assert len(graph.edges) == 5


def test_a_chain_is_laid_in_one_row() -> None:
    graph = layout([Step("one"), Step("two", ["one"]), Step("three", ["two"])])
    assert len({n.y for n in graph.nodes}) == 1
    assert [n.name for n in sorted(graph.nodes, key=lambda n: n.x)] == ["one", "two", "three"]


@dataclass(frozen=True)
class Slot:
    start: datetime
    succeeded: int = 0
    retry_scheduled: int = 0
    dead_lettered: int = 0
    submitted: int = 0


def test_the_chart_stacks_outcomes_and_computes_the_failure_rate() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    slots = [Slot(start), Slot(start + timedelta(minutes=1), succeeded=6, retry_scheduled=3, dead_lettered=1)]
    chart = throughput_chart(slots, width=200, height=100)
    assert chart.top == 10  # the next round number at or above the tallest bar
    empty, full = chart.bars
    assert empty.segments == ()
    assert empty.failure_rate is None
    assert [kind for kind, _, _ in full.segments] == ["succeeded", "retry_scheduled", "dead_lettered"]
    assert sum(height for _, _, height in full.segments) == 100  # ten of ten: the whole height
    assert full.failure_rate == 0.4
    assert "6 succeeded, 4 failed (40% failure rate)" in full.label
    assert chart.rate_dots == ((150.0, 60.0),)
    assert chart.failure_rate == 0.4
