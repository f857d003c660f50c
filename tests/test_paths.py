import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from steer import paths
from steer.paths import get_path

ALL = ["flow", "vp-linear", "vp-scaled-linear", "vp-cosine", "edm"]
ts = st.floats(min_value=0.002, max_value=0.998)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=40, deadline=None)
@given(t=ts)
def test_lambda_and_sigma_inverses(name, t):
    p = get_path(name)
    assert float(p.t_from_lambda(p.lam(t))) == pytest.approx(t, abs=1e-9)
    assert float(p.t_from_sigma_bar(p.sigma_bar(t))) == pytest.approx(t, abs=1e-9)
    assert float(p.sigma_bar(t)) == pytest.approx(float(p.sigma(t) / p.alpha(t)), rel=1e-12)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=25, deadline=None)
@given(t=st.floats(min_value=0.01, max_value=0.99))
def test_derivatives_match_finite_differences(name, t):
    p = get_path(name)
    if p.kind == "vp":  # log α is piecewise linear between knots: stay inside one segment
        k = math.floor(t * p.T)
        t = (k + 0.5) / p.T
        eps = 0.01 / p.T
    else:
        eps = 1e-6
    fd_a = (p.alpha(t + eps) - p.alpha(t - eps)) / (2 * eps)
    fd_s = (p.sigma(t + eps) - p.sigma(t - eps)) / (2 * eps)
    assert float(p.d_alpha(t)) == pytest.approx(float(fd_a), rel=1e-5, abs=1e-9)
    assert float(p.d_sigma(t)) == pytest.approx(float(fd_s), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("name", ["vp-linear", "vp-scaled-linear", "vp-cosine"])
def test_vp_knots_and_ends(name):
    p = get_path(name)
    tau = torch.tensor([0, 1, 499, 998, 999])
    t = (tau + 1).double() / 1000
    assert torch.allclose(p.alpha(t) ** 2, p.alphas_cumprod[tau], rtol=1e-12, atol=0)
    assert torch.allclose(p.alpha(t) ** 2 + p.sigma(t) ** 2, torch.ones(5, dtype=torch.float64))
    assert float(p.alpha(0.0)) == 1.0 and float(p.sigma(0.0)) == 0.0
    assert torch.allclose(p.timestep(t), tau.double())


def test_vp_linear_table_by_hand():
    # ā_0 = 1 − β_0 = 1 − 1e-4; ā_1 = ā_0 (1 − β_1), β_1 = 1e-4 + (0.02 − 1e-4)/999
    p = get_path("vp-linear")
    b1 = 1e-4 + (0.02 - 1e-4) / 999
    assert float(p.alphas_cumprod[0]) == pytest.approx(1 - 1e-4, rel=1e-7)
    assert float(p.alphas_cumprod[1]) == pytest.approx((1 - 1e-4) * (1 - b1), rel=1e-7)


def test_vp_cosine_midpoint_by_hand():
    # ā(t) = f(t)/f(0), f(t) = cos²((t + 0.008)/1.008 · π/2); no β clipping at t = 0.5
    p = get_path("vp-cosine")
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert float(p.alpha(0.5) ** 2) == pytest.approx(f(0.5) / f(0), rel=1e-6)


def test_flow_and_edm_coefficients():
    f, e = get_path("flow"), get_path("edm")
    assert float(f.alpha(0.25)) == 0.75 and float(f.sigma(0.25)) == 0.25
    assert float(f.lam(0.25)) == pytest.approx(math.log(3))
    assert float(e.alpha(0.5)) == 1.0 and float(e.sigma(0.5)) == 40.0
    assert float(e.sigma_bar(0.5)) == 40.0


def test_flow_shift_is_a_log_snr_offset_and_flux_mu():
    f = get_path("flow")
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    s = 3.0
    shifted = paths.flow_shift(t, s)
    assert torch.allclose(f.lam(shifted), f.lam(t) - math.log(s), atol=1e-12)
    mu = math.log(s)  # Flux: t' = e^μ / (e^μ + (1/t − 1))
    assert torch.allclose(shifted, math.exp(mu) / (math.exp(mu) + (1 / t - 1)), atol=1e-12)
    g = get_path("flow", shift=s).default_grid(4)
    assert torch.allclose(g, paths.flow_shift(torch.linspace(1, 0, 5, dtype=torch.float64), s))


def test_karras_grid_by_hand():
    p = get_path("edm")
    g = paths.karras(p, 3, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    sig = p.sigma_bar(g[:-1])
    mid = (80 ** (1 / 7) + 0.5 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(sig, torch.tensor([80.0, mid, 0.002], dtype=torch.float64), rtol=1e-10)
    assert g[-1] == 0 and len(g) == 4


@pytest.mark.parametrize("name", ALL)
def test_grids_are_decreasing_and_logsnr_uniform(name):
    p = get_path(name)
    for kind in paths.GRID_KINDS:
        g = paths.make_grid(p, 10, kind)
        assert len(g) == 11 and torch.all(g[1:] < g[:-1]), kind
    g = paths.uniform_lambda(p, 8, append_zero=False)
    d = torch.diff(p.lam(g))
    assert torch.allclose(d, d[0].expand_as(d), rtol=1e-8)


def test_unknown_names_list_allowed():
    with pytest.raises(ValueError, match="allowed: flow, vp-linear"):
        get_path("vp-quadratic")
    with pytest.raises(ValueError, match="allowed: default, uniform"):
        paths.make_grid(get_path("flow"), 5, "exponential")
    with pytest.raises(ValueError, match="steps must be"):
        paths.uniform_t(get_path("flow"), 0)
