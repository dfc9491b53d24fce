#!/usr/bin/env bash
# `dim latents` on the GPUs of one machine: the multi-GPU latent cache on real
# GPUs (the CPU tests in crates/dim/tests/latent_e2e.rs run it with Gloo
# processes). In one call of a few minutes:
#
#  1. inputs: N_IMAGES (2048) synthetic PNGs in 2 classes, of assorted sizes
#     around SIZE (256), and a randomly initialised full-size SD VAE
#     (`cargo build --release -p dim-vae --example random_vae`);
#  2. `--gpus 1` and `--gpus 2` (with --flip, shards of SHARD (512) latents)
#     write caches that are compared shard by shard: bytes, else max |diff|;
#  3. a `--gpus 2` run stopped after each rank's first batch, then resumed
#     with `--gpus 2`, compared with the `--gpus 1` cache the same way;
#  4. encodes/s (images and their mirror images) of each full run, from its
#     wall time (start-up included).
#
#   xtask/experiments/latents_gpus.sh <bin/dim> <random_vae> <output folder>
#
# Writes <out>/summary.json and the runs' logs. CPU_CHECK=1 runs the same flow
# on the CPU with `--nproc`, 48 images of 32 px and a small VAE (a check of the
# script itself).
set -euo pipefail
dim=$(realpath "$1")
random_vae=$(realpath "$2")
out=$(mkdir -p "$3" && realpath "$3")
n_images=${N_IMAGES:-2048}
size=${SIZE:-256}
shard=${SHARD:-512}
batch=${BATCH:-64}
launch=(--gpus)
vae_cfg=()
if [ -n "${CPU_CHECK:-}" ]; then
  n_images=${N_IMAGES:-48} size=${SIZE:-32} shard=${SHARD:-16} batch=${BATCH:-8}
  launch=(--device cpu --nproc)
fi
export NCCL_NVLS_ENABLE=0            # NVLink multicast stays off on these machines
work=${WORK:-/dev/shm/dim-latents}
rm -rf "$work"
mkdir -p "$work"
log() { echo "[$(date -u +%H:%M:%S)] $*"; }

log "inputs: $n_images images, random SD VAE"
python3 - "$work/images" "$n_images" "$size" <<'PY'
import struct, sys, zlib, os
import numpy as np
root, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def png(path, img):
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 1)) + chunk(b"IEND", b""))
rng = np.random.default_rng(0)
for i in range(n):
    c = i % 2
    d = os.path.join(root, ["cat", "dog"][c])
    os.makedirs(d, exist_ok=True)
    h, w = size + int(rng.integers(0, 64)), size + int(rng.integers(0, 96))
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * (3 + c)) % 256, (y * 5) % 256, ((x + y) * (i % 7 + 1)) % 256], -1)
    img = (base + rng.integers(0, 32, (h, w, 3))).clip(0, 255).astype(np.uint8)
    png(os.path.join(d, f"{i:05d}.png"), img)
PY
if [ -n "${CPU_CHECK:-}" ]; then
  mkdir -p "$work/small"
  echo '{"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8}' >"$work/small/config.json"
  vae_cfg=("$work/small/config.json")
fi
"$random_vae" "$work/vae" "${vae_cfg[@]}" >/dev/null

run() {  # name, extra flags...
  local name=$1; shift
  local t0 t1
  t0=$(date +%s.%N)
  set +e
  "$dim" latents --data "$work/images" --vae "$work/vae/diffusion_pytorch_model.safetensors" \
    --vae-config "$work/vae/config.json" --out "$work/$name" --image-size "$size" --flip \
    --shard-size "$shard" --batch "$batch" --seed 3 "$@" >"$out/$name.log" 2>&1
  local rc=$?
  set -e
  t1=$(date +%s.%N)
  echo "$name $rc $(awk "BEGIN{print $t1 - $t0}")" >>"$out/runs.txt"
  log "$name: exit $rc in $(awk "BEGIN{print $t1 - $t0}") s"
  return 0
}
: >"$out/runs.txt"
run one "${launch[@]}" 1
run two "${launch[@]}" 2
run cut "${launch[@]}" 2 --fail-after-batches 1
run cut "${launch[@]}" 2

python3 - "$work" "$out" "$n_images" <<'PY'
import json, os, struct, sys
import numpy as np
work, out, n_images = sys.argv[1], sys.argv[2], int(sys.argv[3])
def tensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(n))
        data = f.read()
    head.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]]) for k, v in head.items()}
def compare(a, b):
    fa = sorted(os.listdir(os.path.join(work, a)))
    fb = sorted(os.listdir(os.path.join(work, b)))
    res = {"files_a": fa, "files_b": fb, "same_files": fa == fb, "shards": {}}
    for f in fa:
        if not f.endswith(".safetensors") or f not in fb:
            continue
        ta, tb = tensors(os.path.join(work, a, f)), tensors(os.path.join(work, b, f))
        r = {"bytes_equal": open(os.path.join(work, a, f), "rb").read() == open(os.path.join(work, b, f), "rb").read()}
        for k in ta:
            da, sa, xa = ta[k]
            db, sb, xb = tb.get(k, (None, None, b""))
            if da != db or sa != sb:
                r[k] = f"{da} {sa} vs {db} {sb}"
                continue
            dt = {"F16": np.float16, "F32": np.float32, "I64": np.int64}[da]
            va = np.frombuffer(xa, dt).astype(np.float64)
            vb = np.frombuffer(xb, dt).astype(np.float64)
            r[k] = {"max_abs_diff": float(np.abs(va - vb).max()) if va.size else 0.0, "max_abs": float(np.abs(va).max()) if va.size else 0.0}
        res["shards"][f] = r
    idx = lambda d: json.load(open(os.path.join(work, d, "index.json")))
    res["index_equal"] = idx(a) == idx(b)
    return res
runs = [l.split() for l in open(os.path.join(out, "runs.txt"))]
summary = {
    "card": os.popen("nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null").read().strip().splitlines(),
    "images": n_images,
    "runs": [{"name": n, "exit": int(rc), "seconds": float(s), "encodes_per_s": (2 * n_images) / float(s) if rc == "0" and n != "cut" else None} for n, rc, s in runs],
    "two_vs_one": compare("one", "two"),
    "resumed_vs_one": compare("one", "cut"),
}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
for k in ("two_vs_one", "resumed_vs_one"):
    c = summary[k]
    eq = all(s["bytes_equal"] for s in c["shards"].values())
    worst = max((v["max_abs_diff"] for s in c["shards"].values() for t, v in s.items() if isinstance(v, dict)), default=None)
    print(f"{k}: same files {c['same_files']}, index equal {c['index_equal']}, all shards byte-equal {eq}, max |diff| {worst}")
for r in summary["runs"]:
    print(r)
PY
