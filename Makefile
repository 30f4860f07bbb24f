# Two commands do all set-up on a fresh machine (see README):
#   make run    the main job end to end on the embedded default model
#   make test   the test suite
PYTHON ?= python3.11
VENV ?= .venv
GLUE_DIR ?= ../shared/data/glue
TASK ?= sst2
ARGS ?=
# The main job's schedule (docs/study/results.md has the cells behind it): SST-2 on 20,000 training
# sentences (the full dev set), student 3 epochs at lr 3e-4, 80% (two study seeds kept 98.1-99.2% of
# the teacher, fresh clones 97.8-99.6%). 90% is not the default: the student on every training
# sentence at lr 6e-4 kept 98.0% and 97.5% over two student seeds but 95.9% on a fresh clone,
# either side of the gates' 97% floor (docs/study/study.md, seventh session); to run it:
#   make run MAIN="--teacher-limit 20000 --teacher-epochs 1 --student-epochs 1 --student-lr 6e-4 --sparsity 0.9 --threads 1"
# Any other TASK runs the task's defaults (the recipe's; STS-B's own augmented schedule):
# `make run TASK=mrpc` is the paper's 95% on MRPC.
ifeq ($(TASK),sst2)
# One engine thread in the bench, as `make gates`: on 2-vCPU VMs the all-core rows stall at
# random (docs/results.md, "Why one thread"), and they halve the bench's minutes.
MAIN ?= --limit 20000 --teacher-epochs 1 --student-epochs 3 --student-lr 3e-4 --sparsity 0.8 --threads 1
endif
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
	GLUE_DIR=$(GLUE_DIR) $(BIN)/sparsebert run --task $(TASK) --out runs/$(TASK) $(MAIN) $(ARGS)

test: install
	GLUE_DIR=$(GLUE_DIR) $(BIN)/python -m pytest $(ARGS)

# What CI gates on: a model trained quickly from real SST-2 (3,000 examples, 90%: the short CI
# schedule cannot hold 95% on so little data) and its INT8 student, then every stage and the
# gates, accuracy included (its retention floor is its own: .ci/quick-thresholds.yaml, measured with
# the student at 1e-4, the rate this schedule keeps).
gates: install
	GLUE_DIR=$(GLUE_DIR) $(BIN)/sparsebert run --task sst2 --out runs/ci --overwrite --limit 3000 \
	  --teacher-epochs 2 --student-epochs 4 --student-lr 1e-4 --sparsity 0.9 --int8 --max-seq-length 128 --batch-size 32 --threads 1 \
	  --thresholds .ci/quick-thresholds.yaml $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
