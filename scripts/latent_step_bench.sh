#!/usr/bin/env bash
# DiM-XL/2 latent training steps at batch 256 (configs/imagenet256_dim_xl2.toml:
# 2 accumulated micro-batches of 128, bf16) on one GPU, on a synthetic latent
# cache (random 4x32x32 f16 latents, 1000 classes), printing images/s and peak
# memory from metrics.jsonl. Issue 15's GPU acceptance item; the result goes
# in docs/benchmarks with card, date and command.
#
# Usage: scripts/latent_step_bench.sh <path/to/dim> [workdir]
# Needs python3 with numpy (no Rust, no VAE weights: sample grids are off).
set -euo pipefail
DIM=${1:?usage: latent_step_bench.sh <dim binary> [workdir]}
W=${2:-/tmp/dim_latent_step_bench}
HERE=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$W" && mkdir -p "$W/cache"
python3 - "$W/cache" <<'PY'
import json, struct, sys
import numpy as np
d, n = sys.argv[1], 2048
rng = np.random.default_rng(0)
lat = rng.standard_normal((n, 4, 32, 32)).astype("<f2").tobytes()
lab = rng.integers(0, 1000, n).astype("<i8").tobytes()
hdr = {"latents": {"dtype": "F16", "shape": [n, 4, 32, 32], "data_offsets": [0, len(lat)]},
       "labels": {"dtype": "I64", "shape": [n], "data_offsets": [len(lat), len(lat) + len(lab)]}}
h = json.dumps(hdr).encode()
h += b" " * (-len(h) % 8)
with open(f"{d}/shard-00000.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + lat + lab)
json.dump({"version": 1, "count": n, "sample_shape": [4, 32, 32], "dtype": "F16", "has_labels": True,
           "shards": [{"file": "shard-00000.safetensors", "count": n}], "meta": {}},
          open(f"{d}/index.json", "w"))
PY
# The config as written, minus [vae] (no weights here; grids are off anyway).
sed '/^\[vae\]/,/^slice/d' "$HERE/configs/imagenet256_dim_xl2.toml" > "$W/cfg.toml"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
"$DIM" train --config "$W/cfg.toml" "data.dir=\"$W/cache\"" train.steps=30 train.log_every=10 \
    train.sample_every=0 train.ckpt_every=1000000 "train.out_dir=\"$W/run\"" loader.workers=4
echo "last log lines (images_per_s, memory_mib = peak CUDA memory in the window):"
tail -n 2 "$W/run/metrics.jsonl"
