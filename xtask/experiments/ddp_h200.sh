#!/usr/bin/env bash
# Data-parallel training on 2 GPUs (issue 14's acceptance, for
# docs/benchmarks/distributed.md), in one call of a few minutes:
#
#  1. throughput: DiM-XL/2 and DiT-XL/2, batch BATCH (32) per GPU, bf16, on
#     1 GPU and on 2 GPUs (`dim train --gpus 2`, NCCL); images/s averaged
#     over the logged windows after the first (warm-up);
#  2. loss curves: 50 steps of DiM-XL/2 at the same global batch (2 × BATCH)
#     on 1 GPU (grad_accum 2) and on 2 GPUs (BATCH each), same seed.
#
# Data: Fashion-MNIST from the experiment bundle, padded to SIZE (32: 16×16 =
# 256 tokens with patch 2, as ImageNet-256 latents) or resized (SIZE=64:
# 1,024 tokens; batch 32 of DiM-XL/2 there needs ~4× the 34 GiB of 256
# tokens, so lower BATCH with it). Run from the repository root:
#
#   DIM_FASHION_MNIST_DIR=<bundle>/data/fashion-mnist \
#     xtask/experiments/ddp_h200.sh <bundle>/bin/dim <output folder>
#
# Environment (optional): BATCH (32), SIZE (32), STEPS (30, throughput runs),
# CURVE_STEPS (50; 0 skips the curves), MODELS ("dim dit"),
# VARIANTS (more 2-GPU runs of each model, space-separated
# `name:key=value,key=value`, e.g. `view:dist.grad_as_bucket_view=true`;
# an UPPER_CASE key is an environment variable, e.g. `ch8:NCCL_MAX_NCHANNELS=8`),
# PROFILE (N: one more 2-GPU run of each model that records N steps with
# libtorch's profiler, trace summarised by scripts/trace_summary.py;
# PROFILE_HOST=false records the GPU only, which slows the host less), RUN_DIR (where the runs write their
# checkpoints, deleted after each run: /dev/shm/dim-ddp, as a DiM-XL/2
# checkpoint with EMA and Adam moments is 12 GB); CPU_CHECK=1 runs the same flow on
# CPU with `--nproc` and one-block models (a check of the script itself). Writes <out>/summary.json, the runs'
# metrics.jsonl and logs, and <out>/results.tgz with all the small files.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dim=$(realpath "$1")
out=$2
mkdir -p "$out"
out=$(realpath "$out")
batch=${BATCH:-32}
size=${SIZE:-32}
steps=${STEPS:-30}
curve_steps=${CURVE_STEPS:-50}
read -r -a models <<<"${MODELS:-dim dit}"
export NCCL_NVLS_ENABLE=0            # NVLink multicast stays off on these machines
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
log() { echo "[$(date -u +%H:%M:%S)] $*"; }
runs=${RUN_DIR:-/dev/shm/dim-ddp}
run_env=()   # extra environment of the next run (VARIANTS)
mkdir -p "$runs"

if [ -n "${CPU_CHECK:-}" ]; then
  device=cpu launch_flag=--nproc
  small=$'depth = 1\nwidth = 32\nheads = 2\ndt_rank = 4'
else
  device=cuda launch_flag=--gpus small=""
fi
if [ "$size" = 32 ]; then
  transform='{ op = "pad", size = 32 }'
else
  transform="{ op = \"center_crop_resize\", size = $size }"
fi

# config <file> <preset>: Fashion-MNIST at SIZE, 10 classes, bf16, no grids.
config() {
  cat >"$1" <<EOF
[model]
preset = "$2"
$small
in_channels = 1
input_size = [$size, $size]
num_classes = 10
class_dropout_prob = 0.1
learn_sigma = true

[diffusion]
kind = "gaussian"
timesteps = 1000
schedule = "linear"
learn_sigma = true

[data]
kind = "fashion_mnist"
split = "train"
transforms = [$transform]

[loader]
workers = 6
prefetch = 4

[optim]
lr = 1e-4
grad_clip = 0.0
ema_decay = 0.9999

[train]
seed = 0
device = "$device"
precision = "bf16"
log_every = 10
sample_every = 0
ckpt_every = 1000000
keep_last = 1

[dist]
timeout_s = 120
EOF
}

# run <name> <gpus> <config> [overrides...]
run() {
  local name=$1 gpus=$2 cfg=$3
  shift 3
  local launch=()
  [ "$gpus" -gt 1 ] && launch=("$launch_flag" "$gpus")
  local t0=$SECONDS
  rm -rf "${runs:?}/$name" "${out:?}/$name"   # a fresh run, not a resumed or appended one
  env "${run_env[@]}" "$dim" train --config "$cfg" "${launch[@]}" "train.out_dir=\"$runs/$name\"" "$@" \
    >"$out/$name.stdout" 2>"$out/$name.log" || { log "$name FAILED:"; tail -20 "$out/$name.log"; return 1; }
  mkdir -p "$out/$name"
  cp "$runs/$name/metrics.jsonl" "$out/$name/"
  if [ -f "$runs/$name/trace.json" ]; then cp "$runs/$name/trace.json" "$out/$name/"; fi
  rm -rf "${runs:?}/$name"
  log "$name: done in $((SECONDS - t0)) s, last: $(tail -1 "$out/$name/metrics.jsonl")"
}

