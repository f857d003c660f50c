"""Drive diffusers schedulers with a steer Denoiser, and build the scheduler matched to a steer solver.

This is the bridge the parity tests and benchmarks use to run steer and diffusers on the *same* network and the
*same* time grid. diffusers is an optional dependency: it is imported inside the functions.

Coordinates. A diffusers scheduler keeps its ``sample`` in one of three systems:

- VP schedulers (DDIM, DDPM, DPMSolverMultistep, UniPC, DEIS): ``x = α x0 + σ ε``, steer's own VP coordinates;
  ``scale_model_input`` is the identity and ``init_noise_sigma`` is 1.
- k-diffusion ("VE") schedulers (Euler, Heun, EulerAncestral, LMS, KDPM2): ``x̄ = x/α`` at noise level
  ``σ̄ = σ/α`` (``scheduler.sigmas``, steer's ``path.sigma_bar``); ``scale_model_input`` divides by
  ``sqrt(σ̄² + 1) = 1/α``, which hands the network VP coordinates again.
- Flow-matching schedulers: ``x = (1 − t) x0 + t ε``, and ``scheduler.sigmas`` *is* the flow time t
  (``timestep = 1000·t``).

So the tensor a scheduler passes to the network is always in the coordinates of the path the model was trained on,
and a steer Denoiser can be called on it directly, at the steer time t whose noise level equals the level the
scheduler assumes for that call. Only that level matters: diffusers' integer ``timestep`` may be a rounded version
of it (Karras grids), and Heun-type schedulers repeat timesteps for their second stage.

Where diffusers (0.42) departs from the methods, shown in tests/test_parity_diffusers.py:

- k-diffusion schedulers with "linspace"/"trailing" spacing start from ``σ̄_max·z``, i.e. the VP state
  ``σ_max·z`` rather than ``z`` (``steer_noise`` converts);
- DDIMScheduler steps to ``τ − T//N``, not to the next listed timestep, when N does not divide T;
- DPMSolverMultistep's order-3 "sde-dpmsolver++" has ``A2 − 1`` instead of ``A2`` on D2;
- DDPMScheduler with ``variance_type="fixed_large"`` adds noise on the final step of a strided schedule;
- UniPC ``solver_type="bh1"`` returns NaN on a final step to σ = 0;
- below 15 steps DPM-Solver (order 3) and DEIS lower the order of their last steps (a heuristic, not a bug).
"""

from __future__ import annotations

import inspect
import math
import warnings

import torch

from ..paths import VP, Path, get_path
from ..solvers import get_solver

__all__ = ["MATCHED_SOLVERS", "make_scheduler", "run_scheduler", "scheduler_levels", "steer_noise"]

# Schedulers whose sample is x̄ = x/α (k-diffusion coordinates); scale_model_input divides by sqrt(σ̄² + 1).
_VE_SCHEDULERS = frozenset({
    "EulerDiscreteScheduler", "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler",
    "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler",
})

# steer prediction kind -> diffusers prediction_type
_PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction", "flow": "flow_prediction"}

# diffusers' named beta schedules for steer's named VP paths
_BETA_SCHEDULES = {
    "vp-linear": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    "vp-scaled-linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "vp-cosine": {"beta_schedule": "squaredcos_cap_v2"},
}

MATCHED_SOLVERS = ("euler", "heun", "ddim", "ddpm", "euler_ancestral", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde",
                   "dpmpp_3m_sde", "unipc", "deis")
"""steer solvers with a diffusers counterpart (on flow paths only ``euler`` and ``heun``)."""


def _is_flow(scheduler) -> bool:
    return type(scheduler).__name__.startswith("FlowMatch") or bool(getattr(scheduler.config, "use_flow_sigmas", False))


def _is_ve(scheduler) -> bool:
    return type(scheduler).__name__ in _VE_SCHEDULERS


