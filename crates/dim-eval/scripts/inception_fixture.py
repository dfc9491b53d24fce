"""Parity fixture for dim-eval's Inception-v3: pytorch-fid at random init.

pytorch-fid downloads its FID weights; here the download is monkey-patched to
return a seeded random state dict (conv weights, batch-norm statistics and
the 1008-class fc head), so the architecture and the preprocessing (bilinear
resize to 299, [0, 1] -> [-1, 1]) are compared, not trained weights. The
reference runs in float64. Writes to --out:

  weights.safetensors  the random weights (f32), PyTorch state-dict names
  io.safetensors       images (N,3,H,W) f32 in [0,1]; f64 pool (N,2048),
                       spatial (N,2023: Mixed_6d.branch1x1[:, :7], channels-last,
                       as the ADM evaluator's mixed_6/conv), logits (N,1008)

Usage: python inception_fixture.py --out DIR --seed S
"""

import argparse
import os

import torch
import torch.nn.functional as F
import pytorch_fid.inception as fid
from safetensors.torch import save_file


def random_state(seed):
    g = torch.Generator().manual_seed(seed)
    tmpl = fid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    sd = {}
    for k, v in tmpl.state_dict().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = v
        elif k.endswith("running_mean"):
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith("bn.weight"):
            sd[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("bias"):
            sd[k] = 0.05 * torch.randn(v.shape, generator=g)
        else:  # conv / fc weights, He scale
            fan_in = v[0].numel()
            sd[k] = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
    return sd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    sd = random_state(a.seed)
    fid.load_state_dict_from_url = lambda *args, **kw: sd
    net = fid.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
    net = net.eval().double()
    spatial = {}
    mixed_6d = net.blocks[2][6]
    mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: spatial.setdefault("x", o))
    torch.manual_seed(a.seed)
    # Awkward size: not square, smaller than 299 (upsampled) and not a multiple of 8.
    images = torch.rand(3, 3, 45, 71)
    with torch.no_grad():
        pool = net(images.double())[0].flatten(1)
        logits = pool @ sd["fc.weight"].double().t() + sd["fc.bias"].double()
    sp = spatial["x"][:, :7].permute(0, 2, 3, 1).reshape(images.shape[0], -1)
    save_file({k: v.float().contiguous() if v.is_floating_point() else v for k, v in sd.items()},
              os.path.join(a.out, "weights.safetensors"))
    save_file({"images": images.float(), "pool": pool.contiguous(), "spatial": sp.contiguous(),
               "logits": logits.contiguous()}, os.path.join(a.out, "io.safetensors"))


if __name__ == "__main__":
    main()
