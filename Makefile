# adaptopt — the two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=
SECTION ?= all

.PHONY: demo test test-slow bench install install-gpu models prior clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# GPU option: swap the CPU wheel for onnxruntime-gpu (the two must never coexist).
install-gpu: $(STAMP)
	$(BIN)/python -m pip uninstall -y onnxruntime
	$(BIN)/python -m pip install -q onnxruntime-gpu nvidia-ml-py

EXAMPLES := models/resnet_small.onnx models/bert_small.onnx

# the example models are built by our own script (deterministic), not committed
$(EXAMPLES) &: $(STAMP) adaptopt/examples.py models/make_models.py
	$(BIN)/python models/make_models.py

models: $(EXAMPLES)

# Retrain the built-in policy prior (adaptopt/policy/prior_cpu.json, committed) on generated models: about a minute.
prior: $(STAMP)
	$(BIN)/python models/make_prior.py

demo: $(EXAMPLES)
	@mkdir -p out
	$(BIN)/adaptopt profile models/resnet_small.onnx --config configs/cpu.yaml --granularity 2
	$(BIN)/adaptopt optimize models/resnet_small.onnx --config configs/resnet_small.yaml --accuracy-budget 0.999 \
	    -o out/resnet_small.opt.onnx --report out/resnet_small.report.md
	$(BIN)/adaptopt optimize models/bert_small.onnx --config configs/cpu.yaml \
	    --input-shape input_ids=1x128 --input-shape attention_mask=1x128 \
	    -o out/bert_small.opt.onnx --report out/bert_small.report.md
	@echo "reports: out/resnet_small.report.md out/bert_small.report.md"

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(ARGS)

bench: $(EXAMPLES)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[bench]"
	$(BIN)/python -m benchmarks --section $(SECTION) $(ARGS)

clean:
	rm -rf out .pytest_cache .hypothesis
