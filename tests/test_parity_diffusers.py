"""Parity of steer's solvers with diffusers' schedulers driving the same exact GMM denoiser on the same grid.

Each test runs a diffusers scheduler through its standard loop (``run_scheduler``) and ``steer.sample`` on the
grid that scheduler stepped through, both on the exact denoiser of ``gmm.toy(dim=2)``, and compares the final
samples. Where the two disagree the test says which side departs from the reference math and why.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

import steer  # noqa: E402
from steer.integrations.diffusers_schedulers import (  # noqa: E402
    make_scheduler,
    run_scheduler,
    scheduler_levels,
    steer_noise,
)
from steer.solvers import Denoised, get_solver  # noqa: E402
from steer.testbeds import gmm  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

TOL = 1e-5  # float32 parity (max abs difference; samples are O(1)–O(5))
TOL_F64 = 1e-6  # where diffusers keeps float64 (its schedule tables stay float32, ~1e-7 relative)
TOL_SDE = 1e-4  # stochastic samplers: same noise stream, but rounding is amplified along the paths

G = gmm.toy(dim=2)
_gen = torch.Generator().manual_seed(1234)
Z = torch.randn(48, 2, generator=_gen)
LABELS = torch.arange(48) % 3


class _Counting:
    """A Denoiser wrapper that counts network calls."""

    def __init__(self, den):
        self.den, self.path, self.prediction, self.calls = den, den.path, den.prediction, 0

    def __call__(self, x, t, cond):
        self.calls += 1
        return self.den(x, t, cond)


def run_both(solver, path, steps, *, scheduler=None, prediction=None, dtype=torch.float32, seed=None,
             step_kwargs=None, **config):
    """(steer SampleResult, diffusers sample, grid, diffusers NFE) on the identical grid and starting state."""
    prediction = prediction or ("flow" if path == "flow" else "eps")
    den = _Counting(G.denoiser(path=path, prediction=prediction))
    sch = make_scheduler(scheduler or solver, path, prediction, **config)
    z = Z.to(dtype)
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    x_d, grid = run_scheduler(sch, den, z, LABELS, steps, generator=gen, step_kwargs=step_kwargs)
    res = steer.sample(den.den, noise=steer_noise(sch, z, path, grid), cond=LABELS, solver=solver,
                       timesteps=grid, seed=seed, return_info=True)
    return res, x_d, grid, den.calls


def maxdiff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------------
# Deterministic solvers.
#
# Multistep solvers are checked at >= 15 steps and, where they also match, below. Below 15 steps diffusers'
# DPMSolverMultistep (order 3) and DEIS lower the order of their last steps (``lower_order_final``), as steer
# does by default; see test_lower_order_final_below_15_steps. DPM-Solver++(2M) and UniPC-2 match at any step count:
# their only lowered step is the last one to σ = 0, which steer also takes first order (h = ∞).
PARITY = [
    # steer solver, scheduler spec, path, steps, prediction, scheduler config
    ("ddim(eta=0)", "ddim", "vp-linear", 20, "eps", {}),
    ("ddim(eta=0)", "ddim", "vp-scaled-linear", 10, "x0", {}),
    ("euler", "euler", "vp-linear", 20, "eps", {}),
    ("euler", "euler", "vp-scaled-linear", 10, "v", {"timestep_spacing": "linspace"}),  # fractional timesteps
    ("heun", "heun", "vp-linear", 10, "eps", {}),
    ("heun", "heun", "vp-scaled-linear", 15, "eps", {}),
    ("dpmpp_2m", "dpmpp_2m", "vp-linear", 20, "eps", {}),
    ("dpmpp_2m", "dpmpp_2m", "vp-scaled-linear", 10, "v", {}),
    ("dpmpp_2m", "dpmpp_2m", "vp-scaled-linear", 15, "eps", {"use_karras_sigmas": True}),  # rounded timesteps
    ("dpmpp_3m(variant='published')", "dpmpp_3m", "vp-linear", 20, "eps", {}),
    ("dpmpp_3m(variant='published')", "dpmpp_3m", "vp-scaled-linear", 15, "eps", {}),
    ("unipc", "unipc", "vp-linear", 20, "eps", {}),
    ("unipc", "unipc", "vp-scaled-linear", 10, "eps", {}),
    ("deis", "deis", "vp-linear", 20, "eps", {}),  # DEIS ends at σ_min (t = 1/T), not at σ = 0
    ("deis", "deis", "vp-scaled-linear", 15, "eps", {}),
    ("euler", "euler", "flow", 10, "flow", {}),  # FlowMatchEulerDiscreteScheduler
    ("euler", "euler", "flow", 25, "flow", {}),
]


@pytest.mark.parametrize("solver, sched, path, steps, prediction, config", PARITY,
                         ids=[f"{c[0]}-{c[2]}-{c[3]}-{c[4]}{'-' + ','.join(c[5]) if c[5] else ''}" for c in PARITY])
def test_ode_parity(solver, sched, path, steps, prediction, config):
    res, x_d, grid, nfe_d = run_both(solver, path, steps, scheduler=sched, prediction=prediction, **config)
    assert res.nfe == nfe_d
    assert torch.isfinite(x_d).all()
    assert maxdiff(res.x, x_d) < TOL


@pytest.mark.parametrize("solver, path, steps", [
    ("ddim(eta=0)", "vp-linear", 20),
    ("unipc", "vp-linear", 15),
    ("heun", "flow", 10),  # FlowMatchHeunDiscreteScheduler
])
def test_ode_parity_float64(solver, path, steps):
    """Schedulers that keep the sample's dtype (Euler, EulerAncestral, DPM-Solver and FlowMatchEuler cast it to
    float32 inside ``step``) agree in float64 to the precision of their float32 schedule tables."""
    sched = solver.split("(")[0]
    res, x_d, _, _ = run_both(solver, path, steps, scheduler=sched, dtype=torch.float64)
    assert x_d.dtype == torch.float64
    assert maxdiff(res.x, x_d) < TOL_F64


@pytest.mark.parametrize("solver", ["euler", "heun", "ddim", "dpmpp_2m", "unipc"])
def test_trailing_grid_is_steer_default_grid(solver):
    """With trailing spacing and N | 1000 the scheduler's grid is steer's default VP grid (uniform in t)."""
    path = steer.get_path("vp-linear")
    sch = make_scheduler(solver, path)
    sch.set_timesteps(20)
    call_t, grid = scheduler_levels(sch, path)
    assert torch.allclose(grid, path.default_grid(20), rtol=0, atol=1e-7)
    assert len(call_t) == len(sch.timesteps)


def test_heun_levels_repeat_but_grid_does_not():
    sch = make_scheduler("heun", "vp-scaled-linear")
    sch.set_timesteps(10)
    call_t, grid = scheduler_levels(sch, "vp-scaled-linear")
    assert len(call_t) == 19 and len(grid) == 11
    assert torch.equal(call_t[1::2], call_t[2::2])  # the second stage evaluates at the next level
    assert torch.all(grid[1:] < grid[:-1])


def test_taylor_3m_is_not_diffusers_3m():
    """steer's ``dpmpp_3m(variant='taylor')`` (Taylor coefficient 2·A2 on D2, plus a 2nd-order warm-up step costing
    one NFE) is a different method from diffusers' order-3 DPM-Solver++ (coefficient A2, = ``variant='published'``)."""
    pub, x_d, _, nfe_d = run_both("dpmpp_3m(variant='published')", "vp-linear", 20, scheduler="dpmpp_3m")
    tay, _, _, _ = run_both("dpmpp_3m(variant='taylor')", "vp-linear", 20, scheduler="dpmpp_3m")
    assert maxdiff(pub.x, x_d) < TOL
    assert tay.nfe == nfe_d + 1
    assert maxdiff(tay.x, x_d) > 1e-4


