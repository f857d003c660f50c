"""Fréchet distance between Gaussians fitted to two feature sets (the "F" of FID)."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch

from ._util import flat, flat_pair, to_numpy64

__all__ = ["frechet_distance", "frechet_distance_from_stats", "gaussian_stats"]

_METHODS = ("eigh", "sqrtm")


def gaussian_stats(feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a feature set, as fitted for the Fréchet distance.

    ``feats [N, ...]`` is flattened to ``[N, D]``; returns float64 NumPy arrays ``mu [D]`` and
    ``cov [D, D]``, the latter with the unbiased ``1/(N − 1)`` normalisation (as ``numpy.cov`` and the
    reference FID code). Needs ``N >= 2``.
    """
    f = flat(feats, "feats")
    if len(f) < 2:
        raise ValueError(f"need at least 2 samples to fit a covariance, got {len(f)}")
    f = to_numpy64(f, "feats")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _clip_noise(w: np.ndarray) -> np.ndarray:
    """Zero the eigenvalues of a symmetric PSD matrix that are at round-off level.

    ``eigh``/``eigvalsh`` are accurate to about ``D · eps · λ_max`` in absolute terms, so eigenvalues
    below ``10 · D · eps · λ_max`` (including negative round-off) are indistinguishable from 0; leaving
    them in would add ~``√(eps · λ_max)`` each to a sum of square roots (visible for singular
    covariances, e.g. fewer samples than feature dimensions).
    """
    cut = 10 * len(w) * np.finfo(np.float64).eps * max(float(w.max(initial=0.0)), 0.0)
    return np.where(w > cut, w, 0.0)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (round-off eigenvalues set to 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(_clip_noise(w))) @ v.T


def _trace_sqrt_product_eigh(a: np.ndarray, b: np.ndarray) -> float:
    # Tr (A B)^{1/2} = Tr (A^{1/2} B A^{1/2})^{1/2}: A B is similar to the symmetric PSD matrix
    # A^{1/2} B A^{1/2} (for A, B PSD), so both have the same real, non-negative eigenvalues λ_i and
    # the trace is Σ √λ_i; eigvalsh on a symmetric matrix never produces imaginary parts.
    s = _psd_sqrt(a)
    m = s @ b @ s
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(_clip_noise(lam)).sum())


def _trace_sqrt_product_sqrtm(a: np.ndarray, b: np.ndarray, eps: float) -> float:
    # The reference-FID recipe: scipy.linalg.sqrtm of the (non-symmetric) product; if that is not
    # finite (singular product), retry with eps·I added to both covariances; drop the imaginary
    # round-off scipy can return, refusing a large imaginary part.
    covmean = scipy.linalg.sqrtm(a @ b)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(len(a)) * eps
        covmean = scipy.linalg.sqrtm((a + offset) @ (b + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3 * max(1.0, np.abs(np.diagonal(covmean).real).max()):
            raise ValueError(f"sqrtm of the covariance product has a large imaginary component ({imag:.3g})")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b, *, method: str = "eigh", eps: float = 1e-6) -> float:
    """Fréchet (2-Wasserstein squared) distance between ``N(mu_a, cov_a)`` and ``N(mu_b, cov_b)``.

    Papers: D. C. Dowson and B. V. Landau, "The Fréchet distance between multivariate normal
    distributions", J. Multivariate Anal. 12, 1982 (the closed form); M. Heusel, H. Ramsauer,
    T. Unterthiner, B. Nessler and S. Hochreiter, "GANs Trained by a Two Time-Scale Update Rule
    Converge to a Local Nash Equilibrium", NeurIPS 2017, arXiv 1706.08500 (its use as FID).

    Formula::

        d² = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2})

    ``method="eigh"`` (default) evaluates ``Tr (Σ_a Σ_b)^{1/2}`` through the symmetric form
    ``Tr (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2}`` = Σ √λ_i with symmetric eigendecompositions (eigenvalues
    at round-off level, below ``10·D·eps·λ_max``, and negative ones set to 0): real by construction
    and accurate for singular covariances (e.g. fewer samples than feature dimensions).
    ``method="sqrtm"`` is the reference-FID recipe: ``scipy.linalg.sqrtm(Σ_a Σ_b)``, retried with
    ``eps·I`` added to both covariances when the result is not finite, tiny imaginary parts
    discarded (a large one raises ``ValueError``). Both agree to round-off on well-conditioned input.

    Conventions: ``mu_*`` of shape ``[D]``, ``cov_*`` ``[D, D]`` symmetric PSD (tensors or arrays);
    all arithmetic in float64. The result is clipped at 0 against round-off and returned as a float.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(_METHODS)}")
    mu_a, mu_b = np.atleast_1d(to_numpy64(mu_a, "mu_a")), np.atleast_1d(to_numpy64(mu_b, "mu_b"))
    cov_a, cov_b = np.atleast_2d(to_numpy64(cov_a, "cov_a")), np.atleast_2d(to_numpy64(cov_b, "cov_b"))
    d = mu_a.shape[0]
    if mu_a.shape != (d,) or mu_b.shape != (d,) or cov_a.shape != (d, d) or cov_b.shape != (d, d):
        raise ValueError(f"shape mismatch: mu_a {mu_a.shape}, cov_a {cov_a.shape}, "
                         f"mu_b {mu_b.shape}, cov_b {cov_b.shape}")
    diff = mu_a - mu_b
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(cov_a, cov_b)
    else:
        tr_covmean = _trace_sqrt_product_sqrtm(cov_a, cov_b, eps)
    value = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean)
    return max(value, 0.0)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor, *, method: str = "eigh", eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID when the features are
    Inception-v3 pool features; any feature space otherwise).

    Paper: M. Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium", NeurIPS 2017, arXiv 1706.08500.

    Formula: with ``μ, Σ`` the sample mean and unbiased (``1/(N − 1)``) sample covariance of each set,
    ``‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2})``; see :func:`frechet_distance_from_stats` for
    ``method`` and ``eps``.

    Conventions: ``feats_a [N, ...]``, ``feats_b [M, ...]`` flattened to ``[N, D]``, ``N, M >= 2``;
    float64. The plug-in estimate is biased upwards for finite samples (e.g. the mean term alone has
    expectation ``‖μ_a − μ_b‖² + (Tr Σ_a)/N + (Tr Σ_b)/M``), so compare values at equal sample sizes.
    """
    flat_pair(feats_a, feats_b, min_n=2)  # shape checks
    mu_a, cov_a = gaussian_stats(feats_a)
    mu_b, cov_b = gaussian_stats(feats_b)
    return frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b, method=method, eps=eps)
