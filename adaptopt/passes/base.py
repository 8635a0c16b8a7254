"""The pass contract: what every optimization in the library declares and returns.

A pass takes a model (usually a standalone subgraph whose graph inputs/outputs are
its boundary tensors, sometimes a whole model) and returns a :class:`PassResult`
with a *new* model; the input is never mutated. Every pass keeps the names and order
of the graph's inputs and outputs and the default-domain opset; nodes it creates
carry its name as a prefix (``fuse_conv_bn/...``), so an optimized model explains
itself. An initializer the user may override (listed as a graph input, IR >= 4: see
``graph.index.overridable_initializers``) is part of that boundary: no pass folds,
fuses, drops or retypes it. :func:`finish` enforces these rules for every pass, so a
pass that breaks them fails loudly (:class:`PassContractError`, a bug) instead of
corrupting a merge.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import onnx

from adaptopt.config import TargetConfig
from adaptopt.graph.index import listed_constants, overridable_initializers, raise_to_ir_4

Category = Literal["compute", "memory", "hybrid"]
Guarantee = Literal["exact", "lossy"]
Scope = Literal["subgraph", "model"]
MS_DOMAIN = "com.microsoft"
TWO_GIB = 2**31


@dataclass(frozen=True)
class Applicability:
    """Whether a pass has anything to do; a failed match is a value with a reason."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


def yes(reason: str = "") -> Applicability:
    return Applicability(True, reason)


def no(reason: str) -> Applicability:
    return Applicability(False, reason)


@dataclass(frozen=True)
class PassResult:
    """A pass's output: the model (the input object itself when not modified) and
    what changed, e.g. ``{"rewrites": 3, "nodes_added": 3, "nodes_removed": 6,
    "ops": {"BatchNormalization": -3}}``; an unmodified result has a ``reason``."""

    model: onnx.ModelProto
    modified: bool
    changes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PassContext:
    """What a pass may know besides the graph.

    ``feeds``: real (captured) values of the model's graph inputs, used for calibration
    (static QDQ) and self-checks. ``accuracy_budget``: the minimum cosine similarity a
    lossy pass must keep; 0 means lossy passes must not apply.
    """

    target: TargetConfig = field(default_factory=TargetConfig)
    feeds: Mapping[str, np.ndarray] | None = None
    accuracy_budget: float = 0.0
    seed: int = 0


class PassContractError(RuntimeError):
    """A pass broke the contract (boundary renamed, opset changed, invalid graph): a bug."""


class Pass(ABC):
    """One optimization. Subclasses set the four class attributes and implement
    :meth:`check` (cheap applicability) and :meth:`transform` (the rewrite)."""

    name: ClassVar[str]
    category: ClassVar[Category]
    guarantee: ClassVar[Guarantee]
    description: ClassVar[str]
    # searchable parameters declared next to the pass: name -> candidate values
    search_space: ClassVar[Mapping[str, tuple]] = {}
    # "model": the effect lives in what only a whole model carries (ORT session options in
    # its metadata, training_info), which a merge of subgraphs cannot carry; the optimizer
    # decides such passes once, on the merged model.
    scope: ClassVar[Scope] = "subgraph"
    # True: searched only when named (passes.enabled, --passes); for passes whose effect
    # a plain ONNX Runtime user does not get by loading the model (see passes/buffers.py)
    opt_in: ClassVar[bool] = False
    # True: the rewrite fits constants to the activations of ``ctx.feeds`` (static quantization
    # ranges), so it is only as good as those inputs are like the real ones; with an input
    # nobody configured it runs only when named (session.withhold_calibrated)
    calibrated: ClassVar[bool] = False

    def applies(self, model: onnx.ModelProto, ctx: PassContext) -> Applicability:
        """Does this pass have anything to do on ``model`` for ``ctx.target``?"""
        if self.guarantee == "lossy" and ctx.accuracy_budget <= 0:
            return no("lossy pass: the accuracy budget is 0")
        return self.check(model, ctx)

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Rewrite a copy of ``model``; an inapplicable pass returns the input unchanged."""
        verdict = self.applies(model, ctx)
        if not verdict.ok:
            return PassResult(model, False, {"reason": verdict.reason})
        work = onnx.ModelProto()
        work.CopyFrom(model)
        new_model, changes = self.transform(work, ctx)
        if not changes.get("rewrites"):
            return PassResult(model, False, {"reason": changes.get("reason", "nothing to rewrite")})
        return PassResult(finish(model, new_model, self.name), True, _with_counts(model, new_model, changes))

    @abstractmethod
    def check(self, model: onnx.ModelProto, ctx: PassContext) -> Applicability:
        """Cheap test for something to rewrite (the lossy-budget gate is already done)."""

    @abstractmethod
    def transform(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, dict]:
        """Rewrite ``model`` (a private copy; may be mutated or replaced) and return
        ``(model, changes)``; ``changes["rewrites"] == 0`` means nothing was done."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


