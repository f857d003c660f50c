"""Guidance by a worse version of the conditional prediction: a perturbed network (PAG, SEG, TPG, skip-layer) or a
weaker model (autoguidance).

Each is a term ``D_c + (w − 1)(D_c − D_bad)`` in the w-form (the papers' s-form scale is ``s = w − 1``: diffusers'
``pag_scale=3`` is ``pag(scale=4)``), space-independent, stacking with the CFG family: ``cfg(3) + pag(4)`` is
``D_u + 3 (D_c − D_u) + 3 (D_c − D_p)``. The perturbed branch is the conditional input run with the perturbation on
its own rows of the same batched forward pass (``steer.models.hooks``); ``layers`` are site-name patterns, default
the model's middle block. Cost: +1 NFE per step while active.
"""

from __future__ import annotations

import math
from typing import Union

from ..core import Branch
from ..models import get_model, hooks
from .core import Term, check_choice, register

Layers = Union[str, int, list[Union[str, int]], None]  # site-name patterns or site indices; None: the middle block

__all__ = ["Branch", "Perturbed", "Autoguidance", "NAG", "NAGComfy", "SAG", "pag", "seg", "tpg", "slg",
           "autoguidance", "nag", "nag_comfy", "sag"]


class Perturbed(Term):
    """``D_c + (w − 1)(D_c − D_p)`` with ``D_p`` the conditional prediction under ``perturbation``."""

    space = "x0"

    def __init__(self, name: str, perturbation: hooks.Perturbation, scale: float, **kwargs):
        self.name = name
        super().__init__(scale, **kwargs)
        self.neg, self.perturbation = name, perturbation

    def reset(self):
        self.perturbation.reset()

    def branch_specs(self):
        return {self.name: Branch("cond", self.perturbation)}

    def options(self):
        p, options = self.perturbation, super().options()
        options["layers"] = _layers(p)
        if isinstance(p, hooks.SmoothedEnergy):
            options["blur_sigma"] = p.sigma
        if isinstance(p, hooks.TokenShuffle):
            options["seed"] = p.seed
        if isinstance(p, hooks.SkipLayer):  # its default window is not Term's (0, ∞)
            options.update(sigma_lo=self.sigma_lo, sigma_hi=self.sigma_hi)
        return options


def _layers(perturbation: hooks.Perturbation) -> list[str] | None:
    return None if perturbation.layers is None else list(perturbation.layers)


class Autoguidance(Term):
    """Autoguidance (Karras et al., NeurIPS 2024, "Guiding a Diffusion Model with a Bad Version of Itself",
    arXiv 2406.02507): ``D = D_0 + w (D_1 − D_0)`` with ``D_1`` the main model and ``D_0`` a weaker version of the same
    conditional model (smaller and/or shorter trained), both given the same condition (EDM2's generate_images.py).
    ``guide`` must be a Denoiser on the same path, or the name of a registered model (``steer.models.get_model``,
    e.g. the digits testbed's ``'flow-weak'``), which is moved to the sampling device. The guide's pass is a
    separate forward (a different network).
    Default w = 2.1 (paper Table 1, EDM2-S with an XS guide, FID)."""

    name, neg, space = "autoguidance", "guide", "x0"

    def __init__(self, scale: float = 2.1, guide=None, **kwargs):
        if guide is None:
            raise ValueError("autoguidance needs guide=, a weaker Denoiser of the same model (e.g. "
                             "steer.testbeds.digits.load('flow-weak'), or the name 'flow-weak')")
        if not (isinstance(guide, str) or callable(guide)):
            raise ValueError(f"autoguidance: guide must be a Denoiser or the name of a registered model such as "
                             f"'flow-weak', got {guide!r}")
        self.guide_name = guide if isinstance(guide, str) else None  # a registered model, so spec strings can use it
        super().__init__(scale, **kwargs)
        try:
            self.guide_model = get_model(guide) if isinstance(guide, str) else guide
        except ValueError as e:
            raise ValueError(f"autoguidance: {e}") from None

    def prepare(self, device):
        if self.guide_name is not None and hasattr(self.guide_model, "to"):
            self.guide_model = self.guide_model.to(device)

    def branch_specs(self):
        return {"guide": Branch("cond", None, self.guide_model)}

    def options(self):
        return {**super().options(), "guide": self.guide_name or self.guide_model}


@register("pag", family="perturbation",
          paper="Ahn et al. 2024, Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance",
          arxiv="2403.17377", space="any (affine)", extra_nfe="+1", needs_hooks=True,
          defaults_source="s = 3 (w = 4): the paper and diffusers' PAG pipelines; layers: the middle block")
