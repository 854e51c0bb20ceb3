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
#   make plan [TARGET=v4-1024] [EXPERIMENT=experiments/glm-130b-pretrain-tpuv4.yaml] [JSON=plan.json]
#             [ARGS="--search" | ARGS="--generate --preset glm-130b --quantize int4 --batch 1 --prompt 1024 --new 1024"]
#             the step (or generation) compiled for a TPU slice, <gpu>x<count> or cpu:N: memory per device,
#             FLOPs, collectives, roofline; exit 1 when it does not fit (BENCHMARKS.md)
# Launch targets run gcloud or sbatch from wherever make runs (a laptop, a login node) and never build
# the local venv; DRY_RUN=1 prints each command exactly as it would run and runs nothing:
#   make tpu-create TPU_NAME=n ZONE=z [ACCELERATOR_TYPE=v4-8] [RUNTIME_VERSION=tpu-ubuntu2204-base] [PROJECT=p]
#   make tpu-setup TPU_NAME=n ZONE=z [GIT_REF=HEAD]   the commit onto every worker, a .venv with '.[tpu]'
#   make tpu-train TPU_NAME=n ZONE=z EXPERIMENT=x.yaml [ARGS="key=value ..."]   on --worker=all, detached
#   make tpu-logs [WORKER=0|all] | tpu-stop | tpu-delete  TPU_NAME=n ZONE=z
#   make slurm-train EXPERIMENT=x.yaml [NODES=1] [GPUS_PER_NODE=8] [PROCESSES_PER_NODE=1|GPUS_PER_NODE]
#                    [PARTITION=p] [ACCOUNT=a] [TIME_LIMIT=hh:mm:ss] [SLURM_FLAGS=...] [ARGS=...]
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

.PHONY: install install-plan-gpu plan test test-fast lint demo info forward convert-sat2orbax convert-orbax2sat bench sat-env clean \
	data-pydoc train generate tpu-create tpu-setup tpu-train tpu-logs tpu-stop tpu-delete slurm-train

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,lint,plan-tpu]'
	touch $(STAMP)

# the plan-gpu extra's pins (setup.cfg), installed beside the venv: see setup.cfg for why
PLAN_GPU := $(VENV)/plan-gpu
PLAN_GPU_PINS := jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2
$(PLAN_GPU)/.installed: $(STAMP)
	$(PY) -m pip install --quiet --no-deps --target $(PLAN_GPU) $(PLAN_GPU_PINS)
	touch $@

install: $(STAMP)

install-plan-gpu: $(PLAN_GPU)/.installed

test: $(STAMP) $(PLAN_GPU)/.installed
	$(TEST_ENV) $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check glmjax tests tools

# GPU targets are named <gpu>x<count>: only their plans put the CUDA plugin on the path
plan: $(STAMP) $(PLAN_GPU)/.installed
	$(if $(findstring x,$(TARGET)),PYTHONPATH=$(PLAN_GPU)) $(PY) -m glmjax plan \
		$(if $(findstring --generate,$(ARGS)),,$(or $(EXPERIMENT),experiments/glm-130b-pretrain-tpuv4.yaml)) \
		--target $(or $(TARGET),v4-1024) $(if $(JSON),--json $(JSON)) $(ARGS)

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

# ---- Launch targets: TPU VMs and pods through `gcloud compute tpus tpu-vm`, GPU clusters through sbatch.
# No $(STAMP) prerequisite: they need gcloud or sbatch, not this machine's venv.

# $(call shquote,TEXT): TEXT as one single-quoted shell word
shquote = '$(subst ','\'',$(1))'
# $(call launch,COMMAND): a recipe line that runs COMMAND, or with DRY_RUN=1 prints it (and runs nothing)
launch = $(if $(filter-out 0 1,$(DRY_RUN)),$(error glmjax: error: DRY_RUN=$(DRY_RUN): 1 prints the commands, \
	empty or 0 runs them))$(if $(filter 1,$(DRY_RUN)),@printf '%s\n' $(call shquote,$(1)),$(1))
# $(call require,VAR ...): stop with one glmjax: error line naming the first variable left empty
require = $(foreach v,$(1),$(if $(strip $($(v))),,$(error glmjax: error: make $@ needs $(v)=... ($(what_$(v))))))
what_TPU_NAME = the TPU VM or pod slice to create or use
what_ZONE = the TPU's zone: us-central2-b for v4
what_EXPERIMENT = an experiment file such as experiments/glm-130b-pretrain-tpuv4.yaml or -a100.yaml

TPU_NAME ?=
ZONE ?=
PROJECT ?=
ACCELERATOR_TYPE ?= v4-8
# tpu-ubuntu2204-base for v4 and older; v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
RUNTIME_VERSION ?= tpu-ubuntu2204-base
TPU_CREATE_FLAGS ?=
EXPERIMENT ?=
# on every worker, relative to the home directory: the repository, the run's log and its pid
TPU_DIR ?= glmjax
TPU_LOG ?= ~/glmjax-train.log
TPU_PID ?= ~/glmjax-train.pid
# jax 0.10.2 needs Python 3.11+; the TPU images are Ubuntu 22.04 (3.10), so python3.11 from apt
TPU_PYTHON ?= python3.11
# tpu-setup ships this commit (git archive: committed files only) as a tarball
GIT_REF ?= HEAD
TPU_ARCHIVE ?= /tmp/glmjax-src.tar.gz
WORKER ?= 0

