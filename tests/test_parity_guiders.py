"""Parity of steer's CFG-family combines with diffusers' guiders on identical float32 inputs, and tests that
record where diffusers deviates from the papers (reference notes §3.2, §12, §16, §18).

diffusers' guiders work on the raw model output; steer's methods are run with ``space="raw"`` on a context
whose model predicts x0, so both sides combine the very same tensors.
"""
import math

import pytest
import torch

from steer import guidance as g
from steer.guidance import Ctx
from steer.paths import get_path

guiders = pytest.importorskip("diffusers.guiders")
pytestmark = pytest.mark.filterwarnings("ignore")

SHAPE = (3, 4, 32, 32)


def preds(seed=0, shape=SHAPE):
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(shape, generator=gen)
    return c, 0.8 * c + 0.6 * torch.randn(shape, generator=gen)  # correlated like real branches


def ctx_raw(x=None, step=0, prediction="x0"):
    p = get_path("flow")
    return Ctx.at(torch.zeros(SHAPE) if x is None else x, p, 0.5, step, None, prediction)


def run_diffusers(guider, c, u, step=0, steps=10):
    guider.set_state(step=step, num_inference_steps=steps, timestep=torch.tensor(500))
    return guider.forward(c, u).pred


def steer_combine(method, c, u, ctx=None):
    return method.combine({"cond": c, "uncond": u}, ctx or ctx_raw())


def close(a, b):
    return torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_cfg():
    c, u = preds()
    assert close(steer_combine(g.cfg(5.0), c, u),
                 run_diffusers(guiders.ClassifierFreeGuidance(guidance_scale=5.0), c, u))


def test_cfg_rescale_in_raw_space():
    c, u = preds(1)
    d = run_diffusers(guiders.ClassifierFreeGuidance(guidance_scale=7.5, guidance_rescale=0.7), c, u)
    assert close(steer_combine(g.cfg_rescale(7.5, phi=0.7, space="raw"), c, u), d)


def test_apg_with_matched_conventions_over_two_evaluations():
    """diffusers' APG equals the paper's form with ``use_original_formulation=True`` and ``guidance_scale = w − 1``
    (what its ACE-Step pipeline does); the momentum buffer is the same running sum."""
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

    w, eta, r, beta = 8.0, 0.0, 15.0, -0.5
    ours = g.apg(w, eta=eta, rescale=r, momentum=beta, space="raw")
    ctx = ctx_raw()  # one sampling call: the momentum lives in ctx.state
    theirs = guiders.AdaptiveProjectedGuidance(guidance_scale=w - 1, eta=eta, adaptive_projected_guidance_rescale=r,
                                               adaptive_projected_guidance_momentum=beta, use_original_formulation=True)
    theirs.momentum_buffer = MomentumBuffer(beta)
    for step, seed in enumerate((2, 3)):
        c, u = preds(seed)
        c, u = 4 * c, 4 * u  # ‖Δ‖ above r, so the norm cap is exercised
        assert close(steer_combine(ours, c, u, ctx), run_diffusers(theirs, c, u, step=step))


def test_diffusers_apg_default_form_drops_the_parallel_unit_step():
    """Deviation (reference notes §3.2): diffusers' default APG returns ``y_u + w Δ_mod``; the paper's is
    ``y_c + (w − 1) Δ_mod``. With η = 0 (the paper's recommendation) the two differ by ``Δ_∥``, the part of
    ``y_c − y_u`` parallel to ``y_c``: the default is not a reparametrisation of the paper's method."""
    c, u = preds(4)
    w = 6.0
    d = run_diffusers(guiders.AdaptiveProjectedGuidance(guidance_scale=w, eta=0.0,
                                                        adaptive_projected_guidance_rescale=0.0), c, u)
    ours = steer_combine(g.apg(w, eta=0.0, rescale=0.0, momentum=0.0, space="raw"), c, u)
    delta = (c - u).double()
    unit = c.double() / c.double().flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    par = (delta * unit).flatten(1).sum(1).reshape(-1, 1, 1, 1) * unit
    assert close(d, (ours.double() - par).float())
    assert not close(d, ours)


def test_cfg_zero_star_and_zero_init():
    c, u = preds(5)
    theirs = guiders.ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=1)
    ours = g.cfg_zero_star(4.0, zero_init_steps=1)
    ours.modifier.space = "raw"
    assert close(steer_combine(ours, c, u, ctx_raw(step=3)), run_diffusers(theirs, c, u, step=3))
    # zero-init: diffusers returns a zero output (after computing both branches); steer returns the x0 of zero
    # velocity and asks for no branch at all
    ctx = ctx_raw(x=torch.randn(SHAPE), step=0, prediction="flow")
    assert ours.branches(ctx) == ()
    assert torch.allclose(ctx.to(ours.combine({}, ctx), "flow"), run_diffusers(theirs, c, u, step=0), atol=1e-6)


