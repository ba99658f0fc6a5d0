# `make demo` and `make test` work on a fresh clone: each creates .venv and installs the project
# (one pip command, so Ray, mediapipe and protobuf resolve together) when it is missing or stale.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := data/demo

.PHONY: demo test test-quick mutation-check bench install clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the project and its dependencies into $(VENV) (first time: several minutes)"
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither" || true
	@$(PY) -c "import annotators, manifests, pipeline, ray, mediapipe, controlnet_aux" 2>/dev/null \
		|| { echo "install failed: see the pip output above"; exit 1; }
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# Minutes, not the full suite: leaves out training runs, actor pools and Ray heads.
test-quick: $(STAMP)
	$(PY) -m pytest -m "not slow and not cluster" -x -q

demo: $(STAMP)
	@rm -rf $(DEMO)
	$(PY) -m pipeline.samples $(DEMO)/photos
	$(PY) pipeline/annotate.py --input $(DEMO)/photos --output $(DEMO)/manifest --annotators canny --shard-size 8
	$(PY) -m manifests inspect $(DEMO)/manifest
	$(PY) -m manifests validate $(DEMO)/manifest
	$(PY) -m manifests preview $(DEMO)/manifest --out $(DEMO)/preview.png --rows 18 --tile 192
	@echo
	@echo "demo outputs:"
	@echo "  raw collection  $(DEMO)/photos"
	@echo "  manifest        $(DEMO)/manifest   (python -c \"import pandas as pd; print(pd.read_parquet('$(DEMO)/manifest'))\")"
	@echo "  preview grid    $(DEMO)/preview.png"

# Deliberate bugs applied to a copy, one at a time: does the suite notice? (~10 min; not in `make test`)
mutation-check: $(STAMP)
	$(PY) tests/mutation_check.py

bench: $(STAMP)
	$(PY) bench/annotate_throughput.py
	$(PY) bench/annotator_speed.py
	$(PY) bench/train_overhead.py
	$(PY) bench/train_data_memory.py
