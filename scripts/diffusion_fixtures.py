#!/usr/bin/env python3
"""Reference fixtures for `dim-diffusion` from Hugging Face diffusers.

How to run (from the repository root; diffusers is needed only here):

    .venv/bin/pip install diffusers
    .venv/bin/python scripts/diffusion_fixtures.py

It writes `crates/dim-diffusion/tests/fixtures/diffusers.json`, which the Rust
test `tests/diffusers_parity.rs` reads. Generated with diffusers 0.42.1 and
torch 2.11 (CPU); the output is deterministic.

diffusers keeps its tables in float32 (`torch.linspace(..., dtype=torch.float32)`,
`.astype(np.float32)`, `sample.to(torch.float32)`). To compare at 1e-6 in f64,
each scheduler module's `torch` and `np` globals are replaced by thin proxies
whose `float32` attribute is `float64`; everything else is diffusers' own code,
unmodified. All inputs are float64.

Contents (all tensors as {"shape": [...], "data": [flat f64]}):
* "tables": alphas_cumprod for the linear, scaled_linear and cosine schedules (T = 1000).
* "steps": single scheduler steps on fixed inputs (DDPM incl. its Gaussian
  noise, DDIM with and without eta) with timesteps and the step output.
* "loops": whole deterministic sampling loops (DDIM, DPM-Solver++ 2M, Euler,
  Heun, FlowMatchEuler) driven by the closed-form test model
  `model(x, t) = 0.7 tanh(x) + 0.1 cos(t / 137) x`, from a fixed start.
* "hybrid": improved-DDPM / DiT hybrid loss terms (mse, vb in bits/dim, loss)
  for fixed inputs, from a float64 transcription of improved-diffusion's
  `training_losses` / `_vb_terms_bpd` (not diffusers: it has no such loss).
"""

import json
import math
import pathlib
import types

import numpy as np
import torch

import diffusers
from diffusers.schedulers import (
    scheduling_ddim,
    scheduling_ddpm,
    scheduling_dpmsolver_multistep,
    scheduling_euler_discrete,
    scheduling_flow_match_euler_discrete,
    scheduling_heun_discrete,
)

OUT = pathlib.Path(__file__).resolve().parent.parent / "crates/dim-diffusion/tests/fixtures/diffusers.json"


class _F64Module(types.ModuleType):
    """Proxy of a module whose `float32` is `float64`."""

    def __init__(self, inner):
        super().__init__(inner.__name__)
        self._inner = inner

    def __getattr__(self, name):
        if name == "float32":
            return self._inner.float64
        return getattr(self._inner, name)


for _m in (
    scheduling_ddim,
    scheduling_ddpm,
    scheduling_dpmsolver_multistep,
    scheduling_euler_discrete,
    scheduling_flow_match_euler_discrete,
    scheduling_heun_discrete,
):
    _m.torch = _F64Module(torch)
    _m.np = _F64Module(np)

SCHEDULES = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}
PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SHAPE = (2, 3, 4, 4)


def enc(t):
    t = torch.as_tensor(t)
    assert t.dtype in (torch.float64, torch.int64), t.dtype
    return {"shape": list(t.shape), "data": t.double().flatten().tolist()}