def scheduler_levels(scheduler, path: "str | Path") -> tuple[torch.Tensor, torch.Tensor]:
    """The steer times of a scheduler's current schedule (call after ``scheduler.set_timesteps``).

    Returns ``(call_t, grid)``, float64: ``call_t[i]`` is the steer t whose noise level is the one the scheduler
    assumes when it is stepped with ``scheduler.timesteps[i]`` (so the network must be evaluated there), and
    ``grid`` is the decreasing list of distinct steer times the sample passes through, ending with the level of
    the final sample (``steer.sample(..., timesteps=grid)`` runs on the identical grid).

    The level is read from ``scheduler.sigmas`` (σ̄ = σ/α for VP/VE schedulers, the flow time for flow-matching
    ones) by position, not by timestep value: Heun-type schedulers repeat timesteps and Karras grids may round two
    levels to one timestep. DDIM and DDPM have no ``sigmas``; their levels come from ``alphas_cumprod[timestep]``
    and the final level from the step rule (DDIM steps to ``timestep − T//N``; ``final_alpha_cumprod`` below 0).
    Repeated levels appear once in ``grid`` (so a zero-length final step, as some Karras options produce, is dropped).
    """
    path = get_path(path)
    n = len(scheduler.timesteps)
    sigmas = getattr(scheduler, "sigmas", None)
    if _is_flow(scheduler):
        if path.kind != "flow":
            raise ValueError(f"{type(scheduler).__name__} is a flow-matching scheduler but the path is {path.name!r}")
        raw, to_t = sigmas, lambda s: s  # the flow-matching sigma is t itself
    elif sigmas is not None and len(sigmas) > n:
        raw, to_t = sigmas, path.t_from_sigma_bar
    elif hasattr(scheduler, "alphas_cumprod"):  # DDIM, DDPM: indexed by the integer timestep
        ac = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
        last = int(scheduler.timesteps[-1])
        if hasattr(scheduler, "previous_timestep"):  # DDPM: the next timestep of the list, −1 after the last
            prev, final = int(scheduler.previous_timestep(last)), float(getattr(scheduler, "one", 1.0))
        else:  # DDIM: a fixed stride T // N
            T, N = scheduler.config.num_train_timesteps, scheduler.num_inference_steps
            prev, final = last - T // N, float(scheduler.final_alpha_cumprod)
            if T % N:
                warnings.warn(f"{type(scheduler).__name__} with {N} steps: it steps from timestep τ to τ − {T // N}, "
                              f"which is not the next timestep of its own list when {T} % {N} != 0; the returned "
                              "grid (its timesteps) does not describe those steps exactly", stacklevel=2)
        a_final = ac[prev] if prev >= 0 else torch.tensor(final, dtype=torch.float64)
        ab = torch.cat([ac[scheduler.timesteps.long()], a_final.reshape(1)])
        raw, to_t = torch.sqrt((1 - ab) / ab), path.t_from_sigma_bar
    else:
        raise TypeError(f"cannot read the noise levels of {type(scheduler).__name__} (no sigmas or alphas_cumprod)")
    # Convert each distinct level once (this drops the repeats of Heun-type schedulers; converting repeats
    # separately is not safe: vectorised float64 math can round equal inputs differently by an ulp).
    raw = torch.as_tensor(raw, dtype=torch.float64).flatten()
    distinct, index = torch.unique_consecutive(raw, return_inverse=True)
    grid = to_t(distinct).clamp(0.0, 1.0)  # a float32 σ̄_max can invert to t = 1 + 1e-9
    return grid[index[:n]], grid


def steer_noise(scheduler, noise: torch.Tensor, path: "str | Path", grid: torch.Tensor) -> torch.Tensor:
    """The ``noise`` to give ``steer.sample`` so that it starts from the scheduler's initial state.

    diffusers starts from ``noise · init_noise_sigma`` in the scheduler's coordinates; steer starts from
    ``noise · sqrt(α² + σ²)`` at ``grid[0]``. They differ for k-diffusion schedulers with "linspace"/"trailing"
    spacing, whose ``init_noise_sigma`` is ``σ̄_max`` rather than ``sqrt(σ̄_max² + 1)`` (so their VP state is
    ``σ_max·noise`` instead of ``noise``); elsewhere the factor is 1.
    """
    path = get_path(path)
    t0 = torch.as_tensor(grid, dtype=torch.float64).flatten()[0]
    a0, s0 = float(path.alpha(t0)), float(path.sigma(t0))
    init = float(getattr(scheduler, "init_noise_sigma", 1.0))
    to_steer = a0 if _is_ve(scheduler) else 1.0  # x = α x̄
    return noise * (init * to_steer / math.hypot(a0, s0))


