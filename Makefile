# glmjax: every target creates/uses the virtual environment $(VENV) itself.
#   make test        the whole suite on an 8-device CPU-simulated mesh
#   make demo        the main job on an embedded default
#   make info PRESET=glm-130b
#   make forward CHECKPOINT=dir CONFIG=cfg.json INPUTS=in.npz OUTPUT=out.npz [MESH=data=2,tensor=4]
#   make convert-sat2orbax SRC=glm-130b-sat DST=ckpt/glm-130b [CONFIG=experiments/models/glm-130b.json]
#   make convert-orbax2sat SRC=ckpt/glm-130b DST=glm-130b-tp4 [TP=4] [QUANTIZE=int4]
#   make bench         conversion memory/throughput at GLM-130B's shapes, loader and training
#                      throughput [BENCH_TRAIN="--preset glm-1b ..."] (BENCHMARKS.md)
#   make train [TRAIN_CONFIG=experiments/x.yaml] [ARGS="train.steps=10"]   (resumes automatically)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.glmjax-installed
CPU_MESH := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
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
	$(CPU_MESH) $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(CPU_MESH) $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check glmjax tests tools

demo: $(STAMP)
	$(CPU_MESH) $(PY) tools/demo.py

PRESET ?= glm-130b
info: $(STAMP)
	$(PY) -m glmjax info --preset $(PRESET)

forward: $(STAMP)
	$(CPU_MESH) $(PY) -m glmjax forward --checkpoint $(CHECKPOINT) --config $(CONFIG) \
		--inputs $(INPUTS) --output $(OUTPUT) $(if $(MESH),--mesh $(MESH)) $(if $(DTYPE),--dtype $(DTYPE))

CONFIG ?= experiments/models/glm-130b.json
TP ?= 8
convert-sat2orbax: $(STAMP)
	$(CPU_MESH) $(PY) -m glmjax convert --from sat:$(SRC) --to orbax:$(DST) --config $(CONFIG) \
		$(if $(VERIFY),--verify) $(if $(MESH),--mesh $(MESH))

convert-orbax2sat: $(STAMP)
	$(CPU_MESH) $(PY) -m glmjax convert --from orbax:$(SRC) --to sat:$(DST) --tp $(TP) \
		$(if $(QUANTIZE),--quantize $(QUANTIZE)) $(if $(VERIFY),--verify) $(if $(MESH),--mesh $(MESH))

# Python's own documentation text as a corpus, a 4000-piece GLM-130B-layout tokenizer, token shards
runs/data/pydoc/manifest.json: $(STAMP)
	mkdir -p runs/corpus
	$(PY) -c "from pydoc_data.topics import topics; open('runs/corpus/pydoc.txt', 'w').write('\n\n'.join(topics.values()))"
	$(PY) -m glmjax tokenizer train --input runs/corpus/pydoc.txt --vocab-size 4000 --out runs/tok-pydoc
	$(PY) -m glmjax data prepare --tokenizer runs/tok-pydoc --input runs/corpus/pydoc.txt --out runs/data/pydoc --overwrite

data-pydoc: runs/data/pydoc/manifest.json

TRAIN_CONFIG ?= experiments/glm-small-cpu.yaml
train: $(STAMP) $(if $(filter experiments/glm-small-cpu.yaml,$(TRAIN_CONFIG)),runs/data/pydoc/manifest.json)
	$(CPU_MESH) $(PY) -m glmjax train $(TRAIN_CONFIG) $(ARGS)

# generate from a training run (default: the demo's) or any checkpoint; PROMPT=... or stdin (interactive)
CHECKPOINT_DIR ?= runs/demo/run
generate: $(STAMP)
	$(CPU_MESH) $(PY) -m glmjax generate --checkpoint $(CHECKPOINT_DIR) $(if $(PROMPT),--prompt "$(PROMPT)") \
		$(if $(MESH),--mesh $(MESH)) $(if $(QUANTIZE),--quantize $(QUANTIZE)) $(ARGS)

BENCH_LAYERS ?= 2
BENCH_TRAIN ?= --preset glm-test --seq-length 128 --micro-batch 8 --steps 10
BENCH_GENERATE ?= --preset glm-small --prompt 128 --new 32 --batch 1 16
bench: $(STAMP)
	$(PY) tools/bench_convert.py --layers $(BENCH_LAYERS) --tp 8
	$(PY) tools/bench_data.py
	$(PY) tools/bench_train.py $(BENCH_TRAIN)
	$(PY) tools/bench_generate.py $(BENCH_GENERATE)

# GLM-130B's own PyTorch model class (SwissArmyTransformer), for tests/test_sat_model_class.py
sat-env:
	VENV=.venv-sat bash ../shared/reference/setup.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