def rand(seed, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def model_fn(x, t):
    return 0.7 * torch.tanh(x) + 0.1 * math.cos(float(t) / 137.0) * x


def sched_kw(schedule):
    return dict(num_train_timesteps=1000, **SCHEDULES[schedule])


def tables():
    out = {}
    for name in SCHEDULES:
        s = diffusers.DDPMScheduler(**sched_kw(name))
        assert s.alphas_cumprod.dtype == torch.float64
        out[name] = enc(s.alphas_cumprod)
    return out


def ddpm_steps():
    cases = []
    variants = [
        # (schedule, prediction, variance_type, steps, spacing, clip)
        ("linear", "eps", "fixed_small", 1000, "leading", False),
        ("linear", "eps", "fixed_small", 50, "leading", False),
        ("linear", "v", "fixed_large", 50, "trailing", False),
        ("cosine", "x0", "fixed_small", 100, "leading", True),
        ("linear", "eps", "learned_range", 250, "leading", False),
        ("scaled_linear", "v", "learned_range", 50, "trailing", False),
    ]
    for k, (sch, pred, var, steps, spacing, clip) in enumerate(variants):
        s = diffusers.DDPMScheduler(
            **sched_kw(sch),
            prediction_type=PRED[pred],
            variance_type=var,
            clip_sample=clip,
            timestep_spacing=spacing,
        )
        s.set_timesteps(steps)
        ts = s.timesteps.tolist()
        for idx in (0, len(ts) // 2, len(ts) - 2, len(ts) - 1):
            t = ts[idx]
            if idx == len(ts) - 1 and t > 0 and var != "fixed_small":
                # Known, deliberate difference: diffusers adds noise on the last
                # step whenever its timestep is > 0 (trailing spacing), with
                # variance beta_t for fixed_large/learned_range; dim-diffusion
                # (like improved DDPM / DiT) never adds noise on the last step.
                continue
            x = rand(100 + k)
            c = SHAPE[1]
            out_shape = (SHAPE[0], 2 * c, *SHAPE[2:]) if var == "learned_range" else SHAPE
            out = rand(200 + k + idx, out_shape)
            if var == "learned_range":
                out[:, c:] = torch.tanh(out[:, c:])  # v in [-1, 1]
            seed = 300 + k + idx
            noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            prev = s.step(out, t, x, generator=torch.Generator().manual_seed(seed)).prev_sample
            cases.append(
                dict(
                    sampler="ddpm", schedule=sch, prediction=pred, variance=var, steps=steps,
                    spacing=spacing, clip=clip, timesteps=ts, t=t, x=enc(x), model_output=enc(out),
                    noise=enc(noise), prev=enc(prev),
                )
            )
    return cases


def ddim_steps():
    cases = []
    variants = [
        ("linear", "eps", 50, "leading", 0.0, False),
        ("linear", "v", 50, "trailing", 0.0, False),
        ("cosine", "x0", 20, "leading", 0.0, False),
        ("linear", "eps", 50, "leading", 0.7, False),
        ("scaled_linear", "v", 25, "trailing", 1.0, False),
        ("linear", "eps", 50, "leading", 0.0, True),
    ]
    for k, (sch, pred, steps, spacing, eta, clip) in enumerate(variants):
        s = diffusers.DDIMScheduler(
            **sched_kw(sch), prediction_type=PRED[pred], clip_sample=clip, timestep_spacing=spacing,
            set_alpha_to_one=True, steps_offset=0,
        )
        s.set_timesteps(steps)
        ts = s.timesteps.tolist()
        for idx in (0, len(ts) // 2, len(ts) - 1):
            t = ts[idx]
            x = rand(400 + k)
            out = rand(500 + k + idx)
            noise = rand(600 + k + idx)
            prev = s.step(out, t, x, eta=eta, use_clipped_model_output=True, variance_noise=noise).prev_sample
            cases.append(
                dict(
                    sampler="ddim", schedule=sch, prediction=pred, steps=steps, spacing=spacing, eta=eta,
                    clip=clip, timesteps=ts, t=t, x=enc(x), model_output=enc(out), noise=enc(noise),
                    prev=enc(prev),
                )
            )
    return cases


def run_loop(s, x, scale_input):
    x = x * getattr(s, "init_noise_sigma", 1.0)
    for t in s.timesteps:
        inp = s.scale_model_input(x, t) if scale_input else x
        out = model_fn(inp, t)
        x = s.step(out, t, x).prev_sample
    return x


def loops():
    cases = []
    x_T = rand(7)

    def add(sampler, s, sch, pred, steps, spacing, scale_input, **extra):
        init_sigma = float(getattr(s, "init_noise_sigma", 1.0))
        final = run_loop(s, x_T, scale_input)
        assert final.dtype == torch.float64
        cases.append(
            dict(
                sampler=sampler, schedule=sch, prediction=pred, steps=steps, spacing=spacing,
                timesteps=enc(s.timesteps.double()), sigmas=enc(s.sigmas.double()) if hasattr(s, "sigmas") else None,
                init_noise_sigma=init_sigma, x_T=enc(x_T), final=enc(final), **extra,
            )
        )

    for sch, pred, steps, spacing in [
        ("linear", "eps", 50, "leading"),
        ("linear", "v", 10, "trailing"),
        ("cosine", "x0", 20, "leading"),
    ]:
        s = diffusers.DDIMScheduler(
            **sched_kw(sch), prediction_type=PRED[pred], clip_sample=False, timestep_spacing=spacing,
            set_alpha_to_one=True, steps_offset=0,
        )
        s.set_timesteps(steps)
        add("ddim", s, sch, pred, steps, spacing, False)

    for sch, pred, steps, spacing in [
        ("linear", "eps", 20, "linspace"),
        ("linear", "x0", 20, "leading"),
        ("linear", "v", 15, "trailing"),
        ("scaled_linear", "eps", 10, "linspace"),
        ("cosine", "v", 25, "linspace"),
    ]:
        s = diffusers.DPMSolverMultistepScheduler(
            **sched_kw(sch), prediction_type=PRED[pred], timestep_spacing=spacing, solver_order=2,
            algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
            final_sigmas_type="zero", steps_offset=0,
        )
        s.set_timesteps(steps)
        assert s.sigmas.dtype == torch.float64
        add("dpm++2m", s, sch, pred, steps, spacing, False)

    for sch, pred, steps, spacing in [
        ("linear", "eps", 50, "linspace"),
        ("linear", "v", 30, "leading"),
        ("scaled_linear", "eps", 25, "trailing"),
        ("cosine", "x0", 40, "linspace"),
    ]:
        s = diffusers.EulerDiscreteScheduler(
            **sched_kw(sch), prediction_type=PRED[pred], timestep_spacing=spacing, steps_offset=0,
        )
        s.set_timesteps(steps)
        add("euler", s, sch, pred, steps, spacing, True)

    for sch, pred, steps, spacing in [
        ("linear", "eps", 25, "linspace"),
        ("linear", "v", 10, "trailing"),
    ]:
        s = diffusers.HeunDiscreteScheduler(
            **sched_kw(sch), prediction_type=PRED[pred], timestep_spacing=spacing, steps_offset=0,
        )
        s.set_timesteps(steps)
        add("heun", s, sch, pred, steps, spacing, True)

    for steps, shift in [(28, 1.0), (10, 3.0)]:
        s = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        s.set_timesteps(steps)
        add("flow_euler", s, "flow", "velocity", steps, "linspace", False, shift=shift)
    return cases


# ---------------------------------------------------------------------------
# improved-DDPM / DiT hybrid loss, transcribed from openai/improved-diffusion
# (gaussian_diffusion.py, losses.py) with LossType.MSE and learned_range
# variance (what DiT trains with), in float64.


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _discretized_gaussian_log_likelihood(x, *, means, log_scales):
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
    cdf_plus = _approx_standard_normal_cdf(plus_in)
    min_in = inv_stdv * (centered_x - 1.0 / 255.0)
    cdf_min = _approx_standard_normal_cdf(min_in)
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def _mean_flat(x):
    return x.mean(dim=list(range(1, x.ndim)))


def adm_hybrid_losses(model_mean_type):
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    acp = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - acp) / (1.0 - ac)
    plvc = np.log(np.append(post_var[1], post_var[1:]))
    c1 = betas * np.sqrt(acp) / (1.0 - ac)
    c2 = (1.0 - acp) * np.sqrt(alphas) / (1.0 - ac)
    t = torch.tensor([0, 1, 2, 500, 999, 0], dtype=torch.int64)
    shape = (6, 3, 4, 4)

    def ext(arr):
        return torch.from_numpy(arr)[t].view(-1, 1, 1, 1)

    g = torch.Generator().manual_seed(42)
    # Data on the 8-bit grid in [-1, 1], with exact edge values.
    x_start = (torch.randint(0, 256, shape, generator=g).double() / 127.5 - 1.0)
    x_start[0, 0, 0, :2] = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    x_t = ext(np.sqrt(ac)) * x_start + ext(np.sqrt(1.0 - ac)) * noise
    pred = torch.randn(shape, generator=g, dtype=torch.float64) * 0.3
    if model_mean_type == "eps":
        pred = pred + noise  # a plausible, imperfect eps prediction
    else:
        pred = pred + x_start
    var_values = torch.tanh(torch.randn(shape, generator=g, dtype=torch.float64))
    model_output = torch.cat([pred, var_values], dim=1)

    true_mean = ext(c1) * x_start + ext(c2) * x_t
    true_lv = ext(plvc)
    frac = (var_values + 1) / 2
    model_lv = frac * ext(np.log(betas)) + (1 - frac) * ext(plvc)
    if model_mean_type == "eps":
        pred_xstart = ext(np.sqrt(1.0 / ac)) * x_t - ext(np.sqrt(1.0 / ac - 1)) * pred
        target = noise
    else:
        pred_xstart = pred
        target = x_start
    model_mean = ext(c1) * pred_xstart + ext(c2) * x_t
    kl = _mean_flat(_normal_kl(true_mean, true_lv, model_mean, model_lv)) / math.log(2.0)
    nll = -_mean_flat(_discretized_gaussian_log_likelihood(x_start, means=model_mean, log_scales=0.5 * model_lv)) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    mse = _mean_flat((target - pred) ** 2)
    return dict(
        prediction=model_mean_type, t=t.tolist(), x_start=enc(x_start), noise=enc(noise),
        model_output=enc(model_output), mse=enc(mse), vb=enc(vb), loss=enc(mse + vb),
    )


def main():
    data = dict(
        diffusers_version=diffusers.__version__,
        torch_version=torch.__version__,
        model="0.7 * tanh(x) + 0.1 * cos(t / 137) * x",
        tables=tables(),
        steps=ddpm_steps() + ddim_steps(),
        loops=loops(),
        hybrid=[adm_hybrid_losses("eps"), adm_hybrid_losses("x0")],
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data))
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
