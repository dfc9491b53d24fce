#!/usr/bin/env python3
"""Reference fixtures for `dim-diffusion` from Hugging Face diffusers.

How to run (from the repository root; diffusers is needed only here):

    .venv/bin/pip install diffusers
    .venv/bin/python scripts/diffusion_fixtures.py

It writes `crates/dim-diffusion/tests/fixtures/diffusers.json`, which the Rust
test `tests/diffusers_parity.rs` reads. Generated with diffusers 0.42.1 and
torch 2.11 (CPU); the output is deterministic (fixed seeds).

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
* "random": many random configurations (T not round, N not dividing T, every
  sampler, schedule with random betas, spacing, prediction and option:
  Karras / exponential sigmas, zero terminal SNR, thresholding, clipping,
  steps_offset, set_alpha_to_one, eta, custom timesteps / sigmas). For each:
  diffusers' timestep grid and sigmas, one whole loop of the test model from
  a random start (the stochastic samplers' noise recorded in step order, on
  the steps whose noise coefficient is non-zero), and one recorded single
  step (inputs, previous data predictions for DPM-Solver, output).
* "hybrid": improved-DDPM / DiT hybrid loss terms (mse, vb in bits/dim, loss)
  for fixed inputs, from a float64 transcription of improved-diffusion's
  `training_losses` / `_vb_terms_bpd` (not diffusers: it has no such loss).
"""

import importlib
import json
import math
import pathlib
import random
import types

import numpy as np
import torch

import diffusers

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


# The scheduler modules, by name; their float32 tables and steps become float64.
SCHEDULING = {
    name: importlib.import_module(f"diffusers.schedulers.scheduling_{name}")
    for name in (
        "ddim",
        "ddpm",
        "dpmsolver_multistep",
        "euler_ancestral_discrete",
        "euler_discrete",
        "flow_match_euler_discrete",
        "flow_match_heun_discrete",
        "heun_discrete",
    )
}
for _m in SCHEDULING.values():
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

    # (sampler, scheduler, its options beyond schedule, prediction and
    # spacing, whether the model input is scaled, cases)
    gaussian = [
        ("ddim", diffusers.DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=True), False, [
            ("linear", "eps", 50, "leading"),
            ("linear", "v", 10, "trailing"),
            ("cosine", "x0", 20, "leading"),
        ]),
        ("dpm++2m", diffusers.DPMSolverMultistepScheduler, dict(
            solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
            lower_order_final=True, final_sigmas_type="zero",
        ), False, [
            ("linear", "eps", 20, "linspace"),
            ("linear", "x0", 20, "leading"),
            ("linear", "v", 15, "trailing"),
            ("scaled_linear", "eps", 10, "linspace"),
            ("cosine", "v", 25, "linspace"),
        ]),
        ("euler", diffusers.EulerDiscreteScheduler, {}, True, [
            ("linear", "eps", 50, "linspace"),
            ("linear", "v", 30, "leading"),
            ("scaled_linear", "eps", 25, "trailing"),
            ("cosine", "x0", 40, "linspace"),
        ]),
        ("heun", diffusers.HeunDiscreteScheduler, {}, True, [
            ("linear", "eps", 25, "linspace"),
            ("linear", "v", 10, "trailing"),
        ]),
    ]
    for sampler, scheduler, options, scale_input, configs in gaussian:
        for sch, pred, steps, spacing in configs:
            s = scheduler(
                **sched_kw(sch), prediction_type=PRED[pred], timestep_spacing=spacing, steps_offset=0,
                **options,
            )
            s.set_timesteps(steps)
            if hasattr(s, "sigmas"):
                assert s.sigmas.dtype == torch.float64
            add(sampler, s, sch, pred, steps, spacing, scale_input)

    for steps, shift in [(28, 1.0), (10, 3.0)]:
        s = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        s.set_timesteps(steps)
        add("flow_euler", s, "flow", "velocity", steps, "linspace", False, shift=shift)
    return cases


# ---------------------------------------------------------------------------
# Random configurations: every sampler against its diffusers scheduler.

RSHAPE = (2, 2, 2, 2)  # small: the fixtures hold whole loops and recorded noise


def model_fn_learned(x, t):
    """The test model with learned-variance channels (v in [-1, 1])."""
    return torch.cat([model_fn(x, t), torch.tanh(0.5 * x + 0.001 * float(t))], dim=1)


