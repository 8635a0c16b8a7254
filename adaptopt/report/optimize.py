"""The optimize report: every decision, what it was based on, and the verified result.

JSON (versioned, for pipelines) and Markdown (the same content as tables). Every
time in it was measured on this machine in this run or read back from the
measurement cache of an earlier run on the same target (``cache_hits`` says how many).
"""

from __future__ import annotations

from collections import Counter

import onnx
from tabulate import tabulate

from adaptopt.runtime import resolve_providers

OPTIMIZE_SCHEMA_VERSION = "1.0"


def _round(value, digits: int = 5):
    if value is None:
        return None
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return None
    return round(float(value), digits)


def _machine(machine) -> dict:
    return {"peak_gflops": _round(machine.peak_gflops, 2), "bandwidth_gbs": _round(machine.bandwidth_gbs, 2),
            "session_overhead_ms": _round(machine.session_overhead_ms, 5), "fingerprint": machine.fingerprint}


def _result(assembly) -> dict:
    from adaptopt.adapt.assemble import headline
    side = assembly.side
    speedup, original_ms, output_ms = headline(assembly)
    return {
        "improved": assembly.improved,
        "message": assembly.message,
        # timed apart (each model alone, as a user runs it) when those pairs agreed, else in one process
        "speedup": _round(speedup, 4),
        "speedup_in_process": _round(side.speedup, 4) if side else None,
        "verified_by": None if not side else "timed apart" if side.agreed_apart() else "one process",
        "latency_ms": {"original": _round(original_ms), "optimized": _round(output_ms)},
        "aa_noise": _round(side.noise, 4) if side else None,
        # the pairs of processes timed apart, each model alone (verify.apart), when they were
        "apart": side.to_dict()["apart"] if side and side.apart is not None else None,
        "accuracy": {"max_abs_diff": _round(assembly.validation.max_abs_diff, 8),
                     "min_cosine": _round(assembly.validation.min_cosine, 8),
                     "mode": assembly.validation.mode, "ok": assembly.validation.ok},
    }


def _readings(readings: dict) -> dict:
    return {name: {**r.to_dict(), "value": _round(r.value, 6)} for name, r in readings.items()}


def _leaf(sub, plan, accepted: dict, counters: dict | None = None) -> dict:
    env, res = plan.env, plan.result
    features = env.features(res.sequence)
    base = env.features(())
    validation = env.validation(res.sequence)
    ops = Counter(n.op_type for n in env.model.graph.node)
    chosen = next((d for d in reversed(res.decisions) if "final" in d), {})
    return {
        "id": sub.id, "parent": sub.parent, "nodes": sub.node_count, "range": [sub.start, sub.stop],
        "op_types": dict(ops.most_common(6)),
        "baseline_ms": _round(res.baseline.time_ms), "best_ms": _round(res.outcome.time_ms),
        "speedup": _round(res.speedup, 4), "noise": _round(env.noise, 4),
        "sequence": list(res.sequence), "chosen_by": chosen.get("chosen_by"),
        "accepted": sub.id in accepted,
        "bound": base.bound, "performance": _round(base.performance, 4),
        "bound_after": features.bound, "performance_after": _round(features.performance, 4),
        "validation": validation.to_dict() if validation else None,
        "measurements": env.measurements, "pass_errors": env.pass_errors,
        "counters": {k: _readings(v) for k, v in (counters or {}).items()},
        "decisions": res.decisions,
    }


def learning_curve(plans) -> list[float]:
    """Mean episode reward per epoch over the leaves trained from the start."""
    curves = [p.result.curve for p in plans.values() if p.result.curve]
    if not curves:
        return []
    epochs = max(len(c) for c in curves)
    return [round(sum(c[e] for c in curves if e < len(c)) / sum(1 for c in curves if e < len(c)), 5)
            for e in range(epochs)]


