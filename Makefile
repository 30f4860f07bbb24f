# Two commands do all set-up on a fresh machine (see README):
#   make run    the main job end to end on the embedded default model
#   make test   the test suite
PYTHON ?= python3.11
VENV ?= .venv
GLUE_DIR ?= ../shared/data/glue
TASK ?= mrpc
ARGS ?=
BIN = $(VENV)/bin

.PHONY: install run test gates clean

$(BIN)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23,<25"
	$(BIN)/python -m pip install --quiet --editable ".[test]"
	touch $@

install: $(BIN)/.installed

# Teacher, pruned student, ONNX export, parity, latency benchmark and gates in runs/$(TASK).
run: install
	GLUE_DIR=$(GLUE_DIR) $(BIN)/sparsebert run --task $(TASK) --out runs/$(TASK) $(ARGS)

test: install
	GLUE_DIR=$(GLUE_DIR) $(BIN)/python -m pytest $(ARGS)

# What CI gates on: a model trained quickly from real SST-2 (3,000 examples, 90%: the short CI
# schedule cannot hold 95% on so little data) and its INT8 student, then every stage and the
# gates, accuracy included.
gates: install
	GLUE_DIR=$(GLUE_DIR) $(BIN)/sparsebert run --task sst2 --out runs/ci --overwrite --limit 3000 \
	  --teacher-epochs 2 --student-epochs 4 --sparsity 0.9 --int8 --max-seq-length 128 --batch-size 32 --threads 1 $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
