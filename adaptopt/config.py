"""Typed configuration: the schema of DESIGN.md, loaded from YAML and validated.

Every section is a frozen dataclass. Unknown keys, wrong types and bad values raise
:class:`ConfigError` naming the key, the file and the line. Every field has a
default, so ``Config()`` is the built-in CPU configuration used without ``--config``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from adaptopt.errors import ConfigError

DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")
VALUE_KINDS = ("uniform01", "ones", "zeros", "normal")


@dataclass(frozen=True)
class InputSpec:
    """How to build one model input: shape (None = from the model), dtype, values."""

    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    values: str | None = None  # None: not configured (uniform01, but the user never said so)
    value_range: tuple[float, float] | None = None  # integers lo <= v < hi, floats lo <= v < hi


@dataclass(frozen=True)
class TargetConfig:
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    device: str = "cpu"
    threads: int = 2
    allow_cpu_fallback: bool = True


@dataclass(frozen=True)
class GranularityConfig:
    initial_granularity: int = 3
    min_nodes: int = 4
    performance_threshold: float = 0.15
    merging_threshold: float = 0.6
    max_rounds: int = 3


@dataclass(frozen=True)
class ProfilingConfig:
    warmup: int = 3
    iterations: int = 30
    min_time_s: float = 0.05
    max_time_s: float = 2.0
    counters: tuple[str, ...] = ("perf", "rusage", "analytic", "nvml", "ncu")
    per_node: bool = True
    isolate: bool = True  # run and time subgraphs in a worker process (a crash costs one step)
    timeout_s: float = 120.0  # per subgraph run/timing in the worker
    # the written model, and end-to-end gains under 3% (or inside the noise), are timed again in
    # this many pairs of fresh processes, each model alone, and kept only when they hold there
    # (0: no timing apart; small gains are then not kept)
    apart_pairs: int = 8
    # each process times its model this long a pair, in slices of 0.1 s taking turns with the
    # other's (each slice warmed 0.1 s first, at least 2 runs timed; verify.apart)
    apart_seconds: float = 0.5


@dataclass(frozen=True)
class PolicyConfig:
    RL_training_epochs: int = 6
    learning_rate: float = 0.5
    discount: float = 0.9
    epsilon_start: float = 0.3
    epsilon_end: float = 0.0
    max_sequence: int = 4
    bandwidth_weight: float = 0.05
    failure_penalty: float = 1.0
    optimistic_init: float = 0.1
    seed: int = 0
    qtable: str | None = None
    prior: bool = False  # start from the built-in prior table when no qtable file exists (CPU targets)
    cache_dir: str | None = None


@dataclass(frozen=True)
class PassesConfig:
    enabled: tuple[str, ...] = ()  # empty: every pass in the library
    disabled: tuple[str, ...] = ()


@dataclass(frozen=True)
class AccuracyConfig:
    exact_tolerance: float = 1e-4  # max |diff| relative to the output's scale
    budget: float = 0.0  # min cosine lossy passes must keep; 0 disables lossy passes


@dataclass(frozen=True)
class BudgetConfig:
    seconds: float = 300.0  # a 440 MB encoder took 9 min at 600 (the search, then its verification)


@dataclass(frozen=True)
class ReportConfig:
    formats: tuple[str, ...] = ("json", "md")


@dataclass(frozen=True)
class Config:
    target: TargetConfig = field(default_factory=TargetConfig)
    inputs: Mapping[str, InputSpec] = field(default_factory=dict)
    inputs_file: str | None = None  # .npz of real inputs
    granularity: GranularityConfig = field(default_factory=GranularityConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    passes: PassesConfig = field(default_factory=PassesConfig)
    accuracy: AccuracyConfig = field(default_factory=AccuracyConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    source: str = "<defaults>"

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def with_section(self, section: str, **changes: Any) -> "Config":
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})

    def to_dict(self) -> dict:
        return _to_plain(self)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- validation rules
# (type, check, message) per key; a check returns True when the value is acceptable.
_POS_INT = (int, lambda v: v >= 1, "an integer >= 1")
_NONNEG_INT = (int, lambda v: v >= 0, "an integer >= 0")
_FRACTION = (float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
_POS_FLOAT = (float, lambda v: v > 0 and math.isfinite(v), "a positive number")
_BOOL = (bool, lambda v: True, "true or false")
_STR_LIST = (list, lambda v: all(isinstance(s, str) for s in v), "a list of strings")
_OPT_STR = (str, lambda v: True, "a string")
_COUNTERS = ("perf", "rusage", "analytic", "nvml", "ncu")

_RULES: dict[str, dict[str, tuple]] = {
    "target": {
        "execution_providers": (list, lambda v: len(v) > 0 and all(isinstance(s, str) for s in v),
                                "a non-empty list of execution provider names"),
        "device": (str, lambda v: v in ("cpu", "cuda", "gpu"), "one of cpu, cuda, gpu"),
        "threads": (int, lambda v: 0 <= v <= 1024, "an integer in [0, 1024]"),
        "allow_cpu_fallback": _BOOL,
    },
    "granularity": {
        "initial_granularity": (int, lambda v: 0 <= v <= 20, "an integer in [0, 20]"),
        "min_nodes": _POS_INT,
        "performance_threshold": _FRACTION,
        "merging_threshold": _FRACTION,
        "max_rounds": _NONNEG_INT,
    },
    "profiling": {
        "warmup": (int, lambda v: 0 <= v <= 100_000, "an integer in [0, 100000]"),
        "iterations": _POS_INT,
        "min_time_s": (float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0"),
        "max_time_s": _POS_FLOAT,
        "counters": (list, lambda v: all(c in _COUNTERS for c in v), f"a list drawn from {', '.join(_COUNTERS)}"),
        "per_node": _BOOL,
        "isolate": _BOOL,
        "timeout_s": _POS_FLOAT,
        "apart_pairs": (int, lambda v: v == 0 or 5 <= v <= 100, "0 or an integer in [5, 100]"),
        # a pair runs ~4x this (two processes, each slice warmed as long as it is timed): at 10,
        # 3 pairs take about verify.APART_MAX_S, and later pairs are cut
        "apart_seconds": (float, lambda v: 0 <= v <= 10 and math.isfinite(v), "a number in [0, 10]"),
    },
    "policy": {
        "RL_training_epochs": (int, lambda v: 0 <= v <= 100_000, "an integer in [0, 100000]"),
        "learning_rate": (float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
        "discount": _FRACTION,
        "epsilon_start": _FRACTION,
        "epsilon_end": _FRACTION,
        "max_sequence": _POS_INT,
        "bandwidth_weight": (float, lambda v: v >= 0, "a number >= 0"),
        "failure_penalty": (float, lambda v: v >= 0, "a number >= 0"),
        "optimistic_init": (float, lambda v: 0 <= v <= 10, "a number in [0, 10]"),
        "prior": _BOOL,
        "seed": _NONNEG_INT,
        "qtable": _OPT_STR,
        "cache_dir": _OPT_STR,
    },
    "passes": {"enabled": _STR_LIST, "disabled": _STR_LIST},
    "accuracy": {
        "exact_tolerance": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
        "budget": _FRACTION,
    },
    "budget": {"seconds": _POS_FLOAT},
    "report": {"formats": (list, lambda v: all(f in ("json", "md", "html") for f in v), "a list drawn from json, md, html")},
}
_SECTIONS = {
    "target": TargetConfig, "granularity": GranularityConfig, "profiling": ProfilingConfig,
    "policy": PolicyConfig, "passes": PassesConfig, "accuracy": AccuracyConfig,
    "budget": BudgetConfig, "report": ReportConfig,
}
_TOP_LEVEL = set(_SECTIONS) | {"inputs", "inputs_file"}
_INPUT_KEYS = {"shape", "dtype", "values"}


class _Located:
    """A YAML mapping/scalar with its line, so errors can point at the file line."""

    def __init__(self, source: str, node: yaml.Node):
        self.source = source
        self.node = node

    def where(self, node: yaml.Node | None = None) -> str:
        node = node or self.node
        return f"{self.source}:{node.start_mark.line + 1}"


def load_config(path: str | Path | None) -> Config:
    """Load and validate a YAML config; ``None`` gives the built-in CPU defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    return parse_config(text, str(path), base_dir=path.parent)


