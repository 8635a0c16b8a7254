"""adaptopt: measurement-driven, per-subgraph ONNX graph optimizer.

Public API: ``optimize``, ``split``, ``merge``, ``load_config``, ``Config``, and
``adaptopt.api.profile`` (``adaptopt.profile`` is the profiler package itself). The
entry points are imported on first use, so ``import adaptopt`` (and ``adaptopt --help``)
stays fast.
"""

__version__ = "0.1.0"

from adaptopt.config import Config, load_config  # noqa: E402

_API = ("optimize", "split", "merge")
__all__ = ["Config", "load_config", "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from adaptopt import api
        return getattr(api, name)
    raise AttributeError(f"module 'adaptopt' has no attribute {name!r}")
