# adaptopt — the two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=
SECTION ?= all

.PHONY: demo test test-slow bench install install-gpu models clean

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

models: $(STAMP)
	$(BIN)/python models/make_models.py

demo: $(STAMP)
	@mkdir -p out
	$(BIN)/adaptopt split models/resnet_small.onnx -o out/resnet_split --granularity 2
	$(BIN)/adaptopt merge out/resnet_split -o out/resnet_small.merged.onnx

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[bench]"
	$(BIN)/python -m benchmarks --section $(SECTION) $(ARGS)

clean:
	rm -rf out .pytest_cache .hypothesis
