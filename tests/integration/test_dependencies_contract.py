"""The dependency edges' contract (``broker_q/store/dependencies.py``), run against every adapter.

``store_url`` runs each test on the ``dependencies`` of a memory:// store (``MemoryDependencies``),
of a real SQLite file and of a real PostgreSQL schema (``SQLDependencies``). The last test drives
each with the same random operations and compares every answer with a reference kept here.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator

import pytest

from broker_q.store import EventStore, open_store
from broker_q.store.dependencies import Dependencies


@pytest.fixture
def store(store_url: str) -> Iterator[EventStore]:
    opened = open_store(store_url)
    yield opened
    opened.close()


@pytest.fixture
def edges(store: EventStore) -> Dependencies:
    return store.dependencies


def ids(prefix: str, n: int) -> list[str]:
    return [uuid.uuid5(uuid.NAMESPACE_OID, f"{prefix}{i}").hex for i in range(n)]


P1, P2, P3 = ids("parent", 3)
C1, C2, C3 = ids("child", 3)


def test_no_edges(edges: Dependencies) -> None:
    assert not edges.any()
    assert edges.children([P1]) == []
    assert edges.children([]) == []
    assert edges.open_parents([C1]) == {}
    assert edges.open_parents([]) == {}
    edges.add([])
    edges.mark_done([])
    edges.mark_done([P1])  # a parent nobody waits for
    edges.remove_children([])
    edges.remove_children([C1])
    assert not edges.any()


def test_children_are_the_edges_of_the_parents_asked_for_in_order(edges: Dependencies) -> None:
    edges.add([(P2, C1, False), (P1, C2, False), (P1, C1, True), (P3, C3, False)])
    assert edges.any()
    assert edges.children([P1, P2]) == sorted([(P1, C1), (P1, C2), (P2, C1)])
    assert edges.children([P2]) == [(P2, C1)]
    assert edges.children([P3, "0" * 32]) == [(P3, C3)]


def test_open_parents_counts_the_edges_not_done_and_leaves_out_children_with_none(edges: Dependencies) -> None:
    edges.add([(P1, C1, False), (P2, C1, False), (P3, C1, True), (P1, C2, True), (P2, C3, False)])
    assert edges.open_parents([C1, C2, C3]) == {C1: 2, C3: 1}
    assert edges.open_parents([C2]) == {}
    edges.mark_done([P2])
    assert edges.open_parents([C1, C2, C3]) == {C1: 1}
    edges.mark_done([P1, P2])  # twice: still done
    assert edges.open_parents([C1, C2, C3]) == {}
    assert edges.children([P1, P2, P3]) == sorted([(P1, C1), (P2, C1), (P3, C1), (P1, C2), (P2, C3)])


def test_with_edges_names_the_children_with_any_edge_done_or_not(edges: Dependencies) -> None:
    edges.add([(P1, C1, False), (P2, C1, True), (P1, C2, True)])
    assert edges.with_edges([C1, C2, C3, P1]) == {C1, C2}
    assert edges.with_edges([]) == set()
    edges.mark_done([P1])
    assert edges.with_edges([C1, C2]) == {C1, C2}
    edges.remove_children([C1])
    assert edges.with_edges([C1, C2]) == {C2}


def test_adding_an_edge_again_never_undoes_it(edges: Dependencies) -> None:
    edges.add([(P1, C1, True), (P2, C1, False)])
    edges.add([(P1, C1, False), (P2, C1, False)])  # a page read again: P1 looked unfinished then
    assert edges.open_parents([C1]) == {C1: 1}
    edges.add([(P2, C1, True)])
    assert edges.open_parents([C1]) == {}
    edges.add([(P3, C2, False), (P3, C2, True), (P3, C2, False)])  # in one call
    assert edges.open_parents([C2]) == {}
    edges.mark_done([P1])
    edges.add([(P1, C3, False)])  # a new child of a parent marked done before it was added
    assert edges.open_parents([C3]) == {C3: 1}
    assert edges.children([P1, P2, P3]) == sorted([(P1, C1), (P1, C3), (P2, C1), (P3, C2)])


def test_remove_children_removes_their_edges_as_children_only(edges: Dependencies) -> None:
    edges.add([(P1, C1, False), (P2, C1, True), (P1, C2, False), (C1, C3, False)])  # C1 is C3's parent
    edges.remove_children([C1, "0" * 32])
    assert edges.children([P1, P2]) == [(P1, C2)]
    assert edges.children([C1]) == [(C1, C3)]
    assert edges.open_parents([C1, C2, C3]) == {C2: 1, C3: 1}
    edges.remove_children([C2, C3])
    assert not edges.any()
    edges.add([(P1, C1, False)])  # a child added again after its removal (its page read again)
    assert edges.open_parents([C1]) == {C1: 1}


def test_more_parents_and_children_than_one_query_takes(edges: Dependencies) -> None:
    parents, children = ids("p", 1234), ids("c", 1234)
    edges.add([(p, c, i % 3 == 0) for i, (p, c) in enumerate(zip(parents, children, strict=True))]
              + [(parents[0], c, False) for c in children[:700]])
    assert len(edges.children(parents)) == 1234 + 700 - 1  # (parents[0], children[0]) is one edge
    assert len(edges.children(parents[:1])) == 700
    assert edges.with_edges(children + parents) == set(children)
    # Child i waits for parent i unless that edge is done, and for parents[0] too if 0 < i < 700
    # (for child 0 it is the same edge, added done and then not done in one call: done).
    expected = {c: n for i, c in enumerate(children) if (n := (i % 3 != 0) + (0 < i < 700))}
    assert edges.open_parents(children) == expected
    edges.mark_done(parents)
    assert edges.open_parents(children) == {}
    edges.remove_children(children)
    assert not edges.any()


class Reference:
    """The contract, in plain Python."""

    def __init__(self) -> None:
        self.edges: dict[tuple[str, str], bool] = {}

    def add(self, edges: list[tuple[str, str, bool]]) -> None:
        for parent, child, done in edges:
            self.edges[(parent, child)] = self.edges.get((parent, child), False) or done

    def children(self, parents: list[str]) -> list[tuple[str, str]]:
        return sorted(edge for edge in self.edges if edge[0] in parents)

    def mark_done(self, parents: list[str]) -> None:
        for edge in self.edges:
            if edge[0] in parents:
                self.edges[edge] = True

    def open_parents(self, children: list[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for (_, child), done in self.edges.items():
            if child in children and not done:
                counts[child] = counts.get(child, 0) + 1
        return counts

    def with_edges(self, children: list[str]) -> set[str]:
        return {child for _, child in self.edges if child in children}

    def remove_children(self, children: list[str]) -> None:
        self.edges = {edge: done for edge, done in self.edges.items() if edge[1] not in children}

    def any(self) -> bool:
        return bool(self.edges)


@pytest.mark.parametrize("seed", range(3))
def test_random_operations_answer_as_the_reference(edges: Dependencies, seed: int) -> None:
    rng = random.Random(seed)
    names = ids(f"{seed}:", 12)  # a task may be a parent and a child: a graph of several generations
    reference = Reference()

    def some() -> list[str]:
        return rng.sample(names, rng.randint(0, 4))

    for step in range(150):
        operation = rng.choice(["add", "add", "mark_done", "remove_children", "children", "open_parents",
                                "with_edges", "any"])
        if operation == "add":
            batch = [(rng.choice(names), rng.choice(names), rng.random() < 0.3) for _ in range(rng.randint(0, 5))]
            edges.add(batch)
            reference.add(batch)
        elif operation in ("mark_done", "remove_children"):
            chosen = some()
            getattr(edges, operation)(chosen)
            getattr(reference, operation)(chosen)
        elif operation == "any":
            assert edges.any() == reference.any(), step
        else:
            chosen = some()
            assert getattr(edges, operation)(chosen) == getattr(reference, operation)(chosen), (step, operation)
    assert edges.children(names) == reference.children(names)
    assert edges.open_parents(names) == reference.open_parents(names)


def test_edges_are_kept_in_the_stores_database(durable_store_url: str) -> None:
    first = open_store(durable_store_url)
    try:
        first.dependencies.add([(P1, C1, False), (P2, C1, True)])
    finally:
        first.close()
    second = open_store(durable_store_url)
    try:
        assert second.dependencies.open_parents([C1]) == {C1: 1}
        assert second.dependencies.children([P1, P2]) == sorted([(P1, C1), (P2, C1)])
    finally:
        second.close()
