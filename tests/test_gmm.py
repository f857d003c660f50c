
import pytest
import torch

from steer.paths import get_path
from steer.testbeds import gmm


def test_single_gaussian_posterior_mean_by_hand():
    # N(μ, s²): E[x0|x] = μ + α s²/(α² s² + σ²) (x − α μ)
    g = gmm.GaussianMixture([[1.0, -2.0]], stds=[0.5])
    a, s = 0.6, 0.8
    x = torch.tensor([[0.3, 0.1]], dtype=torch.float64)
    k = a * 0.25 / (a * a * 0.25 + s * s)
    expect = torch.tensor([1.0, -2.0]) + k * (x - a * torch.tensor([1.0, -2.0]))
    assert torch.allclose(g.posterior_mean(x, a, s), expect.double(), atol=1e-12)


@pytest.mark.parametrize("path", ["flow", "vp-cosine", "edm"])
def test_tweedie_matches_autograd_score(path):
    # E[x0|x] = (x + σ² ∇ log p_t(x)) / α, with the score from autograd of the exact log marginal
    g = gmm.toy(dim=3, n_classes=2)
    p = get_path(path)
    t = 0.37
    a, s = float(p.alpha(t)), float(p.sigma(t))
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    for labels in (None, torch.tensor([0, 1, 0, 1, 2])):
        xr = x.clone().requires_grad_(True)
        score = torch.autograd.grad(g.log_marginal(xr, a, s, labels).sum(), xr)[0]
        assert torch.allclose(g.posterior_mean(x, a, s, labels), (x + s * s * score) / a, atol=1e-9)


def test_classifier_is_bayes_rule():
    g = gmm.toy(dim=2, n_classes=3)
    p = get_path("flow")
    t = 0.5
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lp = g.classifier_log_probs(x, t, p)
    assert torch.allclose(lp.exp().sum(1), torch.ones(6, dtype=torch.float64))
    a, s = float(p.alpha(t)), float(p.sigma(t))
    w = torch.softmax(g.log_weights, 0)
    prior = torch.stack([w[g.labels == c].sum() for c in range(3)])
    joint = torch.stack([g.log_marginal(x, a, s, torch.full((6,), c)) for c in range(3)], 1) + prior.log()
    assert torch.allclose(lp, joint - torch.logsumexp(joint, 1, keepdim=True), atol=1e-10)


def test_exact_samples_match_mixture_moments():
    g = gmm.toy(dim=2, n_classes=3)
    x = g.sample(200_000, labels=torch.tensor([1]), generator=torch.Generator().manual_seed(0))
    sel = g.labels == 1
    w = torch.softmax(g.log_weights[sel], 0)
    mean = (w[:, None] * g.means[sel]).sum(0)
    second = (w[:, None, None] * (g.covs[sel] + g.means[sel][:, :, None] * g.means[sel][:, None, :])).sum(0)
    cov = second - mean[:, None] * mean[None]
    assert torch.allclose(x.mean(0), mean, atol=0.02)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.05)


@pytest.mark.parametrize("path,t0,t1", [("flow", 1.0, 0.01), ("vp-linear", 1.0, 0.01), ("edm", 1.0, 1e-4),
                                       ("flow", 1.0, 0.0), ("vp-cosine", 0.9, 0.0)])
def test_reference_ode_matches_closed_form(path, t0, t1):
    g = gmm.GaussianMixture([[0.5, -1.0, 2.0]], stds=[0.7])
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = g.ode_solution(x, t0, t1, path)
    exact = gmm.single_gaussian_ode(x, t0, t1, path, mean=torch.tensor([0.5, -1.0, 2.0]), std=0.7)
    assert torch.allclose(ref, exact, rtol=1e-8, atol=1e-8)


def test_denoiser_kinds_agree():
    g = gmm.toy(dim=2)
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t = torch.full((4,), 0.3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3])  # 3 = null label: unconditional
    x0 = g.denoiser("vp-cosine", "x0")(x, t, labels)
    eps = g.denoiser("vp-cosine", "eps")(x, t, labels)
    p = get_path("vp-cosine")
    assert torch.allclose(x0, (x - p.sigma(0.3) * eps) / p.alpha(0.3), atol=1e-12)
    assert torch.allclose(x0[3], g.denoiser("vp-cosine", "x0")(x[3:], t[3:], None)[0])


def test_bad_inputs():
    with pytest.raises(ValueError, match="positive definite"):
        gmm.GaussianMixture([[0.0, 0.0]], covs=[[[1.0, 0.0], [0.0, -1.0]]])
    g = gmm.toy()
    with pytest.raises(ValueError, match="labels must be in 0..2 or the null label 3"):
        g.posterior_mean(torch.zeros(1, 2), 1.0, 0.5, torch.tensor([7]))
