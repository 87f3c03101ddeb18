#!/usr/bin/env bash
# The GPU checks in one run, under 8 minutes on one GPU:
#   1. the gpu test tier (CUDA bf16, compile with the default recipe, device augmentation, train.py on
#      CUDA, 2-GPU DDP when there are two),
#   2. end-to-end images/s, share of the bf16 peak and GPU idle share per step for cifar10.yaml and
#      cifar10-fast.yaml,
#   3. the time of a 50 000-image epoch of model M (the subset repeated, since the full archive is
#      not on our machines).
# It prints everything and appends the figures, with the GPU's name and the date, to bench/RESULTS.md.
#
#   bash bench/gpu_check.sh                      # the CIFAR-10 subset from ../shared/datasets
#   DATA_ROOT=path/to/image/folder bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi >/dev/null 2>&1 || { echo "error: no NVIDIA GPU here (nvidia-smi failed); run this on a GPU machine" >&2; exit 2; }
data_root=${DATA_ROOT:-../shared/datasets/cifar10-subset}
log=$(mktemp)
# Model M (bench/throughput.py --model M): dim 384, depth 7, 12 heads, MLP 384, patch 4, one view per image.
model_m=(--data.patch_size 4 --model.dim 384 --model.depth 7 --model.num_heads 12 --model.mlp_ratio 1.0
         --model.tokenizer patch --model.global_pool token)

step() {  # step TITLE COMMAND...: run it, keep its output, say how long it took
  local title=$1; shift
  echo "### $title" | tee -a "$log"
  echo "\`$*\`" | tee -a "$log"
  local start=$SECONDS
  "$@" 2>&1 | grep -v -i "warning\|warn(" | tee -a "$log.raw" | grep -E \
    "passed|failed|skipped|SKIPPED|FAILED|^model|^device|^data|^epochs|^end-to-end|^model only|^ratio|^work|^waiting|^memory|^augment" \
    | tee -a "$log"
  echo "($((SECONDS - start)) s)" | tee -a "$log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$log"
step "gpu test tier" python -m pytest -m gpu -q -rs -p no:cacheprovider
step "cifar10.yaml end to end" python bench/throughput.py --end-to-end --config configs/cifar10.yaml \
  --data-root "$data_root" --epochs 3
step "cifar10-fast.yaml end to end" python bench/throughput.py --end-to-end --config configs/cifar10-fast.yaml \
  --data-root "$data_root" --epochs 3
step "model M, 50 000-image epoch" python bench/throughput.py --end-to-end --config configs/cifar10-cpu.yaml \
  --data-root "$data_root" --images 50000 --epochs 2 -- "${model_m[@]}"

{
  echo
  echo "## GPU check ($(date -u +%Y-%m-%d), $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"
  echo
  echo "Command: \`bash bench/gpu_check.sh\`. Output lines as printed:"
  echo
  echo '```'
  cat "$log"
  echo '```'
} >> bench/RESULTS.md
echo "Appended to bench/RESULTS.md (full output: $log.raw)"
