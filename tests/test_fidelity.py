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


MEASURED: dict = {}  # test name -> the largest difference seen (printed by `python tests/test_fidelity.py`)


def _maxdiff(a, b) -> float:
    import inspect

    d = float((a - b).abs().max())
    name = inspect.stack()[1].function
    MEASURED[name] = max(MEASURED.get(name, 0.0), d)
    return d


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
    assert _maxdiff(got, _fdg_paper(c, u, scales, rho)) < 1e-10


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
    assert _maxdiff(paper - diff, recon) < 1e-10
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
    assert _maxdiff(ours, ref) < 1e-10
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
        assert _maxdiff(ours, ref) < 1e-9, t
        assert (ours - g.cfg(7.5).combine(preds, ctx)).abs().max() > 1e-2
        assert _maxdiff(state[method]["dx"], buffer[0]) < 1e-9
        x = 0.97 * x  # the state of the next evaluation (any will do)


def test_characteristic_reused_shift_follows_its_rows_when_resampled():
    """The reused shift is batch-first state: resampling rows [2, 0, 2, 3] mid-run gives the rows sampled from the
    reordered noise from the start (float64, exact testbed, 8 euler steps)."""
    import steer
    from steer.testbeds import gmm

    den = gmm.toy(dim=2).denoiser("vp-scaled-linear", "eps")
    z = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels, idx = torch.tensor([0, 1, 2, 0]), torch.tensor([2, 0, 2, 3])
    spec = "characteristic(scale=5)"
    it = steer.sampler(den, noise=z, cond=labels, guidance=spec, solver="euler", steps=8)
    for step in it:
        if step.i == 3:
            it.resample(idx)
            state = [v for v in it.ev.gstate.values() if isinstance(v, dict) and "dx" in v]
    ref = steer.sample(den, noise=z[idx], cond=labels[idx], guidance=spec, solver="euler", steps=8)
    assert state and state[0]["dx"].abs().max() > 0  # a shift was reused
    assert _maxdiff(it.x, ref) < 1e-9


# ---------------------------------------------------------------------------------------------------
# Methods that already matched their official code: compact parity tests on random inputs (float64)


