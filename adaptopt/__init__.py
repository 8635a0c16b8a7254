"""adaptopt: measurement-driven, per-subgraph ONNX graph optimizer."""

__version__ = "0.1.0"

from adaptopt.config import Config, load_config  # noqa: E402

__all__ = ["Config", "load_config", "__version__"]
