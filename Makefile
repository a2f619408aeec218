# The README's two commands: `make serve` and `make test`. Both work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
# The CPU wheel this workplace keeps on disk; on a GPU host pass TORCH=torch (or your CUDA build).
TORCH  ?= torch==2.13.0
# No model hub is reachable here, so the default is a synthetic checkpoint (scores are NOT semantic).
# Point MODEL at a ModelScope id (iic/nlp_structbert_sentence-similarity_chinese-base) or a local copy.
MODEL  ?= .cache/models/synthetic-tiny
HOST   ?= 127.0.0.1
PORT   ?= 8000

BIN := $(VENV)/bin

.PHONY: install serve test

$(BIN)/structsim: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/structsim

.cache/models/synthetic-%: | $(BIN)/structsim
	$(BIN)/structsim make-checkpoint $@ --size $*

serve: install $(if $(filter .cache/models/synthetic-%,$(MODEL)),$(MODEL))
	$(BIN)/structsim serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: install
	$(BIN)/pytest