class NoiseTape:
    """Standard-normal noise from a seeded generator; `record` keeps it for the Rust replay."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)
        self.tape = []

    def draw(self, shape, record=True):
        if not record:
            return torch.zeros(shape, dtype=torch.float64)
        z = torch.randn(shape, generator=self.g, dtype=torch.float64)
        self.tape.append(z)
        return z


SCHEDULERS = {
    "ddpm": diffusers.DDPMScheduler,
    "ddim": diffusers.DDIMScheduler,
    "dpm++2m": diffusers.DPMSolverMultistepScheduler,
    "dpm++3m": diffusers.DPMSolverMultistepScheduler,
    "dpm++2m_sde": diffusers.DPMSolverMultistepScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "euler_a": diffusers.EulerAncestralDiscreteScheduler,
    "heun": diffusers.HeunDiscreteScheduler,
}


def draw_config(rng, k, sampler):
    """One random configuration (a dict of the fixture's keys)."""
    # Tie cases from the issue first, then random T (mostly not round) and N.
    forced = [(1000, 48), (165, 50), (50, 28), (1000, 61), (1000, 103)]
    if k < len(forced) * 2:
        T, N = forced[k % len(forced)]
        spacing = "trailing"
    else:
        T = rng.choice([rng.randint(20, 200), rng.randint(200, 1500)])
        N = rng.randint(1, max(1, min(T // 2, 40)))
        spacing = rng.choice(["leading", "trailing", "linspace"])
    sched = rng.choice(["linear", "scaled_linear", "cosine"])
    if sched == "linear":
        b0, b1 = rng.uniform(5e-5, 1e-3), rng.uniform(0.01, 0.03)
    elif sched == "scaled_linear":
        b0, b1 = rng.uniform(3e-4, 1.5e-3), rng.uniform(0.008, 0.02)
    else:
        b0, b1 = 1e-4, 0.02
    preds = ["eps", "v"] if sampler == "euler_a" else ["eps", "v", "x0"]
    c = dict(
        sampler=sampler, T=T, steps=N, schedule=sched, beta_start=b0, beta_end=b1,
        prediction=rng.choice(preds), spacing=spacing, variance=None, eta=0.0, clip=False,
        thresholding=False, ratio=0.995, max=1.0, steps_offset=0, set_alpha_to_one=True,
        sigma_schedule="default", zero_snr=False, custom_timesteps=None, custom_sigmas=None,
    )
    dpm = sampler.startswith("dpm")
    if sampler in ("ddpm", "ddim", "euler_a") or dpm:
        c["zero_snr"] = rng.random() < 0.15
        if c["zero_snr"] and sampler in ("ddpm", "ddim") and c["prediction"] == "eps":
            c["prediction"] = "v"
    if sampler in ("euler", "heun") or dpm:
        u = rng.random()
        c["sigma_schedule"] = "karras" if u < 0.3 else "exponential" if u < 0.5 else "default"
    if sampler in ("ddpm", "ddim") or dpm:
        if rng.random() < 0.2:
            c.update(thresholding=True, ratio=rng.uniform(0.9, 0.999), max=rng.uniform(1.0, 3.0))
    if sampler in ("ddpm", "ddim", "heun") and not c["thresholding"]:
        c["clip"] = rng.random() < 0.3
    if rng.random() < 0.3:
        c["steps_offset"] = 1
    if sampler == "ddim":
        c["set_alpha_to_one"] = rng.random() < 0.5
        c["eta"] = rng.uniform(0.1, 1.0) if rng.random() < 0.5 else 0.0
    if sampler == "ddpm":
        c["variance"] = rng.choice(["fixed_small", "fixed_large", "learned_range"])
    if c["sigma_schedule"] == "default" and k >= len(forced) * 2:
        if sampler in ("ddpm", "heun") or dpm or sampler == "euler":
            if rng.random() < 0.3:
                ts = sorted(rng.sample(range(T), N), reverse=True)
                if sampler in ("euler", "heun"):
                    ts = [t - rng.random() * 0.9 if t > 1 else float(t) for t in ts]
                c["custom_timesteps"] = [float(t) for t in ts]
        if sampler == "euler" and c["custom_timesteps"] is None and rng.random() < 0.4:
            ac = np.cumprod(1.0 - np.linspace(b0, b1, T))
            smax, smin = math.sqrt((1 - ac[-1]) / ac[-1]), math.sqrt((1 - ac[0]) / ac[0])
            sig = sorted((math.exp(rng.uniform(math.log(smin), math.log(smax))) for _ in range(N)), reverse=True)
            c["custom_sigmas"] = sig + [0.0]
            c["schedule"], c["sigma_schedule"] = "linear", "default"
    return c


def make_scheduler(c):
    sampler = c["sampler"]
    kw = dict(num_train_timesteps=c["T"], beta_schedule=SCHEDULES[c["schedule"]]["beta_schedule"],
              beta_start=c["beta_start"], beta_end=c["beta_end"], prediction_type=PRED[c["prediction"]],
              timestep_spacing=c["spacing"], steps_offset=c["steps_offset"])
    if c["zero_snr"]:
        kw["rescale_betas_zero_snr"] = True
    if sampler in ("ddpm", "ddim"):
        kw.update(clip_sample=c["clip"], thresholding=c["thresholding"],
                  dynamic_thresholding_ratio=c["ratio"], sample_max_value=c["max"])
    if sampler == "ddpm":
        kw["variance_type"] = c["variance"]
    if sampler == "ddim":
        kw["set_alpha_to_one"] = c["set_alpha_to_one"]
    if sampler == "heun":
        kw["clip_sample"] = c["clip"]
    if sampler.startswith("dpm"):
        kw.update(solver_order=3 if sampler == "dpm++3m" else 2,
                  algorithm_type="sde-dpmsolver++" if sampler.endswith("sde") else "dpmsolver++",
                  solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero",
                  thresholding=c["thresholding"], dynamic_thresholding_ratio=c["ratio"],
                  sample_max_value=c["max"])
    if sampler in ("euler", "heun") or sampler.startswith("dpm"):
        kw["use_karras_sigmas"] = c["sigma_schedule"] == "karras"
        kw["use_exponential_sigmas"] = c["sigma_schedule"] == "exponential"
    s = SCHEDULERS[sampler](**kw)
    if c["custom_timesteps"] is not None:
        ts = c["custom_timesteps"]
        s.set_timesteps(timesteps=[int(t) for t in ts] if sampler in ("ddpm",) or sampler.startswith("dpm") else ts)
    elif c["custom_sigmas"] is not None:
        s.set_timesteps(sigmas=c["custom_sigmas"])
    else:
        s.set_timesteps(c["steps"])
    return s


def undouble(v):
    """Heun repeats interior timesteps / sigmas; keep each once."""
    v = list(v)
    return [v[0]] + v[1::2] if len(v) % 2 == 1 else [v[0]] + v[1:-1:2] + [v[-1]]


def random_case(k, c, rng):
    sampler = c["sampler"]
    s = make_scheduler(c)
    heun = sampler == "heun"
    ts = [float(t) for t in s.timesteps]
    sig = [float(v) for v in s.sigmas] if hasattr(s, "sigmas") and sampler not in ("ddpm", "ddim") else None
    if heun:
        ts, sig = undouble(ts), undouble(sig)
    n = len(ts)
    probe = diffusers.DDIMScheduler(num_train_timesteps=c["T"], beta_schedule=SCHEDULES[c["schedule"]]["beta_schedule"],
                                    beta_start=c["beta_start"], beta_end=c["beta_end"],
                                    rescale_betas_zero_snr=c["zero_snr"]).alphas_cumprod
    c = dict(c, timesteps=ts, sigmas=sig, alphas_cumprod_probe=[float(probe[0]), float(probe[c["T"] // 2]), float(probe[-1])])
    want = c["steps"] if c["custom_timesteps"] is None and c["custom_sigmas"] is None else None
    # Two diffusers defects, recorded without a loop: the trailing grid can have
    # N + 1 entries (the last -1); and DPM-Solver's step index lookup skips a
    # step when (rounded Karras) timesteps repeat.
    c["defect"] = None
    if (want is not None and n != want) or any(t < 0 for t in ts):
        c["defect"] = "trailing_n_plus_1"
    elif sampler.startswith("dpm") and len(set(ts)) != len(ts):
        c["defect"] = "repeated_timesteps"
    if c["defect"]:
        return c
    model = model_fn_learned if c["variance"] == "learned_range" else model_fn
    x_T = rand(10_000 + k, RSHAPE)
    tape = NoiseTape(20_000 + k)
    rec_k = rng.randrange(n)
    rec = {}
    ddpm_noise = []
    SCHEDULING["ddpm"].randn_tensor = lambda shape, **kw: ddpm_noise.pop(0)
    SCHEDULING["euler_ancestral_discrete"].randn_tensor = lambda shape, **kw: ddpm_noise.pop(0)
    x = x_T * float(getattr(s, "init_noise_sigma", 1.0))
    ve = sampler in ("euler", "euler_a", "heun")
    T = c["T"]
    for i in range(n):
        stages = 2 if heun and i + 1 < n else 1
        x_in_step = x
        outs = []
        hist = [m for m in s.model_outputs if m is not None] if sampler.startswith("dpm") else []
        noise = None
        for stage in range(stages):
            t = s.timesteps[2 * i + stage if heun else i]
            inp = s.scale_model_input(x, t) if ve else x
            out = model(inp, t)
            outs.append(out)
            kw = {}
            if sampler == "ddim":
                prev_t = int(t) - T // s.num_inference_steps
                a_prev = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.final_alpha_cumprod
                std = c["eta"] * float(s._get_variance(int(t), prev_t)) ** 0.5
                noise = tape.draw(RSHAPE, record=std > 0 and c["eta"] > 0)
                kw = dict(eta=c["eta"], use_clipped_model_output=True, variance_noise=noise)
            elif sampler == "ddpm":
                if int(t) > 0:
                    noise = tape.draw(RSHAPE, record=i + 1 < n)
                    ddpm_noise.append(noise)
            elif sampler == "euler_a":
                noise = tape.draw(RSHAPE, record=float(s.sigmas[i + 1]) > 0)
                ddpm_noise.append(noise)
            elif sampler == "dpm++2m_sde":
                noise = tape.draw(RSHAPE, record=float(s.sigmas[i + 1]) > 0)
                kw = dict(variance_noise=noise)
            x = s.step(out, t, x, **kw).prev_sample
        if i == rec_k:
            rec = dict(k=i, x=enc(x_in_step), out=enc(outs[0]), result=enc(x))
            if stages == 2:
                rec["out2"] = enc(outs[1])
            if sampler.startswith("dpm"):
                rec["hist"] = [enc(h) for h in hist[-2:]]
            if noise is not None:
                rec["noise"] = enc(noise)
    assert x.dtype == torch.float64 and torch.isfinite(x).all(), (k, c)
    c.update(init_noise_sigma=float(getattr(s, "init_noise_sigma", 1.0)), x_T=enc(x_T), final=enc(x),
             noises=[enc(z) for z in tape.tape], step=rec)
    return c


def random_cases(count=104, seed=2026):
    rng = random.Random(seed)
    samplers = list(SCHEDULERS)
    out = []
    for k in range(count):
        c = draw_config(rng, k, samplers[k % len(samplers)])
        out.append(random_case(k, c, rng))
    return out


def flow_random_cases(count=8, seed=77):
    """FlowMatchEuler / FlowMatchHeun loops and single steps on random (N, shift, T)."""
    rng = random.Random(seed)
    out = []
    for k in range(count):
        heun = k % 2 == 1
        T, N, shift = rng.randint(50, 1500), rng.randint(1, 30), rng.choice([1.0, rng.uniform(0.5, 4.0)])
        cls = diffusers.FlowMatchHeunDiscreteScheduler if heun else diffusers.FlowMatchEulerDiscreteScheduler
        s = cls(num_train_timesteps=T, shift=shift)
        s.set_timesteps(N)
        sig = [float(v) for v in s.sigmas]
        if heun:
            sig = undouble(sig)
        x_T = rand(30_000 + k, RSHAPE)
        x = x_T
        rec_k = rng.randrange(N)
        rec = {}
        for i in range(N):
            x_in = x
            outs = []
            for stage in range(2 if heun and i + 1 < N else 1):
                t = s.timesteps[2 * i + stage if heun else i]
                v = model_fn(x, t)
                outs.append(v)
                x = s.step(v, t, x).prev_sample
            if i == rec_k:
                rec = dict(k=i, x=enc(x_in), out=enc(outs[0]), result=enc(x))
                if len(outs) == 2:
                    rec["out2"] = enc(outs[1])
        out.append(dict(sampler="heun" if heun else "euler", T=T, steps=N, shift=shift, sigmas=sig,
                        x_T=enc(x_T), final=enc(x), step=rec))
    return out


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
        random=random_cases(),
        flow_random=flow_random_cases(),
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data))
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