@pytest.mark.parametrize("solver, sched", [("dpmpp_3m(variant='published')", "dpmpp_3m"), ("deis", "deis")])
@pytest.mark.parametrize("steps", [5, 8, 10, 14])
def test_lower_order_final_below_15_steps(solver, sched, steps):
    """Below 15 steps diffusers lowers the order near the end (``lower_order_final=True``, its default):
    DPM-Solver++ order 3 takes its penultimate step at order 2, DEIS (order 2) its last step (to σ_min) at order 1.
    It is a stability heuristic (DPM-Solver's advice for few-step guided sampling), not part of the methods; steer
    follows it by default and both sides agree with it on or off."""
    res, x_d, _, _ = run_both(solver, "vp-linear", steps, scheduler=sched)
    assert maxdiff(res.x, x_d) < TOL
    off = solver[:-1] + ", lower_order_final=False)" if "(" in solver else solver + "(lower_order_final=False)"
    res, x_d, _, _ = run_both(off, "vp-linear", steps, scheduler=sched, lower_order_final=False)
    assert maxdiff(res.x, x_d) < TOL
    res_on, _, _, _ = run_both(solver, "vp-linear", steps, scheduler=sched)
    assert maxdiff(res.x, res_on.x) > 1e-4  # the rule changes the result