def build_report(model: onnx.ModelProto, config, machine, tree, plans, history, assembly, stages, budget, seed,
                 measurements, cache_hits, counters: dict | None = None) -> dict:
    leaves = [(s, plans[s.id]) for s in tree.leaves() if s.id in plans]
    return {
        "schema_version": OPTIMIZE_SCHEMA_VERSION,
        "kind": "optimize",
        "model": {"name": model.graph.name, "nodes": len(model.graph.node)},
        "target": {"execution_providers": list(config.target.execution_providers), "threads": config.target.threads,
                   "resolved_providers": resolve_providers(config.target)},
        "machine": _machine(machine),
        "settings": {"seed": seed, "accuracy_budget": budget, "initial_granularity": config.granularity.initial_granularity,
                     "epochs": config.policy.RL_training_epochs, "max_sequence": config.policy.max_sequence,
                     "passes": [p.name for p in leaves[0][1].env.passes] if leaves else []},
        "result": _result(assembly),
        "leaves": [_leaf(s, p, assembly.accepted, (counters or {}).get(s.id)) for s, p in leaves],
        "granularity_history": history,
        "learning_curve": learning_curve(plans),
        "events": assembly.events,
        "stages_s": stages,
        "measurements": measurements,
        "cache_hits": cache_hits,
        "policy_comparison": "greedy/random/oracle at the same budget: make bench SECTION=learning",
    }


def fixed_sequence_report(model, config, passes, steps: list[dict], assembly, stages, budget) -> dict:
    """``steps``: each pass's {"name", "modified", "changes"} and its "error" when it failed (skipped)."""
    return {
        "schema_version": OPTIMIZE_SCHEMA_VERSION,
        "kind": "optimize-fixed-sequence",
        "model": {"name": model.graph.name, "nodes": len(model.graph.node)},
        "target": {"execution_providers": list(config.target.execution_providers), "threads": config.target.threads,
                   "resolved_providers": resolve_providers(config.target)},
        "settings": {"passes": passes, "accuracy_budget": budget},
        "passes": steps,
        "result": _result(assembly),
        "events": assembly.events,
        "stages_s": stages,
    }


def render_markdown(report: dict) -> str:
    r = report["result"]
    lines = [f"# adaptopt optimize report — {report['model']['name']}", "",
             f"**{r['message']}**", "",
             tabulate([[f"speedup (verified{', ' + r['verified_by'] if r.get('verified_by') else ''})", r["speedup"]],
                       ["speedup in one process (side by side)", r.get("speedup_in_process")],
                       ["latency original (ms)", r["latency_ms"]["original"]],
                       ["latency optimized (ms)", r["latency_ms"]["optimized"]],
                       ["A/A noise (log ratio)", r["aa_noise"]],
                       ["max abs diff", r["accuracy"]["max_abs_diff"]],
                       ["min cosine", r["accuracy"]["min_cosine"]]], headers=["", "value"], tablefmt="github"), ""]
    if r.get("apart"):
        a = r["apart"]
        lines += [f"Timed apart (each model alone in a fresh process, {len(a['pairs'])} pairs): {a['speedup']}x, "
                  f"pairs {', '.join(f'{x}x' for x in a['pairs'])}: {'agreed' if a['agreed'] else 'not confirmed'}.",
                  ""]
    if report.get("cache_unusable"):
        lines += [f"Note: the {report['cache_unusable']}.", ""]
    for name, why in (report.get("settings", {}).get("passes_withheld") or {}).items():
        lines += [f"Not tried: `{name}`: it {why}.", ""]
    if report.get("machine"):
        m = report["machine"]
        lines += [f"Machine: {m['peak_gflops']} GFLOP/s peak, {m['bandwidth_gbs']} GB/s, session overhead "
                  f"{m['session_overhead_ms']} ms ({m['fingerprint']}).", ""]
    lines += _prepass_lines(report.get("prepass"))
    if report.get("leaves"):
        rows = [[x["id"], x["nodes"], ", ".join(list(x["op_types"])[:3]), x["bound"], x["performance"],
                 x["baseline_ms"], x["best_ms"], x["speedup"], " → ".join(x["sequence"]) or "—",
                 "yes" if x["accepted"] else "no", x["measurements"]] for x in report["leaves"]]
        lines += ["## Leaves", "", tabulate(rows, headers=["leaf", "nodes", "ops", "bound", "perf", "base ms",
                                                             "best ms", "speedup", "passes", "kept", "meas."],
                                            tablefmt="github"), ""]
    if report.get("passes"):
        rows = [[p["name"], p["modified"], p["changes"].get("rewrites", p["changes"].get("reason", ""))]
                for p in report["passes"]]
        lines += ["## Passes", "", tabulate(rows, headers=["pass", "modified", "rewrites / reason"],
                                            tablefmt="github"), ""]
    lines += _event_lines(report.get("events") or [])
    if report.get("granularity_history"):
        rows = [[h.get("round"), h["action"], h.get("leaf") or h.get("into") or "", h.get("gain_ms_before"),
                 h.get("gain_ms_after"), h.get("kept")] for h in report["granularity_history"]]
        lines += ["## Granularity", "", tabulate(rows, headers=["round", "action", "leaf", "gain before (ms)",
                                                                "gain after (ms)", "kept"], tablefmt="github"), ""]
    if report.get("learning_curve"):
        lines += ["## Learning curve (mean reward per epoch)", "",
                  " ".join(f"{v:+.3f}" for v in report["learning_curve"]), ""]
    if report.get("stages_s"):
        lines += ["## Time per stage (s)", "", tabulate(sorted(report["stages_s"].items()), headers=["stage", "s"],
                                                        tablefmt="github"), ""]
    return "\n".join(lines)


