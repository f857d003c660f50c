"""Every registered method × every solver × float32/float16/bfloat16 at Stable-Diffusion-like latent sizes, on the
cheap toy model (steer.testbeds.toy): the sample is finite, keeps the noise's dtype and is close to the float32
sample from the same noise."""

import pytest
import torch

import steer
from steer.guidance import REGISTRY
from steer.solvers import SOLVERS
from steer.testbeds.toy import ToyLatentModel, example_guidance

SIZES = {"4x64x64": (4, 64, 64), "16x128x128": (16, 128, 128)}
RENOISE = ("ddim", "ddpm", "euler", "euler_ancestral", "dpmpp_2m")  # the solvers CFG++ can run in
FIRST_ORDER = ("ddim", "ddpm", "euler", "euler_ancestral")  # the solvers TAG can run in
# relative RMS distance to the float32 sample from the same noise; measured worst cases are ~4e-3 (float16) and
# ~3e-2 (bfloat16, 8 mantissa bits) over 3 steps
TOL = {torch.float16: 2e-2, torch.bfloat16: 1e-1}


@pytest.fixture(scope="module")
def models():
    out = {k: ToyLatentModel(shape) for k, shape in SIZES.items()}
    guides = {k: ToyLatentModel(shape, seed=1) for k, shape in SIZES.items()}
    return out, guides


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_and_solver_in_half_precision(models, size, method):
    model, guide = models[0][size], models[1][size]
    steer.models.register_model("toy-guide", lambda: guide)
    labels = torch.tensor([3])
    noise = torch.randn((1, *SIZES[size]), generator=torch.Generator().manual_seed(0))
    guidance = example_guidance(method, SIZES[size])
    kwargs = dict(cond=labels, guidance=guidance, steps=3, seed=0,
                  negative=torch.tensor([5]) if method == "perp_neg" else None)
    for solver in SOLVERS:
        if steer.guidance.parse(guidance).needs_renoise and solver not in RENOISE:
            with pytest.raises(ValueError, match="re-noises"):
                steer.sample(model, noise=noise, solver=solver, **kwargs)
            continue
        if method == "tag" and solver not in FIRST_ORDER:
            with pytest.raises(ValueError, match="tangential part of the sampler's update"):
                steer.sample(model, noise=noise, solver=solver, **kwargs)
            continue
        ref = steer.sample(model, noise=noise, solver=solver, **kwargs)
        assert ref.dtype == torch.float32 and torch.isfinite(ref).all(), solver
        for dtype, tol in TOL.items():
            x = steer.sample(model, noise=noise.to(dtype), solver=solver, **kwargs)
            assert x.dtype == dtype, (solver, dtype)
            assert torch.isfinite(x).all(), (solver, dtype)
            err = float((x.float() - ref).norm() / ref.norm())
            assert err < tol, (solver, dtype, err)


@pytest.mark.parametrize("spec", ["cfg_rescale(scale=7.5)", "cfg_zero_star(scale=7.5, zero_init_steps=0)",
                                  "apg(scale=7.5)", "tcfg(scale=7.5)", "mambo(scale=7.5)"])
def test_sums_of_squares_that_overflow_float16(spec):
    """Per-sample sums over a 16×128×128 latent of values ~±8 reach ~1.7e7, far above float16's 65504: the
    reductions must accumulate in float32. Compared with the float32 run of the same noise."""
    den = steer.denoiser(lambda x, t, c: (8.0 * torch.tanh(x.float())
                                          * (1 + c.float()[:, None, None, None])).to(x.dtype), "flow", "flow")
    den.null_cond = lambda cond, batch: torch.zeros(batch)
    noise = torch.randn(1, 16, 128, 128, generator=torch.Generator().manual_seed(0))
    kw = dict(cond=torch.ones(1), guidance=spec, solver="euler", steps=3)
    ref = steer.sample(den, noise=noise, **kw)
    half = steer.sample(den, noise=noise.half(), **kw)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert float((half.float() - ref).norm() / ref.norm()) < 2e-2


def test_mambo_in_float16_is_mambo_not_cfg():
    """MAMBO-G's norm ratio ‖u_c − u_u‖/‖u_u‖ overflowed to inf/inf in float16 (w_eff → 1 + (w−1)·0: plain CFG
    guidance lost). The float16 result must equal the float32 one, which differs from CFG at the same scale."""
    model = ToyLatentModel((16, 128, 128))
    noise = torch.randn(1, 16, 128, 128, generator=torch.Generator().manual_seed(0))
    kw = dict(cond=torch.tensor([2]), solver="euler", steps=3)
    ref = steer.sample(model, noise=noise, guidance="mambo(scale=10, alpha=8)", **kw)
    half = steer.sample(model, noise=noise.half(), guidance="mambo(scale=10, alpha=8)", **kw).float()
    cfg = steer.sample(model, noise=noise, guidance="cfg(scale=10)", **kw)
    assert float((half - ref).norm() / ref.norm()) < 2e-2
    assert float((cfg - ref).norm() / ref.norm()) > 0.1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_both_reduction_paths_agree_with_float64(dtype):
    """The per-sample reductions have a fused path (accelerators: fewer kernel launches) and a BLAS path (CPU);
    both equal float64 sums of the same values, also where float16 sums would overflow."""
    import importlib

    cfg = importlib.import_module("steer.guidance.cfg")
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(3, 16, 64, 64, generator=gen) * 4 + 1).to(dtype)  # sums of squares ~1e6 > 65504
    b = (0.5 * a.double() + torch.randn(3, 16, 64, 64, generator=gen, dtype=torch.float64)).to(dtype)
    a64, b64 = a.double().flatten(1), b.double().flatten(1)
    expect = [(a64 * a64).sum(1), (a64 * b64).sum(1), (b64 * b64).sum(1)]
    for fused in (True, False):
        got = cfg._gram(a, b, fused=fused)
        for g, e in zip(got, expect):
            assert g.shape == (3, 1, 1, 1) and g.dtype in (torch.float32, torch.float64)
            assert torch.allclose(g.double().flatten(), e, rtol=1e-5)
        var = cfg._var(a, fused=fused)
        assert torch.allclose(var.double().flatten(), a64.var(1), rtol=1e-5)
