"""A workflow's DAG laid out in layers, left to right, for the template to draw as SVG.

Each step goes in the layer after its deepest parent (so every edge points right); within a layer,
steps are ordered by the mean position of their parents, which keeps chains straight and fans
tidy. Plain and predictable rather than optimal: workflows are read, not admired.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Edge", "Graph", "Node", "layout"]

NODE_WIDTH = 168
NODE_HEIGHT = 46
COLUMN_GAP = 64
ROW_GAP = 18
MARGIN = 8


@dataclass(frozen=True)
class Node:
    name: str
    task_id: str
    state: str
    x: float
    y: float
    waiting_for: tuple[str, ...]


@dataclass(frozen=True)
class Edge:
    parent: str
    child: str
    path: str
    """An SVG path from the parent's right side to the child's left side."""
    blocking: bool
    """The child still waits for this parent."""


@dataclass(frozen=True)
class Graph:
    width: float
    height: float
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    node_width: int = NODE_WIDTH
    node_height: int = NODE_HEIGHT


def layout(steps: Sequence[Any]) -> Graph:
    """The graph of ``steps`` (each with ``name``, ``task_id``, ``state``, ``parents`` and
    ``waiting_for``, parents before children: the ``WorkflowView`` steps of the API)."""
    layer: dict[str, int] = {}
    for step in steps:
        layer[step.name] = 1 + max((layer[p] for p in step.parents if p in layer), default=-1)
    columns: dict[int, list[Any]] = {}
    for step in steps:
        columns.setdefault(layer[step.name], []).append(step)
    row: dict[str, float] = {}
    for index in sorted(columns):
        def weight(step: Any) -> float:
            placed = [row[p] for p in step.parents if p in row]
            return sum(placed) / len(placed) if placed else 0.0

        ordered = sorted(columns[index], key=weight) if index else columns[index]
        for position, step in enumerate(ordered):
            row[step.name] = float(position)
    nodes = {step.name: Node(step.name, str(step.task_id), str(step.state),
                             MARGIN + layer[step.name] * (NODE_WIDTH + COLUMN_GAP),
                             MARGIN + row[step.name] * (NODE_HEIGHT + ROW_GAP), tuple(step.waiting_for))
             for step in steps}
    edges = []
    for step in steps:
        child = nodes[step.name]
        for parent_name in step.parents:
            parent = nodes.get(parent_name)
            if parent is None:
                continue
            x1, y1 = parent.x + NODE_WIDTH, parent.y + NODE_HEIGHT / 2
            x2, y2 = child.x, child.y + NODE_HEIGHT / 2
            bend = (x2 - x1) / 2
            path = f"M{x1:.1f},{y1:.1f} C{x1 + bend:.1f},{y1:.1f} {x2 - bend:.1f},{y2:.1f} {x2:.1f},{y2:.1f}"
            edges.append(Edge(parent_name, step.name, path, parent_name in step.waiting_for))
    width = MARGIN * 2 + (max(layer.values(), default=0) + 1) * (NODE_WIDTH + COLUMN_GAP) - COLUMN_GAP
    height = MARGIN * 2 + max((len(c) for c in columns.values()), default=1) * (NODE_HEIGHT + ROW_GAP) - ROW_GAP
    return Graph(width, height, tuple(nodes.values()), tuple(edges))
