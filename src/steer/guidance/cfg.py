"""The classifier-free guidance family: CFG, its modifiers (APG, CFG-Zero*, TCFG, MAMBO-G), CFG++, Adaptive
Guidance, FDG, characteristic guidance, Perp-Neg, and the output modifiers (rescale, TAG, dynamic thresholding).

All scales are in the w-form ``y_u + w (y_c − y_u)`` (w = 1: conditional only). Norms, dot products and statistics
are per sample over all non-batch dimensions, accumulated in float32 or better (float64 where ``_dot`` is used; half
precision inputs are multiplied in float32, so no sum of squares overflows float16's 65504) and cast back.
State that lives across steps (APG's momentum, Adaptive Guidance's latch) is kept in ``ctx.state[owner]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core import Denoised, Modifier
from ..spec import format_spec
from .core import SPACES, OutputModifier, Stack, Term, check_choice, register

__all__ = ["CFG", "APG", "ZeroStar", "TCFG", "MAMBO", "CFGZeroStar", "CFGPP", "Adaptive", "FDG", "Characteristic",
           "PerpNeg", "Rescale", "DynamicThreshold", "TAG", "cfg", "apg", "cfg_rescale", "cfgpp", "cfg_zero_star",
           "adaptive", "tcfg", "tag", "fdg", "characteristic", "dynamic_threshold", "mambo", "perp_neg",
           "laplacian_pyramid", "from_pyramid"]


def _dims(x: torch.Tensor) -> list[int]:
    return list(range(1, x.ndim))


def _wide(a: torch.Tensor) -> torch.Tensor:
    """``a`` in float32 if it is in half precision (float16, bfloat16), else ``a`` itself."""
    return a.float() if a.dtype in (torch.float16, torch.bfloat16) else a


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product, accumulated in float64 (shape [B, 1, ...])."""
    return torch.sum(_wide(a) * _wide(b), dim=_dims(a), keepdim=True, dtype=torch.float64)