def pag(scale: float = 4.0, layers: Layers = None, **kwargs) -> Perturbed:
    """PAG: the chosen self-attention maps are replaced by the identity (``SA(Q, K, V) = V``) in the perturbed pass."""
    return Perturbed("pag", hooks.IdentityAttention(layers), scale, **kwargs)


@register("seg", family="perturbation",
          paper="Hong 2024, Smoothed Energy Guidance: Guiding Diffusion Models with Reduced Energy Curvature of "
                "Attention",
          arxiv="2408.00760", space="any (affine)", extra_nfe="+1", needs_hooks=True,
          defaults_source="s = 3 (w = 4), σ = ∞: the official SEG pipeline; layers: the middle block")
def seg(scale: float = 4.0, blur_sigma: float = math.inf, layers: Layers = None,
        **kwargs) -> Perturbed:
    """SEG: the queries of the chosen self-attention layers are blurred over the token grid (σ = ∞: their mean)."""
    return Perturbed("seg", hooks.SmoothedEnergy(layers, blur_sigma), scale, **kwargs)


@register("tpg", family="perturbation", paper="Rajabi et al. 2025, Token Perturbation Guidance for Diffusion Models",
          arxiv="2506.10036", space="any (affine)", extra_nfe="+1", needs_hooks=True,
          defaults_source="s = 3 (w = 4): the official TPG pipeline; layers: the middle block")
def tpg(scale: float = 4.0, layers: Layers = None, seed: int = 0, **kwargs) -> Perturbed:
    """TPG: the tokens entering the chosen blocks are shuffled (one seeded permutation per call)."""
    return Perturbed("tpg", hooks.TokenShuffle(layers, seed), scale, **kwargs)


SLG_WINDOW = (12.0, 297.0)  # σ̄ of SD3.5's 20 % and 1 % of the steps (shift 3: σ̄ = 3t/(1 − t) at t = 0.8, 0.99)


@register("slg", family="perturbation", paper="Skip-layer guidance (Stability AI, SD3.5 reference code)",
          arxiv="-", space="any (affine)", extra_nfe="+1 inside its window (σ̄ in (12, 297]), 0 outside",
          needs_hooks=True,
          defaults_source="s = 2.5 (w = 3.5) and the window 1 %–20 % of the steps (σ̄ in (12, 297] on SD3.5's "
                          "shift-3 schedule): Stability-AI/sd3.5 sd3_infer.py; layers: the middle block (SD3.5 "
                          "Medium: 7, 8, 9)")
def slg(scale: float = 3.5, layers: Layers = None, sigma_lo: float = SLG_WINDOW[0], sigma_hi: float = SLG_WINDOW[1],
        when: tuple[float, float] | None = None, **kwargs) -> Perturbed:
    """Skip-layer guidance: the chosen blocks are skipped in the perturbed pass.

    Default window: Stability-AI/sd3.5 (``sd3_infer.py`` SD3.5 Medium config, ``sd3_impls.py``
    ``SkipLayerCFGDenoiser``) adds the term only on model evaluations ``i`` with ``0.01 N < i < 0.20 N`` (with CFG 4),
    i.e. between t = 0.99 and t = 0.8 of its flow schedule with shift 3, where ``σ̄ = 3t/(1 − t)``: σ̄ in (12, 297].
    Stated in σ̄, the window keeps its noise levels on any grid and step count (on an unshifted flow schedule it is
    t in (0.923, 0.997]; the first step, σ̄ = ∞, is outside as in the reference). Outside it the term costs no branch
    and returns the conditional prediction. ``sigma_lo=0, sigma_hi=inf`` (or ``when=(0, inf)``) applies it always."""
    if when is not None:
        sigma_lo, sigma_hi = 0.0, math.inf  # Term refuses both forms at once; when= replaces the default window
    return Perturbed("slg", hooks.SkipLayer(layers), scale, sigma_lo=sigma_lo, sigma_hi=sigma_hi, when=when, **kwargs)


@register("autoguidance", family="perturbation",
          paper="Karras et al. 2024, Guiding a Diffusion Model with a Bad Version of Itself",
          arxiv="2406.02507", space="any (affine)", extra_nfe="+1 (of the guide model)",
          defaults_source="w = 2.1: paper Table 1 (EDM2-S, XS guide, FID)")
def autoguidance(scale: float = 2.1, guide=None, **kwargs) -> Autoguidance:
    return Autoguidance(scale, guide, **kwargs)


