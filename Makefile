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
	@echo "installing the project and its dependencies into $(VENV) (first time: several minutes; full log $(VENV)/pip-install.log)"
	@# one numbered line per package pip resolves, then what it installs; errors in full; the rest to the log
	@$(PY) -m pip install --disable-pip-version-check --progress-bar off -e '.[dev]' 2>&1 | tee $(VENV)/pip-install.log \
		| awk '/^Collecting /{n++; printf "  [%3d] %s\n", n, $$0; fflush(); next} \
		       /^Installing collected/{print "  installing them (a minute or two)"; fflush(); next} \
		       /^Successfully installed/{printf "  installed %d packages\n", NF - 2; next} \
		       /^(ERROR|error)/{print; fflush()}' || true
	@$(PY) -c "import annotators, manifests, pipeline, ray, mediapipe, controlnet_aux" 2>/dev/null \
		|| { echo "install failed: see the pip output above and $(VENV)/pip-install.log"; exit 1; }
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# Minutes, not the full suite: leaves out training runs, actor pools and Ray heads.
test-quick: $(STAMP)
	$(PY) -m pytest -m "not slow and not cluster" -x -q

# The whole product on a CPU: raw images -> manifest (local Ray) -> ControlNet (accelerate) -> measured.
# The ControlNet paper's fill task, shrunk: circles' Canny outlines condition a tiny base (models/tiny-circles)
# that knows colours but not where to draw; the report compares it with and without the ControlNet.
# --keep_duplicates: circles that differ only in colour look alike to a (grayscale) perceptual hash,
# but here colour is what the caption asks for, so none of them is a duplicate.
RUN := runs/demo
demo: $(STAMP)
	@rm -rf $(DEMO) $(RUN)
	$(PY) -m demo.samples $(DEMO)/photos
	$(PY) pipeline/annotate.py --input $(DEMO)/photos --output $(DEMO)/manifest --annotators canny --shard-size 8
	$(PY) -m manifests inspect $(DEMO)/manifest
	$(PY) -m manifests validate $(DEMO)/manifest
	$(PY) -m manifests preview $(DEMO)/manifest --out $(DEMO)/preview.png --rows 20 --tile 192 --status all --duplicates keep
	$(PY) -m demo.samples circles $(DEMO)/circles --count 800 --size 64
	$(PY) pipeline/annotate.py --input $(DEMO)/circles --output $(DEMO)/circles_manifest --annotators canny \
		--resolution 64 --shard-size 200
	OMP_NUM_THREADS=1 $(VENV)/bin/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no \
		--dynamo_backend no train/train.py --manifest $(DEMO)/circles_manifest --condition canny \
		--pretrained_model_name_or_path models/tiny-circles --output_dir $(RUN) --resolution 32 \
		--train_batch_size 16 --learning_rate 1e-3 --lr_warmup_steps 50 --max_train_steps 800 \
		--checkpointing_steps 400 --validation_steps 200 --validation_task circle --num_validation_rows 32 \
		--num_validation_images 1 --seed 0 --keep_duplicates
	OMP_NUM_THREADS=1 $(PY) train/evaluate.py --controlnet $(RUN) --pretrained_model_name_or_path models/tiny-circles \
		--manifest $(DEMO)/circles_manifest --condition canny --task circle --num_samples 32 --resolution 32 \
		--output_dir $(RUN)/eval --keep_duplicates
	$(PY) -m demo.report $(RUN)
	@echo
	@echo "demo outputs:"
	@echo "  raw collections $(DEMO)/photos (edge cases), $(DEMO)/circles"
	@echo "  manifests       $(DEMO)/manifest, $(DEMO)/circles_manifest   (python -c \"import pandas as pd; print(pd.read_parquet('$(DEMO)/manifest'))\")"
	@echo "  preview grid    $(DEMO)/preview.png"
	@echo "  ControlNet      $(RUN)/controlnet   (and $(RUN)/controlnet.safetensors)"
	@echo "  report          $(RUN)/report.md   (metrics, $(RUN)/eval/grid.png, $(RUN)/metrics_curve.png)"

# Deliberate bugs applied to a copy, one at a time: does the suite notice? (~10 min; not in `make test`)
mutation-check: $(STAMP)
	$(PY) tests/mutation_check.py

bench: $(STAMP)
	$(PY) bench/annotate_throughput.py
	$(PY) bench/annotator_speed.py
	$(PY) bench/train_overhead.py
	$(PY) bench/train_data_memory.py