def _check_prediction(scheduler, model) -> None:
    kind = model.prediction
    if type(scheduler).__name__.startswith("FlowMatch"):  # these take the velocity and have no prediction_type
        ok = kind == "flow"
        want = "flow"
    else:
        want = getattr(scheduler.config, "prediction_type", None)
        ok = _PREDICTION_TYPES.get(kind) == want
    if not ok:
        raise ValueError(f"the model predicts {kind!r} but {type(scheduler).__name__} expects {want!r}")


def run_scheduler(scheduler, model, noise: torch.Tensor, cond=None, steps: int = 25,
                  generator: torch.Generator | None = None, step_kwargs: dict | None = None):
    """Sample with a diffusers scheduler's standard loop, the network being a steer Denoiser.

    The loop is the one diffusers pipelines run: ``set_timesteps(steps)``; ``x = noise · init_noise_sigma``; for
    each timestep, ``model_input = scale_model_input(x, timestep)`` (flow-matching schedulers have none), one
    model call,
    ``x = step(model_output, timestep, x).prev_sample``. The model is ``model(model_input, t, cond)`` with ``t``
    (float64, one per batch item) the steer time whose noise level is the one the scheduler assumes for that call
    (see ``scheduler_levels``); its prediction kind must match the scheduler's ``prediction_type``.

    ``generator`` is passed to ``step`` when the scheduler draws noise (ancestral and SDE schedulers), and
    ``step_kwargs`` are extra ``step`` arguments (DDIM's ``eta``).

    Returns ``(x, grid)``: the final sample in steer's coordinates of ``model.path`` (k-diffusion samples
    ``x̄ = x/α`` are multiplied back by α) and the decreasing float64 grid of steer times the scheduler stepped
    through, so ``steer.sample(model, noise=..., timesteps=grid)`` runs on the identical grid (see
    ``steer_noise`` for its starting state).
    """
    path = model.path
    _check_prediction(scheduler, model)
    scheduler.set_timesteps(steps)
    call_t, grid = scheduler_levels(scheduler, path)
    kwargs = dict(step_kwargs or {})
    if generator is not None and "generator" in inspect.signature(scheduler.step).parameters:
        kwargs["generator"] = generator
    batch = noise.shape[0]
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    for i, timestep in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, timestep) if hasattr(scheduler, "scale_model_input") else x
        t = torch.full((batch,), float(call_t[i]), dtype=torch.float64, device=noise.device)
        out = model(model_input, t, cond)
        x = scheduler.step(out, timestep, x, **kwargs).prev_sample
    if _is_ve(scheduler):
        x = x * float(path.alpha(grid[-1]))
    return x, grid


def _vp_config(path: VP) -> dict:
    """Scheduler config reproducing ``path``'s float32 alphas_cumprod table bit for bit where possible."""
    from diffusers import DDIMScheduler

    named = _BETA_SCHEDULES.get(path.name)
    if named is not None:
        cfg = {"num_train_timesteps": path.T, **named}
        if torch.equal(DDIMScheduler(**cfg).alphas_cumprod.double(), path.alphas_cumprod):
            return cfg
    ac = path.alphas_cumprod  # a custom table: betas from it (equal up to float32 rounding of the cumprod)
    betas = 1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])
    return {"num_train_timesteps": path.T, "trained_betas": betas.tolist()}


