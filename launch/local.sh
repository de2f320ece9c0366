#!/usr/bin/env bash
# N processes on this machine (CPU or GPUs): bash launch/local.sh N [overrides...]
# On a CPU-only machine the processes use the gloo backend and stand in for GPUs.
set -euo pipefail
N=${1:?usage: launch/local.sh NPROC [overrides...]}
shift
exec torchrun --standalone --nproc_per_node "$N" -m llmsys.train "$@"