def _dot32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product in float32 (torch's cascade summation: ~1e−7 relative on 10⁶ elements)."""
    return (_wide(a) * _wide(b)).sum(dim=_dims(a), keepdim=True)


def _norm(a: torch.Tensor) -> torch.Tensor:
    return _dot(a, a).sqrt()


def _project(v: torch.Tensor, onto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(parallel, orthogonal) parts of v relative to ``onto``, per sample; the projection coefficient
    ``⟨v, u⟩/⟨u, u⟩`` is accumulated in float64."""
    coef = (_dot(v, onto) / _dot(onto, onto).clamp_min(1e-300)).to(v.dtype)
    par = coef * onto
    return par, v - par


# The per-sample reductions below take the shortest path on each kind of device: on an accelerator, where a
# half-precision model's step is bound by kernel launches at small batch, the fewest operations (one batched
# product, one fused variance); on the CPU, where those are memory-bound, BLAS dot products.


def _gram(a: torch.Tensor, b: torch.Tensor, fused: bool | None = None) -> tuple[torch.Tensor, ...]:
    """Per-sample ``(⟨a, a⟩, ⟨a, b⟩, ⟨b, b⟩)``, shape [B, 1, ...] each, accumulated in float32 or better (float64
    for float32 inputs when fused; half-precision products are exact in float32, TF32 included). ``fused``
    (default: off the CPU) takes one batched product."""
    shape = (-1,) + (1,) * (a.ndim - 1)
    if not (a.device.type != "cpu" if fused is None else fused):
        a, b = _wide(a).flatten(1), _wide(b).flatten(1)
        return tuple(torch.linalg.vecdot(x, y).reshape(shape) for x, y in ((a, a), (a, b), (b, b)))
    acc = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else torch.float64
    m = torch.stack([a.flatten(1), b.flatten(1)], 1).to(acc)
    aa, ab, _, bb = torch.bmm(m, m.transpose(1, 2)).reshape(-1, 4, *shape[1:]).unbind(1)
    return aa, ab, bb


def _var(a: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
    """Per-sample unbiased variance (as torch.var) in float32 or better, shape [B, 1, ...]; ``fused`` (default: off
    the CPU) takes one ``var_mean``."""
    if a.device.type != "cpu" if fused is None else fused:
        return torch.var_mean(_wide(a), dim=_dims(a), keepdim=True)[0]
    flat = _wide(a).flatten(1)
    centred = flat - flat.mean(1, keepdim=True)  # two passes
    return (torch.linalg.vecdot(centred, centred) / (flat.shape[1] - 1)).reshape((-1,) + (1,) * (a.ndim - 1))


def _quantile(flat: torch.Tensor, p: float) -> torch.Tensor:
    """``torch.quantile(flat, p, dim=1)`` (linear interpolation) from the tail only, via topk."""
    n = flat.shape[1]
    pos = p * (n - 1)
    lo, frac = int(math.floor(pos)), pos - math.floor(pos)
    hi = min(lo + 1, n - 1)
    if p >= 0.5:
        top = torch.topk(flat, n - lo, dim=1).values  # descending: index j is order statistic n − 1 − j
        v_lo, v_hi = top[:, n - 1 - lo], top[:, n - 1 - hi]
    else:
        bot = torch.topk(flat, hi + 1, dim=1, largest=False).values
        v_lo, v_hi = bot[:, lo], bot[:, hi]
    return v_lo + frac * (v_hi - v_lo)


class CFG(Term):
    """Classifier-free guidance (Ho & Salimans 2022, Classifier-Free Diffusion Guidance, arXiv 2207.12598).

    ``D = D_u + w (D_c − D_u)``, w-form (Ho & Salimans' ``w_HS = w − 1``); a negative prompt is the ``uncond``
    conditioning. Space-independent (affine with weights summing to one). ``modifier`` (APG, ZeroStar, TCFG,
    MAMBO) changes how the two branches combine and its space. Cost: +1 NFE per step while active, batched with
    the conditional pass. Default w = 7.5 (diffusers).
    """

    name = "cfg"

    def __init__(self, scale: float = 7.5, modifier: Modifier | None = None, sigma_lo: float = 0.0,
                 sigma_hi: float = math.inf, schedule=None, when=None, clamp: float = 2.0, rule: str = "sigma"):
        if modifier is not None and not isinstance(modifier, Modifier):
            raise ValueError(f"{self.name}: modifier must be a modifier object such as steer.guidance.APG(...), got "
                             f"{modifier!r}; in a spec string use apg(scale=..., ...) instead (or tcfg, mambo)")
        super().__init__(scale, sigma_lo, sigma_hi, schedule, when, clamp, rule)
        self.modifier = modifier
        if modifier is not None:
            self.space = modifier.space

    def guide(self, yc, yu, w, ctx):
        return yu + w * (yc - yu) if self.modifier is None else self.modifier.guide(yc, yu, w, ctx)

    def options(self):
        out = super().options()
        if self.modifier is not None:
            out["modifier"] = self.modifier
        return out

    def _describe(self):
        options = self.options()
        modifier = options.pop("modifier", None)
        if modifier is None or modifier.name == "modifier":
            return super()._describe()
        return format_spec(modifier.name, {**options, **modifier.options()})  # apg(...), tcfg(...), mambo(...)


class APG(Modifier):
    """Adaptive projected guidance (Sadat, Hilliges & Weber, ICLR 2025, "Eliminating Oversaturation and
    Artifacts of High Guidance Scales in Diffusion Models", arXiv 2410.02416), Algorithm 1.

    In x0 space: ``Δ = D_c − D_u``; reverse momentum ``m ← Δ + β m`` (a running sum, β < 0; ``Δ ← m``); norm cap
    ``Δ ← Δ·min(1, r/‖Δ‖)`` (r = 0 disables); projection on ``D_c`` (inner products by ``_gram``),
    ``Δ_mod = Δ_⊥ + η Δ_∥``;
    ``D = D_c + (w − 1) Δ_mod``. η = 1, r = 0, β = 0 is CFG. The momentum buffer (state, one row per sample) starts
    empty at every sampling call and is updated at every model evaluation (twice per step with 2-stage solvers).
    Defaults η = 0 (the paper's recommendation), r = 15, β = −0.5 (paper Table 10, SDXL row, as quoted by the
    sd-webui-APG port). The scale of ``apg(...)``, w = 10, is steer's choice: no paper source was read for it (the
    paper uses w = 10–15; its SDXL row's w is reported as 15 by a secondary source, unverified).
    """

    name, space = "apg", "x0"

    def __init__(self, eta: float = 0.0, rescale: float = 15.0, momentum: float = -0.5, space: str = "x0"):
        if not -1 < momentum <= 0:
            raise ValueError(f"apg momentum must be in (-1, 0] (negative, as in the paper; |β| >= 1 diverges), "
                             f"got {momentum}")
        if rescale < 0:
            raise ValueError(f"apg rescale (the norm threshold r) must be >= 0, got {rescale}")
        check_choice(self.name, "space", space, SPACES)
        self.eta, self.rescale, self.momentum, self.space = float(eta), float(rescale), float(momentum), space

    def guide(self, yc, yu, w, ctx):
        delta = yc - yu
        if self.momentum != 0:
            m = ctx.state.get(self)
            delta = delta if m is None else torch.add(delta, m, alpha=self.momentum)
            ctx.state[self] = delta
        dd, dy, yy = _gram(delta, yc)
        coef = dy / yy.clamp_min(1e-300)  # Δ_∥ = coef · y_c
        # y_c + k (Δ_⊥ + η Δ_∥) with Δ_⊥ = Δ − coef·y_c and k = (w − 1) min(1, r/‖Δ‖), as one combination of y_c and Δ
        if self.rescale > 0:
            k = dd.clamp_min(1e-24).rsqrt() * (self.rescale * (w - 1))
            k = k.clamp_max(w - 1) if w >= 1 else k.clamp_min(w - 1)
            cy = torch.rsub(k * coef, 1, alpha=1 - self.eta)  # 1 − (1 − η) k coef
            return torch.addcmul(delta * k.to(delta.dtype), yc, cy.to(yc.dtype))
        return torch.addcmul(delta * (w - 1), yc, torch.rsub(coef, 1, alpha=(1 - self.eta) * (w - 1)).to(yc.dtype))


class ZeroStar(Modifier):
    """CFG-Zero*'s optimised scale (Fan et al. 2025, arXiv 2503.18886), in flow-velocity space:
    ``s* = ⟨u_c, u_u⟩ / (‖u_u‖² + 1e−8)`` per sample (float32, as the authors' code),
    ``u = s* u_u + w (u_c − s* u_u)``."""

    name, space = "zero_star", "flow"

    def __init__(self, space: str = "flow"):
        check_choice(self.name, "space", space, SPACES)
        self.space = space

    def guide(self, yc, yu, w, ctx):
        s = _dot32(yc, yu) / (_dot32(yu, yu) + 1e-8)  # float32, as the paper's code
        return torch.add(w * yc, yu * ((1 - w) * s).to(yu.dtype))  # = s* u_u + w (u_c − s* u_u)


class TCFG(Modifier):
    """Tangential damping CFG (Kwon et al., CVPR 2025, arXiv 2503.18137), in ε space: per sample, replace
    ``y_u`` by its component along the first right-singular vector ``v_1`` of ``[y_c; y_u]`` (2 × N), then CFG.
    ``v_1 ∝ Aᵀ e`` with ``e`` the top eigenvector of the 2×2 Gram matrix ``A Aᵀ`` (``_gram``), in closed form instead
    of a full SVD (no solver call, no host-device synchronisation): ``y_u ← a y_c + b y_u`` per sample."""

    name, space = "tcfg", "eps"

    def __init__(self, space: str = "eps"):
        check_choice(self.name, "space", space, SPACES)
        self.space = space

    def guide(self, yc, yu, w, ctx):
        cc, cu, uu = _gram(yc, yu)
        half = (cc - uu) / 2
        top = torch.hypot(half, cu) + (cc + uu) / 2  # λ, the largest eigenvalue of G = [[cc, cu], [cu, uu]]
        first = half >= 0  # its eigenvector e = (e0, e1), from the better-conditioned row of G − λ I
        e0, e1 = torch.where(first, top - uu, cu), torch.where(first, cu, top - cc)
        # v_1 ∝ p = e0 y_c + e1 y_u with ‖p‖² = λ‖e‖² and ⟨y_u, p⟩ = (G e)_1 = λ e1, so y_u's part along v_1 is
        # (e1/‖e‖²) p (0 when e = 0: then y_c ⟂ y_u with equal norms, and y_u's part along y_c, the tie's choice,
        # is 0 too); the result u_par + w (y_c − u_par) = (w + (1 − w) a) y_c + (1 − w) b y_u, (a, b) = e1 e/‖e‖²
        coef = e1 * (1 - w) / (e0 * e0 + e1 * e1).clamp_min(1e-300)
        return torch.addcmul(yc * (coef * e0 + w).to(yc.dtype), yu, (coef * e1).to(yu.dtype))


class MAMBO(Modifier):
    """MAMBO-G (Magnitude-Aware Mitigation for Boosted Guidance, arXiv 2508.03442): per sample
    ``w_eff = 1 + (w − 1) exp(−α ‖u_c − u_u‖ / ‖u_u‖)``, then CFG with ``w_eff``, in flow-velocity space (the
    paper's ratio of velocities; all its experiments are flow models). diffusers' MagnitudeAwareGuidance applies it
    to the raw model output (``space="raw"``). Defaults w = 10, α = 8 (the authors' quick start)."""

    name = "mambo"

    def __init__(self, alpha: float = 8.0, space: str = "flow"):
        check_choice(self.name, "space", space, SPACES)
        self.alpha, self.space = float(alpha), space

    def guide(self, yc, yu, w, ctx):
        diff = yc - yu
        ratio = (_dot32(diff, diff) / _dot32(yu, yu).clamp_min(1e-24)).sqrt()
        w_eff = 1.0 + (w - 1.0) * torch.exp(-self.alpha * ratio)
        return yu + w_eff.to(diff.dtype) * diff


class CFGZeroStar(CFG):
    """CFG-Zero* (Fan, Zheng, Yeh & Liu 2025, "CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching
    Models", arXiv 2503.18886): the optimised scale (``ZeroStar``) plus zero-init: the first
    ``zero_init_steps`` solver steps return zero velocity (x̂0 such that ``α̇ x̂0 + σ̇ ε̂ = 0``) and evaluate
    nothing. ``zero_init_steps=K`` zeroes K steps (diffusers' count; the official ``zero_steps=K−1``).
    Defaults: w = 4 (the authors' SD3 examples use 4–5); zero-init on 4 % of the solver steps, rounded, at least
    one (``zero_init_steps=None``): the official README's usage tip ("Adjust the zero-init steps based on total
    inference steps — 4% is generally a good starting point"; its Wan2.1 T2V setting zeroes 2 of 50 steps, its SD3
    default 1 of 28). Called outside a sampling loop (no grid) it zeroes the first step only."""

    name = "cfg_zero_star"
    ZERO_INIT_FRACTION = 0.04  # the official README's "4% of the total steps"

    def __init__(self, scale: float = 4.0, zero_init_steps: int | None = None, **kwargs):
        super().__init__(scale, modifier=ZeroStar(), **kwargs)
        if zero_init_steps is not None and zero_init_steps < 0:
            raise ValueError(f"zero_init_steps must be >= 0 (or None: 4 % of the steps), got {zero_init_steps}")
        self.zero_init_steps = None if zero_init_steps is None else int(zero_init_steps)

    def zeroed(self, ctx) -> int:
        """How many leading steps are zeroed: ``zero_init_steps``, or 4 % of the grid's steps (at least one)."""
        if self.zero_init_steps is not None:
            return self.zero_init_steps
        n = len(ctx.grid) - 1
        return max(1, math.floor(self.ZERO_INIT_FRACTION * n + 0.5)) if n > 0 else 1

    def skip_all(self, ctx):
        return ctx.step < self.zeroed(ctx)

    def branches(self, ctx):
        return () if self.skip_all(ctx) else super().branches(ctx)

    def combine(self, preds, ctx):
        if self.skip_all(ctx):
            return ctx.x0(torch.zeros_like(ctx.x), "flow")
        return super().combine(preds, ctx)

    def options(self):
        options = super().options()
        del options["modifier"]
        return {**options, "zero_init_steps": self.zero_init_steps}


class CFGPP(CFG):
    """CFG++ (Chung et al., ICLR 2025, "CFG++: Manifold-constrained Classifier Free Guidance for Diffusion
    Models", arXiv 2406.08070): the guided ``x̂0 = D_u + λ (D_c − D_u)`` with λ ∈ [0, 1], re-noised with the
    **unconditional** noise estimate ``ε̂_u``; multistep solvers keep ``D_u`` in their history. Works with the
    solvers that re-noise with a separate estimate: ddim, ddpm, euler, euler_ancestral, dpmpp_2m. λ = 1 still
    re-noises with ε̂_u, so the unconditional pass always runs (+1 NFE). Default λ = 0.6 (their SD1.5 example).
    """

    name = "cfgpp"
    needs_renoise = True
    always_neg = True

    def __init__(self, scale: float = 0.6, **kwargs):
        if not 0.0 <= scale <= 1.0:
            raise ValueError(f"cfgpp scale λ must be in [0, 1] (λ > 1 leaves the data manifold), got {scale}")
        super().__init__(scale, **kwargs)

    def combine(self, preds, ctx):
        if not self.active(ctx):
            return preds["cond"]
        du = preds["uncond"]
        d = du + self.weight(ctx) * (preds["cond"] - du)
        return Denoised(d, ctx.point.eps(ctx.x, du), du)


class Adaptive(CFG):
    """Adaptive Guidance (Castillo et al., AAAI 2025, "Adaptive Guidance: Training-free Acceleration of
    Conditional Diffusion Models", arXiv 2312.12487): CFG until the cosine similarity of the conditional and
    unconditional predictions (per sample) reaches ``threshold``, then the conditional model alone for the rest of
    the sampling call (a one-way latch per sample); once every sample has latched, the unconditional pass is no
    longer evaluated. ``test_space`` is where the cosine is taken: ``"x0"`` (default, as the ComfyUI
    Adaptive-Guidance node) or ``"eps"``. At high noise every ε prediction is ≈ x/σ, so the ε test passes at once:
    on the exact testbed (VP path, w = 3, 25 steps) it latches on the first step and removes the guidance, while the
    x0 test keeps it (tests/test_guidance.py).

    ``crossing`` is what the step whose test first passes returns: ``"cfg"`` (default) the CFG prediction, whose two
    evaluations are already paid, as the ComfyUI Adaptive-Guidance node (asagi4/ComfyUI-Adaptive-Guidance
    ``AdaptiveGuider.predict_noise``: the test runs after the CFG combine, the conditional model alone only from the
    next step), or ``"cond"`` the conditional prediction already on that step. The paper's text gives no code; the
    ComfyUI node is the most-used implementation. Per-sample cosine (the node flattens the whole batch into one
    vector: the same for a batch of one). Defaults: threshold 0.991, steer's choice (reference notes §8 report it
    for a 20-step LDM from a secondary source, unverified; the ComfyUI node uses 0.990); w = 7.5, steer's choice
    (the common CFG default)."""

    name = "adaptive"

    def __init__(self, scale: float = 7.5, threshold: float = 0.991, test_space: str = "x0", crossing: str = "cfg",
                 **kwargs):
        super().__init__(scale, **kwargs)
        if not -1 <= threshold <= 1:
            raise ValueError(f"adaptive threshold is a cosine similarity in [-1, 1], got {threshold}")
        check_choice(self.name, "test_space", test_space, SPACES)
        check_choice(self.name, "crossing", crossing, ("cfg", "cond"))
        self.threshold, self.test_space, self.crossing = float(threshold), test_space, crossing

    def active(self, ctx):
        if not super().active(ctx):
            return False
        latched = ctx.state.get(self)  # [B] bools, batch-first state
        if latched is None:
            return True
        done = ctx.state.get((self, "all latched"))  # (step, bool): skipping the pass needs the latch on the host,
        if done is None or done[0] != ctx.step:  # read once per step
            done = ctx.state[(self, "all latched")] = (ctx.step, bool(latched.all()))
        return not done[1]

    def combine(self, preds, ctx):
        if not self.active(ctx):
            return preds["cond"]
        space = ctx.space_at(self.test_space)
        ec, eu = ctx.pred(preds, "cond", space).flatten(1).float(), ctx.pred(preds, "uncond", space).flatten(1).float()
        cos = F.cosine_similarity(ec, eu, dim=1)
        before = ctx.state.get(self)
        latched = cos >= self.threshold if before is None else (cos >= self.threshold) | before
        ctx.state[self] = latched
        guided = super().combine(preds, ctx)
        if self.crossing == "cfg":  # the crossing step keeps CFG; the conditional model alone from the next step
            if before is None:
                return guided
            latched = before
        keep = latched.reshape(-1, *([1] * (guided.ndim - 1)))
        return torch.where(keep, preds["cond"], guided)

    def options(self):
        return {**super().options(), "threshold": self.threshold, "test_space": self.test_space,
                "crossing": self.crossing}


# ---------------------------------------------------------------------------------------------------
# FDG: Laplacian pyramid (Burt & Adelson), written here: 5×5 binomial blur with reflect padding, bilinear 2×.

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
_KERNELS: dict = {}  # (device, dtype) -> the 5×5 kernel, so no host-to-device copy per call


def _blur(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    key = (x.device, x.dtype)
    if key not in _KERNELS:
        k = _BINOMIAL.to(device=x.device, dtype=x.dtype)
        _KERNELS[key] = k[:, None] * k[None, :]
    k2 = _KERNELS[key].expand(c, 1, 5, 5)
    mode = "reflect" if min(h, w) > 2 else "replicate"  # reflect needs more pixels than the pad
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode=mode), k2, groups=c)


def _down(x):
    return F.interpolate(_blur(x), size=(x.shape[2] // 2, x.shape[3] // 2), mode="bilinear", align_corners=False)


def _up(x):
    return _blur(F.interpolate(x, size=(x.shape[2] * 2, x.shape[3] * 2), mode="bilinear", align_corners=False))


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Band-pass levels from high to low frequency, the last one the low-pass residual. ``x``: [B, C, H, W]
    with H and W divisible by 2^(levels − 1). ``from_pyramid`` inverts it exactly."""
    gauss = [x]
    for _ in range(levels - 1):
        gauss.append(_down(gauss[-1]))
    return [g - _up(g_next) for g, g_next in zip(gauss, gauss[1:])] + [gauss[-1]]


def from_pyramid(pyr: list[torch.Tensor]) -> torch.Tensor:
    img = pyr[-1]
    for level in reversed(pyr[:-1]):
        img = _up(img) + level
    return img


class FDG(CFG):
    """Frequency-decoupled guidance (Sadat et al. 2025, "Guidance in the Frequency Domain Enables High-Fidelity
    Sampling at Low CFG Scales", arXiv 2506.19713). Both predictions are split by a Laplacian pyramid; each level
    gets its own scale ``w_l``, with APG-style down-weighting ρ (``parallel_weight``) of the part of ``Δ^(l)``
    parallel to ``y_c^(l)``: ``y^(l) = y_c^(l) + (w_l − 1)(Δ_⊥^(l) + ρ Δ_∥^(l))`` (the paper's Algorithm 2,
    ``form="paper"``, default); the guided pyramid is reconstructed. ``form="diffusers"`` is diffusers'
    FrequencyDecoupledGuidance, ``y_u^(l) + w_l (Δ_⊥^(l) + ρ Δ_∥^(l))``: the two agree at ρ = 1 and differ by
    ``(1 − ρ) Δ_∥^(l)`` per level otherwise (the same defect as diffusers' APG default). With
    ``levels`` levels, the ``levels − 1`` band-pass levels use ``scale_high`` and the low-pass residual
    ``scale_low`` (or give ``scales`` high → low). Equal scales and no projection is CFG. Space x0 (the
    paper works on denoised predictions; without projection the space does not matter). Needs image-shaped
    samples [B, C, H, W] (video: frames in the batch); sizes are reflect-padded to a multiple of
    2^(levels − 1) and cropped back. Defaults w_low = 5, w_high = 10 (paper's SDXL example), 2 levels."""

    name = "fdg"

    def __init__(self, scale_low: float = 5.0, scale_high: float = 10.0, levels: int = 2, scales=None,
                 parallel_weight: float = 1.0, space: str = "x0", form: str = "paper", **kwargs):
        if scales is not None and (scale_low, scale_high, levels) != (5.0, 10.0, 2):
            raise ValueError("fdg: give either scales=[high, ..., low] or scale_low, scale_high and levels, not both")
        if levels < 2 and scales is None:
            raise ValueError(f"fdg needs levels >= 2, got {levels}")
        check_choice(self.name, "space", space, SPACES)
        check_choice(self.name, "form", form, ("paper", "diffusers"))
        self.form = form
        self.scales = ([float(s) for s in scales] if scales is not None
                       else [float(scale_high)] * (levels - 1) + [float(scale_low)])
        self.levels = len(self.scales)
        super().__init__(max(self.scales, key=lambda s: abs(s - 1)), **kwargs)
        self.scale_low, self.scale_high = self.scales[-1], self.scales[0]
        self.parallel_weight, self.space = float(parallel_weight), space

    def active(self, ctx):
        return super().active(ctx) or (self.in_interval(ctx) and any(s != 1 for s in self.scales))

    def guide(self, yc, yu, w, ctx):
        if yc.ndim != 4:
            raise ValueError(f"fdg needs image-shaped samples [B, C, H, W], got shape {tuple(yc.shape)}")
        h, w_ = yc.shape[-2:]
        m = 2 ** (self.levels - 1)
        ph, pw = (-h) % m, (-w_) % m
        if ph or pw:
            yc, yu = (F.pad(y, (0, pw, 0, ph), mode="reflect") for y in (yc, yu))
        pc, pu = laplacian_pyramid(yc, self.levels), laplacian_pyramid(yu, self.levels)
        out = []
        for lc, lu, s in zip(pc, pu, self.scales):
            delta = lc - lu
            if self.parallel_weight != 1.0:
                par, orth = _project(delta, lc)
                delta = orth + self.parallel_weight * par
            out.append(lc + (s - 1) * delta if self.form == "paper" else lu + s * delta)
        return from_pyramid(out)[..., :h, :w_]

    def options(self):
        options = super().options()
        del options["scale"]  # the largest of the scales, for the interval and schedule logic
        return {"scales": self.scales, "parallel_weight": self.parallel_weight, "space": self.space,
                "form": self.form, **options}


class Characteristic(CFG):
    """Characteristic guidance (Zheng & Lan, ICML 2024, "Characteristic Guidance: Non-linear Correction for
    Diffusion Model at Large Guidance Scale", arXiv 2312.07586), as the authors' WebUI extension computes it
    (scraed/CharacteristicGuidanceWebUI, ``scripts/CharaIte.py`` ``chara_ite_inner_loop``, "Num. Basis" 0).

    In EDM coordinates ``x̄ = x/α``, ``σ̄ = σ/α``: both branches are evaluated at shifted inputs, with the shift Δ
    the fixed point of ``Δ = P_λ[σ̄ (ε_u(x̄ + wΔ) − ε_c(x̄ + (w − 1)Δ))]``; the output is CFG of the shifted
    predictions, ``ε̂ = ε_u(x̄ + wΔ) + w (ε_c(x̄ + (w − 1)Δ) − ε_u(x̄ + wΔ))``, converted to x0 at the unshifted x
    (Δ = 0 is CFG). ``P_λ[v] = ⟨v, ĝ⟩ ĝ / (‖ĝ‖² + λ)`` projects on the per-sample direction ĝ of the Δ = 0
    correction with ridge λ (``reg=None``: P = identity).

    The solver is the reference's: the residual ``G = Δ − P_λ[σ̄(ε_u − ε_c)]`` (unprojected on the first
    iteration, as the reference) is extended by the annealed ridge: λ is an unknown too, ``r = sqrt(λ·reg_w)``
    with residual ``reg_size·(r − r*)``, started at ``λ = max(5, reg)`` and driven to
    ``λ* = reg·(ᾱ_min/ᾱ_t)^(1/reg_range)`` with ``ᾱ = 1/(1 + σ̄²)`` (``ᾱ_min``: the path's at its largest finite
    t, SD's ``alphas_cumprod[-1]`` on VP paths). ``(Δ, r)`` is updated by Anderson acceleration with one
    difference (``anderson=False``: the damped iteration ``X ← X − ℓ G``), step ℓ. A sample converges when the RMS
    of its residual (x̄ units, the ridge entry included) is below ``tol``; it keeps the predictions of that
    iteration, and a sample that does not converge in ``max_iter`` evaluations falls back to CFG (as the
    reference). ``reuse`` > 0 starts from the previous evaluation's shift times ``reuse·σ̄_t²/σ̄_prev²`` (the
    reference's "Reuse Correction", state in ``ctx.state``, one row per sample). ``reg_range=None`` keeps λ = reg
    throughout. The iteration runs on the x0 predictions (``σ̄(ε̂_u − ε̂_c) = Δ + D_c − D_u``; CFG of the shifted ε̂
    at x is CFG of the shifted D), so no large shifted input enters a difference; in half precision the tolerance
    is at least 4 ulps of the RMS of ``x/α + (D_c − D_u) + wΔ``, the rounding of what the residual is made of.

    Cost: 2 NFE per fixed-point evaluation after the first (the first reuses the branch pass unless a reused shift
    moves it), up to ``2·max_iter``; the reference spends 4 more per step (the Δ = 0 basis and a final pass, both
    reused here). One host-device synchronisation per iteration (the early exit reads whether every sample has
    converged). Not implemented: the reference's quantile-band bases ("Num. Basis" > 0) and its ControlNet
    handling. Defaults from the reference's UI: reg = 1, reg_range = 1, max_iter = 50, tol = 1e−4, ℓ = 1,
    reg_size = 0.4, reg_w = 0.5, reuse = 1."""

    name = "characteristic"

    def __init__(self, scale: float = 7.5, reg: float | None = 1.0, step: float = 1.0, tol: float = 1e-4,
                 max_iter: int = 50, reg_range: float | None = 1.0, anderson: bool = True, reuse: float = 1.0,
                 reg_size: float = 0.4, reg_w: float = 0.5, alpha_bar_min: float | None = None, **kwargs):
        super().__init__(scale, **kwargs)
        if reg is not None and reg < 0:
            raise ValueError(f"characteristic reg must be >= 0 or None, got {reg}")
        if reg_range is not None and reg_range <= 0:
            raise ValueError(f"characteristic reg_range must be > 0 or None (no annealing), got {reg_range}")
        if max_iter < 0 or tol <= 0 or reg_w <= 0:
            raise ValueError(f"characteristic needs max_iter >= 0, tol > 0 and reg_w > 0, got {max_iter}, {tol}, "
                             f"{reg_w}")
        self.reg, self.step, self.tol, self.max_iter = reg, float(step), float(tol), int(max_iter)
        self.reg_range, self.anderson, self.reuse = reg_range, bool(anderson), float(reuse)
        self.reg_size, self.reg_w, self.alpha_bar_min = float(reg_size), float(reg_w), alpha_bar_min

    def combine(self, preds, ctx):
        p = ctx.point
        if not self.active(ctx) or p.alpha == 0 or self.max_iter == 0:  # at α = 0 the ε carry no information
            return super().combine(preds, ctx)
        w, x, sb = self.weight(ctx), ctx.x, p.sigma_bar
        shape = (-1,) + (1,) * (x.ndim - 1)
        n = x[0].numel()
        # with x̄_i the shifted inputs and D_i the x0 predictions there, σ̄ ε̂_i = x̄_i − D_i, so the correction
        # σ̄(ε̂_u − ε̂_c) = Δ + D_c − D_u and CFG of the shifted ε̂ at the unshifted x is CFG of the D_i: no large shifted
        # input enters a difference (what keeps half precision usable)
        dc, du = preds["cond"], preds["uncond"]
        g0 = dc - du
        norm = _norm(g0).clamp_min(1e-4)  # the reference's floor
        ghat = (_wide(g0) / norm.to(_wide(g0).dtype)).to(g0.dtype)
        gg = _dot(ghat, ghat)

        def proj(v, lam):
            return v if self.reg is None else (_dot(v, ghat) / (gg + lam)).to(v.dtype) * ghat

        def evaluate(d):
            out = ctx.evaluate({"cond": torch.add(x, d, alpha=p.alpha * (w - 1)),
                                "uncond": torch.add(x, d, alpha=p.alpha * w)})
            return out["cond"], out["uncond"]

        anneal = self.reg is not None and self.reg_range is not None
        abar = 1 / (1 + sb * sb)
        if anneal:
            abar_min = self.alpha_bar_min
            if abar_min is None:
                abar_min = 1 / (1 + float(ctx.path.sigma_bar(ctx.path.t_max_finite)) ** 2)
            r_target = math.sqrt(self.reg * (abar_min / abar) ** (1 / self.reg_range) * self.reg_w)
            lam0 = max(5.0, self.reg)
        else:
            r_target, lam0 = 0.0, (self.reg or 0.0)
        r = torch.full((x.shape[0],) + shape[1:], math.sqrt(lam0 * self.reg_w), dtype=torch.float64, device=x.device)

        prev = ctx.state.get(self)
        d = torch.zeros_like(x)
        if self.reuse > 0 and prev is not None:
            d = prev["dx"] * (self.reuse * prev["abar"] * (1 - abar) / (abar * (1 - prev["abar"])))  # σ̄_t²/σ̄_prev²
            dc, du = evaluate(d)
        rms = lambda v: _wide(v).flatten(1).pow(2).mean(1).sqrt()  # noqa: E731
        half = _wide(x) is not x
        scale = rms(x) / p.alpha + rms(g0)  # in half precision, the rounding of the inputs and of D_c − D_u ...
        done = torch.zeros((x.shape[0],) + shape[1:], dtype=torch.bool, device=x.device)
        out_c, out_u, out_d = dc, du, torch.zeros_like(x)
        hist = None
        for it in range(self.max_iter):
            if it > 0:
                dc, du = evaluate(d)
            r = r.abs()  # the reference keeps λ = r²/reg_w and takes r = sqrt(λ reg_w) back
            lam = r * r / self.reg_w
            gx = du - dc if it == 0 else d - proj(d + (dc - du), lam)
            gr = self.reg_size * (r - r_target) if anneal else torch.zeros_like(r)
            res = ((_dot(gx, gx) + gr * gr) / (n + anneal)).sqrt()
            tol = self.tol
            if half:  # ... and of the shifted inputs bound the residual: the tolerance is at least 4 ulps of them
                tol = torch.clamp(4 * torch.finfo(x.dtype).eps * (scale + abs(w) * rms(d)), min=self.tol)
                tol = tol.reshape(res.shape)
            new = (res < tol) & ~done
            out_c, out_u = torch.where(new, dc, out_c), torch.where(new, du, out_u)
            out_d = torch.where(new, d, out_d)
            done = done | new
            if it == self.max_iter - 1 or bool(done.all()):
                break
            xd, xr, gd, grr = d, r, gx, gr
            if self.anderson and hist is not None:  # one difference: γ = ⟨ΔG, G⟩/‖ΔG‖² (the reference's lstsq)
                dgx, dgr = gx - hist[2], gr - hist[3]
                den = _dot(dgx, dgx) + dgr * dgr
                gamma = torch.where(den > 0, (_dot(dgx, gx) + dgr * gr) / torch.where(den > 0, den, 1.0), 0.0)
                xd, xr = d - (gamma.to(x.dtype) * (d - hist[0])), r - gamma * (r - hist[1])
                gd, grr = gx - gamma.to(x.dtype) * dgx, gr - gamma * dgr
            hist = (d, r, gx, gr)
            d, r = torch.add(xd, gd, alpha=-self.step), xr - self.step * grr
        ctx.state[self] = {"dx": out_d, "abar": abar}
        return torch.where(done, out_u + w * (out_c - out_u), super().combine(preds, ctx))

    def options(self):
        return {**super().options(), "reg": self.reg, "step": self.step, "tol": self.tol, "max_iter": self.max_iter,
                "reg_range": self.reg_range, "anderson": self.anderson, "reuse": self.reuse,
                "reg_size": self.reg_size, "reg_w": self.reg_w, "alpha_bar_min": self.alpha_bar_min}


class PerpNeg(Term):
    """Perp-Neg (Armandpour et al. 2023, "Re-imagine the Negative Prompt Algorithm", arXiv 2304.04968).

    Branches: the positive ``cond``, the empty ``uncond`` and the ``negative`` conditioning. With
    ``δ_+ = y_+ − y_∅``, ``δ_− = y_− − y_∅`` and ``δ_−^⊥ = δ_− − (⟨δ_−, δ_+⟩/‖δ_+‖²) δ_+`` per sample,
    ``ŷ = y_∅ + w (δ_+ − β δ_−^⊥)`` (the authors' pipeline and ComfyUI's PerpNegGuider, whose projection
    coefficient is batch-global; here it is per sample). Space-independent: every term is a difference of
    predictions, which a conversion scales by one factor. Cost: +2 NFE (three branches, one batch).
    Defaults w = 7.5 (the authors' pipeline), β = 1.5: the official README's examples
    (Perp-Neg/Perp-Neg-stablediffusion, ``--weights="1|-1.5"``, ``w_j = −β``; ComfyUI's PerpNegGuider uses 1)."""

    name = "perp_neg"
    space = "x0"

    def __init__(self, scale: float = 7.5, neg_scale: float = 1.5, space: str = "x0", **kwargs):
        super().__init__(scale, **kwargs)
        check_choice(self.name, "space", space, SPACES)
        self.neg_scale, self.space = float(neg_scale), space

    def active(self, ctx):
        return self.in_interval(ctx)

    def branches(self, ctx):
        return ("cond", "uncond", "negative") if self.active(ctx) else ("cond",)

    def combine(self, preds, ctx):
        if not self.active(ctx):
            return preds["cond"]
        yp, y0, yn = (ctx.pred(preds, k, self.space) for k in ("cond", "uncond", "negative"))
        dp, dn = yp - y0, yn - y0
        coef = (_dot(dn, dp) / _dot(dp, dp).clamp_min(1e-300)).to(dp.dtype)
        guided = y0 + self.weight(ctx) * (dp - self.neg_scale * (dn - coef * dp))
        return ctx.x0(guided, self.space)

    def options(self):
        return {**super().options(), "neg_scale": self.neg_scale, "space": self.space}


# ---------------------------------------------------------------------------------------------------
# Output modifiers


class Rescale(OutputModifier):
    """CFG rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    arXiv 2305.08891, §3.4): ``y_resc = y_cfg · std(y_c)/std(y_cfg)``, ``ŷ = φ y_resc + (1 − φ) y_cfg``, per
    sample. Space v by default, as in the paper (their model predicts v); ``space="raw"`` is diffusers'
    ``guidance_rescale`` on the model output. Default φ = 0.7 (paper)."""

    name, order = "rescale", 20

    def __init__(self, phi: float = 0.7, space: str = "v"):
        if not 0 <= phi <= 1:
            raise ValueError(f"rescale phi must be in [0, 1], got {phi}")
        check_choice(self.name, "space", space, SPACES)
        self.phi, self.space = float(phi), space

    def apply(self, d, preds, ctx):
        if self.phi == 0:
            return d
        space = ctx.space_at(self.space)
        y, yc = ctx.to(d, space), ctx.pred(preds, "cond", space)
        ratio = (_var(yc) / _var(y).clamp_min(1e-24)).sqrt()
        return ctx.x0(y * (ratio * self.phi + (1 - self.phi)).to(y.dtype), space)

    def options(self):
        return {"phi": self.phi, "space": self.space}


class DynamicThreshold(OutputModifier):
    """Dynamic thresholding (Saharia et al. 2022, Imagen, arXiv 2205.11487) on x̂0 of a pixel-space model in
    [−1, 1]: ``s = quantile_p(|x̂0|)`` per sample, ``s ← clamp(s, 1, max_value)``, ``x̂0 ← clip(x̂0, −s, s)/s``.
    Defaults p = 0.995 (diffusers), max_value = ∞ (the paper; diffusers' default 1.0 is static clipping)."""

    name, order = "dynamic_threshold", 90

    def __init__(self, percentile: float = 0.995, max_value: float = math.inf):
        if not 0 < percentile <= 1:
            raise ValueError(f"percentile must be in (0, 1], got {percentile}")
        self.percentile, self.max_value = float(percentile), float(max_value)

    def apply(self, d, preds, ctx):
        flat = d.flatten(1).float().abs()
        s = _quantile(flat, self.percentile).clamp(min=1.0, max=self.max_value)
        s = s.reshape(-1, *([1] * (d.ndim - 1))).to(d.dtype)
        return torch.clamp(d, -s, s) / s

    def options(self):
        return {"percentile": self.percentile, "max_value": self.max_value}


class TAG(OutputModifier):
    """Tangential amplifying guidance (Cho et al. 2025, arXiv 2510.04533), in the form of ComfyUI's node: the
    first-order update direction ``d = D − x̄`` (x̄ = x/α in EDM coordinates; x itself on flow paths) is split
    into its part along the state ``x`` and the rest, ``D̂ = x̄ + η_t d_⊥ + η_r d_∥``. η_t = η_r = 1 is the base
    sampler. Defaults: η_t = 1.05, steer's choice (ComfyUI's TangentialAmplifyingGuidance default, a secondary
    source; the paper's own value was not read), η_r = 1 (the paper: the radial part is kept).

    The paper defines TAG on the sampler's update ``Δ = x_{k−1} − x_k``. For one-evaluation first-order solvers
    (euler, ddim, ddpm, euler_ancestral) the update's deterministic part is proportional to ``D − x̄`` plus a radial
    term, so with η_r = 1 this form is the paper's (tests/test_guidance.py); multistep and multi-stage solvers
    (dpmpp_2m: 1.9 apart at η_t = 1.5, 8 steps, 7e−3 at 1.05, 25 steps, on the 2-D exact testbed,
    tests/test_fidelity.py) build their update from several x̂0, so ``sample`` refuses them
    with TAG."""

    name, order = "tag", 60
    first_order_only = True

    def __init__(self, eta: float = 1.05, eta_r: float = 1.0):
        self.eta, self.eta_r = float(eta), float(eta_r)

    def apply(self, d, preds, ctx):
        base = ctx.x if (ctx.path.kind == "flow" or ctx.point.alpha == 0) else ctx.x / ctx.point.alpha
        step = d - base
        par, orth = _project(step, ctx.x)
        return base + self.eta * orth + self.eta_r * par

    def options(self):
        return {"eta": self.eta, "eta_r": self.eta_r}


# ---------------------------------------------------------------------------------------------------
# Spec-string constructors


@register("cfg", family="cfg", paper="Ho & Salimans 2022, Classifier-Free Diffusion Guidance", arxiv="2207.12598",
          space="any (affine)", extra_nfe="+1", defaults_source="w = 7.5: diffusers ClassifierFreeGuidance")
def cfg(scale: float = 7.5, modifier: Modifier | None = None, sigma_lo: float = 0.0, sigma_hi: float = math.inf,
        schedule=None, when=None, clamp: float = 2.0, rule: str = "sigma") -> CFG:
    return CFG(scale, modifier, sigma_lo, sigma_hi, schedule, when, clamp, rule)


@register("cfg_rescale", family="cfg",
          paper="Lin et al. 2024, Common Diffusion Noise Schedules and Sample Steps are Flawed",
          arxiv="2305.08891", space="v (option)", extra_nfe="+1", defaults_source="w = 7.5, φ = 0.7: the paper §3.4")
def cfg_rescale(scale: float = 7.5, phi: float = 0.7, space: str = "v", **kwargs) -> Stack:
    return Stack([CFG(scale, **kwargs), Rescale(phi, space)])


@register("apg", family="cfg",
          paper="Sadat et al. 2025, Eliminating Oversaturation and Artifacts of High Guidance Scales in Diffusion "
                "Models",
          arxiv="2410.02416", space="x0", extra_nfe="+1",
          defaults_source="η = 0: the paper's recommendation; r = 15, β = −0.5: paper Table 10 (SDXL); "
                          "w = 10: steer's choice (no paper source read)")
def apg(scale: float = 10.0, eta: float = 0.0, rescale: float = 15.0, momentum: float = -0.5, space: str = "x0",
        **kwargs) -> CFG:
    return CFG(scale, APG(eta, rescale, momentum, space), **kwargs)


@register("cfgpp", family="cfg",
          paper="Chung et al. 2025, CFG++: Manifold-constrained Classifier Free Guidance for Diffusion Models",
          arxiv="2406.08070", space="x0 + ε_u re-noise", extra_nfe="+1",
          defaults_source="λ = 0.6: the authors' SD1.5 DDIM example")
def cfgpp(scale: float = 0.6, **kwargs) -> CFGPP:
    return CFGPP(scale, **kwargs)


@register("cfg_zero_star", family="cfg",
          paper="Fan et al. 2025, CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching Models",
          arxiv="2503.18886", space="flow velocity", extra_nfe="+1 (0 on zero-init steps, which evaluate nothing)",
          defaults_source="w = 4: the authors' SD3 examples; zero-init on 4 % of the steps (at least 1): the "
                          "official README's usage tip")
def cfg_zero_star(scale: float = 4.0, zero_init_steps: int | None = None, **kwargs) -> CFGZeroStar:
    return CFGZeroStar(scale, zero_init_steps, **kwargs)


@register("adaptive", family="cfg",
          paper="Castillo et al. 2025, Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models",
          arxiv="2312.12487", space="x0 cosine test (ε optional)", extra_nfe="+1 until every sample latches, then 0",
          defaults_source="threshold 0.991: steer's choice (a secondary source's value; ComfyUI's node: 0.990); x0 "
                          "test and CFG on the crossing step: ComfyUI Adaptive-Guidance; w = 7.5: steer's choice")
def adaptive(scale: float = 7.5, threshold: float = 0.991, test_space: str = "x0", crossing: str = "cfg",
             **kwargs) -> Adaptive:
    return Adaptive(scale, threshold, test_space, crossing, **kwargs)


@register("tcfg", family="cfg", paper="Kwon et al. 2025, TCFG: Tangential Damping Classifier-free Guidance",
          arxiv="2503.18137", space="ε", extra_nfe="+1",
          defaults_source="w = 7.5: steer's choice (diffusers' CFG default; no other parameter)")
def tcfg(scale: float = 7.5, space: str = "eps", **kwargs) -> CFG:
    return CFG(scale, TCFG(space), **kwargs)


@register("tag", family="cfg", paper="Cho et al. 2025, Tangential Amplifying Guidance",
          arxiv="2510.04533", space="sampler update (x0 − x̄)", extra_nfe="+1 when scale ≠ 1, else 0",
          defaults_source="η_t = 1.05: steer's choice (ComfyUI TangentialAmplifyingGuidance's default, a "
                          "secondary source); η_r = 1: the paper; scale 1 = TAG without CFG")
def tag(scale: float = 1.0, eta: float = 1.05, eta_r: float = 1.0, **kwargs):
    if scale == 1.0 and kwargs:
        raise ValueError(f"tag: {', '.join(kwargs)} would apply to its CFG term, which it has only with scale != 1")
    return TAG(eta, eta_r) if scale == 1.0 else Stack([CFG(scale, **kwargs), TAG(eta, eta_r)])


@register("fdg", family="cfg",
          paper="Sadat et al. 2025, Guidance in the Frequency Domain Enables High-Fidelity Sampling at Low CFG Scales",
          arxiv="2506.19713", space="x0 (Laplacian pyramid levels)", extra_nfe="+1",
          defaults_source="w_low = 5, w_high = 10: paper's SDXL example (via diffusers); 2 levels; "
                          "form='paper': the paper's Algorithm 2")
def fdg(scale_low: float = 5.0, scale_high: float = 10.0, levels: int = 2, scales: list[float] | None = None,
        parallel_weight: float = 1.0, space: str = "x0", form: str = "paper", **kwargs) -> FDG:
    return FDG(scale_low, scale_high, levels, scales, parallel_weight, space, form, **kwargs)


@register("characteristic", family="cfg",
          paper="Zheng & Lan 2024, Characteristic Guidance: Non-linear Correction for Diffusion Model at Large "
                "Guidance Scale",
          arxiv="2312.07586", space="ε", extra_nfe="+1, plus 2 per fixed-point evaluation (up to 2·max_iter)",
          defaults_source="reg 1, reg_range 1, ℓ = 1, tol = 1e−4 (x/α), 50 iterations, Anderson, reuse 1, "
                          "reg_size 0.4, reg_w 0.5: the reference WebUI (scraed/CharacteristicGuidanceWebUI)")
def characteristic(scale: float = 7.5, reg: float | None = 1.0, step: float = 1.0, tol: float = 1e-4,
                   max_iter: int = 50, reg_range: float | None = 1.0, anderson: bool = True, reuse: float = 1.0,
                   reg_size: float = 0.4, reg_w: float = 0.5, alpha_bar_min: float | None = None,
                   **kwargs) -> Characteristic:
    return Characteristic(scale, reg, step, tol, max_iter, reg_range, anderson, reuse, reg_size, reg_w,
                          alpha_bar_min, **kwargs)


@register("dynamic_threshold", family="output",
          paper="Saharia et al. 2022, Photorealistic Text-to-Image Diffusion Models with Deep Language Understanding "
                "(Imagen)",
          arxiv="2205.11487", space="x0 (pixel models)", extra_nfe="0",
          defaults_source="p = 0.995: diffusers; max_value = ∞: the paper (no cap)")
def dynamic_threshold(percentile: float = 0.995, max_value: float = math.inf) -> DynamicThreshold:
    return DynamicThreshold(percentile, max_value)


@register("mambo", family="cfg", paper="MAMBO-G: Magnitude-Aware Mitigation for Boosted Guidance",
          arxiv="2508.03442", space="flow velocity", extra_nfe="+1",
          defaults_source="w = 10, α = 8: the authors' quick start (and diffusers)")
def mambo(scale: float = 10.0, alpha: float = 8.0, space: str = "flow", **kwargs) -> CFG:
    return CFG(scale, MAMBO(alpha, space), **kwargs)


@register("perp_neg", family="cfg",
          paper="Armandpour et al. 2023, Re-imagine the Negative Prompt Algorithm: Transform 2D Diffusion into 3D",
          arxiv="2304.04968", space="any (differences)", extra_nfe="+2 (three branches)",
          defaults_source="w = 7.5: the authors' pipeline; β = 1.5: the official README's examples "
                          "(weights 1|-1.5; ComfyUI's PerpNegGuider: 1)")
def perp_neg(scale: float = 7.5, neg_scale: float = 1.5, space: str = "x0", **kwargs) -> PerpNeg:
    return PerpNeg(scale, neg_scale, space, **kwargs)
