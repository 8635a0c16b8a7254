"""Section ``learning``: is the Q-learning policy worth it? (issue 5)

For each model, the most expensive leaves of its partition are searched by every
strategy — Q-learning (cold), random search at Q's measurement count, the seed's
static heuristic (compute-bound -> compute passes, else memory passes), greedy, and
an exhaustive oracle over sequences of up to ``ORACLE_DEPTH`` passes. All strategies
read one shared pool of measurements (the same subgraph + sequence is timed once),
so they are compared on identical numbers; each strategy's *measurements* is how
many distinct sequences it asked for. Speedup = sum of leaf baselines / sum of the
best times each strategy found.

Transfer: a Q-table trained on one model warm-starts a short run on the next; it is
compared with a cold run of the same length (speedup and measurements).
"""

from __future__ import annotations

import time

from tabulate import tabulate

from adaptopt.adapt.cache import MeasurementCache, target_fingerprint
from adaptopt.adapt.loop import prepare_run, q_settings
from adaptopt.api import pinned_copy
from adaptopt.graph.capture import make_inputs
from adaptopt.graph.index import GraphIndex
from adaptopt.graph.io import load_model
from adaptopt.graph.partition import partition
from adaptopt.policy.qtable import QTable
from adaptopt.policy.search import greedy_search, heuristic, oracle, q_learning, random_search

from benchmarks.cases import select_cases

ORACLE_DEPTH = 2
LEAVES_PER_MODEL = 4
ACCURACY_BUDGET = 0.999
DEFAULT_MODELS = ("resnet_small", "bert_small", "ch_ppocr_mobile_v2.0_cls_infer", "roberta-small")
WARM_EPOCHS = 2


def _setup(case, args):
    config = case.config(args.config)
    config = config.with_section("granularity", initial_granularity=3)
    skeleton = load_model(case.path, config.replace(inputs={}), infer=False)
    model = pinned_copy(skeleton, config, case.name)
    feeds = make_inputs(model, config)
    index = GraphIndex.build(model)
    cache = MeasurementCache(None, target_fingerprint(config.target))  # one shared in-memory pool
    ctx, _ = prepare_run(model, index, feeds, config, ACCURACY_BUDGET, cache=cache)
    tree = partition(index, config.granularity.initial_granularity, config.granularity.min_nodes)
    return config, ctx, tree


def _top_leaves(ctx, tree, k: int):
    """The k leaves with the largest baseline time (their baselines fill the shared pool)."""
    envs = [ctx.env_for(leaf) for leaf in tree.leaves()]
    ranked = sorted(envs, key=lambda env: -env.evaluate(()).time_ms)
    return [leaf for leaf in tree.leaves() if leaf.id in {e.leaf_id for e in ranked[:k]}]


def _score(results) -> dict:
    base = sum(r.baseline.time_ms for r in results)
    best = sum(r.outcome.time_ms for r in results)
    return {"speedup": round(base / best, 4), "measurements": sum(r.measurements for r in results)}


def _compare(case, args) -> dict:
    config, ctx, tree = _setup(case, args)
    leaves = _top_leaves(ctx, tree, LEAVES_PER_MODEL)
    fresh = lambda: [ctx.env_for(leaf) for leaf in leaves]  # noqa: E731 - new counters, shared pool
    settings = q_settings(config)
    rows = {}
    started = time.perf_counter()
    rows["oracle"] = _score([oracle(env, ORACLE_DEPTH) for env in fresh()])
    q_results = q_learning(fresh(), QTable(), settings, seed=0)
    rows["q-learning"] = _score(q_results)
    per_leaf_budget = [max(2, r.measurements) for r in q_results]
    rows["random"] = _score([random_search(env, b, settings.max_sequence, seed=0)
                             for env, b in zip(fresh(), per_leaf_budget)])
    bounds = [env.features(()).bound for env in fresh()]
    rows["heuristic"] = _score([heuristic(env, bound, settings.max_sequence) for env, bound in zip(fresh(), bounds)])
    rows["greedy"] = _score([greedy_search(env, settings.max_sequence) for env in fresh()])
    oracle_row = rows["oracle"]
    for row in rows.values():
        row["of_oracle_speedup"] = round((row["speedup"] - 1) / (oracle_row["speedup"] - 1), 3) \
            if oracle_row["speedup"] > 1 else None
        row["of_oracle_measurements"] = round(row["measurements"] / max(oracle_row["measurements"], 1), 3)
    return {"model": case.name, "leaves": [leaf.id for leaf in leaves], "strategies": rows,
            "wall_s": round(time.perf_counter() - started, 1), "_ctx": (config, ctx, leaves)}


def _transfer(first: dict, second: dict) -> dict:
    """Table trained on ``first``'s leaves, then a short run on ``second``: warm vs cold."""
    config_a, ctx_a, leaves_a = first["_ctx"]
    config_b, ctx_b, leaves_b = second["_ctx"]
    table = QTable()
    q_learning([ctx_a.env_for(leaf) for leaf in leaves_a], table, q_settings(config_a), seed=0)
    short = q_settings(config_b, epochs=WARM_EPOCHS)
    warm = q_learning([ctx_b.env_for(leaf) for leaf in leaves_b], table, short, seed=0)
    cold = q_learning([ctx_b.env_for(leaf) for leaf in leaves_b], QTable(), short, seed=0)
    full = second["strategies"]["q-learning"]
    return {"from": first["model"], "to": second["model"], "epochs": WARM_EPOCHS,
            "warm": _score(warm), "cold_same_epochs": _score(cold), "cold_full": full}


def run(args) -> dict:
    names = args.models or (["resnet_small", "bert_small"] if args.quick else list(DEFAULT_MODELS))
    cases = select_cases(names, args.input_shape, False)
    results = [_compare(case, args) for case in cases]
    transfers = [_transfer(a, b) for a, b in zip(results, results[1:])]
    for r in results:
        r.pop("_ctx")
    return {"accuracy_budget": ACCURACY_BUDGET, "oracle_depth": ORACLE_DEPTH, "leaves_per_model": LEAVES_PER_MODEL,
            "models": results, "transfer": transfers}


def render(result: dict, markdown: bool) -> str:
    fmt = "github" if markdown else "simple"
    rows = []
    for m in result["models"]:
        for name, row in m["strategies"].items():
            rows.append([m["model"], name, row["speedup"], row["measurements"], row["of_oracle_speedup"],
                         row["of_oracle_measurements"]])
    out = [tabulate(rows, headers=["model", "strategy", "leaf speedup", "measurements", "of oracle gain",
                                   "of oracle meas."], tablefmt=fmt)]
    if result["transfer"]:
        rows = [[t["from"], t["to"], t["epochs"], t["warm"]["speedup"], t["warm"]["measurements"],
                 t["cold_same_epochs"]["speedup"], t["cold_same_epochs"]["measurements"],
                 t["cold_full"]["speedup"], t["cold_full"]["measurements"]] for t in result["transfer"]]
        out.append(tabulate(rows, headers=["trained on", "run on", "epochs", "warm speedup", "warm meas.",
                                           "cold speedup", "cold meas.", "cold full speedup", "cold full meas."],
                            tablefmt=fmt))
    note = (f"Leaf speedup over the {result['leaves_per_model']} most expensive leaves per model, accuracy budget "
            f"{result['accuracy_budget']}, oracle = exhaustive up to {result['oracle_depth']} passes; all strategies "
            "read one shared measurement pool.")
    return "\n\n".join(out + [note])