class NAG(Term):
    """Normalized attention guidance as its authors wrote it (Chen et al., NeurIPS 2025, "Normalized Attention
    Guidance: Universal Negative Guidance for Diffusion Models", arXiv 2505.21179; official code
    ChenDarYen/Normalized-Attention-Guidance). In the cross-attention layers (UNet ``attn2``; the image tokens of a
    DiT's joint attention) the conditional branch's attention output is extrapolated away from the output of the
    *same* image queries against the negative prompt's keys/values, ``Z̃ = φ Z⁺ − (φ − 1) Z⁻``, its per-token norm
    ratio clipped at τ, ``Ẑ = Z̃ min(ρ, τ)/ρ``, and blended back, ``Z = α Ẑ + (1 − α) Z⁺``
    (``hooks.NormalizedCrossAttention``). The NAG-guided prediction *replaces the conditional branch*: with CFG,
    ``cfg(w) + nag(φ)`` is ``D_u + w (D_nag − D_u)`` in two rows (the official pipelines'), and alone (CFG 1, the
    distilled-model use) it is ``D_nag``. The negative keys/values come from the ``uncond`` rows (``negative`` with
    ``use_negative=True``) of the same batched pass, so the negative branch costs one row even at CFG 1.

    Defaults: φ = 5 (the official README's examples), τ = 2.5 (official code); ``norm``/``alpha`` None take the
    official code's choice per layer: L1 with α = 0.5 in UNet cross-attention (``NAGAttnProcessor2_0``, the SDXL
    pipeline; the paper's L1), L2 with α = 0.25 in joint attention (``NAGFluxAttnProcessor2_0``). Layers: every
    cross-attention / joint-attention layer (the official pipelines patch all of them).
    Joint attention (SD3, Flux): ``Z⁻`` uses the negative rows' text keys/values with the positive rows' image
    keys/values. By default the negative text stream is the unconditional branch's own (beside its own image tokens,
    so CFG can share those rows); ``own_negative=True`` gives NAG negative rows of its own that follow the official
    Flux code exactly (``NAGFluxAttnProcessor2_0`` and its transformer): their text attends to the NAG-guided image
    tokens, they enter the single-stream blocks with the guided image tokens, and their single-stream image outputs
    are the guided ones (one more row when CFG also runs; UNet cross-attention is the same either way).
    Models without cross-attention (the digits testbed) need ``nag_comfy``."""

    name, neg, space = "nag", "nag", "x0"

    def __init__(self, scale: float = 5.0, tau: float = 2.5, alpha: float | None = None, norm: str | None = None,
                 layers=None, use_negative: bool = False, own_negative: bool = False, **kwargs):
        super().__init__(scale, **kwargs)
        self.perturbation = hooks.NormalizedCrossAttention(layers or "*", scale, tau, alpha, norm, own_negative)
        self.ref = "negative" if use_negative else "uncond"
        self.rows = "nag_negative" if own_negative else self.ref
        self._layers = layers

    def branch_specs(self):
        specs = {"cond": Branch("cond", self.perturbation, None, self.rows)}
        if self.rows != self.ref:
            specs[self.rows] = Branch(self.ref)
        return specs

    def branches(self, ctx):
        self.perturbation.enabled = on = self.active(ctx)
        return ("cond", self.rows) if on else ("cond",)

    def combine(self, preds, ctx):
        return preds["cond"]

    def options(self):
        p = self.perturbation
        return {**super().options(), "tau": p.tau, "alpha": p.alpha, "norm": p.norm,
                "layers": None if self._layers is None else _layers(p), "use_negative": self.ref == "negative",
                "own_negative": p.own_negative}


class NAGComfy(Term):
    """NAG in the form of ComfyUI's NAGuidance node (a variant of Chen et al., arXiv 2505.21179): with ``Z⁺`` the
    self-attention (or joint-attention image-token) output of the positive branch and ``Z⁻`` that of a separate
    negative branch (each with its own queries), ``Z̃ = φ Z⁺ − (φ − 1) Z⁻``, ``ρ = ‖Z̃‖₁/‖Z⁺‖₁`` per token,
    ``Ẑ = Z̃ min(ρ, τ)/ρ``, ``Z = α Ẑ + (1 − α) Z⁺`` (``hooks.NormalizedAttention``). The result is the positive
    branch's prediction as a term: ``cfg(w) + nag_comfy(φ)`` is ``D_u + w (D_c − D_u) + (D_nag − D_c)`` in three rows,
    which differs from the official ``nag`` by ``(w − 1)(D_nag − D_c)`` and in where it acts. Works on models without
    cross-attention (the digits testbed). Defaults φ = 5, τ = 1.5, α = 0.5 (ComfyUI); L1 norm (the paper).
    Cost: +1 NFE (the negative branch). Before the official ``nag`` existed, ``nag`` meant this variant."""

    name, neg, space = "nag_comfy", "nag_comfy", "x0"

    def __init__(self, scale: float = 5.0, tau: float = 1.5, alpha: float = 0.5, layers=None,
                 use_negative: bool = False, **kwargs):
        super().__init__(scale, **kwargs)
        self.perturbation = hooks.NormalizedAttention(layers or "*.attn", scale, tau, alpha)
        self.ref = "negative" if use_negative else "uncond"

    def branch_specs(self):
        return {"nag_comfy": Branch("cond", self.perturbation, None, self.ref)}

    def branches(self, ctx):
        return ("nag_comfy", self.ref) if self.active(ctx) else ("cond",)

    def combine(self, preds, ctx):
        return preds["nag_comfy"] if self.active(ctx) else preds["cond"]

    def options(self):
        p = self.perturbation
        return {**super().options(), "tau": p.tau, "alpha": p.alpha, "layers": _layers(p),
                "use_negative": self.ref == "negative"}


