#!/usr/bin/env bash
# distclip's example (launch/train_lm.py) on this machine under torchrun: a standalone rendezvous, no setup.
#
#   launch/torchrun_single_node.sh --layout fsdp2 --steps 20
#
# Arguments go to train_lm.py (--layout ddp|fsdp1|fsdp2|deepspeed, --steps, --max-norm, ...; see --help).
# NPROC_PER_NODE: processes to start (default: one per GPU, or 2 without GPUs). On GPUs every process uses its
# own cuda:LOCAL_RANK and nccl; without CUDA the CPU and gloo (train_lm.py picks them).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

gpus="$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)"
if [[ "${gpus:-0}" -gt 0 ]]; then default_nproc="$gpus"; else default_nproc=2; fi

exec torchrun --standalone --nproc-per-node "${NPROC_PER_NODE:-$default_nproc}" "$here/train_lm.py" "$@"
