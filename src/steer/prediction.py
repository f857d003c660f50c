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

__all__ = ["KINDS", "convert", "to_x0", "to_eps", "check_kind"]


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown prediction kind {kind!r}; allowed: {', '.join(KINDS)}")
    return kind


def _coefs(path: Path, t, x: torch.Tensor, need_derivs: bool = False):
    t = torch.as_tensor(t, dtype=torch.float64)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    shape = (-1,) + (1,) * (x.ndim - 1)
    cast = lambda c: c.to(device=x.device, dtype=x.dtype).reshape(shape)  # noqa: E731
    a, s = path.alpha(t), path.sigma(t)
    if need_derivs:
        da, ds = path.d_alpha(t), path.d_sigma(t)
        return cast(a), cast(s), cast(da), cast(ds), cast(ds * a - s * da)
    return cast(a), cast(s), cast(a * a + s * s)


def to_x0(y: torch.Tensor, kind: str, x: torch.Tensor, t, path: Path) -> torch.Tensor:
    if kind == "x0":
        return y
    if kind == "flow":
        a, s, da, ds, det = _coefs(path, t, x, True)
        return (ds * x - s * y) / det
    a, s, n = _coefs(path, t, x)
    if kind == "eps":
        return (x - s * y) / a
    if kind == "v":
        return (a * x - s * y) / n
    if kind == "score":
        return (x + s * s * y) / a
    raise ValueError(check_kind(kind))


def to_eps(y: torch.Tensor, kind: str, x: torch.Tensor, t, path: Path) -> torch.Tensor:
    if kind == "eps":
        return y
    if kind == "flow":
        a, s, da, ds, det = _coefs(path, t, x, True)
        return (a * y - da * x) / det
    a, s, n = _coefs(path, t, x)
    if kind == "x0":
        return (x - a * y) / s
    if kind == "v":
        return (s * x + a * y) / n
    if kind == "score":
        return -s * y
    raise ValueError(check_kind(kind))


def convert(y: torch.Tensor, src: str, dst: str, x: torch.Tensor, t, path: Path) -> torch.Tensor:
    """Convert prediction ``y`` of kind ``src`` at ``(x, t)`` into kind ``dst``."""
    check_kind(src), check_kind(dst)
    if src == dst:
        return y
    if dst == "x0":
        return to_x0(y, src, x, t, path)
    if dst == "eps":
        return to_eps(y, src, x, t, path)
    if dst == "score":
        a, s, _ = _coefs(path, t, x)
        return -to_eps(y, src, x, t, path) / s
    x0, eps = to_x0(y, src, x, t, path), to_eps(y, src, x, t, path)
    if dst == "v":
        a, s, _ = _coefs(path, t, x)
        return a * eps - s * x0
    a, s, da, ds, _ = _coefs(path, t, x, True)
    return da * x0 + ds * eps
