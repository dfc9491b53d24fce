#!/usr/bin/env bash
# DiM-S/2 vs DiT-S/2 on Fashion-MNIST (docs/results.md), end to end:
# train both for the same wall time, train the feature classifier, sample
# 10,000 images from each, FID / precision / recall against the test split,
# the train-vs-test floor, and guided grids. With two or more GPUs the two
# models train and sample side by side (one card each), else one after the
# other. Run from the repository root:
#
#   xtask/experiments/fmnist_s2.sh <dim binary> <output folder>
#
# Environment (all optional): TRAIN_ARGS (extra `dim train` overrides),
# MODELS ("dim dit", or one of them), NUM (samples, 10000), STEPS (sampling steps, the config's), FEATURE_EPOCHS
# (5), DEVICE0 / DEVICE1 (cuda:0 / cuda:1, or cpu for a quick check).
# `cargo xtask experiment-bundle <dir>` packs the binary and the data for a
# machine without Rust.
set -euo pipefail
dim=$(realpath "$1")
out=$2
mkdir -p "$out"
out=$(realpath "$out")
num=${NUM:-10000}
read -r -a models <<<"${MODELS:-dim dit}"
for m in "${models[@]}"; do
  [ "$m" = dim ] || [ "$m" = dit ] || { echo "MODELS: unknown model '$m' (dim, dit)" >&2; exit 2; }
done
epochs=${FEATURE_EPOCHS:-5}
steps=()
[ -n "${STEPS:-}" ] && steps=(--steps "$STEPS")
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
dev0=${DEVICE0:-cuda:0}
if [ -n "${DEVICE1:-}" ]; then dev1=$DEVICE1; elif [ "$ngpu" -ge 2 ]; then dev1=cuda:1; else dev1=$dev0; fi
features=$out/features/fmnist_classifier.safetensors
log() { echo "[$(date -u +%H:%M:%S)] $*"; }

# Runs "$1 <model> <device>" for each model (dim on DEVICE0, dit on DEVICE1),
# in the background when the two have cards of their own, else in turn.
pids=()
for_models() {
  local m dev
  for m in "${models[@]}"; do
    if [ "$m" = dim ]; then dev=$dev0; else dev=$dev1; fi
    if [ "$dev0" != "$dev1" ]; then
      "$1" "$m" "$dev" &
      pids+=($!)
    else
      "$1" "$m" "$dev"
    fi
  done
}
# Waits for the background jobs; fails if any failed.
wait_all() {
  local p
  for p in "${pids[@]}"; do wait "$p" || { log "a job failed: see the logs in $out"; exit 1; }; done
  pids=()
}

train_one() {
  local m=$1 dev=$2
  # shellcheck disable=SC2086
  "$dim" train --config "configs/fmnist_${m}_s2.toml" \
    "train.out_dir=\"$out/$m\"" "train.device=\"$dev\"" ${TRAIN_ARGS:-} \
    >"$out/$m.ckpt" 2>"$out/$m.train.log"
  log "$m: trained, $(tail -1 "$out/$m/metrics.jsonl")"
}

sample_eval_one() {
  local m=$1 dev=$2 ckpt
  ckpt=$(cat "$out/$m.ckpt")
  "$dim" sample --checkpoint "$ckpt" --num "$num" --batch 1000 "${steps[@]}" \
    --device "$dev" --out "$out/$m/samples" 2>"$out/$m.sample.log" >/dev/null
  "$dim" eval --samples "$out/$m/samples" --reference fashion-mnist:test \
    --weights "$features" --device "$dev" --json "$out/$m.eval.json" >/dev/null 2>>"$out/$m.sample.log"
  "$dim" sample --checkpoint "$ckpt" --num 100 --batch 100 --cfg 1.5 "${steps[@]}" \
    --device "$dev" --out "$out/$m/grid_cfg1.5" 2>>"$out/$m.sample.log" >/dev/null
  cp "$out/$m/samples/grid.png" "$out/$m.grid.png"
  cp "$out/$m/grid_cfg1.5/grid.png" "$out/$m.grid_cfg1.5.png"
  log "$m: sampled and evaluated"
}

log "devices: $dev0 $dev1 ($ngpu GPUs); dim $("$dim" --version)"
for_models train_one
wait_all
log "training the feature classifier ($epochs epochs)"
"$dim" train-features --out "$features" --epochs "$epochs" --device "$dev0" >"$out/features.txt" 2>"$out/features.log"
for_models sample_eval_one
"$dim" eval --samples fashion-mnist:train --reference fashion-mnist:test \
  --weights "$features" --device "$dev0" --json "$out/floor.eval.json" >/dev/null 2>"$out/floor.log"
wait_all
log "done"
for f in "$out"/*.eval.json; do echo "$f"; cat "$f"; done
cat "$out/features.txt"
# The small files (no checkpoints or samples) in one archive, to carry back.
pack=$(mktemp -d)/results
mkdir -p "$pack"
for m in "${models[@]}"; do
  cp "$out/$m/metrics.jsonl" "$pack/$m.metrics.jsonl"
  cp "$out/$m.grid.png" "$out/$m.grid_cfg1.5.png" "$out/$m.train.log" "$out/$m.sample.log" "$out/$m.ckpt" "$pack/"
done
cp "$out"/*.eval.json "$out/features.txt" "$features" "$pack/"
tar czf "$out/results.tgz" -C "$(dirname "$pack")" results
log "packed $out/results.tgz"
