"""Numerical comparison of two runs: the one rule every rewrite is judged by.

Exact mode: every output's max |a - b| relative to the output's scale (max |a|, at
least 1) must be <= ``exact_tolerance``, and its cosine similarity >= ``EXACT_MIN_COSINE``
unless the output is negligible (max |a| <= ``exact_tolerance``): a small absolute
error on a small-valued output can still point it somewhere else entirely. Lossy mode (a budget > 0): every output's
cosine similarity with the reference must be >= the budget. Non-finite values must
match position for position in both modes.

Integer and bool outputs (class ids, token ids, TopK indices, masks) are not
approximations: in exact mode they must be equal; with a budget, the fraction of
elements equal to the reference must be >= the budget (it stands in for the cosine,
which says nothing about indices: a flipped class id barely moves it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np


EXACT_MIN_COSINE = 0.999


@dataclass(frozen=True)
class OutputDiff:
    name: str
    max_abs_diff: float
    relative_diff: float
    cosine: float
    shape_ok: bool
    finite_ok: bool
    scale: float = 1.0  # max |reference|
    discrete: bool = False  # integer / bool output: ``cosine`` is the fraction of equal elements


@dataclass(frozen=True)
class Validation:
    ok: bool
    mode: str  # "exact" | "budget"
    threshold: float
    max_abs_diff: float
    max_relative_diff: float
    min_cosine: float
    reason: str = ""
    outputs: tuple[OutputDiff, ...] = field(default=())

    def to_dict(self) -> dict:
        return {"ok": self.ok, "mode": self.mode, "threshold": self.threshold,
                "max_abs_diff": self.max_abs_diff, "max_relative_diff": self.max_relative_diff,
                "min_cosine": self.min_cosine, "reason": self.reason}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64 = np.nan_to_num(a.astype(np.float64).ravel(), nan=0.0, posinf=0.0, neginf=0.0)
    b64 = np.nan_to_num(b.astype(np.float64).ravel(), nan=0.0, posinf=0.0, neginf=0.0)
    # sums, not np.dot / np.linalg.norm: those go to BLAS, whose worker threads keep
    # spinning for ~0.1 s after a call and stalled the leaf timed right after on 2 cores
    na, nb = math.sqrt(float(np.add.reduce(a64 * a64))), math.sqrt(float(np.add.reduce(b64 * b64)))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.add.reduce(a64 * b64)) / (na * nb)


def diff_output(name: str, ref: np.ndarray, got: np.ndarray) -> OutputDiff:
    ref, got = np.asarray(ref), np.asarray(got)
    if ref.shape != got.shape:
        return OutputDiff(name, math.inf, math.inf, 0.0, False, True)
    if ref.dtype.kind in "OUS" or got.dtype.kind in "OUS":
        same = bool(np.array_equal(ref, got))
        return OutputDiff(name, 0.0 if same else math.inf, 0.0 if same else math.inf, 1.0 if same else 0.0, True, True)
    if ref.size == 0:
        return OutputDiff(name, 0.0, 0.0, 1.0, True, True)
    if ref.dtype.kind in "iub" and got.dtype.kind in "iub":
        equal = ref == got
        diff = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64))))
        magnitude = float(np.max(np.abs(ref.astype(np.float64))))
        return OutputDiff(name, diff, diff / max(1.0, magnitude), float(np.mean(equal)), True, True, magnitude,
                          discrete=True)
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    finite_r, finite_g = np.isfinite(r), np.isfinite(g)
    inf_r, inf_g = np.isinf(r), np.isinf(g)
    finite_ok = (bool(np.array_equal(np.isnan(r), np.isnan(g))) and bool(np.array_equal(inf_r, inf_g))
                 and bool(np.array_equal(r[inf_r], g[inf_g])))
    both = finite_r & finite_g
    abs_diff = float(np.max(np.abs(r[both] - g[both]))) if both.any() else 0.0
    magnitude = float(np.max(np.abs(r[both]))) if both.any() else 0.0
    return OutputDiff(name, abs_diff, abs_diff / max(1.0, magnitude), cosine(r, g), True, finite_ok, magnitude)


def compare(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
            exact_tolerance: float = 1e-4, budget: float = 0.0) -> Validation:
    """Compare ``candidate`` against ``reference`` output by output."""
    missing = [n for n in reference if n not in candidate]
    if missing:
        return Validation(False, "exact" if budget <= 0 else "budget", budget or exact_tolerance,
                          math.inf, math.inf, 0.0, f"missing outputs: {', '.join(missing)}")
    diffs = tuple(diff_output(n, reference[n], candidate[n]) for n in reference)
    max_abs = max((d.max_abs_diff for d in diffs), default=0.0)
    max_rel = max((d.relative_diff for d in diffs), default=0.0)
    min_cos = min((d.cosine for d in diffs), default=1.0)
    reason = ""
    bad_shape = [d.name for d in diffs if not d.shape_ok]
    bad_finite = [d.name for d in diffs if not d.finite_ok]
    if budget > 0:
        mode, threshold = "budget", budget
        failing = [d for d in diffs if d.cosine < budget]
        if failing:
            what = "elements equal" if failing[0].discrete else "cosine"
            reason = f"{what} {failing[0].cosine:.6f} < {budget} on '{failing[0].name}'"
    else:
        mode, threshold = "exact", exact_tolerance
        failing = [d for d in diffs if d.relative_diff > exact_tolerance or (d.discrete and d.cosine < 1.0)]
        turned = [d for d in diffs if d.cosine < EXACT_MIN_COSINE and d.scale > exact_tolerance]
        if failing and failing[0].discrete:
            reason = f"{1 - failing[0].cosine:.3g} of the elements differ on '{failing[0].name}' (integer output)"
        elif failing:
            reason = f"relative diff {failing[0].relative_diff:.3g} > {exact_tolerance} on '{failing[0].name}'"
        elif turned:
            reason = f"cosine {turned[0].cosine:.6f} < {EXACT_MIN_COSINE} on '{turned[0].name}' (small values, new direction)"
    if bad_shape:
        reason = f"shape changed on '{bad_shape[0]}'"
    elif bad_finite:
        reason = f"NaN/Inf pattern changed on '{bad_finite[0]}'"
    return Validation(not reason, mode, threshold, max_abs, max_rel, min_cos, reason, diffs)