log "dim $("$dim" --version); $(nvidia-smi -L 2>/dev/null | tr '\n' ' ')"
# A few seconds' 2-rank smoke run first, so a broken NCCL setup fails fast.
config "$out/smoke.toml" "DiM-S/2"
run smoke-2gpu 2 "$out/smoke.toml" "train.steps=5" "train.batch_size=16" "train.log_every=1"
for m in "${models[@]}"; do
  case $m in
    dim) preset="DiM-XL/2" ;;
    dit) preset="DiT-XL/2" ;;
    *) echo "MODELS: unknown model '$m' (dim, dit)" >&2; exit 2 ;;
  esac
  config "$out/$m.toml" "$preset"
  run "$m-1gpu" 1 "$out/$m.toml" "train.steps=$steps" "train.batch_size=$batch"
  run "$m-2gpu" 2 "$out/$m.toml" "train.steps=$steps" "train.batch_size=$((2 * batch))"
  for v in ${VARIANTS:-}; do
    IFS=, read -r -a sets <<<"${v#*:}"
    # UPPER_CASE=value entries are environment variables of that run.
    overrides=() run_env=()
    for kv in "${sets[@]}"; do
      if [[ $kv =~ ^[A-Z_0-9]+= ]]; then run_env+=("$kv"); else overrides+=("$kv"); fi
    done
    run "$m-2gpu-${v%%:*}" 2 "$out/$m.toml" "train.steps=$steps" "train.batch_size=$((2 * batch))" "${overrides[@]}"
    run_env=()
  done
  if [ "${PROFILE:-0}" -gt 0 ]; then
    # rank 0's trace of PROFILE steps after 20 of warm-up (run keeps it)
    name="$m-2gpu-profile"
    run "$name" 2 "$out/$m.toml" "train.steps=$((20 + PROFILE))" "train.batch_size=$((2 * batch))" \
      "train.profile_from=20" "train.profile_steps=$PROFILE" "train.profile_host=${PROFILE_HOST:-true}"
    python3 "$here/../../scripts/trace_summary.py" "$out/$name/trace.json" --steps "$PROFILE" \
      | tee "$out/$name.summary.txt" || true   # (a CPU trace has no GPU events)
    gzip -c "$out/$name/trace.json" >"$out/$name.trace.json.gz"
    rm "$out/$name/trace.json"
  fi
done
if [ "$curve_steps" -gt 0 ]; then
  config "$out/curve.toml" "DiM-XL/2"
  run curve-1gpu 1 "$out/curve.toml" "train.steps=$curve_steps" "train.batch_size=$((2 * batch))" \
    "train.grad_accum=2" "train.log_every=1"
  run curve-2gpu 2 "$out/curve.toml" "train.steps=$curve_steps" "train.batch_size=$((2 * batch))" \
    "train.log_every=1"
fi

python3 - "$out" "$batch" "$size" "${models[@]}" <<'EOF'
import json, os, sys
out, batch, size, models = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
def metrics(name):
    return [json.loads(l) for l in open(f"{out}/{name}/metrics.jsonl")]
def ips(name):
    m = metrics(name)[1:] or metrics(name)  # the first window holds the warm-up
    return sum(r["images_per_s"] for r in m) / len(m)
def spread(name):
    v = [r["images_per_s"] for r in (metrics(name)[1:] or metrics(name))]
    return min(v), max(v)
summary = {"batch_per_gpu": batch, "tokens": (size // 2) ** 2, "throughput": {}}
for m in models:
    one = ips(f"{m}-1gpu")
    runs = sorted(d for d in os.listdir(out) if d.startswith(f"{m}-2gpu") and not d.endswith("-profile")
                  and os.path.isfile(f"{out}/{d}/metrics.jsonl"))
    for r in runs:
        two = ips(r)
        mem = max(x["memory_mib"] for x in metrics(r))
        lo, hi = spread(r)
        key = m if r == f"{m}-2gpu" else f"{m}{r[len(m) + 5:]}"
        summary["throughput"][key] = {"images_per_s_1gpu": one, "images_per_s_2gpu": two,
                                      "speedup": two / one, "peak_mib_per_gpu_2gpu": mem,
                                      "windows_2gpu": [lo, hi]}
        print(f"{key}: 1 GPU {one:.1f} img/s, 2 GPUs {two:.1f} img/s (windows {lo:.0f}-{hi:.0f}): "
              f"{two / one:.3f}x (target >= 1.9x), peak {mem:.0f} MiB")
if not os.path.isfile(f"{out}/curve-1gpu/metrics.jsonl"):
    json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
    sys.exit(0)
c1, c2 = metrics("curve-1gpu"), metrics("curve-2gpu")
diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(c1, c2)]
summary["curve"] = {"steps": len(c1), "global_batch": 2 * batch,
                    "loss_1gpu": [r["loss"] for r in c1], "loss_2gpu": [r["loss"] for r in c2],
                    "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs)}
print(f"loss curves over {len(c1)} steps: max |diff| {max(diffs):.4g}, mean {sum(diffs) / len(diffs):.4g}")
for i in range(0, len(c1), 10):
    print(f"  step {c1[i]['step']}: 1 GPU {c1[i]['loss']:.5f}  2 GPUs {c2[i]['loss']:.5f}")
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
EOF
pack=$(mktemp -d)/ddp
mkdir -p "$pack"
for d in "$out"/*/; do
  n=$(basename "$d")
  [ -f "$d/metrics.jsonl" ] && cp "$d/metrics.jsonl" "$pack/$n.metrics.jsonl"
done
cp "$out"/*.log "$out"/*.toml "$out/summary.json" "$pack/"
cp "$out"/*.summary.txt "$out"/*.trace.json.gz "$pack/" 2>/dev/null || true
tar czf "$out/results.tgz" -C "$(dirname "$pack")" ddp
log "packed $out/results.tgz"