def test_deis_order3_float64_schedule():
    """DEIS order 3 matches to 1e-7 once diffusers' sigmas are float64. With its stock float32 sigmas the
    coefficients ``ind_fn(ρ_t, …) − ind_fn(ρ_s, …)`` are differences of O(ρ log²ρ / Δ²) terms evaluated in float32
    (``np.log`` of float32 0-dim tensors), which costs diffusers ~1e-5 here (steer in float32: ~1e-6 from the
    float64 result); order 2 suffers less (checked to 1e-5 in test_ode_parity)."""
    den = G.denoiser(path="vp-linear", prediction="eps")
    sch = make_scheduler("deis(order=3)", "vp-linear")
    set_timesteps = sch.set_timesteps

    def set_timesteps_f64(n):
        set_timesteps(n)
        sch.sigmas = sch.sigmas.double()

    sch.set_timesteps = set_timesteps_f64
    x_d, grid = run_scheduler(sch, den, Z.double(), LABELS, 20)
    x_s = steer.sample(den, noise=Z.double(), cond=LABELS, solver="deis(order=3)", timesteps=grid)
    assert maxdiff(x_s, x_d) < 1e-7


def test_euler_init_noise_sigma_convention():
    """k-diffusion schedulers with "linspace"/"trailing" spacing start from ``x̄ = σ̄_max·z`` (init_noise_sigma =
    σ̄_max), i.e. from the VP state ``σ_max·z``; the exact VP prior for unit-variance data, and diffusers' own VP
    schedulers (DDIM, DPM-Solver, UniPC: init_noise_sigma = 1), start from ``z`` — as does steer. (With "leading"
    spacing the same scheduler uses ``sqrt(σ̄_max² + 1)``, consistent with the VP start.) On vp-scaled-linear
    σ_max = 0.99767, so the two conventions differ by 0.2 % at the start; ``steer_noise`` converts."""
    path = steer.get_path("vp-scaled-linear")
    den = G.denoiser(path=path, prediction="eps")
    sch = make_scheduler("euler", path)
    x_d, grid = run_scheduler(sch, den, Z, LABELS, 20)
    s_max = float(path.sigma_bar(1.0))
    assert float(sch.init_noise_sigma) == pytest.approx(s_max, rel=1e-6)
    leading = make_scheduler("euler", path, timestep_spacing="leading")
    leading.set_timesteps(20)
    assert float(leading.init_noise_sigma) == pytest.approx(math.sqrt(float(leading.sigmas.max()) ** 2 + 1), rel=1e-6)
    noise = steer_noise(sch, Z, path, grid)
    assert torch.allclose(noise, Z * float(path.sigma(1.0)), rtol=1e-6)
    assert maxdiff(steer.sample(den, noise=noise, cond=LABELS, solver="euler", timesteps=grid), x_d) < TOL
    assert maxdiff(steer.sample(den, noise=Z, cond=LABELS, solver="euler", timesteps=grid), x_d) > 1e-3


def test_ddim_trailing_stride_deviation():
    """diffusers' DDIMScheduler steps from timestep τ to ``τ − T//N`` whatever its spacing, while "trailing" lists
    ``round(T − k·T/N) − 1``. When N does not divide T the target is not the next listed timestep: with N = 15 the
    first step lands on τ = 933, the model is next evaluated at τ = 932 as if the sample were there, and the last
    step ends at τ = 0 (σ = sqrt(β_0) = 0.01) instead of the clean data. (diffusers issues #9261, #11347, #12633;
    DDPMScheduler looks the next timestep up and is not affected.) The DDIM math steps between consecutive
    timesteps of the chosen subsequence, which is what steer does on any grid."""
    sch = make_scheduler("ddim", "vp-linear")
    sch.set_timesteps(15)
    assert sch.timesteps[:2].tolist() == [999, 932] and int(sch.timesteps[-1]) == 66
    ac = sch.alphas_cumprod.double()
    x = torch.ones(1, 2)
    out = sch.step(torch.zeros(1, 2), sch.timesteps[0], x).prev_sample  # ε̂ = 0: x_prev = sqrt(ā_prev/ā_τ) x
    a_prev = (out[0, 0].double() ** 2 * ac[999]).item()
    assert a_prev == pytest.approx(ac[933].item(), rel=1e-5) and a_prev != pytest.approx(ac[932].item(), rel=1e-5)
    out = sch.step(torch.zeros(1, 2), sch.timesteps[-1], x).prev_sample
    assert (out[0, 0].double() ** 2 * ac[66]).item() == pytest.approx(ac[0].item(), rel=1e-5)  # not 1
    with pytest.warns(UserWarning, match="not the next timestep"):
        _, grid = scheduler_levels(sch, "vp-linear")
    assert float(grid[-1]) == pytest.approx(1e-3)


