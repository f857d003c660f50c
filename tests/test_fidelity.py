"""Fidelity to the authors' official code: each test re-implements the official update independently (from the
repository and function named in its docstring) and compares steer's method with it on the same inputs, to float
precision. The README's "Fidelity to the official code" table summarises these tests."""
import math

import pytest
import torch

from steer import guidance as g
from steer.guidance import Ctx
from steer.paths import get_path


def _pair(seed, shape=(3, 4, 16, 16)):
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(shape, generator=gen, dtype=torch.float64)
    return c, 0.8 * c + 0.6 * torch.randn(shape, generator=gen, dtype=torch.float64)


def _ctx(x, t=0.5, path="flow", step=0, prediction="x0"):
    return Ctx.at(x, get_path(path), t, step, None, prediction)


def _dot(a, b):
    return (a * b).flatten(1).sum(1).reshape(-1, *([1] * (a.ndim - 1)))


# ---------------------------------------------------------------------------------------------------
# FDG


def _fdg_paper(c, u, scales, rho):
    """FDG, the paper's Algorithm 2 (arXiv 2506.19713; the listing diffusers' ``project`` and
    ``build_image_from_pyramid`` port): kornia Laplacian pyramids of both predictions, per level
    ``c_l + (w_l − 1)(Δ_⊥ + ρ Δ_∥)`` with Δ projected on the normalised ``c_l`` in float64, then upsample-and-add."""
    kornia = pytest.importorskip("kornia")
    pc = kornia.geometry.transform.build_laplacian_pyramid(c, len(scales))
    pu = kornia.geometry.transform.build_laplacian_pyramid(u, len(scales))
    out = []
    for lc, lu, w in zip(pc, pu, scales):
        d = lc - lu
        unit = lc / _dot(lc, lc).sqrt()
        par = _dot(d, unit) * unit
        out.append(lc + (w - 1) * ((d - par) + rho * par))
    img = out[-1]
    for level in reversed(out[:-1]):
        img = kornia.geometry.pyrup(img) + level
    return img


@pytest.mark.parametrize("levels, rho", [(2, 0.5), (3, 0.0), (2, 1.0)])
def test_fdg_default_is_the_papers_algorithm(levels, rho):
    c, u = _pair(1)
    scales = [10.0] * (levels - 1) + [5.0]
    ours = g.fdg(scale_low=5.0, scale_high=10.0, levels=levels, parallel_weight=rho)
    got = ours.combine({"cond": c, "uncond": u}, _ctx(torch.zeros_like(c)))
    assert (got - _fdg_paper(c, u, scales, rho)).abs().max() < 1e-10


def test_fdg_diffusers_form_differs_by_the_parallel_unit_step():
    """``form="diffusers"`` is ``u + w(Δ_⊥ + ρΔ_∥)`` per level: it differs from the paper's by ``(1 − ρ)Δ_∥`` per
    level, i.e. by the reconstruction of those parts (max 0.5 or more on unit-scale inputs at ρ = 0.5)."""
    kornia = pytest.importorskip("kornia")
    c, u = _pair(2)
    ctx = _ctx(torch.zeros_like(c))
    paper = g.fdg(parallel_weight=0.5).combine({"cond": c, "uncond": u}, ctx)
    diff = g.fdg(parallel_weight=0.5, form="diffusers").combine({"cond": c, "uncond": u}, ctx)
    pc = kornia.geometry.transform.build_laplacian_pyramid(c, 2)
    pu = kornia.geometry.transform.build_laplacian_pyramid(u, 2)
    pars = []
    for lc, lu in zip(pc, pu):
        unit = lc / _dot(lc, lc).sqrt()
        pars.append(0.5 * _dot(lc - lu, unit) * unit)  # (1 − ρ) Δ_∥
    recon = kornia.geometry.pyrup(pars[1]) + pars[0]
    assert (paper - diff - recon).abs().max() < 1e-10
    assert (paper - diff).abs().max() > 0.3


# ---------------------------------------------------------------------------------------------------
# TAG: defined on the update of the sampler


