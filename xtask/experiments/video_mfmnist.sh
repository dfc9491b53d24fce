#!/usr/bin/env bash
# Video DiM-S/2 vs video DiT-S/2 on Moving Fashion-MNIST (docs/results.md):
# 16 frames of 64×64 with 2×2×2 tubelets (8,192 tokens), both trained for
# the same wall time, then sampled (DDIM), scored with FVD on the project's
# video classifier beside the floor (held-out clips of the training
# distribution vs the training clips), with GIF grids, steps, clips/s and
# peak memory gathered in <out>/results (summary.md, summary.json). With
# two or more GPUs the two models train and sample side by side (one card
# each), else one after the other. Run from the repository root:
#
#   xtask/experiments/video_mfmnist.sh <dim binary> <output folder>
#
# Environment (all optional): TRAIN_S (training wall time per model, 180),
# NUM (clips sampled per model and reference clips, 128), STEPS (DDIM
# steps, 20), FEATURE_CLIPS (4000) and FEATURE_EPOCHS (3) of the video
# classifier (trained here unless FEATURES names an existing weights file),
# MODELS ("dim dit" or one of them), DEVICE0 / DEVICE1 (cuda:0 / cuda:1),
# TRAIN_ARGS (extra `dim train` overrides), TINY=1 (a CPU-sized run of the
# whole pipeline in about a minute: small models and clips, for checking the
# script itself). `cargo xtask experiment-bundle <dir>` packs the binary and
# the Fashion-MNIST files for a machine without Rust.
set -euo pipefail
dim=$(realpath "$1")
out=$2
mkdir -p "$out"
out=$(realpath "$out")
read -r -a models <<<"${MODELS:-dim dit}"
for m in "${models[@]}"; do
  [ "$m" = dim ] || [ "$m" = dit ] || { echo "MODELS: unknown model '$m' (dim, dit)" >&2; exit 2; }
done
tiny=${TINY:-0}
train_s=${TRAIN_S:-180}
num=${NUM:-128}
steps=${STEPS:-20}
fclips=${FEATURE_CLIPS:-4000}
fepochs=${FEATURE_EPOCHS:-3}
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "$tiny" = 1 ]; then
  train_s=${TRAIN_S:-15}; num=${NUM:-24}; steps=${STEPS:-2}; fclips=${FEATURE_CLIPS:-96}; fepochs=${FEATURE_EPOCHS:-1}
  dev0=${DEVICE0:-cpu}; dev1=${DEVICE1:-$dev0}
else
  dev0=${DEVICE0:-cuda:0}
  if [ -n "${DEVICE1:-}" ]; then dev1=$DEVICE1; elif [ "$ngpu" -ge 2 ]; then dev1=cuda:1; else dev1=$dev0; fi
fi
res=$out/results
mkdir -p "$res"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$res/log.txt"; }

