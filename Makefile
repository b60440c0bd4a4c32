# make test   create .venv if missing, install runtime + test requirements, run the suite
# make demo   install runtime requirements, prepare the four demo datasets (real
#             Fashion-MNIST mosaics, shipped in the repo), pretrain a small Swin on
#             them (python -m ark_jax.main), print the test AUC of student and teacher
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
# timm 0.5.4 is what the Ark reference code runs on; the interop tests load our
# 'ark' exports into it (in a subprocess, next to the current timm).
TIMM_054 := $(VENV)/timm054

.PHONY: test demo install install-test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip

$(VENV)/.installed: requirements.txt | $(VENV)/bin/python
	$(PIP) install -q -r requirements.txt
	touch $@

$(VENV)/.installed-test: requirements.txt requirements-test.txt $(VENV)/.installed
	$(PIP) install -q -r requirements.txt -r requirements-test.txt
	$(PIP) install -q --no-deps --target $(TIMM_054) timm==0.5.4
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# One worker per core, each test file on one worker (its module fixtures built once).
test: install-test
	$(VENV)/bin/python -m pytest -q -n auto --dist loadfile tests

DEMO_DATA := workdir/data
DEMO_SETS := demo_multilabel demo_subset demo_binary demo_count

# The reference's schedule: cyclic passes, one teacher update per pass (README,
# "The demo"); configs/demo.py:mixed interleaves the datasets instead.
DEMO_CONFIG ?= configs/demo.py
DEMO_WORKDIR ?= workdir/demo

demo: install
	for name in $(DEMO_SETS); do \
	  $(VENV)/bin/python -m input_pipeline.prepare --dataset=$$name --data_dir=$(DEMO_DATA) \
	    --demo_source=subset || exit 1; \
	done
	$(VENV)/bin/python -m ark_jax.main --config=$(DEMO_CONFIG) --workdir=$(DEMO_WORKDIR) \
	  --config.data.data_dir=$(DEMO_DATA) --config.log_every_steps=100 --verbosity=-1

clean:
	rm -rf $(VENV)
