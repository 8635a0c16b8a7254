"""Library entry points. They return result objects; they never print or exit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from adaptopt.config import Config
from adaptopt.errors import about_model, source_name
from adaptopt.graph.capture import make_inputs
from adaptopt.graph.index import GraphIndex
from adaptopt.graph.io import (
    atomic_directory,
    dynamic_inputs,
    load_model,
    load_model_and_signature,
    save_model,
)
from adaptopt.graph.merge import merge_directory
from adaptopt.graph.partition import PartitionTree, partition
from adaptopt.graph.subgraph import write_tree


@dataclass(frozen=True)
class SplitResult:
    tree: PartitionTree
    manifest: dict
    directory: Path


def build_tree(model: onnx.ModelProto, config: Config, granularity: int | None = None) -> PartitionTree:
    """Partition ``model`` into a tree of convex subgraphs (no files written)."""
    depth = config.granularity.initial_granularity if granularity is None else granularity
    return partition(GraphIndex.build(model), depth, config.granularity.min_nodes)


def try_make_inputs(model: onnx.ModelProto, config: Config) -> dict | None:
    """Reference inputs when the config (or the model's static shapes) allows, else None."""
    if dynamic_inputs(model) and not config.inputs and not config.inputs_file:
        return None
    return make_inputs(model, config)


def split(source: str | Path, directory: str | Path, config: Config | None = None,
          granularity: int | None = None) -> SplitResult:
    """Split a model into one standalone ONNX file per tree node plus ``manifest.json``.

    The files are cut at the config's input shapes; the root file, from which ``merge``
    takes the merged model's signature, keeps the model's own (dynamic dims stay dynamic)."""
    config = config or Config()
    with about_model(source):
        model, signature = load_model_and_signature(source, config)
        tree = build_tree(model, config, granularity)
        with atomic_directory(directory) as staging:  # all files or none (issue 7)
            manifest = write_tree(tree, staging, source=str(source), feeds=try_make_inputs(model, config),
                                  signature=signature)
    return SplitResult(tree, manifest, Path(directory))


def merge(directory: str | Path, destination: str | Path | None = None) -> onnx.ModelProto:
    """Rebuild one model from a split folder; write it when ``destination`` is given."""
    model = merge_directory(directory)
    if destination is not None:
        save_model(model, destination)
    return model


# ---------------------------------------------------------------- profile (issue 3)
def profile(source: str | Path, config: Config | None = None, granularity: int | None = None):
    """Profile a model (path or ``-``) subgraph by subgraph on real activations.

    Returns a :class:`adaptopt.profile.ProfileReport`; ``adaptopt.report.schema.profile_dict``
    turns it into the versioned JSON shape. A dynamic input dim without a shape raises
    :class:`InputError` naming the input.
    """
    from adaptopt.profile import profile_model
    config = config or Config()
    with about_model(source):
        model, signature = load_model_and_signature(source, config)
        return profile_model(model, config, granularity, name=source_name(source), signature=signature)


def hal_status(config: Config | None = None, recalibrate: bool = False) -> dict:
    """Execution providers present, each counter backend (available? why) and the machine calibration
    (read from the cache; measured and cached when absent or when ``recalibrate``)."""
    import onnxruntime as ort

    from adaptopt.hal.registry import describe_all
    from adaptopt.profile.calibrate import machine_profile
    config = config or Config()
    machine = machine_profile(config.target, config.policy.cache_dir, refresh=recalibrate)
    from adaptopt.runtime import provider_problem
    names = list(dict.fromkeys([*config.target.execution_providers, *ort.get_available_providers()]))
    problems = {p: provider_problem(p, config.target) for p in names}
    return {"onnxruntime": ort.__version__, "execution_providers": [p for p, why in problems.items() if why is None],
            "unusable_providers": {p: why for p, why in problems.items() if why is not None},
            "backends": describe_all(), "machine": machine.to_dict()}



# ---------------------------------------------------------------- passes (issue 4)

@dataclass(frozen=True)
class PassSequenceResult:
    """A fixed pass sequence applied to a model: the new model, what each pass did,
    and the new model validated against the original."""

    model: onnx.ModelProto
    results: tuple  # ((pass name, PassResult), ...)
    validation: object  # adaptopt.validate.Validation

    def to_dict(self) -> dict:
        return {"passes": [{"name": n, "modified": r.modified, "changes": r.changes} for n, r in self.results],
                "validation": self.validation.to_dict()}


def list_passes() -> list:
    """Every pass of the library (name, category, guarantee, description attributes)."""
    from adaptopt.passes.registry import all_passes
    return all_passes()


def apply_passes(model: onnx.ModelProto, pass_names, config: Config, feeds=None) -> PassSequenceResult:
    """Apply ``pass_names`` in order (no policy) and validate against the original.

    Unknown names, or names the config disables, are refused (InputError naming the
    pass) before anything runs. Validation uses ``feeds`` or inputs built from the
    config; it is exact unless a lossy pass changed the model (then the budget).
    """
    from adaptopt.errors import InputError
    from adaptopt.passes.base import PassContext
    from adaptopt.passes.registry import get_pass, run_sequence
    from adaptopt.runtime import make_session, run
    from adaptopt.validate import compare
    names = list(pass_names)
    for name in names:
        get_pass(name)
        if name in config.passes.disabled or (config.passes.enabled and name not in config.passes.enabled):
            raise InputError(f"pass '{name}' is disabled by the config ({config.source})")
    if feeds is None:
        feeds = try_make_inputs(model, config)
    if feeds is None:
        raise InputError("the model has dynamic input dims: give their shapes (config inputs: or --input-shape) "
                         "so the passes can be validated")
    ctx = PassContext(target=config.target, feeds=feeds, accuracy_budget=config.accuracy.budget,
                      seed=config.policy.seed)
    new_model, results = run_sequence(model, names, ctx)
    lossy = any(r.modified and get_pass(n).guarantee == "lossy" for n, r in zip(names, results))
    reference = run(make_session(model, config.target, level="disable"), feeds)
    candidate = run(make_session(new_model, config.target, level="disable"), feeds)
    validation = compare(reference, candidate, config.accuracy.exact_tolerance,
                         config.accuracy.budget if lossy else 0.0)
    return PassSequenceResult(new_model, tuple(zip(names, results)), validation)



# ---------------------------------------------------------------- optimize (issue 5)
def optimize(source: str | Path, config: Config | None = None, *, passes: list[str] | tuple[str, ...] | None = None,
             accuracy_budget: float | None = None, seed: int | None = None, budget_s: float | None = None,
             qtable: str | None = None, keep_subgraphs: str | Path | None = None, allow_slower: bool = False,
             progress=None, log=None):
    """Optimize a model file (or ``-``); returns an ``OptimizeResult`` (the model is not written).

    The returned model keeps the input's signature (dynamic dims stay dynamic); the
    work is done at the shapes given by the config's ``inputs``.
    """
    from adaptopt.adapt.loop import OptimizeOptions, optimize_model
    config = config or Config()
    if accuracy_budget is not None:
        _check_accuracy_budget(accuracy_budget)
    if passes and (keep_subgraphs is not None or qtable is not None):
        from adaptopt.errors import ConfigError  # neither would do anything: a fixed sequence has no search
        raise ConfigError(f"{'--keep-subgraphs' if keep_subgraphs is not None else '--policy'} needs the search: "
                          "--passes applies a fixed sequence to the whole model (no partition tree, no Q-table)")
    from adaptopt.graph.functions import inlined
    with about_model(source):
        given = load_model(source, config.replace(inputs={}), infer=False)
        skeleton = inlined(given, log or (lambda message: None))  # passes see inside model-local functions
        model = pinned_copy(skeleton, config, str(source))
        options = OptimizeOptions(tuple(passes) if passes else None, accuracy_budget, seed, budget_s, qtable,
                                  allow_slower, progress, log)
        result = optimize_model(model, skeleton, config, options)
    if result.model is skeleton:  # the original is written: as given, its functions not inlined
        result.model = given
    if keep_subgraphs is not None and result.tree is not None:
        write_optimized_tree(result, keep_subgraphs, str(source), signature=skeleton)
    return result


def train_policy(sources: list[str | Path], output: str | Path, config: Config | None = None, *,
                 accuracy_budget: float = 0.0, seed: int | None = None, log=None) -> list[dict]:
    """Train the Q-table ``output`` on the leaves of every model in ``sources`` (continuing
    from ``output`` when it exists) and save it; returns one summary row per model.

    Every model is loaded and checked before any is measured, so a bad path fails fast.
    """
    from adaptopt.adapt.cache import target_stamp
    from adaptopt.adapt.training import TrainingModel, train
    from adaptopt.policy.prior import stamp_target
    from adaptopt.policy.qtable import QTable
    config = config or Config()
    _check_accuracy_budget(accuracy_budget)
    models = [TrainingModel(str(source), load_model(source, config), config) for source in sources]
    table = QTable.load_or_new(output)
    rows = train(models, table, accuracy_budget, config.policy.seed if seed is None else seed,
                 log or (lambda _m: None))
    stamp_target(table, target_stamp(config.target))
    table.save(output)
    return rows


def _check_accuracy_budget(budget: float) -> None:
    from adaptopt.errors import ConfigError
    if not 0.0 <= budget <= 1.0:
        raise ConfigError(f"--accuracy-budget must be a cosine similarity in [0, 1], got {budget}")


def pinned_copy(skeleton: onnx.ModelProto, config: Config, name: str) -> onnx.ModelProto:
    """A copy of ``skeleton`` with dynamic dims pinned from the config and shapes inferred."""
    from adaptopt.graph.io import infer_shapes, pin_input_shapes
    model = onnx.ModelProto()
    model.CopyFrom(skeleton)
    if config.inputs:
        model = pin_input_shapes(model, config.inputs, name)
    return infer_shapes(model, name)


def write_optimized_tree(result, directory: str | Path, source: str, signature: onnx.ModelProto | None = None) -> dict:
    """``--keep-subgraphs``: the partition tree with the chosen leaf rewrites in place
    (all files or none: an interrupted write leaves ``directory`` as it was). ``signature``
    (the user's model as loaded, dynamic dims kept) is what a merge of the folder gets
    as inputs and outputs; without it, the pinned work model's."""
    with atomic_directory(Path(directory)) as staging:
        manifest = write_tree(result.tree, staging, source=source, signature=signature)
        files = {n["id"]: n["file"] for n in manifest["nodes"]}
        for leaf_id, leaf_model in result.leaf_models.items():
            save_model(leaf_model, staging / files[leaf_id])
    return manifest
