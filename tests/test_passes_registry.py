"""The pass interface and registry, the API entry point and the `adaptopt passes` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from adaptopt import api
from adaptopt.cli import cli
from adaptopt.config import AccuracyConfig, Config, PassesConfig
from adaptopt.errors import InputError
from adaptopt.passes.base import (
    Pass,
    PassContext,
    PassContractError,
    PassResult,
    finish,
)
from adaptopt.passes.registry import _unique, all_passes, get_pass, run_sequence
from tests.test_passes_support import CPU, feeds_for, prepared


def test_library_is_complete_and_well_formed():
    passes = all_passes()
    names = [p.name for p in passes]
    assert len(names) == len(set(names))
    for p in passes:
        assert isinstance(p, Pass)
        assert p.category in ("compute", "memory", "hybrid") and p.guarantee in ("exact", "lossy")
        assert p.description and "\n" not in p.description
    families = {"fold_constants", "eliminate_dead_code", "eliminate_common_subexpressions", "simplify_chains",
                "eliminate_identity", "fuse_conv_bn", "fuse_matmul_add", "fuse_layernorm", "fuse_gelu",
                "fuse_attention", "unroll_loops", "quantize_dynamic_int8", "quantize_static_qdq",
                "quantize_weights_int4", "prune_zero_channels", "prune_channels_magnitude", "cancel_transposes",
                "convert_nhwc", "tile_operator", "buffers_low_memory", "prefetch_weights", "mixed_precision_fp16",
                "gradient_accumulation"}
    assert families <= set(names)


def test_duplicate_names_are_refused():
    p = get_pass("fold_constants")
    with pytest.raises(ValueError, match="duplicate pass name 'fold_constants'"):
        _unique([p, p])


def test_unknown_pass_is_an_input_error_naming_it():
    with pytest.raises(InputError, match="unknown pass 'fuse_everything'"):
        get_pass("fuse_everything")


@pytest.mark.parametrize("name", [p.name for p in all_passes() if p.guarantee == "lossy"])
def test_lossy_passes_never_apply_with_zero_budget(name, bert_model, bert_config, resnet_model):
    for model, config in ((prepared(bert_model, bert_config), bert_config), (prepared(resnet_model), Config())):
        ctx = PassContext(target=CPU, feeds=feeds_for(model, config), accuracy_budget=0.0)
        verdict = get_pass(name).applies(model, ctx)
        result = get_pass(name).apply(model, ctx)
        assert not verdict.ok and "budget" in verdict.reason
        assert not result.modified and result.model is model


def test_run_sequence_chains_passes(resnet_model):
    model = prepared(resnet_model)
    out, results = run_sequence(model, ["eliminate_identity", "fuse_conv_bn", "fuse_conv_activation"],
                                PassContext(target=CPU))
    assert [r.modified for r in results] == [True, True, True]
    ops = {n.op_type for n in out.graph.node}
    assert "BatchNormalization" not in ops and "FusedConv" in ops and "Identity" not in ops
    assert all(n.name.split("/")[0] in {"fuse_conv_activation"} for n in out.graph.node if n.op_type == "FusedConv")


def test_run_sequence_refuses_unknown_names_before_running(resnet_model):
    with pytest.raises(InputError, match="unknown pass 'nope'"):
        run_sequence(resnet_model, ["fuse_conv_bn", "nope"], PassContext(target=CPU))


def test_contract_violation_names_the_pass(resnet_model):
    model = prepared(resnet_model)
    broken = type(model)()
    broken.CopyFrom(model)
    broken.graph.output[0].name = "renamed"
    with pytest.raises(PassContractError, match="pass rogue changed the graph inputs/outputs"):
        finish(model, broken, "rogue")


def test_api_apply_passes_validates_against_the_original(resnet_model):
    model = prepared(resnet_model)
    result = api.apply_passes(model, ["fuse_conv_bn", "eliminate_identity"], Config())
    assert result.validation.ok and result.validation.mode == "exact"
    assert [n for n, _ in result.results] == ["fuse_conv_bn", "eliminate_identity"]
    assert all(isinstance(r, PassResult) and r.modified for _, r in result.results)
    assert json.dumps(result.to_dict())


def test_api_apply_passes_judges_lossy_passes_by_the_budget(bert_model, bert_config):
    model = prepared(bert_model, bert_config)
    config = bert_config.replace(accuracy=AccuracyConfig(budget=0.99))
    result = api.apply_passes(model, ["quantize_dynamic_int8"], config)
    assert result.results[0][1].modified
    assert result.validation.ok and result.validation.mode == "budget" and result.validation.min_cosine >= 0.99


def test_api_apply_passes_refuses_unknown_and_disabled_passes(resnet_model):
    with pytest.raises(InputError, match="unknown pass 'fuse_magic'"):
        api.apply_passes(resnet_model, ["fuse_conv_bn", "fuse_magic"], Config())
    config = Config().replace(passes=PassesConfig(disabled=("fuse_conv_bn",)))
    with pytest.raises(InputError, match="pass 'fuse_conv_bn' is disabled"):
        api.apply_passes(resnet_model, ["fuse_conv_bn"], config)


def test_api_apply_passes_needs_shapes_for_dynamic_models(bert_model):
    with pytest.raises(InputError, match="dynamic input dims"):
        api.apply_passes(bert_model, ["fuse_gelu"], Config())


def test_cli_lists_passes_as_a_table_and_as_json():
    runner = CliRunner()
    table = runner.invoke(cli, ["passes"])
    assert table.exit_code == 0
    assert table.output.splitlines()[0].split() == ["name", "category", "guarantee", "description"]
    assert "fuse_conv_bn" in table.output and "lossy" in table.output
    listing = runner.invoke(cli, ["passes", "--json"])
    rows = json.loads(listing.output)
    assert {r["name"] for r in rows} == {p.name for p in all_passes()}


def test_feeds_are_never_mutated(resnet_model):
    model = prepared(resnet_model)
    feeds = feeds_for(model)
    copy = {k: v.copy() for k, v in feeds.items()}
    get_pass("quantize_static_qdq").apply(model, PassContext(target=CPU, feeds=feeds, accuracy_budget=0.99))
    assert all(np.array_equal(copy[k], feeds[k]) for k in feeds)


def test_session_option_passes_are_opt_in():
    """ORT does not read the arena / memory-pattern options from a model's ort_config, so a
    gain measured with them is not one a user loading the model gets: the default search
    leaves the buffers_* passes out; naming them brings them in."""
    from adaptopt.adapt.session import select_passes
    default = {p.name for p in select_passes(Config(), None, 0.0)}
    assert not any(name.startswith("buffers_") for name in default)
    assert "fold_constants" in default
    named = Config(passes=PassesConfig(enabled=("buffers_no_arena", "fold_constants")))
    assert [p.name for p in select_passes(named, None, 0.0)] == ["fold_constants", "buffers_no_arena"]
