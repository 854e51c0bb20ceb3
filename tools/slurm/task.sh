#!/bin/bash
# One process of the job that train.sbatch starts with srun: chooses this process's GPUs, then runs
# `glmjax launch -- train`, whose jax.distributed.initialize() (GLMJAX_DISTRIBUTED=1) takes the process id
# from SLURM_PROCID, the count from SLURM_NTASKS and the coordinator from the first node of
# SLURM_STEP_NODELIST. DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
source tools/slurm/lib.sh

# jax's SLURM detection (jax/_src/clusters/cluster.py) gives a process only the GPU numbered
# SLURM_LOCALID, so one process per node would drive just its first GPU. JAX_LOCAL_DEVICE_IDS (read
# before that detection) says instead: the GPUs this process sees are split evenly, in order, between
# the node's processes -- all of them with one process per node, GPU SLURM_LOCALID with one per GPU.
# A process Slurm bound to a single GPU (--gpus-per-task=1) gets that one. A value already set is kept.
if [ -z "${JAX_LOCAL_DEVICE_IDS:-}" ]; then
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
    gpus=${#visible[@]}
  else
    gpus=$(nvidia-smi -L | grep -c '^GPU ')
  fi
  steps_tasks=${SLURM_STEP_TASKS_PER_NODE:-1}
  tasks=${SLURM_NTASKS_PER_NODE:-${steps_tasks%%[(,]*}}
  localid=${SLURM_LOCALID:-0}
  if [ "$gpus" -eq 1 ]; then
    JAX_LOCAL_DEVICE_IDS=0
  elif [ $((gpus % tasks)) -ne 0 ]; then
    glmjax_error "$gpus GPUs on this node do not split evenly between its $tasks processes: --ntasks-per-node must divide the GPU count (1: one process per node; the count: one per GPU)"
  else
    per=$((gpus / tasks))
    JAX_LOCAL_DEVICE_IDS=$(seq -s, $((localid * per)) $((localid * per + per - 1)))
  fi
fi

# `glmjax launch` without --processes: this task's process of the job (GLMJAX_DISTRIBUTED=1 for it);
# it ends with one line when another task dies
glmjax_run env "JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS" \
  "${GLMJAX_PYTHON:-.venv/bin/python}" -m glmjax launch -- train "$@"