# The Moving Fashion-MNIST of the configs (or a tiny one), as a [data] table
# with generator seed $1 and $2 clips: seed 0 is the training distribution,
# seed 1 the held-out clips of the floor.
moving() {
  if [ "$tiny" = 1 ]; then
    echo "[data]"
    echo "kind = \"moving_fashion_mnist\""
    echo "moving = { len = $2, frames = 4, canvas = 32, items = 2, seed = $1, min_speed = 2.0, max_speed = 4.0 }"
  else
    echo "[data]"
    echo "kind = \"moving_fashion_mnist\""
    echo "moving = { len = $2, frames = 16, canvas = 64, items = 2, seed = $1, min_speed = 2.0, max_speed = 4.0 }"
  fi
}
moving 0 10000 >"$out/train_clips.toml"
moving 1 "$num" >"$out/heldout_clips.toml"
tiny_args=()
if [ "$tiny" = 1 ]; then
  tiny_args=(model.depth=3 model.width=32 model.heads=2 model.patch=8 "model.input_size=[32, 32]" model.frames=4
    "data.moving={ len = 64, frames = 4, canvas = 32, items = 2, seed = 0, min_speed = 2.0, max_speed = 4.0 }"
    train.batch_size=2 train.log_every=1 loader.workers=1 train.threads=2 train.precision=\"f32\")
fi

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
wait_all() {
  local p
  for p in "${pids[@]}"; do wait "$p" || { log "a job failed: see the logs in $out"; exit 1; }; done
  pids=()
}

train_one() {
  local m=$1 dev=$2
  # shellcheck disable=SC2086
  "$dim" train --config "configs/mfmnist_video_${m}.toml" \
    "train.out_dir=\"$out/$m\"" "train.device=\"$dev\"" "train.time_limit_s=$train_s" \
    "${tiny_args[@]}" ${TRAIN_ARGS:-} \
    >"$out/$m.ckpt" 2>"$out/$m.train.log"
  log "$m: trained, $(tail -1 "$out/$m/metrics.jsonl")"
}

sample_one() {
  local m=$1 dev=$2
  "$dim" sample --checkpoint "$(cat "$out/$m.ckpt")" --num "$num" --batch 32 --steps "$steps" \
    --sampler ddim --device "$dev" --out "$out/$m/samples" >/dev/null 2>"$out/$m.sample.log"
  "$dim" fvd --samples "$out/$m/samples" --reference "$out/train_clips.toml" --num "$num" \
    --weights "$features" --device "$dev" --json "$res/$m.fvd.json" >/dev/null 2>>"$out/$m.sample.log"
  cp "$out/$m/samples/grid.gif" "$res/$m.grid.gif"
  cp "$out/$m/samples/grid.png" "$res/$m.frames.png"
  cp "$out/$m/metrics.jsonl" "$res/$m.metrics.jsonl"
  log "$m: sampled, FVD $(grep '"fvd"' "$res/$m.fvd.json")"
}

log "devices: $dev0 $dev1 ($ngpu GPUs); dim $("$dim" --version); train ${train_s}s each, $num clips, DDIM-$steps"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$res/gpu.txt" 2>/dev/null || echo "cpu" >"$res/gpu.txt"
for_models train_one
wait_all
features=${FEATURES:-$out/features/mfmnist_video_classifier.safetensors}
if [ ! -f "$features" ]; then
  log "training the video classifier ($fclips clips, $fepochs epochs)"
  "$dim" train-features --video --data "$out/train_clips.toml" --clips "$fclips" --epochs "$fepochs" \
    --out "$features" --device "$dev0" >"$res/features.txt" 2>"$out/features.log"
  cat "$res/features.txt" | tee -a "$res/log.txt"
fi
for_models sample_one
"$dim" fvd --samples "$out/heldout_clips.toml" --reference "$out/train_clips.toml" --num "$num" \
  --weights "$features" --device "$dev0" --json "$res/floor.fvd.json" >/dev/null 2>"$out/floor.log"
wait_all
log "floor: $(grep '"fvd"' "$res/floor.fvd.json")"
for m in "${models[@]}"; do cp "configs/mfmnist_video_${m}.toml" "$res/"; done

# Steps, clips/s (median over the logged lines after the first), peak memory,
# FVD and the floor, as JSON and a Markdown table for docs/results.md.
python3 - "$res" "$train_s" "$num" "$steps" "${models[@]}" <<'PY'
import json, statistics, sys, pathlib
res = pathlib.Path(sys.argv[1]); train_s, num, steps = sys.argv[2:5]; models = sys.argv[5:]
floor = json.loads((res / "floor.fvd.json").read_text())["fvd"]
rows, summary = [], {"train_s": float(train_s), "clips": int(num), "ddim_steps": int(steps), "floor": floor, "models": {}}
for m in models:
    lines = [json.loads(l) for l in (res / f"{m}.metrics.jsonl").read_text().splitlines() if l.strip()]
    rate = statistics.median([l["images_per_s"] for l in lines[1:]] or [lines[-1]["images_per_s"]])
    peak = max(l.get("memory_mib", 0) for l in lines)
    fvd = json.loads((res / f"{m}.fvd.json").read_text())["fvd"]
    summary["models"][m] = {"steps": lines[-1]["step"], "clips_per_s": rate, "peak_memory_mib": peak,
                            "final_loss": lines[-1]["loss"], "fvd": fvd}
    rows.append(f"| {m} | {lines[-1]['step']} | {rate:.1f} | {peak / 1024:.1f} | {lines[-1]['loss']:.4f} | {fvd:.2f} | {floor:.2f} |")
(res / "summary.json").write_text(json.dumps(summary, indent=2))
gpu = (res / "gpu.txt").read_text().strip()
table = "\n".join([f"{gpu}; {train_s} s of training each, {num} clips, DDIM-{steps}",
                   "", "| model | steps | clips/s | peak GiB | last loss | FVD | floor |", "|---|---|---|---|---|---|---|", *rows])
(res / "summary.md").write_text(table + "\n")
print(table)
PY
tar czf "$out/results.tgz" -C "$out" results
log "results in $res (packed: $out/results.tgz)"