def test_tcfg():
    c, u = preds(6, shape=(3, 4, 4, 4))
    d = run_diffusers(guiders.TangentialClassifierFreeGuidance(guidance_scale=5.0), c, u)
    assert close(steer_combine(g.tcfg(5.0, space="raw"), c, u), d)


def test_diffusers_tcfg_float32_svd_loses_precision_on_real_sizes():
    """Deviation: diffusers takes a float32 SVD of the 2 × N stack; on a 4×32×32 latent its result is ~2e−4 away
    from the exact (float64) answer, while steer's 2×2 Gram eigen-decomposition stays within 1e−5."""
    import numpy as np

    c, u = preds(6)
    d = run_diffusers(guiders.TangentialClassifierFreeGuidance(guidance_scale=5.0), c, u).double()
    ours = steer_combine(g.tcfg(5.0, space="raw"), c, u).double()
    ref = []
    for ci, ui in zip(c.double().flatten(1).numpy(), u.double().flatten(1).numpy()):
        v1 = np.linalg.svd(np.stack([ci, ui]), full_matrices=False)[2][0]
        ref.append((ui @ v1) * v1 + 5 * (ci - (ui @ v1) * v1))
    ref = torch.from_numpy(np.array(ref)).reshape(c.shape)
    assert (ours - ref).abs().max() < 1e-5
    assert (d - ref).abs().max() > 1e-5


def test_mambo():
    c, u = preds(7)
    c, u = c.flatten(1), u.flatten(1)  # see the next test for 4-D latents
    d = run_diffusers(guiders.MagnitudeAwareGuidance(guidance_scale=10.0, alpha=8.0), c, u)
    ctx = ctx_raw(x=torch.zeros_like(c))
    assert close(steer_combine(g.mambo(10.0, alpha=8.0, space="raw"), c, u, ctx), d)


def test_diffusers_mambo_fails_on_image_latents():
    """Deviation: diffusers' MagnitudeAwareGuidance calls ``torch.norm(x, dim=[1, 2, 3])``, which this torch
    rejects (a Frobenius norm takes two dims), so it fails on every 4-D latent; steer reduces per sample."""
    c, u = preds(7)
    with pytest.raises(RuntimeError, match="dim must be a 2-tuple"):
        run_diffusers(guiders.MagnitudeAwareGuidance(guidance_scale=10.0, alpha=8.0), c, u)
    assert steer_combine(g.mambo(10.0, alpha=8.0, space="raw"), c, u).shape == c.shape


@pytest.mark.parametrize("parallel", [1.0, 0.5])
@pytest.mark.parametrize("levels", [2, 3])
def test_fdg(levels, parallel):
    pytest.importorskip("kornia")
    c, u = preds(8)
    scales = [10.0] * (levels - 1) + [5.0]
    d = run_diffusers(guiders.FrequencyDecoupledGuidance(guidance_scales=scales, parallel_weights=[parallel] * levels),
                      c, u)
    ours = g.fdg(scale_low=5.0, scale_high=10.0, levels=levels, parallel_weight=parallel, space="raw",
                 form="diffusers")
    assert close(steer_combine(ours, c, u), d)
    if parallel == 1.0:  # without projection diffusers' form is the paper's (the default)
        paper = g.fdg(scale_low=5.0, scale_high=10.0, levels=levels, space="raw")
        assert close(steer_combine(paper, c, u), d)


def test_diffusers_fdg_returns_padded_latents_for_other_sizes():
    """Deviation: kornia pads to the next power of two and diffusers never crops back, so a 3×4×40×40 latent
    comes back 3×4×64×64. steer pads only to a multiple of 2^(levels−1), crops, and returns the input's shape."""
    pytest.importorskip("kornia")
    c, u = preds(9, shape=(3, 4, 40, 40))
    d = run_diffusers(guiders.FrequencyDecoupledGuidance(guidance_scales=[10.0, 5.0]), c, u)
    ours = steer_combine(g.fdg(5.0, 10.0, space="raw"), c, u, ctx_raw(x=torch.zeros(3, 4, 40, 40)))
    assert d.shape == (3, 4, 64, 64) and ours.shape == c.shape


def test_guidance_interval_is_stated_in_sigma_not_step_fractions():
    """diffusers windows are fractions of the step count (reference notes §16); steer's interval is in σ̄, so it
    selects the same noise levels whatever the number of steps."""
    p = get_path("edm")
    method = g.cfg(2.0, sigma_lo=0.28, sigma_hi=5.42)
    for steps in (16, 32, 64):
        ts = p.default_grid(steps)
        active = [method.active(Ctx.at(torch.zeros(1), p, float(t)))
                  for t in ts[:-1]]
        sig = p.sigma_bar(ts[:-1])
        assert all(a == bool(0.28 < s <= 5.42) for a, s in zip(active, sig.tolist()))
    assert math.isfinite(method.sigma_hi)
