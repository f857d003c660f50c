import pytest
import torch
from hypothesis import given, settings, strategies as st

from steer.paths import get_path
from steer.prediction import KINDS, convert

ALL = ["flow", "vp-linear", "vp-cosine", "edm"]


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=30, deadline=None)
@given(t=st.floats(min_value=0.01, max_value=0.99), seed=st.integers(0, 2**31 - 1),
       src=st.sampled_from(KINDS), dst=st.sampled_from(KINDS))
def test_round_trip_is_identity(name, t, seed, src, dst):
    p = get_path(name)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    back = convert(convert(y, src, dst, x, t, p), dst, src, x, t, p)
    assert torch.allclose(back, y, rtol=1e-9, atol=1e-9)


def test_flow_path_values_by_hand():
    # t = 0.25: α = 0.75, σ = 0.25; x = 1, ε̂ = 0.5 → x̂0 = (1 − 0.125)/0.75 = 7/6, u = ε − x0 = −2/3,
    # v = α ε − σ x0 = 0.375 − 7/24 = 1/12, score = −ε/σ = −2
    p = get_path("flow")
    x, eps = torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[0.5]], dtype=torch.float64)
    got = {k: float(convert(eps, "eps", k, x, 0.25, p)) for k in KINDS}
    assert got == pytest.approx({"eps": 0.5, "x0": 7 / 6, "flow": -2 / 3, "v": 1 / 12, "score": -2.0})


def test_vp_v_prediction_by_hand():
    # VP: x0 = α x − σ v, ε = σ x + α v
    p = get_path("vp-cosine")
    t = 0.4
    a, s = float(p.alpha(t)), float(p.sigma(t))
    x, v = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[-1.2]], dtype=torch.float64)
    assert float(convert(v, "v", "x0", x, t, p)) == pytest.approx(a * 0.3 + s * 1.2)
    assert float(convert(v, "v", "eps", x, t, p)) == pytest.approx(s * 0.3 - a * 1.2)


def test_vp_flow_velocity_is_time_derivative_of_path():
    # u = α̇ x0 + σ̇ ε is d/dt of α x0 + σ ε: check against a finite difference of the path
    p = get_path("vp-cosine")
    t, h = 0.4055, 1e-5  # inside one knot segment
    x0, eps = torch.tensor([[0.7]], dtype=torch.float64), torch.tensor([[-0.2]], dtype=torch.float64)
    xt = p.alpha(t) * x0 + p.sigma(t) * eps
    u = convert(eps, "eps", "flow", xt, t, p)
    fd = ((p.alpha(t + h) - p.alpha(t - h)) * x0 + (p.sigma(t + h) - p.sigma(t - h)) * eps) / (2 * h)
    assert float(u) == pytest.approx(float(fd), rel=1e-6)


def test_unknown_kind():
    with pytest.raises(ValueError, match="allowed: eps, x0, v, flow, score"):
        convert(torch.zeros(1, 1), "noise", "x0", torch.zeros(1, 1), 0.5, get_path("flow"))
