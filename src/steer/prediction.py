"""Exact conversions among prediction kinds at fixed ``(x_t, t)`` on any path ``x_t = α x0 + σ ε``.

Kinds: ``eps`` (ε̂), ``x0`` (x̂0, the denoiser), ``v`` (``v = α ε − σ x0``, Salimans & Ho 2022),
``flow`` (the path's velocity ``u = α̇ x0 + σ̇ ε``; for rectified flow ``u = ε − x0``) and ``score``
(``∇ log p_t = −ε/σ``). Each conversion is affine in the prediction, so a round trip is the identity
to float precision. Coefficients are formed in float64 and cast to the prediction's dtype.
"""

from __future__ import annotations

import torch

from .paths import Path

KINDS = ("eps", "x0", "v", "flow", "score")

__all__ = ["KINDS", "convert", "check_kind"]


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown prediction kind {kind!r}; allowed: {', '.join(KINDS)}")
    return kind


def _coefs(path: Path, t, x: torch.Tensor):
    """(α, σ, α̇, σ̇) at t, shaped to broadcast against x (float64 math, cast to x's dtype)."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    shape = (-1,) + (1,) * (x.ndim - 1)
    return tuple(c.to(device=x.device, dtype=x.dtype).reshape(shape)
                 for c in (path.alpha(t), path.sigma(t), path.d_alpha(t), path.d_sigma(t)))


def _x0(y, kind, x, a, s, da=None, ds=None):
    """x̂0 from a prediction given the path coefficients at the point (floats or broadcastable tensors)."""
    if kind == "x0":
        return y
    if kind == "eps":
        return (x - s * y) / a
    if kind == "v":
        return (a * x - s * y) / (a * a + s * s)
    if kind == "flow":
        return (ds * x - s * y) / (ds * a - s * da)
    if kind == "score":
        return (x + s * s * y) / a
    raise ValueError(check_kind(kind))


def _eps(y, kind, x, a, s, da=None, ds=None):
    if kind == "eps":
        return y
    if kind == "x0":
        return (x - a * y) / s
    if kind == "v":
        return (s * x + a * y) / (a * a + s * s)
    if kind == "flow":
        return (a * y - da * x) / (ds * a - s * da)
    if kind == "score":
        return -s * y
    raise ValueError(check_kind(kind))


def convert(y: torch.Tensor, src: str, dst: str, x: torch.Tensor, t, path: Path) -> torch.Tensor:
    """Convert prediction ``y`` of kind ``src`` at ``(x, t)`` into kind ``dst``."""
    check_kind(src), check_kind(dst)
    if src == dst:
        return y
    a, s, da, ds = _coefs(path, t, x)
    if dst == "x0":
        return _x0(y, src, x, a, s, da, ds)
    eps = _eps(y, src, x, a, s, da, ds)
    if dst == "eps":
        return eps
    if dst == "score":
        return -eps / s
    x0 = _x0(y, src, x, a, s, da, ds)
    return a * eps - s * x0 if dst == "v" else da * x0 + ds * eps