class SAG(Term):
    """Self-attention guidance (Hong et al., ICCV 2023, "Improving Sample Quality of Diffusion Models Using
    Self-Attention Guidance", arXiv 2210.00939). The unconditional pass (the conditional one without CFG) records the
    self-attention of the chosen layer; tokens whose received attention (mean over heads, summed over queries) exceeds
    1 form a mask M (nearest-upsampled to the image); the prediction is degraded there,
    ``x̃0 = M ⊙ blur(x̂0) + (1 − M) ⊙ x̂0``, re-noised with the same noise estimate, ``x̃_t = α x̃0 + σ ε̂``, and
    evaluated again: ``D = D_guided + (w − 1)(x̃0 − D(x̃_t))`` (ComfyUI's denoised form; the SD pipelines'
    ``sag_scale`` is s = w − 1, the guided-diffusion code's ``guide_scale`` is w).
    The blur is torchvision's ``GaussianBlur(kernel_size, blur_sigma)`` as the official code calls it (the kernel
    ``exp(−r²/2σ²)`` on ``r = −(k−1)/2 … (k−1)/2``, normalised, reflect padding; the official code computes the kernel
    in float32, steer in float64 then in the prediction's dtype); where the image is too small for a reflect pad of
    ``k // 2`` (the official code raises), steer pads by replication. ``source``: the branch whose map,
    prediction and ε̂ are used and re-evaluated; ``"auto"`` (default), as the official code, takes the unconditional
    branch when a CFG-family term is stacked (the SD pipelines with CFG) and the conditional one otherwise (the SD
    pipelines without CFG, the paper's guided-diffusion code); ``"uncond"``/``"cond"`` force one.
    Defaults s = 0.75 (w = 1.75), σ = 1 with 9 taps: the diffusers SAG pipeline and the authors' Stable Diffusion
    pipeline (which defaults to s = 1); the authors' guided-diffusion runs use 31 taps with σ = 3 or 9 and
    ``guide_scale`` = w (1.01–1.5). Cost: +1 NFE, a second sequential pass (and the unconditional pass with
    ``source="uncond"`` when no CFG runs it)."""

    name, neg, space = "sag", "sag", "x0"

    def __init__(self, scale: float = 1.75, blur_sigma: float = 1.0, layers=None, source: str = "auto",
                 kernel_size: int = 9, **kwargs):
        super().__init__(scale, **kwargs)
        check_choice(self.name, "source", source, ("auto", "uncond", "cond"))  # auto: uncond with CFG, else cond
        if int(kernel_size) != kernel_size or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"sag: kernel_size must be an odd positive integer (9 in the Stable Diffusion pipelines, "
                             f"31 in the paper's guided-diffusion code), got {kernel_size!r}")
        if blur_sigma <= 0:
            raise ValueError(f"sag: blur_sigma must be > 0, got {blur_sigma!r}")
        self.blur_sigma, self.source, self.kernel_size = float(blur_sigma), source, int(kernel_size)
        self.src = "cond" if source == "auto" else source  # the branch used; 'auto' is resolved by bind()
        self.recorder = hooks.RecordAttention(layers)

    def reset(self):
        self.src = "cond" if self.source == "auto" else self.source

    def bind(self, stack):
        if self.source == "auto":
            cfg = any(getattr(t, "pos", None) == "cond" and getattr(t, "neg", None) == "uncond" for t in stack.terms)
            self.src = "uncond" if cfg else "cond"

    def branch_specs(self):  # the recorder rides on the source branch itself: no extra rows for it
        return {self.src: Branch(self.src, self.recorder), "sag_eval": Branch(self.src)}

    def branches(self, ctx):
        return ("cond", self.src) if self.active(ctx) and self.src != "cond" else ("cond",)

    def combine(self, preds, ctx):
        import torch

        if not self.active(ctx):
            return preds["cond"]
        d_src = preds[self.src]
        maps = self.recorder.maps  # [B, heads, tokens, tokens] of the source rows
        received = maps.mean(1).sum(1)  # attention each token receives
        b, n = received.shape
        x = ctx.x
        grid = _grid_of(n, x.shape[-2:])
        mask = (received > 1.0).float().reshape(b, 1, *grid)
        mask = torch.nn.functional.interpolate(mask, size=x.shape[-2:], mode="nearest").to(x.dtype)
        degraded = mask * _gaussian_blur(d_src, self.blur_sigma, self.kernel_size) + (1 - mask) * d_src
        x_deg = ctx.point.alpha * degraded + ctx.point.sigma * ctx.point.eps(x, d_src)
        d_again = ctx.evaluate({"sag_eval": x_deg})["sag_eval"]
        return preds["cond"] + (self.weight(ctx) - 1) * (degraded - d_again)

    def options(self):
        return {**super().options(), "blur_sigma": self.blur_sigma, "layers": _layers(self.recorder),
                "source": self.source, "kernel_size": self.kernel_size}


