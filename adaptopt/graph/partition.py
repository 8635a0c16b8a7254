"""Hierarchical partition: the whole graph is the root; each tree node is split in two.

A tree node is a contiguous range ``[start, stop)`` of the topological order (hence
convex). It is cut at the position crossed by the fewest tensors, ties broken by the
fewest bytes and then by balance; cuts are looked for in the middle half of the range
so the tree stays roughly balanced. Recursion depth is ``initial_granularity``; a
leaf never has fewer than ``min_nodes`` nodes. Built with an explicit work list, so
a 100,000-node chain never meets Python's recursion limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from adaptopt.graph.index import GraphIndex


@dataclass(frozen=True)
class Subgraph:
    """A view of one tree node: which nodes, which boundary tensors. No weights."""

    id: str
    parent: str | None
    start: int
    stop: int
    depth: int
    node_names: tuple[str, ...]
    boundary_inputs: tuple[str, ...]
    boundary_outputs: tuple[str, ...]
    initializers: tuple[str, ...]
    content_hash: str
    children: tuple[str, ...] = ()

    @property
    def node_count(self) -> int:
        return self.stop - self.start


@dataclass
class PartitionTree:
    index: GraphIndex
    nodes: dict[str, Subgraph] = field(default_factory=dict)
    root: str = "0"

    def leaves(self) -> list[Subgraph]:
        """Leaves in topological order (their ranges tile [0, N))."""
        return sorted((s for s in self.nodes.values() if not s.children), key=lambda s: s.start)

    def make(self, sid: str, parent: str | None, start: int, stop: int, depth: int) -> Subgraph:
        boundary = self.index.boundary(start, stop)
        ins, outs, inits = boundary
        return Subgraph(sid, parent, start, stop, depth, self.index.node_names(start, stop), tuple(ins),
                        tuple(outs), tuple(inits), self.index.hash_with_boundary(start, stop, boundary))

    def set_children(self, sid: str, children: tuple[str, ...]) -> None:
        import dataclasses
        self.nodes[sid] = dataclasses.replace(self.nodes[sid], children=children)

    def add(self, sub: Subgraph) -> None:
        self.nodes[sub.id] = sub

    def remove_subtree(self, sid: str) -> None:
        """Drop ``sid``'s descendants, so it becomes a leaf again."""
        work = list(self.nodes[sid].children)
        while work:
            child = work.pop()
            work.extend(self.nodes[child].children)
            del self.nodes[child]
        self.set_children(sid, ())


def partition(index: GraphIndex, depth: int, min_nodes: int) -> PartitionTree:
    tree = PartitionTree(index)
    root = tree.make("0", None, 0, len(index), 0)
    tree.add(root)
    work = [root.id]
    while work:
        sid = work.pop()
        sub = tree.nodes[sid]
        if sub.depth >= depth:
            continue
        cut = best_cut(index, sub.start, sub.stop, min_nodes)
        if cut is None:
            continue
        left = tree.make(f"{sid}.0", sid, sub.start, cut, sub.depth + 1)
        right = tree.make(f"{sid}.1", sid, cut, sub.stop, sub.depth + 1)
        tree.add(left)
        tree.add(right)
        tree.set_children(sid, (left.id, right.id))
        work.extend((right.id, left.id))
    return tree


def crossing_costs(index: GraphIndex, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """For each cut position k in (start, stop): tensors and bytes produced before k and read at or after k.

    A tensor written at ``pos`` whose last reader inside the range is ``last`` crosses
    the cuts k in (pos, last]; tensors of unknown size count 4096 bytes. Array work
    over the range's write slots (difference arrays, then a prefix sum).
    """
    n = stop - start
    t = index.tables
    slots = np.arange(t.write_offsets[start], t.write_offsets[stop])
    pos = t.write_producer[slots]
    last = t.last_reader_before(slots, stop)
    crossing = last > pos
    first_k, end_k = pos[crossing] + 1 - start, last[crossing] + 1 - start
    sizes = index.written_sizes()[slots[crossing]]
    sizes = np.where(np.isnan(sizes), 4096.0, sizes)
    count_diff = np.bincount(first_k, minlength=n + 1) - np.bincount(end_k, minlength=n + 1)
    # byte sizes are whole numbers, so float sums are exact whatever the order of additions
    bytes_diff = np.bincount(first_k, sizes, minlength=n + 1) - np.bincount(end_k, sizes, minlength=n + 1)
    return np.cumsum(count_diff, dtype=np.int64)[:n], np.cumsum(bytes_diff, dtype=np.float64)[:n]


def best_cut(index: GraphIndex, start: int, stop: int, min_nodes: int,
             window: tuple[float, float] = (0.25, 0.75), weight: np.ndarray | None = None) -> int | None:
    """The cut position (first node of the right half), or None when too small to split.

    ``weight``, when given, is a per-node cost (e.g. measured time) over [start, stop):
    the window is then placed by cumulative cost instead of node count, which is how
    subdivision isolates a leaf's most expensive nodes.
    """
    n = stop - start
    if n < 2 * min_nodes:
        return None
    counts, sizes = crossing_costs(index, start, stop)
    lo_k, hi_k = _window(n, min_nodes, window, weight)
    if lo_k > hi_k:
        return None
    ks = np.arange(lo_k, hi_k + 1)
    centre = (lo_k + hi_k) / 2
    # lexicographic: fewest tensors, then fewest bytes (log-scaled), then closest to centre
    score = counts[ks] * 1e6 + np.log2(1.0 + sizes[ks]) * 1e3 + np.abs(ks - centre) / max(n, 1)
    return start + int(ks[int(np.argmin(score))])


def _window(n: int, min_nodes: int, window: tuple[float, float], weight: np.ndarray | None) -> tuple[int, int]:
    if weight is None:
        lo_k = max(min_nodes, math.floor(n * window[0]))
        hi_k = min(n - min_nodes, math.ceil(n * window[1]))
        return max(lo_k, 1), hi_k
    cum = np.cumsum(np.asarray(weight, dtype=np.float64))
    total = cum[-1] if cum[-1] > 0 else 1.0
    lo_k = int(np.searchsorted(cum, total * window[0])) + 1
    hi_k = int(np.searchsorted(cum, total * window[1])) + 1
    lo_k, hi_k = max(lo_k, min_nodes), min(hi_k, n - min_nodes)
    return max(lo_k, 1), hi_k
