import math

import pytest
import torch

import steer
from steer.solvers import SOLVERS
from steer.testbeds import gmm


@pytest.fixture(scope="module")
def g():
    return gmm.toy(dim=2)


class Counting:
    """Wraps a denoiser and records the batch of every forward pass."""

    def __init__(self, den):
        self.den, self.path, self.prediction, self.sample_shape = den, den.path, den.prediction, den.sample_shape
        self.calls = []

    def null_cond(self, cond, batch):
        return self.den.null_cond(cond, batch)

    def __call__(self, x, t, cond):
        self.calls.append((x.shape[0], None if cond is None else cond.clone()))
        return self.den(x, t, cond)


def test_single_euler_step_by_hand(g):
    # from t=1 on the flow path, Euler gives x_t = α_t x̂0 + σ_t ε̂ with x̂0 = E[x0 | c] (α=0 at t=1)
    den = g.denoiser("flow", "flow")
    z = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0])
    x = steer.sample(den, noise=z, cond=labels, solver="euler", timesteps=[1.0, 0.6])
    mean_c = g.posterior_mean(z, 0.0, 1.0, labels)
    assert torch.allclose(x, 0.4 * mean_c + 0.6 * z, atol=1e-12)


def test_cfg_spec_matches_manual_combination(g):
    den = g.denoiser("vp-cosine", "eps")
    z = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0, 1])
    s, t = 0.7, 0.4
    x = steer.sample(den, noise=z, cond=labels, guidance="cfg(scale=4)", solver="euler", timesteps=[s, t])
    p = den.path
    a_s, s_s, a_t, s_t = float(p.alpha(s)), float(p.sigma(s)), float(p.alpha(t)), float(p.sigma(t))
    xs = z * math.hypot(a_s, s_s)
    dc, du = g.posterior_mean(xs, a_s, s_s, labels), g.posterior_mean(xs, a_s, s_s, None)
    d = du + 4 * (dc - du)
    assert torch.allclose(x, a_t * d + s_t * (xs - a_s * d) / s_s, atol=1e-12)


def test_cfg_batches_branches_and_counts_nfe(g):
    den = Counting(g.denoiser("flow", "flow"))
    labels = torch.tensor([0, 1, 2])
    res = steer.sample(den, cond=labels, guidance="cfg(scale=3)", solver="dpmpp_2m", steps=10, seed=0, return_info=True)
    assert res.nfe == 20 and res.forward_passes == 10 and len(den.calls) == 10
    batch, cond = den.calls[0]
    assert batch == 6 and cond.tolist() == [0, 1, 2, 3, 3, 3]  # cond then null label, one pass
    den.calls.clear()
    res = steer.sample(den, cond=labels, guidance="cfg(scale=1)", solver="euler", steps=10, seed=0, return_info=True)
    assert res.nfe == 10 and all(b == 3 for b, _ in den.calls)  # w = 1 needs no unconditional pass


@pytest.mark.parametrize("solver,steps,nfe", [
    ("euler", 10, 10), ("heun", 10, 19), ("midpoint", 10, 20), ("dpmpp_2m", 10, 10), ("unipc", 10, 10),
    ("dpmpp_3m(variant='published')", 10, 10), ("restart", 10, 19 + 2 * 2 * 2)])
def test_nfe_counts(g, solver, steps, nfe):
    den = g.denoiser("vp-linear", "eps")
    grid = steer.paths.karras(den.path, steps)  # reaches the restart interval's σ̄ = 0.06
    res = steer.sample(den, cond=torch.tensor([0]), solver=solver, timesteps=grid, seed=0, return_info=True)
    assert res.nfe == nfe


def test_restart_warns_when_interval_is_off_grid(g):
    den = g.denoiser("vp-linear", "eps")
    with pytest.warns(UserWarning, match="restart interval .* skipped"):
        res = steer.sample(den, cond=torch.tensor([0]), solver="restart", steps=10, seed=0, return_info=True)
    assert res.nfe == 19


