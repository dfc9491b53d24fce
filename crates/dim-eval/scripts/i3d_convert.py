#!/usr/bin/env python3
"""Converts Kinetics-400 I3D weights to the safetensors file `dim fvd
--features i3d --weights <file>` loads (tensor names of the PyTorch port,
`Conv3d_1a_7x7.conv3d.weight`, ..., `logits.conv3d.bias`).

Accepted inputs:
- a state dict of the PyTorch port (`i3d_pretrained_400.pt`, as used by
  TATS and cd-fvd): names are kept as they are;
- a TorchScript I3D (`i3d_torchscript.pt`, the file of StyleGAN-V's FVD):
  its parameters and buffers are matched to the port's names in
  registration order, every shape checked. This mapping assumes the
  TorchScript module registers its tensors in the port's order; the script
  refuses the file if any shape disagrees (verified only on port-format
  files here; the TorchScript file was not available to test).

Needs torch, safetensors and the port's architecture from the `cd-fvd`
package (pinned in xtask/src/setup.rs):
    .venv/bin/python crates/dim-eval/scripts/i3d_convert.py i3d_torchscript.pt weights/i3d_kinetics400.safetensors
"""
import importlib.util
import pathlib
import sys

import torch
from safetensors.torch import save_file


def port_names():
    pkg = importlib.util.find_spec("cdfvd").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location(
        "pytorch_i3d", pathlib.Path(pkg) / "third_party" / "i3d" / "pytorch_i3d.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sd = mod.InceptionI3d(400, in_channels=3).state_dict()
    return [(k, tuple(v.shape)) for k, v in sd.items() if not k.endswith("num_batches_tracked")]


def main(src, dst):
    want = port_names()
    try:
        state = torch.jit.load(src, map_location="cpu").state_dict()
        kind = "TorchScript"
    except RuntimeError:
        state = torch.load(src, map_location="cpu")
        state = state.get("state_dict", state)
        kind = "state dict"
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    names = {k for k, _ in want}
    if names <= set(state):
        out = {k: state[k] for k, _ in want}
    else:
        got = list(state.items())
        if len(got) != len(want):
            sys.exit(f"{src}: {len(got)} tensors, the I3D port has {len(want)}: not a Kinetics-400 I3D")
        out = {}
        for (name, shape), (theirs, t) in zip(want, got):
            if tuple(t.shape) != shape:
                sys.exit(f"{src}: `{theirs}` has shape {tuple(t.shape)}, expected {shape} for `{name}`")
            out[name] = t
    for name, shape in want:
        if tuple(out[name].shape) != shape:
            sys.exit(f"{src}: `{name}` has shape {tuple(out[name].shape)}, expected {shape}")
    save_file({k: v.float().contiguous() for k, v in out.items()}, dst)
    print(f"{kind} {src} -> {dst}: {len(out)} tensors")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
