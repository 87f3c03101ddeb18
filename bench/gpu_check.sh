#!/usr/bin/env bash
# The GPU checks in one run, under 8 minutes on one GPU (each step has a time limit; 9 minutes at most):
#   1. the gpu test tier (CUDA bf16, compile with the default recipe, device augmentation, train.py on
#      CUDA, 2-GPU DDP when there are two),
#   2. one short accuracy run: the default GPU recipe on the CIFAR-10 subset for 3 minutes, so that bf16,
#      compile and the device-side augmentation are shown to learn, not only to run,
#   3. end-to-end images/s, share of the bf16 peak and GPU idle share per step for cifar10.yaml and
#      cifar10-fast.yaml,
#   4. the time of a 50 000-image epoch of model M (the subset repeated, since the full archive is
#      not on our machines).
# Each step's figures are written as they come to $OUT/gpu_check.md (full output: $OUT/gpu_check.log),
# so what ran survives a cut-short call; at the end they are also appended to bench/RESULTS.md.
#
# A GPU machine that reaches no package registry and lacks some of the project's requirements
# (jsonargparse, torchdata) installs them from wheels prepared here beforehand, at no GPU time:
#   bash bench/gpu_check.sh --prepare            # here: wheels + the CIFAR-10 subset into .gpu_check/data
#   OUT=folder bash bench/gpu_check.sh           # there, with .gpu_check/ carried along with the checkout
#   bash bench/gpu_check.sh --rehearse [VENV]    # here: the same install in a venv of the GPU machine's packages
#   DATA_ROOT=path/to/image/folder bash bench/gpu_check.sh   # another image folder
set -uo pipefail
cd "$(dirname "$0")/.."
folder=${GPU_CHECK_DIR:-.gpu_check}
site=${TMPDIR:-/tmp}/vit-lightning-site  # where the missing packages are installed (then PYTHONPATH)
if ! command -v python >/dev/null; then  # some images name it python3 only
  shim=$(mktemp -d); ln -s "$(command -v python3)" "$shim/python"; export PATH="$shim:$PATH"
fi

install_missing() {  # what this Python lacks of the project's requirements, from the prepared wheels, offline
  python bench/gpu_prepare.py --folder "$folder" --install "$site" 2>&1 | tee -a "${log:-/dev/null}"
  [ "${PIPESTATUS[0]}" = 0 ] || exit 2
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
}

case "${1:-}" in
  --prepare)
    exec python bench/gpu_prepare.py --folder "$folder" ;;
  --rehearse)  # the GPU machine's situation on this CPU: only its packages, no registry for the rest
    venv=${2:-${TMPDIR:-/tmp}/vit-lightning-gpu-venv}
    set -e
    python bench/gpu_prepare.py --folder "$folder"
    python bench/gpu_prepare.py --venv "$venv"
    export PATH="$venv/bin:$PATH"
    unset PYTHONPATH
    rm -rf "$site"
    echo "the venv lacks: $(python bench/gpu_prepare.py --missing | tr '\n' ' ')"
    install_missing
    runs=$(mktemp -d)
    python train.py --data ImageFolderDataModule --data.root "$folder/data" --trainer.fast_dev_run 1 \
      --checkpoint.dirpath "$runs" 2>&1 | grep -E "^(Recipe|Precision|Data|test/acc =)|[Ee]rror"
    python -m pytest -m gpu -q -p no:cacheprovider | tail -1
    rm -rf "$runs"
    echo "rehearsal passed: train.py ran on the GPU machine's packages and the prepared wheels alone"
    exit 0 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--prepare | --rehearse [VENV]]" >&2; exit 2 ;;
esac

nvidia-smi >/dev/null 2>&1 || { echo "error: no NVIDIA GPU here (nvidia-smi failed); run this on a GPU machine" >&2; exit 2; }
if [ -d "$folder/data" ]; then data_root=${DATA_ROOT:-$folder/data}
else data_root=${DATA_ROOT:-../shared/datasets/cifar10-subset}; fi
[ -d "$data_root" ] || { echo "error: no data at $data_root: run bash bench/gpu_check.sh --prepare first, or set DATA_ROOT" >&2; exit 2; }
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
log=$out/gpu_check.md
raw=$out/gpu_check.log
: > "$log"; : > "$raw"
install_missing
work=$(mktemp -d)
# Model M (bench/throughput.py --model M): dim 384, depth 7, 12 heads, MLP 384, patch 4, one view per image.
model_m=(--data.patch_size 4 --model.dim 384 --model.depth 7 --model.num_heads 12 --model.mlp_ratio 1.0
         --model.tokenizer patch --model.stem_width 0 --model.global_pool token)

step() {  # step TITLE SECONDS COMMAND...: run it for at most SECONDS, keep its output, say how long it took
  local title=$1 limit=$2; shift 2
  echo "### $title" | tee -a "$log"
  echo "\`$*\`" | tee -a "$log"
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -v -i "warning\|warn(" | tee -a "$raw" | grep -E \
    "passed|failed|skipped|SKIPPED|FAILED|^model|^device|^data|^epochs|^end-to-end|^model only|^ratio|^work|^waiting|^memory|^augment|^(Recipe|Precision|Shape|Data|Mirror|Schedule|Budget|Compile|Augmentation): |test/acc =|stopped|[Ee]rror" \
    | tee -a "$log"
  local status=${PIPESTATUS[0]}
  [ "$status" = 124 ] && echo "(stopped at its ${limit} s limit)" | tee -a "$log"
  echo "($((SECONDS - start)) s)" | tee -a "$log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$log"
step "gpu test tier" 120 python -m pytest -m gpu -q -rs -p no:cacheprovider
step "default GPU recipe, 3 minutes on $data_root" 230 python train.py --data ImageFolderDataModule \
  --data.root "$data_root" --trainer.max_time 00:00:03:00 --checkpoint.dirpath "$work/accuracy"
grep -o "Epoch [0-9]*:.*val/acc=[0-9.]*" "$raw" | tail -1 | sed -E 's/^(Epoch [0-9]+):.*(train\/loss)/last: \1, \2/' | tee -a "$log"
step "cifar10.yaml end to end" 70 python bench/throughput.py --end-to-end --config configs/cifar10.yaml \
  --data-root "$data_root" --epochs 3
step "cifar10-fast.yaml end to end" 60 python bench/throughput.py --end-to-end --config configs/cifar10-fast.yaml \
  --data-root "$data_root" --epochs 3
step "model M, 50 000-image epoch" 60 python bench/throughput.py --end-to-end --config configs/cifar10-cpu.yaml \
  --data-root "$data_root" --images 50000 --epochs 2 -- "${model_m[@]}"
rm -rf "$work"

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
echo "Appended to bench/RESULTS.md; figures in $log, full output in $raw"
