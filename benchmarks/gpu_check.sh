#!/usr/bin/env bash
# The GPU check: on a machine with one NVIDIA GPU, in under 8 minutes,
#   1. the parity and sharded tests on CUDA (tests/clip/test_cuda.py: one process bitwise against torch.nn.utils;
#      2 gloo ranks on the one GPU with CUDA tensors, against float64),
#   2. GradClipper.clip_() in sharded mode on a one-rank NCCL group under
#      torch.cuda.set_sync_debug_mode("error"): no host synchronisation (benchmarks/gpu_sync_check.py),
#   3. the clip against the HBM floor (benchmarks/gpu_bench.py: `distclip bench` measures on the CPU only),
#      its table written into docs/benchmarks.md between the gpu-check markers.
#
# Usage: benchmarks/gpu_check.sh [--dry-run] [--docs PATH] [--out DIR]
#   --dry-run   the same steps on the CPU, quickly (CI runs this: tests/tools/test_gpu_check.py): the parity tests
#               with DISTCLIP_TEST_DEVICE=cpu, the sync check's logic on a gloo group, a tiny bench, and the
#               docs step into a copy of docs/benchmarks.md under --out (the real page is left alone)
#   --docs      the page to write the bench table into (default docs/benchmarks.md; --dry-run: a copy)
#   --out       where the JSON and logs go (default: a new temporary directory)
# Environment: PYTHON (default python), the interpreter with distclip and its dev extra installed.
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

cd "$(dirname "$0")/.."
dry_run=0
docs=""
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --docs) [ $# -ge 2 ] || { echo "gpu_check: --docs needs a path" >&2; exit 2; }; docs="$2"; shift ;;
    --out) [ $# -ge 2 ] || { echo "gpu_check: --out needs a directory" >&2; exit 2; }; out="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

python="${PYTHON:-python}"
out="${out:-$(mktemp -d "${TMPDIR:-/tmp}/distclip-gpu-check.XXXXXX")}"
mkdir -p "$out"

if [ "$dry_run" = 1 ]; then
  device=cpu
  if [ -z "$docs" ]; then
    docs="$out/benchmarks.md"
    cp docs/benchmarks.md "$docs"
  fi
  test_filter=(-k parity)  # the sharded test's 2 ranks are tests/clip/test_sharded_*.py's business on the CPU
  bench_args=(--workloads tiny --dtypes fp32 --norm-types 2 --repeats 2)
  limits=(120 60 60)
else
  device=cuda
  docs="${docs:-docs/benchmarks.md}"
  if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA device (use --dry-run on a machine without one)" >&2
    exit 1
  fi
  test_filter=()
  bench_args=()
  limits=(200 60 200)  # seconds per step, 460 in all: under 8 minutes with the start
fi

step() {  # step <n> <limit seconds> <name> <command...>
  local n="$1" limit="$2" name="$3"
  shift 3
  local start=$SECONDS
  echo "gpu_check: [$n/3] $name"
  if ! timeout "$limit" "$@" 2>&1 | tee "$out/step$n.log"; then
    echo "gpu_check: [$n/3] $name FAILED (or ran past ${limit}s); log: $out/step$n.log" >&2
    exit 1
  fi
  echo "gpu_check: [$n/3] $name done in $((SECONDS - start))s"
}

step 1 "${limits[0]}" "parity and sharded tests on $device" \
  env DISTCLIP_TEST_DEVICE="$device" "$python" -m pytest -q -p no:cacheprovider tests/clip/test_cuda.py \
  ${test_filter[@]+"${test_filter[@]}"}
step 2 "${limits[1]}" "sharded GradClipper.clip_() without host synchronisation" \
  "$python" benchmarks/gpu_sync_check.py --device "$device"
step 3 "${limits[2]}" "clip against the HBM floor, into $docs" \
  "$python" benchmarks/gpu_bench.py --device "$device" --json "$out/gpu_bench.json" --docs "$docs" \
  ${bench_args[@]+"${bench_args[@]}"}

echo "gpu_check: OK ($device$([ "$dry_run" = 1 ] && echo ', dry run'); results in $out, table in $docs)"
