"""Train the built-in policy prior (``make prior``): ``adaptopt/policy/prior_cpu.json``.

Q-learning on the generated models of ``adaptopt.examples.TRAINING_CORPUS`` with the
default CPU config (12 epochs instead of 6) and a 0.999 accuracy budget (so lossy passes get values too; a
lossless run never offers them). The result depends on this machine's timings; the
file records what it was trained on.
"""

import sys
from pathlib import Path

from adaptopt.adapt.training import TrainingModel, train
from adaptopt.api import pinned_copy
from adaptopt.config import Config
from adaptopt.examples import TRAINING_CORPUS
from adaptopt.policy.prior import PRIOR_FILES
from adaptopt.policy.qtable import QTable

ACCURACY_BUDGET = 0.999
TRAINING_EPOCHS = 12  # twice a run's default: the prior is trained once, offline


def main() -> None:
    import tempfile
    output = Path(__file__).resolve().parents[1] / "adaptopt" / "policy" / PRIOR_FILES["cpu"]
    with tempfile.TemporaryDirectory(prefix="adaptopt-prior-") as cache:
        models = []
        for name, build, kwargs, inputs in TRAINING_CORPUS:
            config = Config(inputs=inputs or {}).with_section("policy", cache_dir=cache,
                                                              RL_training_epochs=TRAINING_EPOCHS)
            models.append(TrainingModel(name, pinned_copy(build(**kwargs), config, name), config))
        table = QTable()
        train(models, table, ACCURACY_BUDGET, seed=0, say=lambda m: print(m, file=sys.stderr))
    table.meta["command"] = "make prior"
    table.save(output)
    print(f"wrote {output}: {sum(len(v) for v in table.values.values())} (state, pass) values")


if __name__ == "__main__":
    main()