def _vec(seed, shape=(3, 4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _combine(method, preds, ctx):
    return method.combine(preds, ctx)


def test_apg_matches_the_papers_listing_over_two_evaluations():
    """Sadat et al. (arXiv 2410.02416) Algorithm 1 / appendix listing (``MomentumBuffer``, ``project`` in float64,
    ``normalized_guidance``): ``Δ ← Δ + β m`` running sum, norm cap ``min(1, r/‖Δ‖)``, projection on ``D_c``,
    ``D_c + (w − 1)(Δ_⊥ + η Δ_∥)``, on denoised predictions."""
    w, eta, r, beta = 8.0, 0.3, 2.5, -0.5
    ours, ctx = g.apg(w, eta=eta, rescale=r, momentum=beta), _ctx(_vec(0))
    running = 0.0
    for seed in (1, 2):
        c, u = _vec(seed), _vec(seed + 10)
        diff = c - u
        running = diff + beta * running  # MomentumBuffer.update
        diff = running
        diff = diff * torch.clamp(r / _dot(diff, diff).sqrt(), max=1.0)
        unit = c / _dot(c, c).sqrt()
        par = _dot(diff, unit) * unit
        ref = c + (w - 1) * ((diff - par) + eta * par)
        assert _maxdiff(_combine(ours, {"cond": c, "uncond": u}, ctx), ref) < 1e-12


def test_cfg_zero_star_matches_the_official_pipeline():
    """WeichenFan/CFG-Zero-star ``models/sd/sd3_pipeline.py``: per sample ``s* = ⟨u_c, u_u⟩/(‖u_u‖² + 1e−8)``,
    ``u = s* u_u + w (u_c − s* u_u)`` in velocity space; ``i <= zero_steps`` (0) zeroes the velocity."""
    x, t, w = _vec(3), 0.6, 4.0
    uc, uu = _vec(4), 0.7 * _vec(4) + 0.5 * _vec(5)
    for step in (0, 1):
        ctx = _ctx(x, t, step=step)
        preds = {"cond": ctx.x0(uc, "flow"), "uncond": ctx.x0(uu, "flow")}
        got = ctx.to(g.cfg_zero_star(w).combine(preds, ctx), "flow")
        s = _dot(uc, uu) / (_dot(uu, uu) + 1e-8)
        ref = torch.zeros_like(uc) if step == 0 else uu * s + w * (uc - uu * s)
        assert _maxdiff(got, ref) < 1e-12


def test_cfgpp_ddim_and_euler_match_the_official_samplers():
    """CFGpp-diffusion/CFGpp ``latent_diffusion.py``: ``ddim_cfg++`` (VP: ``x̂0`` from ``ε_λ = ε_u + λ(ε_c − ε_u)``,
    re-noised with ``ε_u``) and ``euler_cfg++`` (k-diffusion: ``x̄_{i+1} = D_λ + σ̄_{i+1}(x̄_i − D_u)/σ̄_i``), three
    steps on the exact testbed; steer's ddim and euler with cfgpp give both."""
    import steer
    from steer.testbeds import gmm

    mix = gmm.toy(dim=2)
    path = get_path("vp-linear")
    den = mix.denoiser(path, "eps")
    labels = torch.arange(9) % 3
    z = torch.randn(9, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    ts, lam = [0.9, 0.6, 0.3, 0.0], 0.6
    a = [float(path.alpha(t)) for t in ts]
    s = [float(path.sigma(t)) for t in ts]

    def eps(x, t, i, lab):
        return (x - a[i] * mix.posterior_mean(x, a[i], s[i], lab)) / s[i]

    x_ddim = z * (a[0] ** 2 + s[0] ** 2) ** 0.5
    x_eul = x_ddim / a[0]
    for i in range(3):
        eu, ec = eps(x_ddim, ts[i], i, mix.null_label), eps(x_ddim, ts[i], i, labels)
        e_lam = eu + lam * (ec - eu)
        z0 = (x_ddim - s[i] * e_lam) / a[i]
        x_ddim = a[i + 1] * z0 + s[i + 1] * eu
        xv = a[i] * x_eul  # Euler in k-diffusion coordinates
        du = mix.posterior_mean(xv, a[i], s[i], mix.null_label)
        dc = mix.posterior_mean(xv, a[i], s[i], labels)
        x_eul = du + lam * (dc - du) + (s[i + 1] / a[i + 1]) * (x_eul - du) / (s[i] / a[i])
    for solver, ref in (("ddim", x_ddim), ("euler", a[-1] * x_eul)):
        got = steer.sample(den, noise=z, cond=labels, guidance=f"cfgpp(scale={lam})", solver=solver, timesteps=ts)
        assert _maxdiff(got, ref) < 1e-10, solver


def test_perp_neg_matches_the_official_aggregator():
    """Perp-Neg/Perp-Neg-stablediffusion ``pipeline_perpneg_stable_diffusion.py``: ``ε_∅ + w (δ_+ + Σ_j w_j
    perp(δ_j, δ_+))`` with negative weights ``w_j = −β`` and ``perp(x, y) = x − (⟨x, y⟩/‖y‖²) y`` (the official
    helper sums over the whole tensor: its pipeline runs one prompt at a time; here applied per sample). The
    defaults are the official README's example: weights ``1|-1.5`` (β = 1.5)."""
    ctx = _ctx(_vec(7))
    yp, y0, yn = _vec(8), _vec(9), _vec(10)
    w, beta = 7.5, 1.5
    got = g.perp_neg(w).combine({"cond": yp, "uncond": y0, "negative": yn}, ctx)
    ref = []
    for i in range(yp.shape[0]):
        dp, dn = yp[i] - y0[i], yn[i] - y0[i]
        perp = dn - (dn * dp).sum() / dp.pow(2).sum() * dp
        ref.append(y0[i] + w * (dp + (-beta) * perp))
    assert _maxdiff(got, torch.stack(ref)) < 1e-12


def test_cfg_rescale_matches_the_papers_algorithm_in_v_space():
    """Lin et al. (arXiv 2305.08891) Algorithm 2 on v predictions: ``σ_pos = std(v_c)``, ``σ_cfg = std(v_cfg)``
    per sample, ``v = φ v_cfg σ_pos/σ_cfg + (1 − φ) v_cfg``."""
    x = _vec(11)
    ctx = _ctx(x, 0.5, path="vp-scaled-linear", prediction="eps")
    c, u = _vec(12), _vec(13)
    vc, vu = ctx.to(c, "v"), ctx.to(u, "v")
    w, phi = 7.5, 0.7
    v_cfg = vu + w * (vc - vu)
    sd = lambda v: v.flatten(1).std(1).reshape(-1, 1, 1, 1)  # noqa: E731
    ref = phi * v_cfg * sd(vc) / sd(v_cfg) + (1 - phi) * v_cfg
    got = ctx.to(g.cfg_rescale(w, phi=phi).combine({"cond": c, "uncond": u}, ctx), "v")
    assert _maxdiff(got, ref) < 1e-10


def test_dynamic_thresholding_matches_imagen_as_diffusers_implements_it():
    """Saharia et al. (arXiv 2205.11487) §2.3 as diffusers' ``DDPMScheduler._threshold_sample``: ``s`` the p-quantile
    of ``|x̂0|`` per sample, clamped to ``[1, max_value]``, ``clip(x̂0, −s, s)/s``."""
    d = 2.5 * _vec(14)
    ref = []
    for row in d:
        s = torch.quantile(row.abs().flatten(), 0.995).clamp(1.0, 3.0)
        ref.append(torch.clamp(row, -s, s) / s)
    got = g.dynamic_threshold(0.995, max_value=3.0).apply(d, {}, _ctx(d))
    assert _maxdiff(got, torch.stack(ref)) < 1e-12


def test_mambo_matches_its_formula_in_velocity_space():
    """MAMBO-G (arXiv 2508.03442, the authors' quick start): ``w_eff = 1 + (w − 1) exp(−α ‖u_c − u_u‖/‖u_u‖)`` per
    sample, CFG with ``w_eff`` on velocities."""
    x = _vec(15)
    ctx = _ctx(x, 0.4)
    uc, uu = _vec(16), _vec(17)
    preds = {"cond": ctx.x0(uc, "flow"), "uncond": ctx.x0(uu, "flow")}
    got = ctx.to(g.mambo(10.0, alpha=0.5).combine(preds, ctx), "flow")
    w_eff = 1 + 9 * torch.exp(-0.5 * (_dot(uc - uu, uc - uu) / _dot(uu, uu)).sqrt())
    assert _maxdiff(got, (uu + w_eff * (uc - uu))) < 1e-12


def test_perturbation_attention_matches_pag_and_seg_at_infinite_sigma():
    """PAG (KU-CVLAB/Perturbed-Attention-Guidance processor: the perturbed rows' attention output is the value)
    and SEG at σ = ∞ (SusungHong/SEG-SDXL ``SEGCFGSelfAttnProcessor``: every query replaced by the spatial mean of
    the queries, then scaled dot-product attention)."""
    import torch.nn.functional as F

    from steer.models import hooks

    q, k, v = _vec(18, (2, 3, 16, 8)), _vec(19, (2, 3, 16, 8)), _vec(20, (2, 3, 16, 8))
    assert torch.equal(hooks.IdentityAttention().attention(q, k, v, (4, 4)), v)
    ref = F.scaled_dot_product_attention(q.mean(dim=2, keepdim=True).expand_as(q).contiguous(), k, v)
    assert _maxdiff(hooks.SmoothedEnergy(None, math.inf).attention(q, k, v, (4, 4)), ref) < 1e-12


def test_perturbation_terms_and_autoguidance_combine_as_the_official_code():
    """PAG/SEG/SLG pipelines: ``D_u + w(D_c − D_u) + s(D_c − D_p)`` (Stability-AI/sd3.5 ``SkipLayerCFGDenoiser``:
    ``scaled + (cond − skip)·slg_scale``); autoguidance (NVlabs/edm2 ``generate_images.py``):
    ``lerp(D_guide, D_main, w)``."""
    ctx = _ctx(_vec(21), t=0.95)  # σ̄ = 19: inside SLG's default window
    c, u, p = _vec(22), _vec(23), _vec(24)
    w, s = 4.0, 2.5
    for name in ("pag", "seg", "slg"):
        method = g.cfg(w) + getattr(g, name)(s + 1)
        got = method.combine({"cond": c, "uncond": u, name: p}, ctx)
        assert _maxdiff(got, (u + w * (c - u) + s * (c - p))) < 1e-12, name
    got = g.autoguidance(2.1, guide=lambda x, t, cond: x).combine({"cond": c, "guide": p}, ctx)
    assert _maxdiff(got, torch.lerp(p, c, 2.1)) < 1e-12


# ---------------------------------------------------------------------------------------------------
# SAG: one guidance evaluation against the authors' two code bases


class _MapAttention:
    """A self-attention site that, like the UNet of the authors' guided-diffusion fork (``QKVAttention``), can also
    return its weights ``softmax_s(q_t·k_s/√c)`` as ``[b·heads, T (queries), S (keys)]``; steer's hooks see the
    ordinary path (``attend``)."""

    def __new__(cls, dim, heads, gen):
        from steer.models import hooks

        class Site(hooks.AttentionSite):
            def __init__(self):
                super().__init__()
                self.heads = heads
                self.w_qkv = 1.5 * torch.randn(dim, 3 * dim, generator=gen, dtype=torch.float64)

            def forward(self, h, grid, want_map=False):
                b, n, d = h.shape
                q, k, v = (h @ self.w_qkv).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
                if not want_map:
                    return self.attend(q, k, v, grid).transpose(1, 2).reshape(b, n, d), None
                qf, kf, vf = (z.reshape(b * self.heads, n, -1) for z in (q, k, v))
                weight = torch.softmax(torch.einsum("btc,bsc->bts", qf, kf) / math.sqrt(qf.shape[-1]), dim=-1)
                out = torch.einsum("bts,bsc->btc", weight, vf).reshape(b, self.heads, n, -1)
                return out.transpose(1, 2).reshape(b, n, d), weight

        return Site()


class _SagModel:
    """A small class-conditional ε-model on vp-linear (float64): 3 channels, tokens pooled on a ``grid``×``grid``
    lattice, one self-attention (the only site: steer's default layer and the one the reference reads),
    ``ε = 0.5 x + tanh(upsampled attention output) + 0.1 t``."""

    def __init__(self, size=16, grid=4, dim=8, heads=2, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.path, self.prediction, self.sample_shape, self.grid = get_path("vp-linear"), "eps", (3, size, size), grid
        self.w_in = 2.0 * torch.randn(3, dim, generator=gen, dtype=torch.float64)
        self.w_out = torch.randn(dim, 3, generator=gen, dtype=torch.float64)
        self.labels = torch.randn(11, dim, generator=gen, dtype=torch.float64)
        self.attn = _MapAttention(dim, heads, gen)

    def sites(self):
        return {"mid.attn": self.attn}

    def null_cond(self, cond=None, batch=None):
        return torch.full((batch if batch is not None else len(cond),), 10, dtype=torch.long)

    def __call__(self, x, t, cond, want_map=False):
        import torch.nn.functional as F

        b, g = x.shape[0], self.grid
        tokens = F.adaptive_avg_pool2d(x, g).flatten(2).transpose(1, 2) @ self.w_in + self.labels[cond][:, None]
        h, weight = self.attn(tokens, (g, g), want_map)
        h = (h @ self.w_out).transpose(1, 2).reshape(b, 3, g, g)
        eps = 0.5 * x + torch.tanh(F.interpolate(h, size=x.shape[-2:], mode="nearest")) + 0.1 * t.reshape(-1, 1, 1, 1)
        return (eps, weight) if want_map else eps


def _tv_gaussian_blur(img, kernel_size, sigma, kernel_dtype=torch.float32):
    """torchvision ``GaussianBlur(kernel_size, sigma)`` (as the authors' code calls it; diffusers'
    ``gaussian_blur_2d`` is the same): 1-D kernel ``exp(−½(x/σ)²)`` on ``linspace(−(k−1)/2, (k−1)/2, k)``
    normalised (computed in float32 there), its outer product as one 2-D depthwise kernel, reflect padding k // 2."""
    import torch.nn.functional as F

    half = (kernel_size - 1) * 0.5
    pdf = torch.exp(-0.5 * (torch.linspace(-half, half, kernel_size, dtype=kernel_dtype) / sigma) ** 2)
    k1 = (pdf / pdf.sum()).to(img.dtype)
    c = img.shape[-3]
    k2 = (k1[:, None] @ k1[None, :]).expand(c, 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    return F.conv2d(F.pad(img, [pad, pad, pad, pad], mode="reflect"), k2, groups=c)


def _sag_mask(weight, b, heads, channels, size):
    """The official mask: mean over heads, sum over queries (attention each key token receives) ``> 1``, reshaped
    to the token grid, repeated over channels, nearest-upsampled (``F.interpolate``'s default)."""
    import torch.nn.functional as F

    n = weight.shape[-1]
    received = weight.reshape(b, heads, n, n).mean(1).sum(1)
    side = math.isqrt(n)
    mask = (received > 1.0).reshape(b, side, side).unsqueeze(1).repeat(1, channels, 1, 1).to(weight.dtype)
    return F.interpolate(mask, (size, size)), received


def _sag_sd_pipeline(model, x, t, labels, cfg_scale, sag_scale, kernel_dtype=torch.float32):
    """The authors' Stable Diffusion pipeline (SusungHong/Self-Attention-Guidance ``pipeline_stable_diffusion_sag.py``,
    ``__call__`` with CFG and ``sag_masking``; diffusers' ``StableDiffusionSAGPipeline`` is the same): CFG on ε; x̂0
    from the unconditional ε̂_u; the mask from the unconditional pass's map; 9-tap σ = 1 blur; re-noised with ε̂_u
    (``add_noise``); ``ε = ε_cfg + s (ε̂_u − ε(x̃_t, ∅))``. Returns the x̂0 of the final ε and the token sums."""
    tt = torch.tensor(t, dtype=torch.float64)
    a, s = float(model.path.alpha(tt)), float(model.path.sigma(tt))
    tv = torch.full((x.shape[0],), t, dtype=torch.float64)
    null = torch.full_like(labels, 10)
    eps_u, weight = model(x, tv, null, want_map=True)
    eps_c = model(x, tv, labels)
    eps = eps_u + cfg_scale * (eps_c - eps_u)
    x0 = (x - s * eps_u) / a
    mask, received = _sag_mask(weight, x.shape[0], model.attn.heads, x.shape[1], x.shape[-1])
    degraded = _tv_gaussian_blur(x0, 9, 1.0, kernel_dtype) * mask + x0 * (1 - mask)
    eps_deg = model(a * degraded + s * eps_u, tv, null)
    eps = eps + sag_scale * (eps_u - eps_deg)
    return (x - s * eps) / a, received


def _sag_guided_diffusion(model, x, t, labels, guide_scale, blur_sigma, kernel_dtype=torch.float32):
    """The paper's guided-diffusion fork (SusungHong/Self-Attention-Guidance ``gaussian_diffusion.py``, ``p_sample``
    / ``ddim_sample`` with ``attention_masking``), no CFG, ``clip_denoised=False``: ε̂ and the map of one pass,
    ``x̂0 = √(1/ᾱ) x − √(1/ᾱ − 1) ε̂``, mask, ``GaussianBlur(kernel_size=31, sigma=blur_sigma)``,
    ``q_sample(x̃0, t, noise=ε̂)``, ``ε = ε̃ + s (ε̂ − ε̃)`` with s = ``guide_scale``. Returns the x̂0 of the final ε."""
    tt = torch.tensor(t, dtype=torch.float64)
    a, s = float(model.path.alpha(tt)), float(model.path.sigma(tt))
    tv = torch.full((x.shape[0],), t, dtype=torch.float64)
    eps, weight = model(x, tv, labels, want_map=True)
    x0 = x / a - (s / a) * eps
    mask, received = _sag_mask(weight, x.shape[0], model.attn.heads, x.shape[1], x.shape[-1])
    degraded = _tv_gaussian_blur(x0, 31, blur_sigma, kernel_dtype) * mask + x0 * (1 - mask)
    eps_bar = model(a * degraded + s * eps, tv, labels)
    guided = eps_bar + guide_scale * (eps - eps_bar)
    return (x - s * guided) / a, received


def _steer_guided_x0(model, x, labels, t, spec):
    import steer

    it = steer.sampler(model, noise=x, cond=labels, guidance=spec, solver="euler", timesteps=[t, 0.0])
    assert torch.equal(it.x, x)  # VP: the loop starts at the noise itself
    return next(iter(it)).x0


def test_sag_with_cfg_matches_the_authors_stable_diffusion_pipeline():
    """One guidance evaluation of ``cfg(3) + sag(1.75)`` (SD pipeline: guidance_scale 3, sag_scale 0.75) on a
    16×16 ε-model whose 4×4-token attention map the reference reads itself: steer's x̂0 equals the re-implemented
    pipeline's to float64 precision (float64 kernel in the reference); with the official float32 kernel they
    differ by the kernel's rounding only."""
    model = _SagModel()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 16, 16, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 3, 7, 9])
    for t in (0.3, 0.7):
        ours = _steer_guided_x0(model, x, labels, t, "cfg(scale=3) + sag(scale=1.75)")  # with CFG: 'uncond'
        forced = _steer_guided_x0(model, x, labels, t, "cfg(scale=3) + sag(scale=1.75, source='uncond')")
        assert torch.equal(ours, forced)
        ref, received = _sag_sd_pipeline(model, x, t, labels, 3.0, 0.75, torch.float64)
        assert (received - 1).abs().min() > 1e-6  # no token on the threshold: both sides must pick the same mask
        assert 0 < (received > 1).float().mean() < 1  # a real mask, neither empty nor full
        assert _maxdiff(ours, ref) < 1e-10, t  # |x̂0| up to 60 at t = 0.7: relative 2e-14
        plain = _steer_guided_x0(model, x, labels, t, "cfg(scale=3)")
        assert (ours - plain).abs().max() > 1e-2  # SAG's term is not small here
        ref32, _ = _sag_sd_pipeline(model, x, t, labels, 3.0, 0.75, torch.float32)
        rel = float((ours - ref32).abs().max() / ref32.abs().max())
        key = "sag: the official float32 blur kernel vs steer's float64 one, relative to max |x̂0|"
        MEASURED[key] = max(MEASURED.get(key, 0.0), rel)
        assert rel < 1e-5  # measured 1.7e-6: the float32 kernel's rounding (6e-8) carried through the second pass


def test_sag_without_cfg_matches_the_papers_guided_diffusion_code():
    """``sag(scale=1.5, blur_sigma=3, kernel_size=31)`` alone (``source='auto'``: the conditional branch, as the
    official code without CFG) against the guided-diffusion fork's step
    (guide_scale 1.5 is steer's w; 31 taps, σ = 3 as its ImageNet 128 script) on a 32×32 image with an 8×8 token
    map (attn_res 8): equal to float64 precision. Steer's default 9 taps give another result at σ = 3."""
    model = _SagModel(size=32, grid=8, seed=1)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 3, 32, 32, generator=gen, dtype=torch.float64)
    labels = torch.tensor([1, 5, 10])
    t = 0.5
    ours = _steer_guided_x0(model, x, labels, t, "sag(scale=1.5, blur_sigma=3, kernel_size=31)")  # alone: 'cond'
    ref, received = _sag_guided_diffusion(model, x, t, labels, 1.5, 3.0, torch.float64)
    assert (received - 1).abs().min() > 1e-6 and 0 < (received > 1).float().mean() < 1
    assert _maxdiff(ours, ref) < 1e-12
    forced = _steer_guided_x0(model, x, labels, t, "sag(scale=1.5, blur_sigma=3, kernel_size=31, source='cond')")
    assert torch.equal(forced, ours)
    old_default = _steer_guided_x0(model, x, labels, t, "sag(scale=1.5, blur_sigma=3, kernel_size=31, source='uncond')")
    assert (old_default - ref).abs().max() > 1e-3  # steer's old default read the unconditional branch even alone
    nine = _steer_guided_x0(model, x, labels, t, "sag(scale=1.5, blur_sigma=3, source='cond')")
    assert (nine - ref).abs().max() > 1e-3  # the kernel size matters: the test can tell 9 taps from 31


# ---------------------------------------------------------------------------------------------------
# Solvers: the packaged accuracy table, Heun on vp-cosine


def _solver_table_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "solver_table.py"
    spec = importlib.util.spec_from_file_location("solver_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_packaged_solver_table_is_what_the_script_measures():
    """``steer solvers`` reads ``steer.solver_accuracy``; one cell recomputed by the script's own function."""
    from steer.solver_accuracy import ACCURACY, SAMPLES
    from steer.solvers import most_accurate

    cell = _solver_table_script().ode_error("euler", "vp-linear", 5, samples=SAMPLES)
    stored = ACCURACY["vp-linear"][5]["euler"]
    assert (cell["steps"], cell["nfe"]) == (stored["steps"], stored["nfe"])
    assert abs(cell["error"] - stored["error"]) < 1e-6 * stored["error"]
    best, entry = most_accurate("vp-linear", 5)
    assert entry["error"] == min(c["error"] for c in ACCURACY["vp-linear"][5].values())


def test_heun_on_vp_cosine_takes_euler_over_two_decades_of_sigma():
    """vp-cosine's default grid starts at σ̄ = 2.0e4 and steps to 6.4: the trapezoid over that step was off by
    1.9e2 at 10 NFE (256 samples); with the Euler fallback Heun's error is 0.067 there (DPM-Solver++(2M): 0.045)."""
    from steer.solvers import HEUN_MAX_RATIO

    st = _solver_table_script()
    heun = st.ode_error("heun", "vp-cosine", 10, samples=64)
    assert heun["nfe"] == 10 and heun["error"] < 0.1
    path = get_path("vp-cosine")
    grid = path.default_grid(heun["steps"])
    sb = path.sigma_bar(grid[:2])
    assert sb[0] > HEUN_MAX_RATIO * sb[1]  # the first step is such a step


# ---------------------------------------------------------------------------------------------------
# TPG on the digits network


@pytest.mark.parametrize("layers", [[f"blocks.{i}"] for i in range(6)] + [["blocks.*"]])
def test_tpg_on_the_digits_network_is_the_clean_prediction_shuffled(layers):
    """Every block of the digits DiT is permutation-equivariant over tokens (position embeddings are added once, at
    the input; attention has no positional bias; norms, MLPs and the output layer act per token), so shuffling the
    tokens entering any block(s) permutes the output patches of the clean prediction and changes nothing else: the
    TPG branch carries no information beyond a shuffle of ``D_c``, whatever ``layers`` says."""
    from steer.models import hooks
    from steer.testbeds import digits

    net = digits.load("flow").net
    gen = torch.Generator().manual_seed(5)
    x, t, y = torch.randn(4, 1, 8, 8, generator=gen), torch.rand(4, generator=gen), torch.tensor([0, 3, 7, 10])
    with torch.no_grad():
        clean = net(x, t, y)
        with hooks.perturb(net, {(0, 4): hooks.TokenShuffle(layers, seed=11)}):
            shuffled = net(x, t, y)
    # the permutations the hook draws, one per perturbed block, composed in block order
    draw, order = torch.Generator().manual_seed(11), torch.arange(16)
    for _ in range(6 if layers == ["blocks.*"] else 1):
        order = order[torch.randperm(16, generator=draw)]
    patches = clean.reshape(4, 1, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(4, 16, 4)  # token order of the net
    expected = patches[:, order].reshape(4, 4, 4, 1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(4, 1, 8, 8)
    assert _maxdiff(shuffled, expected) < 1e-5
    assert (shuffled - clean).abs().max() > 1e-2  # a real shuffle, not the identity


# ---------------------------------------------------------------------------------------------------
# Adaptive Guidance


def _adaptive_comfy(mix, z, labels, ts, w, threshold, crossing_cfg=True):
    """asagi4/ComfyUI-Adaptive-Guidance ``AdaptiveGuider.predict_noise`` (035cb39) in an Euler loop on the flow path,
    one sample at a time (the node's cosine flattens its whole batch): while not latched, both denoised predictions,
    the CFG combine, then the cosine test of the denoised predictions; once it passed, later steps use the
    conditional model alone. ``crossing_cfg=False``: the conditional prediction already on the crossing step."""
    out = []
    for k in range(z.shape[0]):
        x, lab, latched = z[k:k + 1], labels[k:k + 1], False
        for t, t_next in zip(ts[:-1], ts[1:]):
            dc = mix.posterior_mean(x, 1 - t, t, lab)
            if latched:
                d = dc
            else:
                du = mix.posterior_mean(x, 1 - t, t, torch.full_like(lab, mix.null_label))
                d = du + w * (dc - du)
                cos = torch.nn.functional.cosine_similarity(dc.reshape(1, -1), du.reshape(1, -1))
                latched = float(cos) >= threshold
                if latched and not crossing_cfg:
                    d = dc
            x = d + (t_next / t) * (x - d)  # Euler on the flow ODE, v = (x − D)/t
        out.append(x)
    return torch.cat(out)


def test_adaptive_guidance_matches_the_comfyui_node_and_the_cond_crossing_option():
    import steer
    from steer.testbeds import gmm

    mix = gmm.toy(dim=2)
    den = mix.denoiser(get_path("flow"), "x0")
    labels = torch.arange(12) % 3
    z = torch.randn(12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ts = [1.0 - i / 10 for i in range(10)] + [0.0]
    w, thr = 3.0, 0.95
    for crossing in ("cfg", "cond"):
        got = steer.sample(den, noise=z, cond=labels, solver="euler", timesteps=ts,
                           guidance=f"adaptive(scale={w}, threshold={thr}, crossing='{crossing}')")
        ref = _adaptive_comfy(mix, z, labels, ts, w, thr, crossing_cfg=crossing == "cfg")
        assert _maxdiff(got, ref) < 1e-10, crossing
    apart = (_adaptive_comfy(mix, z, labels, ts, w, thr) - ref).abs().max()
    MEASURED["adaptive: crossing 'cfg' vs 'cond', final samples"] = float(apart)
    assert apart > 1e-2  # the two rules differ on this run: the test tells them apart


# ---------------------------------------------------------------------------------------------------
# Skip-layer guidance's window


def test_slg_default_window_is_the_sd35_references_and_costs_nothing_outside():
    """Stability-AI/sd3.5 ``SkipLayerCFGDenoiser``: with N model evaluations, evaluation ``i`` gets the skip-layer
    term iff ``0.01 N < i < 0.20 N`` (SD3.5 Medium's ``sd3_infer.py`` config), on its flow schedule with shift 3
    (``σ = 3t/(1 + 2t)``, t from 1 down in N equal steps). steer's default window (12, 297] in σ̄ selects the same
    evaluations on that schedule at 10, 28, 40 and 50 steps; outside it slg asks for no branch and returns ``D_c``."""
    method = g.slg()
    for n in (10, 28, 40, 50):
        # sd3_infer's get_sigmas: timesteps linspace(1000 σ_max, 1000 σ_min), σ_min = σ(t = 0.001), each then shifted
        t = torch.linspace(1.0, 3e-3 / 1.002, n, dtype=torch.float64)
        sigma = 3 * t / (1 + 2 * t)
        official = [0.01 * n < i < 0.20 * n for i in range(n)]
        ours = []
        for i in range(n):
            x = torch.zeros(1, 2, dtype=torch.float64)
            ctx = Ctx.at(x, get_path("flow"), float(sigma[i]), i, None, "x0")
            ours.append(method.branches(ctx) == ("cond", "slg"))
        assert ours == official, n
    c, p = _vec(30), _vec(31)
    outside = _ctx(torch.zeros_like(c), t=0.5)  # σ̄ = 1
    assert method.branches(outside) == ("cond",)
    assert torch.equal(method.combine({"cond": c}, outside), c)
    inside = _ctx(torch.zeros_like(c), t=0.95)  # σ̄ = 19
    assert _maxdiff(method.combine({"cond": c, "slg": p}, inside), c + 2.5 * (c - p)) < 1e-12
    always = g.parse("slg(sigma_lo=0, sigma_hi=inf)")
    assert always.branches(outside) == ("cond", "slg") and g.parse(repr(always)).sigma_hi == math.inf


# ---------------------------------------------------------------------------------------------------
# Guidance interval with Heun


def _edm_sampler_with_interval(mix, latents, labels, w, start, stop, num_steps=32):
    """kynkaat/guidance-interval ``sampling/edm_sampler.py`` (d7a57db; EDM2's Heun sampler, S_churn = 0): 32 Karras
    steps (σ 80 → 0.002, ρ = 7, then 0); step ``i`` with ``start <= i <= stop`` uses the guided denoiser
    ``lerp(D_u, D_c, w)`` for its Euler evaluation and its Heun correction alike; the last step is Euler only."""
    i = torch.arange(num_steps, dtype=torch.float64)
    t_steps = (80.0 ** (1 / 7) + i / (num_steps - 1) * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    t_steps = torch.cat([t_steps, torch.zeros(1, dtype=torch.float64)])
    null = torch.full_like(labels, mix.null_label)
    x_next = latents * t_steps[0]
    for k, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        guided = start <= k <= stop

        def denoise(x, t):
            dc = mix.posterior_mean(x, 1.0, float(t), labels)
            return mix.posterior_mean(x, 1.0, float(t), null).lerp(dc, w) if guided else dc

        x_hat = x_next
        d_cur = (x_hat - denoise(x_hat, t_cur)) / t_cur
        x_next = x_hat + (t_next - t_cur) * d_cur
        if k < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next, t_steps


def test_guidance_interval_step_rule_matches_the_official_edm2_heun_sampler():
    """EDM2-S's FID setting (w = 2, steps 17–22 of 32). ``rule="step"`` with the interval (σ_23, σ_17] equals the
    official sampler to float precision; the default ``rule="sigma"`` decides each evaluation by its own σ̄, so at
    the two edges the Heun corrections differ (step 16's is guided, step 22's is not)."""
    import steer
    from steer.testbeds import gmm

    mix = gmm.toy(dim=2)
    den = mix.denoiser(get_path("edm"), "x0")
    labels = torch.arange(12) % 3
    latents = torch.randn(12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    ref, sig = _edm_sampler_with_interval(mix, latents, labels, 2.0, 17, 22)
    noise = latents * 80.0 / math.sqrt(80.0**2 + 1)  # steer starts from sqrt(α² + σ²)·noise
    lo, hi = float(sig[23]), float(sig[17])
    ts = (sig / 80.0).tolist()
    got = {rule: steer.sample(den, noise=noise, cond=labels, solver="heun", timesteps=ts,
                              guidance=f"cfg(scale=2, sigma_lo={lo!r}, sigma_hi={hi!r}, rule='{rule}')")
           for rule in ("step", "sigma")}
    assert _maxdiff(got["step"], ref) < 1e-10
    apart = (got["sigma"] - ref).abs().max()
    MEASURED["guidance interval: rule 'sigma' vs the official per-step rule, final samples"] = float(apart)
    assert apart > 1e-4  # the edges differ: the test tells the rules apart


# ---------------------------------------------------------------------------------------------------
# Defaults with a primary source


@pytest.mark.parametrize("steps, zeroed", [(10, 1), (28, 1), (50, 2), (100, 4)])
def test_cfg_zero_star_zero_inits_four_percent_of_the_steps_by_default(steps, zeroed):
    """WeichenFan/CFG-Zero-star README: "Adjust the zero-init steps based on total inference steps — 4% is
    generally a good starting point" (Wan2.1 T2V: 2 of 50 steps; SD3: 1 of 28). The default zeroes round(4 % of
    the steps), at least one: the same samples and NFE as the explicit count, zero-init steps evaluating nothing."""
    import steer
    from steer.testbeds import gmm

    mix = gmm.toy(dim=2)
    den = mix.denoiser(get_path("flow"), "flow")
    labels = torch.arange(6) % 3
    z = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    run = {spec: steer.sample(den, noise=z, cond=labels, solver="euler", steps=steps, guidance=spec, return_info=True)
           for spec in ("cfg_zero_star(scale=4)", f"cfg_zero_star(scale=4, zero_init_steps={zeroed})")}
    default, explicit = run.values()
    assert torch.equal(default.x, explicit.x) and default.nfe == explicit.nfe == 2 * (steps - zeroed)


def test_defaults_name_a_primary_source_or_say_steers_choice():
    """Each default named by issue 8 cites its primary source or says it is steer's choice, in the docstring and
    in ``steer methods`` (the registry's ``defaults_source``); Perp-Neg's β is the official 1.5."""
    from steer.guidance import REGISTRY

    assert REGISTRY["perp_neg"].defaults["neg_scale"] == 1.5
    for name, word in [("apg", "w = 10: steer's choice"), ("tag", "η_t = 1.05: steer's choice"),
                       ("adaptive", "threshold 0.991: steer's choice"), ("cfg_zero_star", "4 %"),
                       ("perp_neg", "β = 1.5: the official README"), ("slg", "sd3_infer.py")]:
        assert word in REGISTRY[name].defaults_source, name
    assert "steer's choice" in g.APG.__doc__ and "steer's choice" in g.TAG.__doc__
    assert "steer's choice" in g.Adaptive.__doc__ and "4%" in g.CFGZeroStar.__doc__


if __name__ == "__main__":  # the numbers of the README's fidelity table
    for name, fn in list(globals().items()):
        if name.startswith("test_"):
            params = {"test_fdg_default_is_the_papers_algorithm": [(2, 0.5), (3, 0.0), (2, 1.0)],
                      "test_tpg_on_the_digits_network_is_the_clean_prediction_shuffled": [(["blocks.*"],)],
                      "test_cfg_zero_star_zero_inits_four_percent_of_the_steps_by_default": [(50, 2)]}
            params = params.get(name, [()])
            for args in params:
                fn(*args)
    for name, d in MEASURED.items():
        print(f"{name}: {d:.1e}")