@pytest.mark.parametrize("path, pred", [("vp-linear", "eps"), ("flow", "flow"), ("edm", "x0")])
def test_taylor_3m_warm_up_costs_one_nfe_on_every_path(g, path, pred):
    """VP and EDM: the first step (finite λ, no history) is the warm-up. Flow: the first step starts at α = 0
    (h = ∞) and is DDIM, exact there and without warm-up; the second has no usable history and warms up. One
    extra NFE either way (it was two on flow paths, whose first step took the warm-up at h = ∞ as well)."""
    den = g.denoiser(path, pred)
    run = lambda v: steer.sample(den, cond=torch.tensor([0]), solver=f"dpmpp_3m(variant='{v}')", steps=10,  # noqa
                                 seed=0, return_info=True).nfe
    assert run("taylor") == 11 and run("published") == 10


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_batch_invariance(g, solver):
    den = g.denoiser("flow", "flow")
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(16) % 3
    full = steer.sample(den, noise=z, cond=labels, solver=solver, steps=6, seed=1)
    if SOLVERS[solver].stochastic or "eta" in solver:
        return  # noise depends on the batch layout; its distribution is tested in test_sde.py
    alone = steer.sample(den, noise=z[5:6], cond=labels[5:6], solver=solver, steps=6, seed=1)
    assert torch.allclose(full[5:6], alone, atol=1e-6)


def test_seed_reproducible(g):
    den = g.denoiser("flow", "flow")
    a = steer.sample(den, cond=torch.tensor([0, 1]), solver="dpmpp_2m_sde", steps=5, seed=3)
    b = steer.sample(den, cond=torch.tensor([0, 1]), solver="dpmpp_2m_sde", steps=5, seed=3)
    assert torch.equal(a, b)


def test_result_is_state_at_last_time(g):
    den = g.denoiser("flow", "flow")
    z = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2])
    part = steer.sample(den, noise=z, cond=labels, solver="heun", timesteps=torch.linspace(1, 0.3, 41))
    ref = g.ode_solution(z, 1.0, 0.3, "flow", labels)
    assert torch.allclose(part, ref, atol=1e-3)
    assert (g.ode_solution(z, 1.0, 0.0, "flow", labels) - part).abs().max() > 0.1  # not the t=0 state


def test_callback_and_progress(g):
    seen = []
    den = g.denoiser("vp-cosine", "eps")
    steer.sample(den, cond=torch.tensor([1]), steps=4, seed=0, progress=True, callback=lambda info: seen.append(info))
    assert [s.step for s in seen] == [0, 1, 2, 3] and seen[-1].nfe == 4 and seen[0].sigma > seen[-1].sigma


def test_errors_are_clear(g):
    den = g.denoiser("flow", "flow")
    c = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="unknown solver 'rk45'; allowed: euler, heun"):
        steer.sample(den, cond=c, solver="rk45")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        steer.sample(den, cond=c, steps=0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        steer.sample(den, cond=c, timesteps=[0.2, 0.5, 0.0])
    with pytest.raises(ValueError, match="cond has batch 2 but noise has batch 3"):
        steer.sample(den, noise=torch.randn(3, 2), cond=c)
    with pytest.raises(ValueError, match="bad options for solver 'ddim'"):
        steer.sample(den, cond=c, solver="ddim(etaa=1)")
    with pytest.raises(ValueError, match="unknown guidance method 'cfgg'"):
        steer.sample(den, cond=c, guidance="cfgg(scale=2)")
    with pytest.raises(ValueError, match="model returned shape"):
        steer.sample(steer.denoiser(lambda x, t, c: x[:, :1], "flow", "flow"), noise=torch.randn(2, 2))
    with pytest.raises(ValueError, match="needs the .uncond. conditioning.*no null_cond"):
        steer.sample(steer.denoiser(lambda x, t, c: x, "flow", "flow"), noise=torch.randn(2, 2),
                     guidance="cfg(scale=2)")
    with pytest.raises(ValueError, match="unknown prediction kind"):
        steer.denoiser(lambda x, t, c: x, "flow", "velocity")


def test_nan_names_step_and_sigma():
    def fn(x, t, c):
        return torch.full_like(x, math.nan) if float(t[0]) < 0.5 else torch.zeros_like(x)

    with pytest.raises(steer.NonFiniteError, match=r"model returned NaN or inf at step 3 \(sigma=0.666667\) in branch"):
        steer.sample(steer.denoiser(fn, "flow", "flow"), noise=torch.randn(1, 2), solver="euler", steps=5)


def test_eps_model_at_pure_noise_explains():
    den = steer.denoiser(lambda x, t, c: x, "flow", "eps")
    with pytest.raises(steer.NonFiniteError, match="cannot recover x0 from a 'eps' prediction"):
        steer.sample(den, noise=torch.randn(1, 2), solver="euler", steps=5)


def test_time_shift_sampler_by_hand():
    """TS-DPM (ADM form): x̂0 at the nominal time, target moved by τ* − s where σ(τ*)² matches Var(x)."""
    path = steer.get_path("vp-linear")
    den = steer.denoiser(lambda x, t, c: torch.zeros_like(x), path, "x0")  # x̂0 = 0, ε̂ = x/σ_s
    s, t = 0.6, 0.5
    tau = 0.62  # make Var(x) = σ(τ)² exactly, inside the window [0.56, 0.64]
    base = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)  # per-sample variance 2 with torch's unbiased var
    x = base * float(path.sigma(tau)) / 2**0.5
    got = steer.sample(den, noise=x / float(torch.hypot(path.alpha(s), path.sigma(s))), solver="ddim(time_shift=True)",
                       timesteps=[s, t])
    t_new = t + (tau - s)
    assert torch.allclose(got, float(path.sigma(t_new)) * x / float(path.sigma(s)), atol=1e-9)
    plain = steer.sample(den, noise=x / float(torch.hypot(path.alpha(s), path.sigma(s))), solver="ddim",
                         timesteps=[s, t])
    assert torch.allclose(plain, float(path.sigma(t)) * x / float(path.sigma(s)), atol=1e-9)