# ---------------------------------------------------------------------------------------------------
# UniPC with B(h) = −h ("bh1") on the step to σ = 0.


def test_unipc_bh1_parity_on_sigma_min_grid():
    """bh1 agrees with diffusers on a grid that ends at σ_min (and with diffusers' final-step lowering off)."""
    res, x_d, grid, _ = run_both("unipc(variant='bh1')", "vp-linear", 20, final_sigmas_type="sigma_min",
                                 lower_order_final=False)
    assert float(grid[-1]) == pytest.approx(1e-3)
    assert maxdiff(res.x, x_d) < TOL


def test_unipc_bh1_at_sigma_zero():
    """diffusers' UniPC with ``solver_type="bh1"`` and its default ``final_sigmas_type="zero"`` returns NaN: on the
    last step h = ∞, so ``B_h = −h = −∞`` multiplies the empty predictor sum ``pred_res = 0`` (``x_t = x_t_ −
    alpha_t·B_h·pred_res``). The first-order update's limit is ``x_0 = m``, the data prediction of the last call,
    whatever B(h) is; steer returns that (it had the same NaN, fixed in d5ba6ad), and it equals the ``m`` diffusers
    stored for that call."""
    den = G.denoiser(path="vp-linear", prediction="eps")
    sch = make_scheduler("unipc(variant='bh1')", "vp-linear")
    x_d, grid = run_scheduler(sch, den, Z, LABELS, 10)
    assert torch.isnan(x_d).all()
    x_s = steer.sample(den, noise=Z, cond=LABELS, solver="unipc(variant='bh1')", timesteps=grid)
    assert torch.isfinite(x_s).all()
    assert maxdiff(x_s, sch.model_outputs[-1]) < TOL


# ---------------------------------------------------------------------------------------------------
# Stochastic samplers: steer.sample(seed=s) and diffusers with torch.Generator().manual_seed(s) draw the same
# float32 normals in the same order (one per step), so the paths coincide.


@pytest.mark.parametrize("solver, sched, path, steps, step_kwargs", [
    ("euler_ancestral", "euler_ancestral", "vp-linear", 20, None),
    ("ddpm", "ddpm", "vp-scaled-linear", 10, None),
    ("ddim(eta=1)", "ddim", "vp-linear", 10, {"eta": 1.0}),
    ("dpmpp_2m_sde", "dpmpp_2m_sde", "vp-linear", 20, None),
])
def test_stochastic_parity(solver, sched, path, steps, step_kwargs):
    res, x_d, _, _ = run_both(solver, path, steps, scheduler=sched, seed=7, step_kwargs=step_kwargs)
    assert maxdiff(res.x, x_d) < TOL_SDE


def _three_steps(step, ms, x):
    for m in ms:
        x = step(m, x)
    return x