def _grid_of(n_tokens: int, size) -> tuple[int, int]:
    h, w = size
    for gh in range(1, n_tokens + 1):
        if n_tokens % gh == 0 and gh * w == (n_tokens // gh) * h:
            return gh, n_tokens // gh
    raise ValueError(f"cannot fit {n_tokens} attention tokens on a {h}×{w} image")


def _gaussian_blur(x, sigma: float, size: int = 9):
    import torch
    import torch.nn.functional as F

    r = torch.arange(size, dtype=torch.float64) - size // 2  # the kernel in float64, then in x's dtype
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = (k / k.sum()).to(device=x.device, dtype=x.dtype)
    c = x.shape[1]
    pad = size // 2
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    y = F.pad(x, (pad, pad, pad, pad), mode=mode)
    y = F.conv2d(y, k.reshape(1, 1, 1, -1).expand(c, 1, 1, size), groups=c)
    return F.conv2d(y, k.reshape(1, 1, -1, 1).expand(c, 1, size, 1), groups=c)


@register("nag", family="perturbation",
          paper="Chen et al. 2025, Normalized Attention Guidance: Universal Negative Guidance for Diffusion Models",
          arxiv="2505.21179", space="attention outputs (replaces the conditional branch)",
          extra_nfe="+1 (the negative rows; none beyond CFG's)", needs_hooks=True,
          defaults_source="φ = 5: official README; τ = 2.5 and, per layer, L1/α = 0.5 (UNet cross-attention) or "
                          "L2/α = 0.25 (joint attention): official code; all cross/joint attention layers")
def nag(scale: float = 5.0, tau: float = 2.5, alpha: float | None = None, norm: str | None = None,
        layers: Layers = None, use_negative: bool = False, own_negative: bool = False, **kwargs) -> NAG:
    return NAG(scale, tau, alpha, norm, layers, use_negative, own_negative, **kwargs)


@register("nag_comfy", family="perturbation",
          paper="Chen et al. 2025, Normalized Attention Guidance (ComfyUI NAGuidance variant)",
          arxiv="2505.21179", space="attention outputs", extra_nfe="+1 (the negative branch)", needs_hooks=True,
          defaults_source="φ = 5, τ = 1.5, α = 0.5: ComfyUI NAGuidance; all self-attention layers")
def nag_comfy(scale: float = 5.0, tau: float = 1.5, alpha: float = 0.5, layers: Layers = None,
              use_negative: bool = False, **kwargs) -> NAGComfy:
    return NAGComfy(scale, tau, alpha, layers, use_negative, **kwargs)


@register("sag", family="perturbation",
          paper="Hong et al. 2023, Improving Sample Quality of Diffusion Models Using Self-Attention Guidance",
          arxiv="2210.00939", space="x0", extra_nfe="+1 (sequential)", needs_hooks=True,
          defaults_source="s = 0.75 (w = 1.75), blur σ = 1 with 9 taps: the diffusers SAG pipeline (the authors' "
                          "Stable Diffusion pipeline: the same blur, s = 1); layer: the middle block")
def sag(scale: float = 1.75, blur_sigma: float = 1.0, layers: Layers = None, source: str = "auto",
        kernel_size: int = 9, **kwargs) -> SAG:
    return SAG(scale, blur_sigma, layers, source, kernel_size, **kwargs)