def test_momentum_2m_by_hand():
    """HB on DPM-Solver++(2M): v_n = (1−β) v_{n−1} + β (m_0 + D1/2), x_t = (σ_t/σ_s) x_s + α_t (1 − e^{−h}) v_n."""
    path = steer.get_path("vp-linear")
    m_of = lambda t: 1.0 + 2.0 * t  # noqa: E731  x̂0 depends on t only
    den = steer.denoiser(lambda x, t, c: torch.full_like(x, 1.0) + 2.0 * t.reshape(-1, 1).to(x), path, "x0")
    ts = [0.9, 0.6, 0.3]
    beta = 0.7
    a = [float(path.alpha(t)) for t in ts]
    s = [float(path.sigma(t)) for t in ts]
    lam = [math.log(ai / si) for ai, si in zip(a, s)]
    x = 0.3
    v = m_of(ts[0])  # first step: value m_0, velocity initialised to it
    x = s[1] / s[0] * x + a[1] * (1 - math.exp(-(lam[1] - lam[0]))) * v
    h, h0 = lam[2] - lam[1], lam[1] - lam[0]
    val = m_of(ts[1]) + 0.5 * (m_of(ts[1]) - m_of(ts[0])) * h / h0
    v = (1 - beta) * v + beta * val
    x = s[2] / s[1] * x + a[2] * (1 - math.exp(-h)) * v
    noise = torch.full((1, 1), 0.3 / math.hypot(a[0], s[0]), dtype=torch.float64)
    got = steer.sample(den, noise=noise, solver=f"dpmpp_2m(momentum={beta}, lower_order_final=False)", timesteps=ts)
    assert float(got) == pytest.approx(x, rel=1e-10)


def test_dict_conditions_are_concatenated_per_branch():
    seen = []

    def fn(x, t, cond):
        seen.append({k: v.clone() for k, v in cond.items()})
        return torch.zeros_like(x) + cond["emb"][:, :1]

    den = steer.denoiser(fn, "flow", "x0")
    cond = {"emb": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "mask": torch.tensor([[1], [0]])}
    uncond = {"emb": torch.zeros(1, 2), "mask": torch.zeros(1, 1, dtype=torch.long)}  # batch 1 broadcasts
    x = steer.sample(den, noise=torch.zeros(2, 1), cond=cond, uncond=uncond, guidance="cfg(scale=3)",
                     solver="euler", timesteps=[1.0, 0.0])
    assert seen[0]["emb"].tolist() == [[1.0, 2.0], [3.0, 4.0], [0.0, 0.0], [0.0, 0.0]]
    assert seen[0]["mask"].tolist() == [[1], [0], [0], [0]]
    assert x.flatten().tolist() == [3.0, 9.0]  # 0 + 3·(c − 0) with x0 = c at t = 0
