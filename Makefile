# The two set-up commands: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fastsort-installed
# A CPU-sized schedule for the demo (2 cores, under 15 minutes); on a GPU drop these flags for the seed's.
DEMO_FLAGS ?= --image-size 224 --batch-size 32 --epochs 6 --lr 0.02

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --disable-pip-version-check -e ".[demo,test,bench]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/fastsort data elpv
	rm -rf runs/demo
	$(BIN)/fastsort train --dali --out runs/demo $(DEMO_FLAGS)

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs build *.egg-info