def _tag_on_update(den, z, labels, solver, steps, eta):
    """The paper's TAG (arXiv 2510.04533, ``x_{k−1} = x_k + η_r Δ_∥ + η_t Δ_⊥`` with ``Δ`` the base solver's update
    and ``∥`` along ``x_k``, per sample), applied to whatever solver through the open loop, η_r = 1."""
    import steer

    it = steer.sampler(den, noise=z, cond=labels, solver=solver, steps=steps)
    x = it.x
    for _ in it:
        delta = it.x - x
        unit = x / x.norm(dim=1, keepdim=True)
        par = (delta * unit).sum(1, keepdim=True) * unit
        it.x = x + par + eta * (delta - par)
        x = it.x
    return x


def test_tag_refuses_multistep_solvers_and_matches_the_update_form_on_first_order_ones():
    import steer
    from steer.testbeds import gmm

    mix = gmm.toy(dim=2)
    den = mix.denoiser("flow", "flow")
    z = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    labels = torch.arange(64) % mix.n_classes
    ref = _tag_on_update(den, z, labels, "euler", 8, 1.5)
    ours = steer.sample(den, noise=z, cond=labels, solver="euler", steps=8, guidance="tag(eta=1.5)")
    assert (ours - ref).abs().max() < 1e-10
    for solver in ("dpmpp_2m", "heun", "dpmpp_3m", "unipc"):
        with pytest.raises(ValueError, match=r"use one of: euler, ddim, ddpm, euler_ancestral"):
            steer.sample(den, noise=z, cond=labels, solver=solver, steps=8, guidance="tag(eta=1.5)")
    # why: on dpmpp_2m the x̂0 form (forced past the check) is far from TAG on the multistep update
    forced = g.TAG(1.5)
    forced.first_order_only = False
    x0_form = steer.sample(den, noise=z, cond=labels, solver="dpmpp_2m", steps=8, guidance=forced)
    update_form = _tag_on_update(den, z, labels, "dpmpp_2m", 8, 1.5)
    assert (x0_form - update_form).abs().max() > 1e-2  # measured: 1.9 (7e-3 at η = 1.05, 25 steps)


# ---------------------------------------------------------------------------------------------------
# Characteristic guidance


