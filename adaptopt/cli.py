"""Command line: parse -> api -> render -> exit code. Nothing else lives here."""

from __future__ import annotations

import functools
import json
import math
import sys
import traceback
from pathlib import Path

import click

from adaptopt import __version__, signals
from adaptopt.errors import AdaptoptError, ExitCode


def _fail(message: str, code: int) -> None:
    click.echo(f"adaptopt: error: {message}", err=True)
    sys.exit(code)


def command(fn):
    """Map user errors to one line + their exit code; bugs to exit 1 (traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False) or (click.get_current_context().find_root().params.get("debug"))
        try:
            with signals.interrupts_as_exceptions():  # SIGTERM unwinds like Ctrl-C: temp files cleaned
                return fn(*args, **kwargs)
        except AdaptoptError as exc:
            if debug:
                traceback.print_exc()
            _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, int(exc.exit_code))
        except KeyboardInterrupt as exc:
            _fail(signals.describe(exc), signals.exit_code(exc))
        except BrokenPipeError:  # the reader of stdout left (`| head`): quiet, as other tools are
            _stdout_gone()
        except click.exceptions.Exit:
            raise
        except Exception as exc:  # noqa: BLE001 - the one place a bug becomes exit 1
            if debug:
                traceback.print_exc()
            _fail(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                  "(run with --debug for the traceback)", int(ExitCode.INTERNAL_ERROR))
    return wrapper


def _stdout_gone() -> None:
    """Exit 141 (128 + SIGPIPE, what a shell reports for a tool killed by it) without a word:
    stdout is pointed at /dev/null first, so flushing it at exit cannot raise again."""
    import os
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    sys.exit(141)


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses nan and inf: ``float()`` reads "nan" and "inf",
    nan passes every range bound (it compares false) and a gate on it never fires."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def config_options(fn):
    """--config and --input-shape, shared by every command that reads a model."""
    fn = click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxDx...",
                      help="Shape of a model input (repeatable); overrides the config's inputs.")(fn)
    fn = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                      help="YAML config (default: built-in CPU settings).")(fn)
    return fn


def check_outputs(*paths: tuple[str | None, str], folder: tuple[str | None, str] | None = None) -> None:
    """Refuse unwritable output paths (``(path, what)``; None and ``-`` are skipped) before
    any work: a run that measures for minutes must not fail at the end on a bad -o."""
    from adaptopt.errors import InputError
    from adaptopt.graph.io import check_writable
    for path, what in list(paths) + ([folder] if folder else []):
        if path is not None and not path.strip():
            raise InputError(f"{what}: empty path")
    for path, what in paths:
        if path and path != "-":
            check_writable(path, what)
    if folder and folder[0]:
        check_writable(folder[0], folder[1], directory=True)


def load_run_config(config_path: str | None, input_shapes: tuple[str, ...]):
    """The config with command-line shapes; says on stderr when a configured execution
    provider is not usable here and the run falls back to the CPU (configs/gpu.yaml on a
    machine without a GPU runs, but must not pass for a GPU measurement)."""
    from adaptopt.config import load_config, parse_input_shapes, with_input_shapes
    from adaptopt.runtime import fallback_warning
    config = with_input_shapes(load_config(config_path), parse_input_shapes(input_shapes))
    warning = fallback_warning(config.target)
    if warning:
        click.echo(f"adaptopt: warning: {warning}", err=True)
    return config


def warn_if_cache_unusable(config) -> None:
    """One line when the measurement cache cannot be used (a file, read-only): the run works
    in memory, but a rerun measures again (the same-seed, same-bytes promise needs the cache)."""
    from adaptopt.adapt.cache import unusable_reason
    from adaptopt.profile.calibrate import resolve_cache_dir
    reason = unusable_reason(resolve_cache_dir(config.policy.cache_dir))
    if reason:
        click.echo(f"adaptopt: warning: {reason}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="adaptopt")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def cli(debug: bool) -> None:
    """adaptopt: measure each subgraph of an ONNX model on the target and keep only the rewrites that win."""


@cli.command()
@click.argument("model", type=str)
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the subgraph files and manifest.json.")
@click.option("--granularity", type=click.IntRange(0, 20), default=None,
              help="Depth of the partition tree (default: the config's initial_granularity).")
@config_options
@command
def split(model: str, out_dir: str, granularity: int | None, config_path: str | None,
          input_shapes: tuple[str, ...]) -> None:
    """Split MODEL (a path or -) into a tree of standalone subgraph ONNX files."""
    from adaptopt import api
    config = load_run_config(config_path, input_shapes)
    check_outputs(folder=(out_dir, "-o"))
    result = api.split(model, out_dir, config, granularity)
    leaves = result.manifest["leaves"]
    click.echo(f"wrote {len(result.manifest['nodes'])} subgraph files ({len(leaves)} leaves) and manifest.json "
               f"to {result.directory}", err=True)


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("-o", "--output", required=True, help="Merged model path, or - for stdout.")
@command
def merge(directory: str, output: str) -> None:
    """Rebuild one model from the leaves named in DIRECTORY/manifest.json."""
    from adaptopt import api
    check_outputs((output, "-o"))
    model = api.merge(directory, output)
    if output != "-":
        click.echo(f"wrote {output}: {len(model.graph.node)} nodes", err=True)


# ---------------------------------------------------------------- profile / hal (issue 3)
@cli.command()
@click.argument("model", type=str)
@click.option("--granularity", type=click.IntRange(0, 20), default=None,
              help="Depth of the partition tree (default: the config's initial_granularity).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv", "md"]), default="table",
              show_default=True, help="Report format.")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False, allow_dash=True),
              help="Write the report to FILE instead of stdout (- is stdout).")
@config_options
@command
def profile(model: str, granularity: int | None, fmt: str, output: str | None, config_path: str | None,
            input_shapes: tuple[str, ...]) -> None:
    """Time every subgraph of MODEL (a path or -) on real activations and say what bounds it."""
    from adaptopt import api
    from adaptopt.report.render import render
    check_outputs((output, "-o"))
    report = api.profile(model, load_run_config(config_path, input_shapes), granularity)
    text = render(report, fmt)
    if output is None or output == "-":
        click.echo(text)
        return
    from pathlib import Path

    from adaptopt.graph.io import atomic_path
    with atomic_path(Path(output)) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    click.echo(f"wrote {output}: {len(report.leaves)} leaves profiled in {report.wall_s:.1f} s", err=True)


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config (target execution providers and threads; default: built-in CPU settings).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--recalibrate", is_flag=True, help="Measure the machine again instead of reading the cache.")
@command
def hal(config_path: str | None, fmt: str, recalibrate: bool) -> None:
    """Execution providers, counter backends (available? why) and the cached machine calibration."""
    from adaptopt import api
    from adaptopt.config import load_config
    from adaptopt.report.render import render_hal
    click.echo(render_hal(api.hal_status(load_config(config_path), recalibrate), fmt))



# ---------------------------------------------------------------- passes (issue 4)

@cli.command("passes")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@command
def passes_command(as_json: bool) -> None:
    """List the optimization passes: name, category, guarantee, description."""
    from adaptopt import api
    rows = [(p.name, p.category, p.guarantee, p.description) for p in api.list_passes()]
    if as_json:
        keys = ("name", "category", "guarantee", "description")
        click.echo(json.dumps([dict(zip(keys, row)) for row in rows], indent=2))
        return
    from tabulate import tabulate
    click.echo(tabulate(rows, headers=["name", "category", "guarantee", "description"]))



# ---------------------------------------------------------------- optimize / policy (issue 5)
@cli.command()
@click.argument("model", type=str)
@click.option("-o", "--output", default=None, help="Optimized model path or - (default: MODEL.opt.onnx).")
@click.option("--report", "report_path", default=None, help="Write the report (.json or .md).")
@click.option("--policy", "qtable", default=None, help="Q-table JSON: warm start from it, save to it.")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Random seed (default: the config's policy.seed).")
@click.option("--budget", "budget_s", type=FiniteFloatRange(min=1.0), default=None, help="Time budget in seconds.")
@click.option("--require-speedup", type=FiniteFloatRange(min=0.0, min_open=True), default=None,
              help="Exit 3 if the verified speedup is below X (X > 0): the one timed apart in fresh processes when its "
                   "pairs agreed, else the lower of that and the one-process speedup.")
@click.option("--keep-subgraphs", type=click.Path(file_okay=False), default=None,
              help="Write the partition tree with the chosen rewrites (adaptopt merge DIR rebuilds).")
@click.option("--passes", "pass_list", default=None, help="Apply this fixed pass sequence (a,b,c) to the whole model instead of the search "
                   "(then --keep-subgraphs and --policy are errors).")
@click.option("--accuracy-budget", type=FiniteFloatRange(0.0, 1.0), default=None,
              help="Let lossy passes in while every output keeps cosine >= C (0 = lossless).")
@click.option("--allow-slower", is_flag=True, help="Keep the rewrites even when not verified faster.")
@click.option("--json", "as_json", is_flag=True, help="Print a one-object JSON summary on stdout.")
@config_options
@command
def optimize(model: str, output: str | None, report_path: str | None, qtable: str | None, seed: int | None,
             budget_s: float | None, require_speedup: float | None, keep_subgraphs: str | None, pass_list: str | None,
             accuracy_budget: float | None, allow_slower: bool, as_json: bool, config_path: str | None,
             input_shapes: tuple[str, ...]) -> None:
    """Optimize MODEL (a path or -): measure each subgraph, keep only rewrites that win."""
    from adaptopt import api
    from adaptopt.cli_render import (
        optimize_summary,
        progress_printer,
        report_format,
        write_report,
    )
    from adaptopt.errors import GateNotMet, InputError
    check_outputs((output, "-o"), (report_path, "--report"), (qtable, "--policy"),
                  folder=(keep_subgraphs, "--keep-subgraphs"))
    output = output if output is not None else ("-" if model == "-" else str(Path(model).with_suffix("")) + ".opt.onnx")
    if as_json and output == "-":
        raise InputError("--json prints the summary on stdout; give -o PATH for the model")
    config = load_run_config(config_path, input_shapes)
    warn_if_cache_unusable(config)
    if report_path:
        report_format(report_path)
    check_outputs((output, "-o"))  # the default path, next to the model
    passes = [p.strip() for p in pass_list.split(",") if p.strip()] if pass_list else None
    result = api.optimize(model, config, passes=passes, accuracy_budget=accuracy_budget, seed=seed,
                          budget_s=budget_s, qtable=qtable, keep_subgraphs=keep_subgraphs,
                          allow_slower=allow_slower, progress=progress_printer(), log=lambda m: click.echo(m, err=True))
    api.save_model(result.model, output)
    if report_path:
        write_report(result.report, report_path)
    summary = optimize_summary(result, output, report_path)
    click.echo(summary["message"], err=True)
    if as_json:
        click.echo(json.dumps(summary))
    verified = result.gated_speedup
    if require_speedup is not None and verified < require_speedup:
        raise GateNotMet(f"verified speedup {verified:.3f}x is below --require-speedup {require_speedup} "
                         f"(the model was written to {output})")


@cli.group()
def policy() -> None:
    """Train and inspect Q-table files (`optimize --policy FILE` starts from one)."""


@policy.command("train")
@click.argument("models", nargs=-1, required=True, type=str)
@click.option("-o", "--output", required=True, help="Q-table JSON to write (training continues from it if it exists).")
@click.option("--accuracy-budget", type=FiniteFloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="Let lossy passes in while every output keeps cosine >= C (0 = lossless).")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Random seed (default: the config's policy.seed).")
@config_options
@command
def policy_train(models: tuple[str, ...], output: str, accuracy_budget: float, seed: int | None,
                 config_path: str | None, input_shapes: tuple[str, ...]) -> None:
    """Learn pass values on MODELS (Q-learning over every subgraph, measured here) into a Q-table."""
    from tabulate import tabulate

    from adaptopt import api
    config = load_run_config(config_path, input_shapes)
    warn_if_cache_unusable(config)
    check_outputs((output, "-o"))
    rows = api.train_policy(list(models), output, config, accuracy_budget=accuracy_budget, seed=seed,
                            log=lambda m: click.echo(m, err=True))
    click.echo(tabulate(rows, headers="keys"))
    click.echo(f"wrote {output}", err=True)


@policy.command("show")
@click.argument("qtable", type=str)
@command
def policy_show(qtable: str) -> None:
    """Print a Q-table file as a table (state, action, Q value, visits)."""
    from tabulate import tabulate

    from adaptopt.policy.qtable import QTable
    table = QTable.load(qtable)
    rows = table.rows()
    trained = table.meta.get("target")
    if isinstance(trained, dict) and trained.get("machine"):
        click.echo(f"trained on: {trained['machine']}")
    click.echo(tabulate(rows, headers="keys", floatfmt=".4f") if rows else "(empty Q-table)")


def main() -> None:
    """The ``adaptopt`` entry point: click's usage errors become one line too (click prints
    a usage block by default), exit 2 as click gives them."""
    from adaptopt.malloc import return_freed_memory_promptly
    return_freed_memory_promptly()
    try:
        code = cli(prog_name="adaptopt", standalone_mode=False)
    except click.exceptions.ClickException as exc:
        usage = isinstance(exc, click.UsageError) and exc.ctx is not None
        hint = f" (see '{exc.ctx.command_path} --help')" if usage else ""
        _fail(" ".join(exc.format_message().split()) + hint, exc.exit_code)
    except click.exceptions.Abort:
        _fail("interrupted", 130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()



