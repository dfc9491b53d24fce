#!/usr/bin/env python3
"""Writes tests/fixtures/i3d_fixture.json: the outputs of an independent I3D
(the PyTorch port shipped by the `cd-fvd` package, pinned in
xtask/src/setup.rs) at a deterministic pseudo-random initialisation, for
dim-eval's I3D parity test.

Every tensor gets values from a closed formula of its sorted-name index and
flat element index (so the Rust test rebuilds the same weights without a
50 MB weights file), scaled like a He initialisation; batch-norm statistics
are non-trivial. Inputs come from a formula too. Everything in float64.

Run from the crate folder with the project venv (torch; `pip install
--no-deps cd-fvd==0.1.1`):
    ../../.venv/bin/python scripts/i3d_fixture.py
"""
import importlib.util
import json
import math
import pathlib

import torch

# Load the port's module file directly: the package's __init__ pulls in
# optional dependencies (VideoMAE, requests) the architecture does not need.
pkg = importlib.util.find_spec("cdfvd").submodule_search_locations[0]
spec = importlib.util.spec_from_file_location(
    "pytorch_i3d", pathlib.Path(pkg) / "third_party" / "i3d" / "pytorch_i3d.py"
)
pytorch_i3d = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pytorch_i3d)


def formula(k, shape):
    n = math.prod(shape)
    i = torch.arange(n, dtype=torch.float64)
    return torch.sin(0.37 * i + 1.1 * k + 0.5).reshape(shape)


def value(name, k, shape):
    base = formula(k, shape)
    if name.endswith("running_var"):
        return 1.0 + 0.25 * (1.0 + base)
    if name.endswith("bn.weight"):
        return 1.0 + 0.2 * base
    if name.endswith("bias") or name.endswith("running_mean"):
        return 0.1 * base
    fan_in = math.prod(shape[1:])
    return base * 2.0 / math.sqrt(fan_in)


def clip(shape):
    n = math.prod(shape)
    i = torch.arange(n, dtype=torch.float64)
    return (0.9 * torch.sin(0.013 * i + 0.2)).reshape(shape)


torch.manual_seed(0)
net = pytorch_i3d.InceptionI3d(400, in_channels=3).double().eval()
state = net.state_dict()
names = sorted(k for k in state if not k.endswith("num_batches_tracked"))
with torch.no_grad():
    for k, name in enumerate(names):
        state[name].copy_(value(name, k, list(state[name].shape)))

with torch.no_grad():
    small = clip([2, 3, 9, 61, 75])
    pre = net.extract_pre_pool_features(small)
    big = clip([1, 3, 16, 224, 224])
    logits = net(big)

flat = pre.flatten()
picks = [(j * 7919) % flat.numel() for j in range(400)]
out = {
    "names": names,
    "shapes": [list(state[n].shape) for n in names],
    "pre_pool_input": [2, 3, 9, 61, 75],
    "pre_pool_shape": list(pre.shape),
    "pre_pool_channel_sum": pre.sum(dim=(0, 2, 3, 4)).tolist(),
    "pre_pool_picks": picks,
    "pre_pool_values": [flat[j].item() for j in picks],
    "logits_input": [1, 3, 16, 224, 224],
    "logits": logits.flatten().tolist(),
    "torch_version": torch.__version__,
}
path = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "i3d_fixture.json"
path.write_text(json.dumps(out))
print(f"wrote {path}: pre-pool {list(pre.shape)}, logits {list(logits.shape)}, |logits| max {logits.abs().max().item():.4g}")
