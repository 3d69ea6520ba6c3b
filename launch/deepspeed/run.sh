#!/usr/bin/env bash
# distclip under the DeepSpeed launcher, on this machine: 2 CPU processes (gloo), as the hostfile next to this
# script says. With no script argument it runs the DeepSpeed example (train.py here), whose arguments follow:
#   launch/deepspeed/run.sh --stage 3 --norm-type inf
# Given a Python script first, it runs that one instead, e.g. the language-model example of launch/:
#   launch/deepspeed/run.sh launch/train_lm.py --layout deepspeed --zero-stage 3
# On GPUs: DS_ACCELERATOR=cuda launch/deepspeed/run.sh (the scripts then use nccl); set slots to the GPU count.
# On several machines: list them in a hostfile (HOSTFILE=path) and drop --no_ssh_check and --master_addr, so
# that the launcher reaches them over ssh (pdsh) and finds the master address itself.
set -euo pipefail
script=launch/deepspeed/train.py
if [[ "${1:-}" == *.py ]]; then
  script="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"  # as given, relative to where it was run from
  shift
fi
cd "$(dirname "$0")/../.."
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
exec deepspeed --hostfile "${HOSTFILE:-launch/deepspeed/hostfile}" --no_ssh_check --master_addr 127.0.0.1 \
  --master_port "${MASTER_PORT:-29500}" "$script" "$@"
