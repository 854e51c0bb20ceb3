# glmjax: every target creates/uses the virtual environment $(VENV) itself.
#   make test        the whole suite on an 8-device CPU-simulated mesh
#   make demo        the main job on an embedded default (8 simulated CPU devices, whatever the machine)
#   make info [PRESET=glm-130b | CONFIG=file.json|experiment.yaml] [ARGS="key=value ..."]
#   make forward CHECKPOINT=dir INPUTS=in.npz OUTPUT=out.npz [CONFIG=cfg.json] [MESH=data=2,tensor=4] [DTYPE=...]
#   make convert-sat2orbax SRC=glm-130b-sat DST=ckpt/glm-130b [CONFIG=experiments/models/glm-130b.json]
#   make convert-orbax2sat SRC=ckpt/glm-130b DST=glm-130b-tp4 [TP=4] [QUANTIZE=int4]
#   make bench         conversion memory/throughput at GLM-130B's shapes, loader and training
#                      throughput [BENCH_TRAIN="--preset glm-1b ..."] (BENCHMARKS.md)
#   make train [TRAIN_CONFIG=experiments/x.yaml] [ARGS="train.steps=10"]   (resumes automatically)
#   make generate [CHECKPOINT_DIR=runs/demo/run] [PROMPT="..."] [MESH=...] [QUANTIZE=int8|int4] [ARGS=...]
# Model targets run on the accelerator the machine has (a TPU's /dev/accel* or /dev/vfio, an NVIDIA
# GPU's /dev/nvidia0); only without one do they simulate CPU_MESH=8 devices on the CPU. CPU_MESH=N
# asks for N simulated CPU devices anywhere; CPU_MESH= (empty) for none. Flags are passed only when
# their variable is set, so every default is the CLI's own.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.glmjax-installed
ACCELERATOR := $(firstword $(wildcard /dev/accel* /dev/vfio/[0-9]* /dev/nvidia0))
CPU_MESH ?= $(if $(ACCELERATOR),,8)
RUN_ENV = $(if $(CPU_MESH),XLA_FLAGS=--xla_force_host_platform_device_count=$(CPU_MESH) JAX_PLATFORMS=cpu)
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
PYTEST_ARGS ?=

.PHONY: install test test-fast lint demo info forward convert-sat2orbax convert-orbax2sat bench sat-env clean \
	data-pydoc train generate

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,lint]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check glmjax tests tools

demo: $(STAMP)
	$(TEST_ENV) $(PY) tools/demo.py

info: $(STAMP)
	$(PY) -m glmjax info $(if $(CONFIG),--config $(CONFIG),--preset $(or $(PRESET),glm-130b)) $(ARGS)

forward: $(STAMP)
	$(RUN_ENV) $(PY) -m glmjax forward --checkpoint $(CHECKPOINT) $(if $(CONFIG),--config $(CONFIG)) \
		--inputs $(INPUTS) --output $(OUTPUT) $(if $(MESH),--mesh $(MESH)) $(if $(DTYPE),--dtype $(DTYPE)) $(ARGS)

# SAT files carry no config: GLM-130B's unless CONFIG says otherwise
convert-sat2orbax: $(STAMP)
	$(RUN_ENV) $(PY) -m glmjax convert --from sat:$(SRC) --to orbax:$(DST) \
		--config $(or $(CONFIG),experiments/models/glm-130b.json) \
		$(if $(VERIFY),--verify) $(if $(MESH),--mesh $(MESH)) $(ARGS)

convert-orbax2sat: $(STAMP)
	$(RUN_ENV) $(PY) -m glmjax convert --from orbax:$(SRC) --to sat:$(DST) $(if $(TP),--tp $(TP)) \
		$(if $(QUANTIZE),--quantize $(QUANTIZE)) $(if $(VERIFY),--verify) $(if $(MESH),--mesh $(MESH)) $(ARGS)

# Python's own documentation text as a corpus, a 4000-piece GLM-130B-layout tokenizer, token shards
runs/data/pydoc/manifest.json: $(STAMP)
	mkdir -p runs/corpus
	$(PY) -c "from pydoc_data.topics import topics; open('runs/corpus/pydoc.txt', 'w').write('\n\n'.join(topics.values()))"
	$(PY) -m glmjax tokenizer train --input runs/corpus/pydoc.txt --vocab-size 4000 --out runs/tok-pydoc --overwrite
	$(PY) -m glmjax data prepare --tokenizer runs/tok-pydoc --input runs/corpus/pydoc.txt --out runs/data/pydoc --overwrite

data-pydoc: runs/data/pydoc/manifest.json

TRAIN_CONFIG ?= experiments/glm-small-cpu.yaml
train: $(STAMP) $(if $(filter experiments/glm-small-cpu.yaml,$(TRAIN_CONFIG)),runs/data/pydoc/manifest.json)
	$(RUN_ENV) $(PY) -m glmjax train $(TRAIN_CONFIG) $(ARGS)

# generate from a training run (default: the demo's) or any checkpoint; PROMPT=... or stdin (interactive)
CHECKPOINT_DIR ?= runs/demo/run
generate: $(STAMP)
	$(RUN_ENV) $(PY) -m glmjax generate --checkpoint $(CHECKPOINT_DIR) $(if $(PROMPT),--prompt "$(PROMPT)") \
		$(if $(MESH),--mesh $(MESH)) $(if $(QUANTIZE),--quantize $(QUANTIZE)) $(ARGS)

BENCH_LAYERS ?= 2
BENCH_TRAIN ?= --preset glm-test --seq-length 128 --micro-batch 8 --steps 10
BENCH_GENERATE ?= --preset glm-small --prompt 128 --new 32 --batch 1 16
bench: $(STAMP)
	$(PY) tools/bench_convert.py --layers $(BENCH_LAYERS) --tp 8
	$(PY) tools/bench_data.py
	$(RUN_ENV) $(PY) tools/bench_train.py $(BENCH_TRAIN)
	$(RUN_ENV) $(PY) tools/bench_generate.py $(BENCH_GENERATE)

# GLM-130B's own PyTorch model class (SwissArmyTransformer), for tests/test_sat_model_class.py
sat-env:
	VENV=.venv-sat bash ../shared/reference/setup.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