def make_scheduler(solver: str = "dpmpp_2m", path: "str | Path" = "vp-linear", prediction: str = "eps", **config):
    """The diffusers scheduler implementing the steer ``solver`` (a name or spec string) on ``path``.

    VP paths map to their beta schedule (``"vp-linear"`` → ``linear``, ``"vp-scaled-linear"`` →
    ``scaled_linear``, ``"vp-cosine"`` → ``squaredcos_cap_v2``) with ``timestep_spacing="trailing"`` (uniform
    in t from t = 1, steer's default VP grid) and ``prediction_type`` from ``prediction``:

    ===================  =====================================================================================
    steer solver         diffusers scheduler
    ===================  =====================================================================================
    euler                EulerDiscreteScheduler
    heun                 HeunDiscreteScheduler
    euler_ancestral      EulerAncestralDiscreteScheduler (η = 1 only)
    ddim(eta)            DDIMScheduler, set_alpha_to_one=True, clip_sample=False; η is a ``step`` argument:
                         pass ``step_kwargs={"eta": η}`` to ``run_scheduler``
    ddpm(variance)       DDPMScheduler, variance_type "fixed_small" / "fixed_large", clip_sample=False
    dpmpp_2m             DPMSolverMultistepScheduler, solver_order=2, algorithm_type="dpmsolver++"
    dpmpp_3m             same with solver_order=3: identical to ``dpmpp_3m(variant='published')`` only
    dpmpp_2m_sde         same with algorithm_type="sde-dpmsolver++" (η = 1 only)
    dpmpp_3m_sde         solver_order=3, "sde-dpmsolver++" (its D2 coefficient differs, see the parity tests)
    unipc(order, ...)    UniPCMultistepScheduler, solver_order, solver_type "bh1"/"bh2", predict_x0
    deis(order)          DEISMultistepScheduler, algorithm_type="deis", solver_type="logrho"
    ===================  =====================================================================================

    On the flow path: ``euler`` → FlowMatchEulerDiscreteScheduler, ``heun`` → FlowMatchHeunDiscreteScheduler
    (with the path's shift). Solver options diffusers cannot express raise ``ValueError``; ``config`` overrides
    any scheduler config entry.
    """
    import diffusers

    s = get_solver(solver)
    name, opts = s.name, s.options()
    path = get_path(path)

    def require(**wanted):
        for key, value in wanted.items():
            if opts.get(key) != value:
                raise ValueError(f"diffusers has no counterpart of {s!r}: needs {key}={value!r}")

    if path.kind == "flow":
        if prediction != "flow":
            raise ValueError(f"flow-matching schedulers take the velocity (prediction='flow'), not {prediction!r}")
        classes = {"euler": diffusers.FlowMatchEulerDiscreteScheduler, "heun": diffusers.FlowMatchHeunDiscreteScheduler}
        if name not in classes:
            raise ValueError(f"no diffusers flow-matching scheduler matches {name!r}; matched: euler, heun")
        return classes[name](**{"shift": path.shift, **config})
    if path.kind != "vp":
        raise ValueError(f"make_scheduler supports VP and flow paths, not {path.name!r}")
    if prediction not in ("eps", "x0", "v"):
        raise ValueError(f"VP schedulers take prediction 'eps', 'x0' or 'v', not {prediction!r}")
    base = {**_vp_config(path), "timestep_spacing": "trailing", "prediction_type": _PREDICTION_TYPES[prediction]}
    dpm = {"algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
           "final_sigmas_type": "zero"}
    if name == "euler":
        cls, extra = diffusers.EulerDiscreteScheduler, {}
    elif name == "heun":
        cls, extra = diffusers.HeunDiscreteScheduler, {}
    elif name == "euler_ancestral":
        require(eta=1.0, s_noise=1.0)
        cls, extra = diffusers.EulerAncestralDiscreteScheduler, {}
    elif name == "ddim":
        require(time_shift=False)
        cls, extra = diffusers.DDIMScheduler, {"set_alpha_to_one": True, "clip_sample": False}
    elif name == "ddpm":
        cls = diffusers.DDPMScheduler
        extra = {"variance_type": "fixed_" + opts["variance"], "clip_sample": False}
    elif name == "dpmpp_2m":
        require(momentum=1.0)
        cls, extra = diffusers.DPMSolverMultistepScheduler, {**dpm, "solver_order": 2}
    elif name == "dpmpp_3m":
        cls, extra = diffusers.DPMSolverMultistepScheduler, {**dpm, "solver_order": 3}
    elif name in ("dpmpp_2m_sde", "dpmpp_3m_sde"):
        require(eta=1.0, s_noise=1.0)
        cls = diffusers.DPMSolverMultistepScheduler
        extra = {**dpm, "algorithm_type": "sde-dpmsolver++", "solver_order": 2 if name == "dpmpp_2m_sde" else 3,
                 "solver_type": opts.get("solver_type", "midpoint")}
    elif name == "unipc":
        cls = diffusers.UniPCMultistepScheduler
        extra = {"solver_order": opts["order"], "solver_type": opts["variant"], "predict_x0": True,
                 "lower_order_final": True,
                 "disable_corrector": [] if opts["corrector"] else list(range(base["num_train_timesteps"]))}
    elif name == "deis":
        cls = diffusers.DEISMultistepScheduler
        extra = {"solver_order": opts["order"], "algorithm_type": "deis", "solver_type": "logrho",
                 "lower_order_final": True}
    else:
        raise ValueError(f"no diffusers scheduler matches steer solver {name!r}; matched: {', '.join(MATCHED_SOLVERS)}")
    return cls(**{**base, **extra, **config})
