# Two commands do all set-up on a fresh machine (see README):
#   make run    the main job end to end on the embedded default model
#   make test   the test suite
PYTHON ?= python3.11
VENV ?= .venv
GLUE_DIR ?= ../shared/data/glue
TASK ?= sst2
ARGS ?=
# The main job's schedule (docs/study/study.md, seventh session): SST-2 at 90%. The teacher fine-tunes
# 1 epoch on a seeded 20,000 of the training sentences; the student distils from it on all 67,349
# (it learns the teacher's answers, not the labels) for one pass at lr 6e-4: 84.75 and 84.29 over two
# seeds, 97.7% of the teacher (86.47), where make run's earlier schedule (the 20,000 sentences, 3
# epochs, lr 3e-4) kept 96.0% at 90% and 98.7% at 80%. Any other TASK runs the task's defaults (the
# recipe's; STS-B's own augmented schedule): `make run TASK=mrpc` is the paper's 95% on MRPC.
ifeq ($(TASK),sst2)
# One engine thread in the bench, as `make gates`: on 2-vCPU VMs the all-core rows stall at
# random (docs/results.md, "Why one thread"), and they halve the bench's minutes.
MAIN ?= --teacher-limit 20000 --teacher-epochs 1 --student-epochs 1 --student-lr 6e-4 --sparsity 0.9 --threads 1
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
