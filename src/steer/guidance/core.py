from __future__ import annotations

import torch

from ..spec import parse_spec

__all__ = ["Guidance", "CFG", "cfg", "parse", "REGISTRY"]


class Guidance:
    """Base class. ``branches(sigma)`` names the predictions needed at noise level ``sigma`` (σ̄ = σ/α);
    ``combine(preds, sigma)`` maps ``{branch: x0}`` to the guided x0 (or a ``Denoised``)."""

    name = "guidance"

    def reset(self) -> None:
        """Called at the start of every sampling call (clears any state, such as momentum)."""

    def branches(self, sigma: float) -> tuple[str, ...]:
        return ("cond",)

    def combine(self, preds: dict[str, torch.Tensor], sigma: float):
        return preds["cond"]


class CFG(Guidance):
    """Classifier-free guidance (Ho & Salimans 2022, Classifier-Free Diffusion Guidance, arXiv 2207.12598).

    ``D = D_u + w (D_c − D_u)`` in the w-form: w = 1 is the conditional model alone (and evaluates no
    unconditional branch). The same in ε, x0, v or flow space, since the conversions are affine with weights
    summing to one. Cost: 2 NFE per step (1 when w = 1), batched into one forward pass.
    """

    name = "cfg"

    def __init__(self, scale: float = 7.5):
        self.scale = float(scale)

    def branches(self, sigma):
        return ("cond",) if self.scale == 1 else ("cond", "uncond")

    def combine(self, preds, sigma):
        if self.scale == 1:
            return preds["cond"]
        u = preds["uncond"]
        return u + self.scale * (preds["cond"] - u)

    def __repr__(self):
        return f"cfg(scale={self.scale:g})"


def cfg(scale: float = 7.5) -> CFG:
    return CFG(scale)


REGISTRY = {"cfg": CFG}


def parse(spec: "str | Guidance | None") -> Guidance | None:
    """A guidance from ``None``, an instance or a spec string like ``"cfg(scale=4)"``."""
    if spec is None or isinstance(spec, Guidance):
        return spec
    name, args, kwargs = parse_spec(spec)
    if name not in REGISTRY:
        raise ValueError(f"unknown guidance method {name!r}; allowed: {', '.join(REGISTRY)}")
    try:
        return REGISTRY[name](*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad options for guidance {name!r}: {e}") from e