def _chara_reference(eps, xbar, sb, w, abar_min, buffer, ite=50, thres=1e-4, lr=1.0, reg_ini=1.0, reg_range=1.0,
                     reg_size=0.4, reg_w=0.5, decay=1.0):
    """An independent re-implementation of scraed/CharacteristicGuidanceWebUI ``scripts/CharaIte.py``
    ``chara_ite_inner_loop`` (HEAD d88752d) for an ε-model in k-diffusion coordinates (``x̄``, ``σ̄``), "Num. Basis"
    0: quantile basis with one band, ``proj_least_squares`` by ``eigh``, Anderson acceleration on the residual
    extended by the ridge entry with lists of differences and ``torch.linalg.lstsq``, per-sample best iterate,
    fallback to CFG, and the reused shift. ``eps(x̄, branch)`` is the model's ε at ``x̄``. Returns the guided
    denoised prediction and the buffer ``(dxs, ᾱ)``."""
    B = xbar.shape[0]
    abt = 1 / (1 + sb * sb)
    direction = lambda d: sb * (eps(xbar + w * d, "uncond") - eps(xbar + (w - 1) * d, "cond"))  # noqa: E731
    dxs = torch.zeros_like(xbar)
    if buffer is not None:
        dxs = buffer[0] * ((buffer[1] - abt * buffer[1]) / (abt - abt * buffer[1])) * decay
    reg_level = torch.full((B,), max(5.0, reg_ini), dtype=xbar.dtype)
    reg_target_level = reg_ini * (abar_min / abt) ** (1 / reg_range)
    g_1, xs_hist, gs_hist = None, [], []
    for iteration in range(ite):
        ggg = direction(dxs)
        if g_1 is None:
            proj = ggg
        else:
            A = g_1.reshape(B, -1, 1)
            C = A.transpose(1, 2) @ A + reg_level[:, None, None] * torch.eye(1, dtype=A.dtype)
            ev, vec = torch.linalg.eigh(C)
            c_inv = vec @ torch.diag_embed(1 / torch.clamp(ev, min=1e-4)) @ vec.transpose(1, 2)
            proj = (A @ (c_inv @ (A.transpose(1, 2) @ ggg.reshape(B, -1, 1)))).reshape(ggg.shape)
        g = dxs - proj
        if g_1 is None:
            basis = -direction(dxs * 0)
            norm = basis.flatten(1).norm(dim=1).reshape(B, 1, 1, 1)
            g_1 = basis / torch.clamp(norm, min=1e-4)
        reg_acc = (reg_level * reg_w) ** 0.5
        reg_target = torch.full((B,), (reg_target_level * reg_w) ** 0.5, dtype=xbar.dtype)
        G = torch.cat([g.reshape(B, -1), reg_size * (reg_acc - reg_target)[:, None]], 1)
        res_el = G.pow(2).mean(1).sqrt()
        if iteration == 0:
            best_res, best_dxs, not_conv = res_el, dxs, torch.ones(B, dtype=torch.bool)
        better = (res_el < best_res) & not_conv
        best_res = torch.where(better, res_el, best_res)
        best_dxs = torch.where(better.reshape(B, 1, 1, 1), dxs, best_dxs)
        not_conv = not_conv & (res_el >= thres)
        if best_res.max() < thres:
            break
        X = torch.cat([dxs.reshape(B, -1), reg_acc[:, None]], 1)
        xs_hist.append(X)
        gs_hist.append(G)
        if len(gs_hist) >= 2:
            gs_hist[-2], xs_hist[-2] = gs_hist[-1] - gs_hist[-2], xs_hist[-1] - xs_hist[-2]
            if len(gs_hist) > 2:
                del gs_hist[0], xs_hist[0]
            gA, xA = gs_hist[0][..., None], xs_hist[0][..., None]
            gnorm = torch.clamp(gA.pow(2).sum(1, keepdim=True).sqrt(), min=1e-4)
            gamma = torch.linalg.lstsq(gA / gnorm, G[..., None]).solution
            X = X - ((xA / gnorm) @ gamma)[..., 0]
            G = G - ((gA / gnorm) @ gamma)[..., 0]
        X = X - lr * G
        dxs = X[:, :-1].reshape(dxs.shape)
        reg_level = X[:, -1] ** 2 / reg_w
    final = best_dxs * (~not_conv).reshape(B, 1, 1, 1)
    xu, xc = xbar + w * final, xbar + (w - 1) * final
    du, dc = xu - sb * eps(xu, "uncond"), xc - sb * eps(xc, "cond")
    return du + w * (dc - du), (final, abt)


def test_characteristic_matches_the_reference_iteration_over_two_steps():
    """Two consecutive evaluations (the second reuses the first's shift) on SD's schedule, a 4-D mixture at
    w = 7.5, float64: the same guided x̂0 as the re-implemented reference to 1e−9, and a correction far from CFG."""
    from steer.testbeds import gmm

    mix = gmm.toy(dim=4, n_classes=2, seed=3)
    path = get_path("vp-scaled-linear")
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 1, 2, 2, generator=gen, dtype=torch.float64)
    abar_min = float(path.alpha(1.0)) ** 2
    state, buffer = {}, None
    method = g.characteristic(7.5)  # its state lives in ctx.state under this object
    for t in (0.7, 0.66):
        a, s = float(path.alpha(t)), float(path.sigma(t))
        sb = s / a

        def x0_of(xs, lab):
            return mix.posterior_mean(xs.flatten(1), a, s, lab).reshape(xs.shape)

        def eps(xbar, branch):  # ε at x = α x̄
            lab = labels if branch == "cond" else torch.full_like(labels, mix.null_label)
            return (a * xbar - a * x0_of(a * xbar, lab)) / s

        def evaluate(xs):
            return {"cond": x0_of(xs["cond"], labels), "uncond": x0_of(xs["uncond"], mix.null_label)}

        ctx = Ctx.at(x, path, t, evaluate=evaluate, prediction="eps")
        ctx.state = state
        preds = evaluate({"cond": x, "uncond": x})
        ours = method.combine(preds, ctx)
        ref, buffer = _chara_reference(eps, x / a, sb, 7.5, abar_min, buffer)
        assert (ours - ref).abs().max() < 1e-9, t
        assert (ours - g.cfg(7.5).combine(preds, ctx)).abs().max() > 1e-2
        assert (state[method]["dx"] - buffer[0]).abs().max() < 1e-9
        x = 0.97 * x  # the state of the next evaluation (any will do)
