"""Pixel-range diagnostics for generated images (over-saturation at high guidance scales)."""

from __future__ import annotations

import torch

from ._util import flat

__all__ = ["saturation"]


def saturation(x: torch.Tensor, lo: float = -1.0, hi: float = 1.0) -> dict[str, float]:
    """Range and contrast statistics of a batch of samples, to detect over-saturation.

    Papers (motivation; these statistics are simple diagnostics, not one paper's metric):
    C. Saharia et al., "Photorealistic Text-to-Image Diffusion Models with Deep Language
    Understanding" (Imagen), arXiv 2205.11487 — large guidance weights push ``x̂_0`` outside the
    data range [-1, 1] and give over-saturated images (hence static / dynamic thresholding);
    S. Sadat, O. Hilliges and R. M. Weber, "Eliminating Oversaturation and Artifacts of High
    Guidance Scales in Diffusion Models", arXiv 2410.02416.

    With ``x`` flattened to ``[N, D]`` (values ``x_{n,d}``, ``lo <= hi``), returns a dict:

    * ``"frac_out"``: fraction of all ``N·D`` values outside ``[lo, hi]``:
      ``mean_{n,d} 1[x_{n,d} < lo or x_{n,d} > hi]``;
    * ``"excess"``: mean distance of a value to the range, over *all* values (inside ones count 0):
      ``mean_{n,d} (max(0, lo − x_{n,d}) + max(0, x_{n,d} − hi))``; for the symmetric range
      ``[−b, b]`` this is ``mean max(0, |x| − b)``;
    * ``"contrast"``: mean over samples of the per-sample standard deviation,
      ``mean_n sqrt(mean_d (x_{n,d} − mean_d x_{n,d})²)`` (population std, ``1/D``);
    * ``"max_abs"``: mean over samples of the per-sample maximum absolute value, ``mean_n max_d |x_{n,d}|``.

    Conventions: ``x [N, ...]`` with all non-batch dims flattened (channels and pixels alike);
    float64. Values are Python floats.
    """
    if lo > hi:
        raise ValueError(f"need lo <= hi, got lo={lo}, hi={hi}")
    v = flat(x)
    if v.numel() == 0:
        raise ValueError("saturation of an empty tensor is undefined")
    below, above = (lo - v).clamp(min=0), (v - hi).clamp(min=0)
    return {
        "frac_out": float(((v < lo) | (v > hi)).double().mean()),
        "excess": float((below + above).mean()),
        "contrast": float(v.std(dim=1, correction=0).mean()),
        "max_abs": float(v.abs().amax(dim=1).mean()),
    }
