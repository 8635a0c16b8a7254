"""The library: an explicit list of passes (no import side effects), lookup, sequences."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import onnx

from adaptopt.errors import InputError
from adaptopt.passes.base import Pass, PassContext, PassContractError, PassResult


@functools.lru_cache(maxsize=1)
def _library() -> tuple[Pass, ...]:
    from adaptopt.passes import (
        attention,
        buffers,
        cleanup,
        dims,
        fusion,
        layout,
        loops,
        patterns,
        precision,
        prefetch,
        prune,
        quantize,
        tiling,
        training,
        transformer,
    )
    passes = (
        # cleanups
        cleanup.FoldConstantsPass(), cleanup.EliminateIdentityPass(), dims.ShareInputDimsPass(),
        cleanup.CommonSubexpressionPass(),
        layout.SimplifyChainsPass(), prune.EliminateDeadCodePass(),
        # kernel fusion: elementwise patterns first (folding an affine into a Conv can take
        # the "/ 6" a hard-swish match needs), then the folds into Conv / Gemm
        patterns.FuseHardSwishPass(), patterns.FuseSiluPass(), patterns.FuseGeluPass(),
        patterns.FuseLayerNormPass(), transformer.FuseTransformerPass(),
        attention.FuseScaledDotProductAttentionPass(),
        fusion.FusePadConvPass(), fusion.FuseConvBnPass(), fusion.FuseConvAffinePass(), fusion.FuseActivationPass(),
        fusion.FuseMatMulScalePass(), fusion.FuseMatMulAddPass(),
        # loop unrolling
        loops.UnrollLoopsPass(),
        # quantization
        quantize.QuantizeDynamicPass(), quantize.QuantizeStaticPass(), quantize.QuantizeInt4Pass(),
        # pruning
        prune.PruneZeroChannelsPass(), prune.PruneMagnitudePass(),
        # data layout, tiling, buffers, prefetching
        layout.TransposeResidualsPass(), layout.CancelTransposesPass(), layout.NhwcPass(), tiling.TileOperatorPass(),
        *buffers.BUFFER_PASSES, prefetch.PrefetchWeightsPass(),
        # hybrid
        precision.MixedPrecisionPass(), training.GradientAccumulationPass(),
    )
    return _unique(passes)


def _unique(passes: Iterable[Pass]) -> tuple[Pass, ...]:
    seen: dict[str, Pass] = {}
    for p in passes:
        if p.name in seen:
            raise ValueError(f"duplicate pass name '{p.name}' ({seen[p.name]!r} and {p!r})")
        seen[p.name] = p
    return tuple(seen.values())


def all_passes() -> list[Pass]:
    """Every pass of the library, in a fixed order: cleanups, then fusions with the
    elementwise patterns before the folds into Conv/Gemm, so the exact passes in library
    order make a sensible static sequence."""
    return list(_library())


def pass_names() -> list[str]:
    return [p.name for p in _library()]


def get_pass(name: str) -> Pass:
    """The pass called ``name``; :class:`InputError` naming it when there is none."""
    for p in _library():
        if p.name == name:
            return p
    raise InputError(f"unknown pass '{name}' (known: {', '.join(pass_names())})")


def run_sequence(model: onnx.ModelProto, names: Sequence[str], ctx: PassContext
                 ) -> tuple[onnx.ModelProto, list[PassResult]]:
    """Apply the passes ``names`` in order; each sees the previous one's output.

    Unknown names are refused before anything runs. A pass that breaks the contract
    raises :class:`PassContractError` naming it and the passes that ran before it.
    """
    passes = [get_pass(n) for n in names]
    results: list[PassResult] = []
    for p in passes:
        try:
            result = p.apply(model, ctx)
        except PassContractError as exc:
            before = ", ".join(q.name for q in passes[:len(results)]) or "none"
            raise PassContractError(f"{exc} (passes run before it: {before})") from exc
        results.append(result)
        model = result.model
    return model, results
