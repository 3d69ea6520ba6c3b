#!/usr/bin/env bash
# The one install recipe of distclip's Docker images (docker/Dockerfile.cpu, docker/Dockerfile.gpu). CI runs
# the CPU recipe in a virtualenv apart from the checkout's (tests/tools/test_docker_recipe.py), so what the CPU
# image installs is tested even where no Docker engine runs.
#
#   docker/install.sh cpu   torch==2.13.0 (the CPU build) and numpy, then distclip
#   docker/install.sh gpu   on a CUDA PyTorch image: keeps its torch, builds DeepSpeed with its CUDA ops, then
#                           distclip with the DeepSpeed extra
#
# It installs into the environment of $PYTHON (default: python3 on PATH). Settings:
#   TORCH_INDEX_URL         cpu: where the CPU build of torch comes from (default PyTorch's CPU index; set it
#                           empty to use only pip's own configuration, e.g. a local wheel in find-links)
#   TORCH_CUDA_ARCH_LIST    gpu: the GPU architectures DeepSpeed's ops are compiled for (default below; a build
#                           has no GPU to ask)
#   DS_BUILD_*              gpu: DeepSpeed's op switches; this script turns on DS_BUILD_OPS and off the ops
#                           named in DS_SKIPPED_OPS (default below)
set -euo pipefail

TORCH_VERSION=2.13.0
DEEPSPEED_REQUIREMENT="deepspeed>=0.19.8,<0.20"  # setup.cfg's deepspeed extra: the versions distclip was tested with
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"

die() {
  echo "docker/install.sh: $*" >&2
  exit 1
}

pip_install() {
  echo "+ pip install $*"
  "$python" -m pip install --no-cache-dir "$@"
}

install_cpu() {
  local index=()
  if [[ -n "${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}" ]]; then
    index=(--extra-index-url "${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}")
  fi
  pip_install "${index[@]}" "torch==${TORCH_VERSION}+cpu" numpy  # numpy: torch warns at import without it
  pip_install "$repo"
  "$python" -c 'import torch, distclip; print(f"distclip {distclip.__version__} on torch {torch.__version__}")'
}

install_gpu() {
  # The base image's torch must stay: check it is a CUDA build of the tested version, and pin it while pip runs.
  local torch_version cuda_version
  torch_version="$("$python" -c 'import torch; print(torch.__version__, torch.version.cuda or "")' 2>/dev/null)" ||
    die "gpu: no torch in $python; start from a CUDA PyTorch image (docker/Dockerfile.gpu)"
  read -r torch_version cuda_version <<<"$torch_version"
  [[ -n "${cuda_version:-}" ]] ||
    die "gpu: torch $torch_version in $python is not a CUDA build; the gpu recipe needs a CUDA PyTorch image (docker/Dockerfile.gpu); use 'cpu' here"
  [[ "${torch_version%%+*}" == "$TORCH_VERSION"* ]] ||
    die "gpu: torch $torch_version found; distclip is tested with torch $TORCH_VERSION: use a $TORCH_VERSION base image"
  command -v nvcc >/dev/null ||
    die "gpu: nvcc not found; DeepSpeed's ops compile against CUDA: use a -devel base image"
  local constraints
  constraints="$(mktemp)"
  echo "torch==$torch_version" >"$constraints"

  # DeepSpeed's ops compiled now rather than at the first run (JIT), against this torch (no build isolation).
  # Ops DeepSpeed finds incompatible are skipped with a warning; these are skipped outright: inference-only
  # kernels, and ops that need libraries a training image does not carry (CUTLASS, GPUDirect Storage).
  # A DS_BUILD_<OP> set in the environment wins.
  # The build has no GPU to detect: without DS_ACCELERATOR=cuda DeepSpeed would pick its CPU accelerator and
  # compile the CPU ops instead.
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cuda}"
  export DS_BUILD_OPS="${DS_BUILD_OPS:-1}"
  local skipped="${DS_SKIPPED_OPS:-EVOFORMER_ATTN CUTLASS_OPS GDS FP_QUANTIZER RAGGED_DEVICE_OPS RAGGED_OPS INFERENCE_CORE_OPS TRANSFORMER_INFERENCE SPATIAL_INFERENCE}"
  local op variable
  for op in $skipped; do
    variable="DS_BUILD_${op}"
    export "$variable=${!variable:-0}"
  done
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;8.6;8.9;9.0+PTX}"
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  pip_install --constraint "$constraints" ninja packaging wheel "setuptools>=70.1"
  pip_install --constraint "$constraints" --no-build-isolation "$DEEPSPEED_REQUIREMENT"
  pip_install --constraint "$constraints" "${repo}[deepspeed]"
  rm -f "$constraints"
  "$python" -m deepspeed.env_report  # ds_report: which ops were compiled
  "$python" -c 'import torch, deepspeed, distclip; print(f"distclip {distclip.__version__}, DeepSpeed {deepspeed.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda})")'
}

case "${1:-}" in
  cpu) install_cpu ;;
  gpu) install_gpu ;;
  *)
    echo "usage: docker/install.sh cpu|gpu" >&2
    exit 2
    ;;
esac