def test_dpmpp_3m_sde_d2_coefficient():
    """diffusers' order-3 "sde-dpmsolver++" (added in diffusers PR #9104) puts ``α_t·((1 − e^{−2h} − 2h)/(2h)² − ½)``
    on D2. With ``H = 2h`` that is ``A2(H) − 1``, where ``A2(H) = ½ − (H − 1 + e^{−H})/H²`` is the coefficient of
    the published 3M ODE solver at step H and of k-diffusion's ``sample_dpmpp_3m_sde`` (``−phi_3``), and steer's
    ``dpmpp_3m_sde(variant='published')`` (the Taylor variant uses 2·A2). The extra ``−α_t·D2`` is O(h²) per step:
    the scheduler falls back to first order. Reproduced on one third-order step with given data predictions and
    zero noise; its D1 coefficient ``A1(H) = 1 − (1 − e^{−H})/H`` agrees with both."""
    path = steer.get_path("vp-linear")
    sch = make_scheduler("dpmpp_3m_sde(variant='published')", path, prediction="x0", lower_order_final=False)
    sch.set_timesteps(20)
    gen = torch.Generator().manual_seed(3)
    ms = [torch.randn(4, 2, generator=gen) for _ in range(3)]
    x0 = torch.randn(4, 2, generator=gen)
    zeros = torch.zeros(4, 2)
    xs = [x0]
    for i, m in enumerate(ms):
        xs.append(sch.step(m, sch.timesteps[i], xs[-1], variance_noise=zeros).prev_sample)

    # the third step (from grid point 2 to 3) by hand, from the scheduler's own float32 sigmas
    sig = sch.sigmas.double()[:4]
    a, s = 1 / torch.sqrt(sig**2 + 1), sig / torch.sqrt(sig**2 + 1)
    lam = torch.log(a / s)
    h, r0, r1 = lam[3] - lam[2], (lam[2] - lam[1]) / (lam[3] - lam[2]), (lam[1] - lam[0]) / (lam[3] - lam[2])
    m0, m1, m2 = (m.double() for m in reversed(ms))
    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    D1, D2 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)
    H = 2 * h
    A1, A2 = 1 - (1 - torch.exp(-H)) / H, 0.5 - (H - 1 + torch.exp(-H)) / H**2
    base = s[3] / s[2] * torch.exp(-h) * xs[2].double() + a[3] * (1 - torch.exp(-H)) * m0 + a[3] * A1 * D1
    correct, diffusers_d2 = base + a[3] * A2 * D2, base + a[3] * (A2 - 1) * D2
    assert maxdiff(xs[3], diffusers_d2) < TOL
    assert maxdiff(xs[3], correct) > 1e-2

    # steer's published 3M SDE on the same grid and inputs (noise 0) takes the A2 step
    solver = get_solver("dpmpp_3m_sde(variant='published')")
    state = solver.init(path, scheduler_levels(sch, path)[1])
    it = iter(ms)
    x = x0.double()
    for i in range(3):
        m = next(it).double()
        x, state = solver.step(i, x, state, lambda x_, t_, m=m: Denoised(m), lambda like: torch.zeros_like(like))
    assert maxdiff(x, correct) < TOL


def test_ddpm_fixed_large_noises_the_final_step():
    """diffusers' DDPMScheduler adds noise whenever the timestep is > 0. On a strided schedule the last step starts
    at τ_last > 0 (99 with 10 trailing steps) and ends at ā = 1; with ``variance_type="fixed_small"`` its variance is
    0 there, but with ``"fixed_large"`` it is β = 1 − ā_{τ_last} (≈ 0.1), so the returned sample is x̂0 + N(0, β).
    DDPM's Algorithm 2 adds no noise on the final step, nor does steer's ``ddpm(variance='large')``. (Elsewhere the
    two agree in distribution but not path by path: steer draws the extra large-minus-small variance as a second
    normal.)"""
    sch = make_scheduler("ddpm(variance='large')", "vp-linear")
    sch.set_timesteps(10)
    last = sch.timesteps[-1]
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(20000, 1)
    out = sch.step(torch.zeros_like(x), last, x, generator=gen).prev_sample  # ε̂ = 0 at x = 0: x̂0 = 0
    beta = 1 - sch.alphas_cumprod[int(last)].item()
    assert out.std().item() == pytest.approx(math.sqrt(beta), rel=0.03)

    path = steer.get_path("vp-linear")
    solver = get_solver("ddpm(variance='large')")
    state = solver.init(path, scheduler_levels(sch, path)[1])
    x0 = torch.randn(4, 2)
    y, _ = solver.step(9, torch.zeros(4, 2), state, lambda x_, t_: Denoised(x0), lambda like: torch.randn_like(like))
    assert torch.equal(y, x0)


# ---------------------------------------------------------------------------------------------------
# The helper's guards.


@pytest.mark.parametrize("solver", ["dpmpp_2m(momentum=0.8)", "euler_ancestral(eta=0.5)", "midpoint", "restart",
                                    "ddim(time_shift=True)"])
def test_make_scheduler_rejects_unmatched(solver):
    with pytest.raises(ValueError):
        make_scheduler(solver, "vp-linear")


def test_run_scheduler_checks_prediction():
    den = G.denoiser(path="vp-linear", prediction="v")
    with pytest.raises(ValueError, match="expects 'epsilon'"):
        run_scheduler(make_scheduler("euler", "vp-linear", "eps"), den, Z, LABELS, 5)
