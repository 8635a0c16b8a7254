"""Adaptive granularity: subdivide slow leaves, merge fast sibling leaves.

A leaf below ``performance_threshold`` (a small fraction of its roofline) is cut in
two around its most expensive nodes (per-node times from ORT's profiler weight the
cut), so a pass can target the expensive part alone. Two sibling leaves both above
``merging_threshold``, or dominated by session overhead, are merged back into their
parent, which lets rewrites cross the old boundary. Either change is kept only when
its measured gain (ms saved, baseline minus best) beats the structure it replaces;
sums of standalone times are not compared directly because each standalone session
adds its own overhead. Restricting merges to siblings keeps the partition a tree.
"""

from __future__ import annotations

from dataclasses import dataclass

from adaptopt.adapt.environment import SubgraphEnv
from adaptopt.adapt.session import RunContext
from adaptopt.config import GranularityConfig
from adaptopt.graph.partition import PartitionTree, best_cut
from adaptopt.policy.qtable import QTable
from adaptopt.policy.search import QSettings, SearchResult, q_learning


@dataclass
class LeafPlan:
    env: SubgraphEnv
    result: SearchResult

    @property
    def gain_ms(self) -> float:
        return max(0.0, self.result.baseline.time_ms - self.result.outcome.time_ms)

    @property
    def performance(self) -> float | None:
        return self.env.features(self.result.sequence).performance

    @property
    def bound(self) -> str:
        return self.env.features(self.result.sequence).bound


def search_leaves(ctx: RunContext, envs: list[SubgraphEnv], table: QTable, settings: QSettings,
                  seed: int, stage: str = "policy") -> list[LeafPlan]:
    progress = None if ctx.progress is None else (lambda done, total: ctx.progress(stage, done, total))
    results = q_learning(envs, table, settings, seed, should_stop=ctx.expired, progress=progress)
    return [LeafPlan(env, res) for env, res in zip(envs, results)]


def adapt_round(ctx: RunContext, tree: PartitionTree, plans: dict[str, LeafPlan], table: QTable,
                settings: QSettings, seed: int, thresholds: GranularityConfig) -> list[dict]:
    """One subdivide + merge round; updates ``tree`` and ``plans`` in place; returns history."""
    history: list[dict] = []
    for leaf in [tree.nodes[sid] for sid in list(plans)]:
        plan = plans[leaf.id]
        perf = plan.performance
        if ctx.expired() or perf is None or perf >= thresholds.performance_threshold:
            continue
        weights = [ctx.node_times_ms.get(n, 0.0) for n in leaf.node_names]
        cut = best_cut(ctx.index, leaf.start, leaf.stop, thresholds.min_nodes,
                       weight=weights if sum(weights) > 0 else None)
        if cut is None:
            continue
        left = tree.make(f"{leaf.id}.0", leaf.id, leaf.start, cut, leaf.depth + 1)
        right = tree.make(f"{leaf.id}.1", leaf.id, cut, leaf.stop, leaf.depth + 1)
        children = search_leaves(ctx, [ctx.env_for(left), ctx.env_for(right)], table, settings, seed,
                                 f"subdivide {leaf.id}")
        gain = sum(c.gain_ms for c in children)
        kept = gain > plan.gain_ms
        history.append({"action": "subdivide", "leaf": leaf.id, "cut_at": cut, "children": [left.id, right.id],
                        "performance": round(perf, 4), "gain_ms_before": round(plan.gain_ms, 5),
                        "gain_ms_after": round(gain, 5), "kept": kept})
        if kept:
            tree.add(left)
            tree.add(right)
            tree.set_children(leaf.id, (left.id, right.id))
            del plans[leaf.id]
            plans[left.id], plans[right.id] = children
    for parent_id in _mergeable_parents(tree, plans, thresholds):
        if ctx.expired():
            break
        parent = tree.nodes[parent_id]
        a, b = (plans[c] for c in parent.children)
        [merged] = search_leaves(ctx, [ctx.env_for(parent)], table, settings, seed, f"merge into {parent_id}")
        kept = merged.gain_ms > a.gain_ms + b.gain_ms
        history.append({"action": "merge", "leaves": list(parent.children), "into": parent_id,
                        "gain_ms_before": round(a.gain_ms + b.gain_ms, 5),
                        "gain_ms_after": round(merged.gain_ms, 5), "kept": kept})
        if kept:
            for child in parent.children:
                del plans[child]
            tree.remove_subtree(parent_id)
            plans[parent_id] = merged
    return history


def _mergeable_parents(tree: PartitionTree, plans: dict[str, LeafPlan], thresholds: GranularityConfig) -> list[str]:
    def fast(plan: LeafPlan) -> bool:
        perf = plan.performance
        return plan.bound == "overhead" or (perf is not None and perf > thresholds.merging_threshold)

    parents = []
    for sub in tree.nodes.values():
        if len(sub.children) == 2 and all(c in plans for c in sub.children):
            if all(fast(plans[c]) for c in sub.children):
                parents.append(sub.id)
    return sorted(parents, key=lambda sid: tree.nodes[sid].start)