def parse_config(text: str, source: str = "<config>", *, base_dir: str | Path | None = None) -> Config:
    """Validate config ``text``. Relative paths in it (``inputs_file``, ``policy.qtable``,
    ``policy.cache_dir``) are taken relative to ``base_dir`` (the config file's folder, as
    :func:`load_config` passes it), else to the working folder."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if root is None:
        return Config(source=source)
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{source}:1: a config must be a mapping of sections")
    loc = _Located(source, root)
    _refuse_duplicate_keys(loc, root)
    changes: dict[str, Any] = {"source": source}
    for key_node, value_node in root.value:
        key = key_node.value
        if key not in _TOP_LEVEL:
            raise ConfigError(f"{loc.where(key_node)}: unknown config key '{key}' "
                              f"(known: {', '.join(sorted(_TOP_LEVEL))})")
        if key == "inputs":
            changes["inputs"] = _parse_inputs(loc, value_node)
        elif key == "inputs_file":
            changes["inputs_file"] = _relative_to(base_dir, _scalar(loc, "inputs_file", value_node, _OPT_STR))
        else:
            changes[key] = _parse_section(loc, key, value_node)
            if key == "passes":
                _check_pass_names(loc, value_node)
    config = Config(**changes)
    if "policy" in changes:  # the other paths a config names, read the same way as inputs_file
        config = config.with_section("policy", qtable=_relative_to(base_dir, config.policy.qtable),
                                     cache_dir=_relative_to(base_dir, config.policy.cache_dir))
    _check_consistency(config, source)
    return config


def _check_pass_names(loc: _Located, node: yaml.Node) -> None:
    """Every name under ``passes.enabled``/``disabled`` is a pass of the library, refused at its
    line (it was checked only when ``optimize`` selected its passes: ``profile`` and ``split``
    took a typo silently, and the error named no line)."""
    from adaptopt.passes.registry import pass_names
    known = set(pass_names())
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        for item in value_node.value if isinstance(value_node, yaml.SequenceNode) else ():
            if isinstance(item, yaml.ScalarNode) and item.value not in known:
                raise ConfigError(f"{loc.where(item)}: passes.{key_node.value}: unknown pass '{item.value}' "
                                  "(see 'adaptopt passes')")


def _relative_to(base_dir: str | Path | None, path: str | None) -> str | None:
    """``path`` as seen from ``base_dir``: a config names its files from where it lives, so
    the same config works whatever folder adaptopt is run from. Absolute paths are kept."""
    if path is None or base_dir is None or Path(path).is_absolute():
        return path
    return str(Path(base_dir) / path)


def _refuse_duplicate_keys(loc: _Located, root: yaml.Node) -> None:
    """Refuse a key given twice in one mapping, at any depth. YAML loaders keep the last
    one silently, so a second ``granularity:`` section would throw the first away unseen.
    Each node is walked once (aliases share nodes), without recursion."""
    work: list[tuple[yaml.Node, str]] = [(root, "")]
    walked: set[int] = set()
    while work:
        node, prefix = work.pop()
        if id(node) in walked:
            continue
        walked.add(id(node))
        children: list[tuple[yaml.Node, str]] = []
        if isinstance(node, yaml.SequenceNode):
            children = [(item, prefix) for item in node.value]
        elif isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if key is not None and key in first:
                    raise ConfigError(f"{loc.where(key_node)}: duplicate config key '{prefix}{key}' "
                                      f"(first given on line {first[key]})")
                if key is not None:
                    first[key] = key_node.start_mark.line + 1
                children.append((value_node, prefix if key is None else f"{prefix}{key}."))
        work.extend(reversed(children))  # popped in file order: the first duplicate is the one named


def _parse_section(loc: _Located, section: str, node: yaml.Node) -> Any:
    cls = _SECTIONS[section]
    if _is_null(node):
        return cls()
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{loc.where(node)}: '{section}' must be a mapping")
    values: dict[str, Any] = {}
    rules = _RULES[section]
    for key_node, value_node in node.value:
        key = key_node.value
        if key not in rules:
            raise ConfigError(f"{loc.where(key_node)}: unknown config key '{section}.{key}' "
                              f"(known: {', '.join(rules)})")
        value = _scalar(loc, f"{section}.{key}", value_node, rules[key])
        values[key] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _scalar(loc: _Located, key: str, node: yaml.Node, rule: tuple) -> Any:
    expected, check, description = rule
    if _is_null(node) and rule is _OPT_STR:
        return None
    value = _construct(node)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is float and isinstance(value, str) and node.tag == "tag:yaml.org,2002:str" and not node.style:
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string; a quoted string stays a string
            value = float(value)
        except ValueError:
            pass
    ok_type = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
    if not ok_type or not check(value):
        raise ConfigError(f"{loc.where(node)}: config key '{key}' must be {description}, got {value!r}")
    return value


def _construct(node: yaml.Node) -> Any:
    try:
        return yaml.safe_load(yaml.serialize(node))
    except yaml.YAMLError as exc:  # e.g. a !!python tag: safe_load refuses to build it
        raise ConfigError(f"line {node.start_mark.line + 1}: {getattr(exc, 'problem', None) or exc}") from None


def _parse_inputs(loc: _Located, node: yaml.Node) -> dict[str, InputSpec]:
    if _is_null(node):
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{loc.where(node)}: 'inputs' must map input names to {{shape, dtype, values}}")
    specs = {}
    for name_node, spec_node in node.value:
        name = name_node.value
        if not isinstance(spec_node, yaml.MappingNode):
            raise ConfigError(f"{loc.where(spec_node)}: inputs.{name} must be a mapping with shape/dtype/values")
        raw = {k.value: (k, v) for k, v in spec_node.value}
        for k, (knode, _) in raw.items():
            if k not in _INPUT_KEYS:
                raise ConfigError(f"{loc.where(knode)}: unknown config key 'inputs.{name}.{k}' "
                                  f"(known: {', '.join(sorted(_INPUT_KEYS))})")
        shape = dtype = value_range = values = None
        if "shape" in raw:
            shape = tuple(_scalar(loc, f"inputs.{name}.shape", raw["shape"][1], (
                list, lambda v: all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v),
                "a list of non-negative integers")))
        if "dtype" in raw:
            dtype = _scalar(loc, f"inputs.{name}.dtype", raw["dtype"][1],
                            (str, lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"))
        if "values" in raw:
            vnode = raw["values"][1]
            value = _construct(vnode)
            if isinstance(value, str) and value in VALUE_KINDS:
                values = value
            elif (isinstance(value, dict) and set(value) == {"range"} and isinstance(value["range"], list)
                  and len(value["range"]) == 2 and all(isinstance(x, (int, float)) for x in value["range"])
                  and value["range"][0] < value["range"][1]):
                values, value_range = "range", (value["range"][0], value["range"][1])
            else:
                raise ConfigError(f"{loc.where(vnode)}: config key 'inputs.{name}.values' must be one of "
                                  f"{', '.join(VALUE_KINDS)} or {{range: [lo, hi]}} with lo < hi, got {value!r}")
        specs[name] = InputSpec(shape=shape, dtype=dtype, values=values, value_range=value_range)
    return specs


def _check_consistency(config: Config, source: str) -> None:
    g = config.granularity
    if g.merging_threshold < g.performance_threshold:
        raise ConfigError(
            f"{source}: granularity.merging_threshold ({g.merging_threshold}) must be >= "
            f"granularity.performance_threshold ({g.performance_threshold}): a leaf cannot be "
            "both slow enough to subdivide and fast enough to merge")
    p = config.policy
    if p.epsilon_end > p.epsilon_start:
        raise ConfigError(f"{source}: policy.epsilon_end ({p.epsilon_end}) must be <= policy.epsilon_start "
                          f"({p.epsilon_start})")
    if config.profiling.min_time_s > config.profiling.max_time_s:
        raise ConfigError(f"{source}: profiling.min_time_s must be <= profiling.max_time_s")
    unknown = set(config.passes.enabled) & set(config.passes.disabled)
    if unknown:
        raise ConfigError(f"{source}: passes {sorted(unknown)} are both enabled and disabled")


def parse_input_shapes(items: tuple[str, ...] | list[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``--input-shape NAME=1x3x224x224`` values (repeatable)."""
    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition("=")
        if not sep or not name or not dims:
            raise ConfigError(f"--input-shape '{item}': expected NAME=DIMxDIMx... (e.g. x=1x3x224x224)")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--input-shape '{item}': dimensions must be integers separated by 'x'") from None
        if any(d < 0 for d in shape):
            raise ConfigError(f"--input-shape '{item}': dimensions must be >= 0")
        if name in shapes and shapes[name] != shape:
            raise ConfigError(f"--input-shape {name} given twice ({'x'.join(map(str, shapes[name]))} and {dims})")
        shapes[name] = shape
    return shapes


def with_input_shapes(config: Config, shapes: Mapping[str, tuple[int, ...]]) -> Config:
    """Return ``config`` with command-line input shapes overriding the config's."""
    if not shapes:
        return config
    inputs = dict(config.inputs)
    for name, shape in shapes.items():
        inputs[name] = dataclasses.replace(inputs.get(name, InputSpec()), shape=shape)
    return config.replace(inputs=inputs)
