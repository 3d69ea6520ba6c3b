#!/usr/bin/env bash
# distclip's example (launch/train_lm.py) on several machines under torchrun, with a c10d rendezvous.
# Run it once on every node, with the same NNODES and RDZV_ENDPOINT and each node its own NODE_RANK:
#
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node0.example:29500 launch/torchrun_multi_node.sh --layout fsdp2   # node 0
#   NNODES=2 NODE_RANK=1 RDZV_ENDPOINT=node0.example:29500 launch/torchrun_multi_node.sh --layout fsdp2   # node 1
#
# NNODES:          the number of nodes.
# NODE_RANK:       this node's index, 0 .. NNODES-1. Node 0 hosts the c10d rendezvous store, at RDZV_ENDPOINT
#                  (so that must be node 0's address, and a port free there). The processes' global ranks are
#                  assigned by the rendezvous, not by NODE_RANK (torchrun uses --node-rank only without c10d).
# RDZV_ENDPOINT:   host:port of node 0, reachable from every node.
# NPROC_PER_NODE:  processes per node (default: one per GPU, or 2 without GPUs).
# RDZV_ID:         the job's id, the same on every node (default distclip-lm).
# LOCAL_ADDR:      optional: the address of this node that the others reach (torchrun --local-addr), when its
#                  hostname does not resolve to it.
# Arguments go to train_lm.py. GPUs: nccl, one GPU per process; without CUDA: the CPU and gloo.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

: "${NNODES:?set NNODES, the number of nodes}"
: "${NODE_RANK:?set NODE_RANK, the index of this node (0 .. NNODES-1)}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT, host:port of node 0}"

gpus="$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)"
if [[ "${gpus:-0}" -gt 0 ]]; then default_nproc="$gpus"; else default_nproc=2; fi
if [[ "$NODE_RANK" == 0 ]]; then is_host=true; else is_host=false; fi
local_addr=()
if [[ -n "${LOCAL_ADDR:-}" ]]; then local_addr=(--local-addr "$LOCAL_ADDR"); fi

exec torchrun \
  --nnodes "$NNODES" \
  --nproc-per-node "${NPROC_PER_NODE:-$default_nproc}" \
  --rdzv-backend c10d \
  --rdzv-endpoint "$RDZV_ENDPOINT" \
  --rdzv-id "${RDZV_ID:-distclip-lm}" \
  --rdzv-conf "is_host=$is_host" \
  "${local_addr[@]}" \
  "$here/train_lm.py" "$@"
