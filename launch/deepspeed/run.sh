#!/usr/bin/env bash
# distclip's DeepSpeed example under the DeepSpeed launcher, on this machine: 2 CPU processes (gloo), as the
# hostfile next to this script says. Arguments go to train.py, e.g.:
#   launch/deepspeed/run.sh --stage 3 --norm-type inf
# On GPUs: DS_ACCELERATOR=cuda launch/deepspeed/run.sh (train.py then uses nccl); set slots to the GPU count.
# On several machines: list them in a hostfile and drop --no_ssh_check and --master_addr, so that the launcher
# reaches them over ssh (pdsh) and finds the master address itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
exec deepspeed --hostfile launch/deepspeed/hostfile --no_ssh_check --master_addr 127.0.0.1 \
  --master_port "${MASTER_PORT:-29500}" launch/deepspeed/train.py "$@"