TPU_AT = $(TPU_NAME) --zone=$(ZONE)$(if $(PROJECT), --project=$(PROJECT))
# $(call tpu_ssh,REMOTE COMMAND,WORKER): REMOTE COMMAND run by the shell of that worker (or all)
tpu_ssh = gcloud compute tpus tpu-vm ssh $(TPU_AT) --worker=$(2) --command=$(call shquote,$(1))
TPU_CREATE = gcloud compute tpus tpu-vm create $(TPU_AT) --accelerator-type=$(ACCELERATOR_TYPE) \
	--version=$(RUNTIME_VERSION)$(if $(TPU_CREATE_FLAGS), $(TPU_CREATE_FLAGS))
TPU_PACK = git archive --format=tar.gz -o $(TPU_ARCHIVE) $(GIT_REF)
TPU_COPY = gcloud compute tpus tpu-vm scp $(TPU_ARCHIVE) $(TPU_NAME):$(notdir $(TPU_ARCHIVE)) --zone=$(ZONE)$(if \
	$(PROJECT), --project=$(PROJECT)) --worker=all
# unpack over the previous copy (its .venv and runs stay), install python3.11 only where it is missing
# (apt waits for the boot-time upgrade's lock), then the venv with the tpu extra
TPU_INSTALL = mkdir -p $(TPU_DIR) && tar -xzf $(notdir $(TPU_ARCHIVE)) -C $(TPU_DIR) && cd $(TPU_DIR) \
	&& ($(TPU_PYTHON) -c "import ensurepip" 2>/dev/null || (sudo apt-get -o DPkg::Lock::Timeout=600 update -qq \
	&& sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq $(TPU_PYTHON) $(TPU_PYTHON)-venv)) \
	&& $(TPU_PYTHON) -m venv .venv && .venv/bin/pip install --quiet --upgrade pip \
	&& .venv/bin/pip install --quiet -e ".[tpu]"
# detached from the ssh session (setsid nohup, no terminal), appending to the worker's log; its pid kept
# for tpu-stop. ARGS are shell words, as for `make train`; the worker's shell reads them.
# `glmjax launch` without --processes: this host's process of the pod's job (jax reads the TPU metadata);
# it ends the run with one line if another host dies, and passes tpu-stop's SIGTERM on
TPU_TRAIN = cd $(TPU_DIR) && { setsid nohup .venv/bin/glmjax launch -- train $(EXPERIMENT)$(if \
	$(ARGS), $(ARGS)) >> $(TPU_LOG) 2>&1 < /dev/null & echo $$! > $(TPU_PID); }
TPU_LOGS = tail -n 100 -F $(TPU_LOG)
# SIGTERM: the run writes a checkpoint and exits (make tpu-train resumes from it)
TPU_STOP = kill -TERM $$(cat $(TPU_PID))

tpu-create:
	$(call require,TPU_NAME ZONE)
	$(call launch,$(TPU_CREATE))

tpu-setup:
	$(call require,TPU_NAME ZONE)
	$(call launch,$(TPU_PACK))
	$(call launch,$(TPU_COPY))
	$(call launch,$(call tpu_ssh,$(TPU_INSTALL),all))

tpu-train:
	$(call require,TPU_NAME ZONE EXPERIMENT)
	$(call launch,$(call tpu_ssh,$(TPU_TRAIN),all))

tpu-logs:
	$(call require,TPU_NAME ZONE)
	$(call launch,$(call tpu_ssh,$(TPU_LOGS),$(WORKER)))

tpu-stop:
	$(call require,TPU_NAME ZONE)
	$(call launch,$(call tpu_ssh,$(TPU_STOP),all))

tpu-delete:
	$(call require,TPU_NAME ZONE)
	$(call launch,gcloud compute tpus tpu-vm delete $(TPU_AT))

# SLURM: tools/slurm/train.sbatch runs srun, one process per node (PROCESSES_PER_NODE=1, all its GPUs)
# or one per GPU (PROCESSES_PER_NODE=GPUS_PER_NODE); sbatch is run from here, the repository's root on
# the cluster's shared file system, where every node finds .venv and the experiment
NODES ?= 1
GPUS_PER_NODE ?= 8
PROCESSES_PER_NODE ?= 1
PARTITION ?=
ACCOUNT ?=
TIME_LIMIT ?=
SLURM_FLAGS ?=
SLURM_TRAIN = sbatch --job-name=glmjax --nodes=$(NODES) --ntasks-per-node=$(PROCESSES_PER_NODE) \
	--gres=gpu:$(GPUS_PER_NODE)$(if $(PARTITION), --partition=$(PARTITION))$(if $(ACCOUNT), --account=$(ACCOUNT))$(if \
	$(TIME_LIMIT), --time=$(TIME_LIMIT))$(if $(SLURM_FLAGS), $(SLURM_FLAGS)) tools/slurm/train.sbatch \
	$(EXPERIMENT)$(if $(ARGS), $(ARGS))

slurm-train:
	$(call require,EXPERIMENT)
	$(if $(wildcard $(EXPERIMENT)),,$(error glmjax: error: EXPERIMENT=$(EXPERIMENT): no such file (the nodes read it from here)))
	$(call launch,$(SLURM_TRAIN))

# GLM-130B's own PyTorch model class (SwissArmyTransformer), for tests/test_sat_model_class.py
sat-env:
	VENV=.venv-sat bash ../shared/reference/setup.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