@contextlib.contextmanager
def ort_tool() -> Iterator[None]:
    """Around calls into ORT's Python tools (quantizer, transformers optimizer, float16):
    their log chatter is silenced and the scratch files some of them drop into the
    working directory (``sym_shape_infer_temp.onnx``) land in a temporary one."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime")]
    levels = [lg.level for lg in loggers]
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="adaptopt-ort-") as scratch, contextlib.redirect_stdout(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # e.g. the quantizer's scale of a constant tensor
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        os.chdir(scratch)
        try:
            yield
        finally:
            os.chdir(cwd)
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def detach_overridable(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Take the overridable initializers (:func:`overridable_initializers`) out of
    ``model.graph.initializer``, leaving their graph inputs: plain runtime inputs to the
    tool that sees ``model`` next. ORT's quantizers and fusion scripts treat every
    initializer as a weight to quantize, merge or drop from the inputs, whether the user
    may feed it or not; as an input it is left alone. Returns what was taken, for
    :func:`reattach_overridable`."""
    names = overridable_initializers(model)
    if not names:
        return []
    graph = model.graph
    taken = [t for t in graph.initializer if t.name in names]
    kept = [t for t in graph.initializer if t.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return taken


def reattach_overridable(model: onnx.ModelProto, taken: list[onnx.TensorProto]) -> onnx.ModelProto:
    """Give ``model`` (a tool's output) back the initializers :func:`detach_overridable`
    took, as defaults of the graph inputs of the same name; one whose input the tool
    dropped stays out, and the boundary checks then refuse the result."""
    listed = {i.name for i in model.graph.input}
    present = {t.name for t in model.graph.initializer}
    model.graph.initializer.extend(t for t in taken if t.name in listed and t.name not in present)
    return model


def apply_guarded(p: Pass, model: onnx.ModelProto, ctx: PassContext) -> tuple[PassResult | None, str]:
    """``p.apply`` for the optimizer: a failure comes back as one line naming the pass.

    Passes wrap third-party tools (ORT's quantizer and transformer fusions) that raise
    arbitrary exception types. For the optimizer, one pass failing on one (sub)graph is
    an outcome to record and revert, not a reason to abort the user's run; every caller
    puts the line in its report.
    """
    try:
        return p.apply(model, ctx), ""
    except Exception as exc:  # noqa: BLE001 - see the docstring: the failure is returned, never hidden
        return None, _failure_line(p, exc)


def applies_guarded(p: Pass, model: onnx.ModelProto, ctx: PassContext) -> tuple[bool, str]:
    """``p.applies(...).ok`` for the optimizer, with a failing check as one line (the
    check of some passes runs part of their matcher, or a third-party tool): like
    :func:`apply_guarded`, the pass failing on this graph is recorded, not fatal."""
    try:
        return p.applies(model, ctx).ok, ""
    except Exception as exc:  # noqa: BLE001 - returned as the pass's failure, like apply_guarded
        return False, _failure_line(p, exc)


def _failure_line(p: Pass, exc: Exception) -> str:
    text = str(exc).strip()
    return f"{p.name}: {type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def boundary_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Names of the graph's inputs and outputs, in order (what a pass must keep). An
    initializer listed as an input is one (the user may feed it) except below IR 4,
    where the listing was mandatory (:func:`listed_constants`)."""
    constants = listed_constants(model)
    return [i.name for i in model.graph.input if i.name not in constants], [o.name for o in model.graph.output]


def ensure_domain(model: onnx.ModelProto, domain: str = MS_DOMAIN, version: int = 1) -> None:
    if domain and not any(i.domain == domain for i in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def _node_names(model: onnx.ModelProto) -> set[str]:
    return {n.name for n in model.graph.node}


def finish(original: onnx.ModelProto, model: onnx.ModelProto, pass_name: str) -> onnx.ModelProto:
    """Enforce the contract on a rewritten model and stamp the nodes the pass created.

    A model below IR 4 comes out at IR 4 (:func:`raise_to_ir_4`, the same meaning): the
    initializers a rewrite adds need not be listed as graph inputs there."""
    raise_to_ir_4(model)
    _check_boundary(original, model, pass_name)
    _check_overridable(original, model, pass_name)
    if default_opset(model) != default_opset(original):
        raise PassContractError(f"pass {pass_name} changed the default opset "
                                f"{default_opset(original)} -> {default_opset(model)}")
    for domain in {n.domain for n in model.graph.node} - {"", "ai.onnx"}:
        ensure_domain(model, domain)
    _stamp_new_nodes(original, model, pass_name)
    _keep_model_identity(original, model)
    _sort_nodes(model)
    _refresh_value_info(model)
    _check(model, pass_name)
    return model


IDENTITY_FIELDS = ("producer_name", "producer_version", "domain", "model_version", "doc_string")


def _keep_model_identity(original: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """The model's producer, version and docs stay the user's (ORT's quantizer signed its
    output "onnx.quantize" 0.1.0), and so do its metadata entries; what a pass sets there
    (a session option, a quantizer's marker) is kept."""
    for name in IDENTITY_FIELDS:
        setattr(model, name, getattr(original, name))
    present = {p.key for p in model.metadata_props}
    for prop in original.metadata_props:
        if prop.key not in present:
            model.metadata_props.add(key=prop.key, value=prop.value)


def _check_boundary(original: onnx.ModelProto, model: onnx.ModelProto, pass_name: str) -> None:
    inits = {t.name for t in model.graph.initializer}
    before, after = boundary_names(original), boundary_names(model)
    if before != after:
        raise PassContractError(f"pass {pass_name} changed the graph inputs/outputs {before} -> {after}")
    orig_types = {v.name: v.type.SerializeToString() for v in list(original.graph.input) + list(original.graph.output)}
    overridable = overridable_initializers(original)
    for vi in list(model.graph.input) + list(model.graph.output):
        if (vi.name not in inits or vi.name in overridable) and vi.type.SerializeToString() != orig_types[vi.name]:
            raise PassContractError(f"pass {pass_name} changed the type of boundary tensor '{vi.name}'")


def _check_overridable(original: onnx.ModelProto, model: onnx.ModelProto, pass_name: str) -> None:
    """Every overridable initializer of ``original`` is still one, of the same type and
    shape: the user may feed it, so no pass may drop, rename or retype that default (nor
    fold it, which :meth:`GraphEditor.const` and :func:`detach_overridable` prevent; its
    bytes are not compared, which for a model exported with every weight as an input
    would copy them all for each pass)."""
    before = overridable_initializers(original)
    if not before:
        return
    lost = sorted(before - overridable_initializers(model))
    if lost:
        raise PassContractError(f"pass {pass_name} dropped the overridable initializer(s) {lost} "
                                "(initializers the user may feed as graph inputs)")
    old = {t.name: (t.data_type, tuple(t.dims)) for t in original.graph.initializer if t.name in before}
    for t in model.graph.initializer:
        if t.name in old and (t.data_type, tuple(t.dims)) != old[t.name]:
            raise PassContractError(f"pass {pass_name} changed the type or shape of the overridable "
                                    f"initializer '{t.name}'")


def _stamp_new_nodes(original: onnx.ModelProto, model: onnx.ModelProto, pass_name: str) -> None:
    """Nodes not in the original carry ``pass_name/`` (tools such as the ORT quantizer
    name nodes their own way; they are renamed here). Names stay unique."""
    before = _node_names(original)
    taken = set(_node_names(model))
    prefix = pass_name + "/"
    for node in model.graph.node:
        if node.name in before or node.name.startswith(prefix):
            continue
        base = prefix + (node.name or node.op_type)
        candidate, k = base, 0
        while candidate in taken:
            k += 1
            candidate = f"{base}_{k}"
        taken.add(candidate)
        node.name = candidate


def _sort_nodes(model: onnx.ModelProto) -> None:
    """Tools such as ORT's quantizer append nodes out of order; sort topologically."""
    from adaptopt.passes.edit import toposort
    graph = model.graph
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    ordered = toposort(list(graph.node), available)
    del graph.node[:]
    graph.node.extend(ordered)


def _refresh_value_info(model: onnx.ModelProto) -> None:
    """Drop value infos of tensors that no longer exist, then re-run shape inference."""
    produced = {o for n in model.graph.node for o in n.output}
    keep = [vi for vi in model.graph.value_info if vi.name in produced]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    if model.ByteSize() >= TWO_GIB:
        return
    # overridable initializers are hidden from inference (see external.inference_pieces)
    hidden = overridable_initializers(model)
    initializers = list(model.graph.initializer) if hidden else []
    if hidden:
        del model.graph.initializer[:]
        model.graph.initializer.extend(t for t in initializers if t.name not in hidden)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except (onnx.shape_inference.InferenceError, RuntimeError):
        return  # inference is a convenience here; the checker below is the rule
    finally:
        if hidden:
            del model.graph.initializer[:]
            model.graph.initializer.extend(initializers)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)


def _check(model: onnx.ModelProto, pass_name: str) -> None:
    """The ONNX checker, through io.check_model (which handles weights kept on disk and > 2 GiB)."""
    from adaptopt.errors import InputError
    from adaptopt.graph.io import check_model
    try:
        check_model(model, f"pass {pass_name}", structure=False)
    except InputError as exc:
        raise PassContractError(f"pass {pass_name} produced an invalid model: {exc}") from None


def op_histogram(model: onnx.ModelProto) -> Counter:
    return Counter((f"{n.domain}." if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in model.graph.node)


def _with_counts(original: onnx.ModelProto, model: onnx.ModelProto, changes: dict) -> dict:
    before, after = _node_names(original), _node_names(model)
    delta = op_histogram(model)
    delta.subtract(op_histogram(original))
    out = dict(changes)
    out.setdefault("nodes_added", len(after - before))
    out.setdefault("nodes_removed", len(before - after))
    out["ops"] = {op: n for op, n in sorted(delta.items()) if n}
    return out
