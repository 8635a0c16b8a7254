"""Write the bundled example models (``python models/make_models.py``).

The builders live in ``adaptopt.examples`` so tests can build the same graphs;
this script only writes them next to itself. Output is deterministic (seeded).
"""

from pathlib import Path

import onnx

from adaptopt.examples import EXAMPLES


def main() -> None:
    here = Path(__file__).resolve().parent
    for name, build in EXAMPLES.items():
        model = build()
        onnx.checker.check_model(model)
        path = here / f"{name}.onnx"
        onnx.save_model(model, str(path))
        print(f"wrote {path.name}: {len(model.graph.node)} nodes, {path.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
