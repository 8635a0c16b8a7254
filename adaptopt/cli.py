"""Command line: parse -> api -> render -> exit code. Nothing else lives here."""

from __future__ import annotations

import functools
import sys
import traceback


import click

from adaptopt import __version__
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
            return fn(*args, **kwargs)
        except AdaptoptError as exc:
            if debug:
                traceback.print_exc()
            _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, int(exc.exit_code))
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except click.exceptions.Exit:
            raise
        except Exception as exc:  # noqa: BLE001 - the one place a bug becomes exit 1
            if debug:
                traceback.print_exc()
            _fail(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                  "(run with --debug for the traceback)", int(ExitCode.INTERNAL_ERROR))
    return wrapper


def config_options(fn):
    """--config and --input-shape, shared by every command that reads a model."""
    fn = click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxDx...",
                      help="Shape of a model input (repeatable); overrides the config's inputs.")(fn)
    fn = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                      help="YAML config (default: built-in CPU settings).")(fn)
    return fn


def load_run_config(config_path: str | None, input_shapes: tuple[str, ...]):
    from adaptopt.config import load_config, parse_input_shapes, with_input_shapes
    return with_input_shapes(load_config(config_path), parse_input_shapes(input_shapes))


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
    model = api.merge(directory, output)
    if output != "-":
        click.echo(f"wrote {output}: {len(model.graph.node)} nodes", err=True)


# ---------------------------------------------------------------- profile / hal (issue 3)


# ---------------------------------------------------------------- passes (issue 4)


# ---------------------------------------------------------------- optimize / policy (issue 5)
@cli.group()
def policy() -> None:
    """Inspect Q-table files written by `optimize --policy`."""


@policy.command("show")
@click.argument("qtable", type=str)
@command
def policy_show(qtable: str) -> None:
    """Print a Q-table file as a table (state, action, Q value, visits)."""
    from tabulate import tabulate

    from adaptopt.policy.qtable import QTable
    table = QTable.load(qtable)
    rows = table.rows()
    click.echo(tabulate(rows, headers="keys", floatfmt=".4f") if rows else "(empty Q-table)")


def main() -> None:
    cli(prog_name="adaptopt")


if __name__ == "__main__":
    main()



