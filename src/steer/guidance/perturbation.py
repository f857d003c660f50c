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
from dataclasses import dataclass
from typing import Any

from ..models import hooks
from .core import Term, register

__all__ = ["Branch", "Perturbed", "Autoguidance", "pag", "seg", "tpg", "slg", "autoguidance"]


@dataclass(frozen=True)
class Branch:
    """How to evaluate a branch: which conditioning, with which perturbation, through which model."""

    cond: str = "cond"
    perturbation: hooks.Perturbation | None = None
    model: Any = None  # None: the sampled model


class Perturbed(Term):
    """``D_c + (w − 1)(D_c − D_p)`` with ``D_p`` the conditional prediction under ``perturbation``."""

    space = "x0"

    def __init__(self, name: str, perturbation: hooks.Perturbation, scale: float, **kwargs):
        super().__init__(scale, **kwargs)
        self.name, self.neg, self.perturbation = name, name, perturbation

    def branch_specs(self):
        return {self.name: Branch("cond", self.perturbation)}

    def options(self):
        return {**super().options(), "layers": list(self.perturbation.layers) if self.perturbation.layers else "mid"}


class Autoguidance(Term):
    """Autoguidance (Karras et al., NeurIPS 2024, "Guiding a Diffusion Model with a Bad Version of Itself",
    arXiv 2406.02507): ``D = D_0 + w (D_1 − D_0)`` with ``D_1`` the main model and ``D_0`` a weaker version of the same
    conditional model (smaller and/or shorter trained), both given the same condition (EDM2's generate_images.py).
    ``guide`` must be a Denoiser on the same path. The guide's pass is a separate forward (a different network).
    Default w = 2.1 (paper Table 1, EDM2-S with an XS guide, FID)."""

    name, neg, space = "autoguidance", "guide", "x0"

    def __init__(self, scale: float = 2.1, guide=None, **kwargs):
        if guide is None:
            raise ValueError("autoguidance needs guide=, a weaker Denoiser of the same model (e.g. "
                             "steer.testbeds.digits.load('flow-weak'), or the name 'flow-weak')")
        if isinstance(guide, str):  # a digits testbed model by name, so spec strings can use it
            from ..testbeds import digits

            guide = digits.load(guide)
        super().__init__(scale, **kwargs)
        self.guide_model = guide

    def branch_specs(self):
        return {"guide": Branch("cond", None, self.guide_model)}

    def options(self):
        return {**super().options(), "guide": type(self.guide_model).__name__}


@register("pag", family="perturbation", paper="Ahn et al. 2024, Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance",
          arxiv="2403.17377", space="any (affine)", extra_nfe="+1", needs_hooks=True,
          defaults_source="s = 3 (w = 4): the paper and diffusers' PAG pipelines; layers: the middle block")
def pag(scale: float = 4.0, layers=None, **kwargs) -> Perturbed:
    """PAG: the chosen self-attention maps are replaced by the identity (``SA(Q, K, V) = V``) in the perturbed pass."""
    return Perturbed("pag", hooks.IdentityAttention(layers), scale, **kwargs)


@register("seg", family="perturbation", paper="Hong 2024, Smoothed Energy Guidance: Guiding Diffusion Models with Reduced Energy Curvature of Attention",
          arxiv="2408.00760", space="any (affine)", extra_nfe="+1", needs_hooks=True,
          defaults_source="s = 3 (w = 4), σ = ∞: the official SEG pipeline; layers: the middle block")
def seg(scale: float = 4.0, blur_sigma: float = math.inf, layers=None, **kwargs) -> Perturbed:
    """SEG: the queries of the chosen self-attention layers are blurred over the token grid (σ = ∞: their mean)."""
    return Perturbed("seg", hooks.SmoothedEnergy(layers, blur_sigma), scale, **kwargs)


@register("tpg", family="perturbation", paper="Rajabi et al. 2025, Token Perturbation Guidance for Diffusion Models",
          arxiv="2506.10036", space="any (affine)", extra_nfe="+1", needs_hooks=True,
          defaults_source="s = 3 (w = 4): the official TPG pipeline; layers: the middle block")
def tpg(scale: float = 4.0, layers=None, seed: int = 0, **kwargs) -> Perturbed:
    """TPG: the tokens entering the chosen blocks are shuffled (one seeded permutation per call)."""
    return Perturbed("tpg", hooks.TokenShuffle(layers, seed), scale, **kwargs)


@register("slg", family="perturbation", paper="Skip-layer guidance (Stability AI, SD3.5 reference code)",
          arxiv="-", space="any (affine)", extra_nfe="+1", needs_hooks=True,
          defaults_source="s = 2.5 (w = 3.5): SD3.5's sd3_infer.py; layers: the middle block (SD3.5 Medium: 7, 8, 9)")
def slg(scale: float = 3.5, layers=None, **kwargs) -> Perturbed:
    """Skip-layer guidance: the chosen blocks are skipped in the perturbed pass."""
    return Perturbed("slg", hooks.SkipLayer(layers), scale, **kwargs)


@register("autoguidance", family="perturbation", paper="Karras et al. 2024, Guiding a Diffusion Model with a Bad Version of Itself",
          arxiv="2406.02507", space="any (affine)", extra_nfe="+1 (of the guide model)",
          defaults_source="w = 2.1: paper Table 1 (EDM2-S, XS guide, FID)")
def autoguidance(scale: float = 2.1, guide=None, **kwargs) -> Autoguidance:
    return Autoguidance(scale, guide, **kwargs)