def _event_lines(events: list[dict]) -> list[str]:
    """The verification after the search, one row per decision: which leaves were confirmed
    alone, what the merged model measured side by side and timed apart, what was rolled
    back and why (without it a leaf that won 3x in the search shows only 'kept: no')."""
    if not events:
        return []
    rows = []
    for e in events:
        subject = e.get("leaf") or e.get("pass") or e.get("candidate") or e.get("attempt", "")
        if isinstance(e.get("leaves"), list):
            subject = ", ".join(e["leaves"]) or "—"
        measured = ""
        if "speedup" in e and "noise" in e:
            measured = f"{e['speedup']}x (A/A noise {e['noise']}, {e.get('rounds')} rounds)"
        apart = e.get("apart") if isinstance(e.get("apart"), dict) else (e if e["event"] == "timed_apart" else None)
        if apart is not None and apart.get("pairs") is not None:
            measured += (" " if measured else "") + f"apart: {apart.get('speedup')}x over {len(apart['pairs'])} pairs, " \
                        + ("agreed" if apart.get("agreed") else "not confirmed")
        kept = e.get("kept", e.get("agreed", ""))
        why = e.get("why") or e.get("error") or (" → ".join(e["sequence"]) if e.get("sequence") else "")
        rows.append([e["event"], subject, measured, {True: "yes", False: "no"}.get(kept, kept), why])
    return ["## Verification (after the search)", "",
            tabulate(rows, headers=["step", "leaf / pass / try", "measured", "kept", "why / passes"],
                     tablefmt="github"), ""]


def _prepass_lines(pre: dict | None) -> list[str]:
    """The whole-model exact passes: what ran, what was dropped and why, and the verdict."""
    if not pre or not (pre.get("applied") or pre.get("dropped") or pre.get("errors")):
        return []
    untimed = set(pre.get("untimed", []))
    rows = [[name, "kept", "outputs checked; not timed alone (the time left was short)" if name in untimed else ""]
            for name in pre.get("applied", [])]
    rows += [[d["pass"], "dropped", d["why"]] for d in pre.get("dropped", [])]
    rows += [["", "error", e] for e in pre.get("errors", [])]
    verdict = "kept" if pre.get("kept") else "not kept"
    return ["## Whole-model exact passes (pre-pass)", "", f"{verdict}: {pre.get('reason', '')}", "",
            tabulate(rows, headers=["pass", "step", "why"], tablefmt="github"), ""]
