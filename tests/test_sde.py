"""Stochastic samplers against exact samples of p(x0 | c) on the Gaussian-mixture testbed."""
import pytest
import torch

import steer
from steer.metrics import energy_distance, energy_test
from steer.testbeds import gmm

N = 1000
SDE_SOLVERS = ["ddpm", "ddpm(variance='large')", "ddim(eta=1)", "euler_ancestral", "dpmpp_2m_sde",
               "dpmpp_3m_sde", "restart"]


@pytest.fixture(scope="module")
def setup():
    g = gmm.toy(dim=2)
    labels = torch.arange(N) % 3
    ref = g.sample(N, labels, generator=torch.Generator().manual_seed(1)).float()
    return g, labels, ref


@pytest.mark.parametrize("path,pred", [("vp-linear", "eps"), ("flow", "flow")])
@pytest.mark.parametrize("solver", SDE_SOLVERS)
def test_sde_solver_converges_to_exact_samples(setup, path, pred, solver):
    g, labels, ref = setup
    den = g.denoiser(path, pred)
    coarse = energy_distance(steer.sample(den, cond=labels, solver=solver, steps=2, seed=3), ref)
    x = steer.sample(den, cond=labels, solver=solver, steps=200, seed=3)
    fine, p = energy_test(x, ref, permutations=100)
    # two exact sample sets of this size differ by at most ~0.0065 (20 replicates); 2 steps are far off
    assert coarse > fine + 0.005, (coarse, fine)
    assert p > 0.01, (fine, p)


@pytest.mark.parametrize("path,pred", [("vp-cosine", "eps"), ("flow", "v")])
def test_ancestral_family_coincides(path, pred):
    """DDIM(η=1), DDPM (posterior variance) and ancestral Euler(η=1) are one update written three ways;
    with the same noise stream they give the same samples."""
    g = gmm.toy(dim=2)
    den = g.denoiser(path, pred)
    labels = torch.arange(8) % 3
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = [steer.sample(den, noise=z, cond=labels, solver=s, steps=7, seed=5)
           for s in ("ddim(eta=1)", "ddpm", "euler_ancestral")]
    assert torch.allclose(out[0], out[1], atol=1e-10) and torch.allclose(out[0], out[2], atol=1e-10)
    ddim_half = steer.sample(den, noise=z, cond=labels, solver="ddim(eta=0.5)", steps=7, seed=5)
    anc_half = steer.sample(den, noise=z, cond=labels, solver="euler_ancestral(eta=0.5)", steps=7, seed=5)
    assert torch.allclose(ddim_half, anc_half, atol=1e-10)


def test_first_order_sde_dpm_solver_is_ddpm():
    g = gmm.toy(dim=2)
    den = g.denoiser("vp-linear", "eps")
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = torch.tensor([1.0, 0.6], dtype=torch.float64)
    a = steer.sample(den, noise=z, cond=torch.zeros(8, dtype=torch.long), solver="dpmpp_2m_sde", timesteps=grid, seed=2)
    b = steer.sample(den, noise=z, cond=torch.zeros(8, dtype=torch.long), solver="ddpm", timesteps=grid, seed=2)
    assert torch.allclose(a, b, atol=1e-12)


def test_ddpm_step_by_hand():
    # one step s → t of DDPM with a model whose x0 is 0: ε̂ = x/σ_s, so
    # x_t = sqrt(σ_t² − c²)·x/σ_s + c·z with c = σ_t sqrt(1 − e^{−2h}), e^{−h} = α_s σ_t/(σ_s α_t)
    path = steer.get_path("vp-linear")
    den = steer.denoiser(lambda x, t, c: torch.zeros_like(x), path, "x0")
    s, t = 0.8, 0.5
    a_s, s_s, a_t, s_t = (float(f(v)) for v, f in ((s, path.alpha), (s, path.sigma), (t, path.alpha), (t, path.sigma)))
    e_h = a_s * s_t / (s_s * a_t)
    c = s_t * (1 - e_h**2) ** 0.5
    x = torch.tensor([[1.5]], dtype=torch.float64)
    got = steer.sample(den, noise=x / (a_s**2 + s_s**2) ** 0.5, solver="ddpm", timesteps=[s, t], seed=7)
    z = torch.randn((1, 1), generator=torch.Generator().manual_seed(7)).double()  # drawn in float32 for every dtype
    assert float(got) == pytest.approx(float((s_t**2 - c**2) ** 0.5 * x / s_s + c * z), rel=1e-10)
