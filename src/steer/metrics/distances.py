"""Distances between two sample sets that need no feature network: energy distance (and its
permutation test), sliced Wasserstein distance, and the kernel maximum mean discrepancy.

All functions take tensors ``[N, ...]`` / ``[M, ...]``, flatten the non-batch dimensions (a sample
is the vector of its ``D`` entries) and compute in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._util import cdist_chunks, flat, flat_pair

__all__ = ["energy_distance", "energy_test", "sliced_wasserstein", "mmd"]


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Squared energy distance between two sample sets.

    Paper: G. J. Székely and M. L. Rizzo, "Energy statistics: A class of statistics based on
    distances", Journal of Statistical Planning and Inference 143(8), 2013 (no arXiv version).

    Formula::

        E(X, Y) = 2 E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖

    estimated with the plain mean over all ``N·M`` cross pairs and unbiased (U-statistic) within-set
    terms, i.e. ``Σ_{i≠j} ‖x_i − x_j‖ / (N(N − 1))``. It is zero in expectation iff the two
    distributions are equal (and may be slightly negative for finite samples).

    Conventions: inputs ``[N, ...]`` and ``[M, ...]`` with ``N, M >= 2``, flattened to vectors;
    Euclidean norm; float64. Returns a Python float.
    """
    x, y = flat(x), flat(y)
    n, m = len(x), len(y)
    dxy = torch.cdist(x, y).mean()
    dxx = torch.cdist(x, x).sum() / (n * (n - 1))
    dyy = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * dxy - dxx - dyy)


def energy_test(x: torch.Tensor, y: torch.Tensor, permutations: int = 200, seed: int = 0) -> tuple[float, float]:
    """Permutation test of equal distributions with the energy statistic: ``(distance, p-value)``.

    Paper: G. J. Székely and M. L. Rizzo, "Testing for equal distributions in high dimension",
    InterStat 5, 2004 (no arXiv version).

    The statistic is :func:`energy_distance` of the two sets; its null distribution is obtained by
    re-splitting the pooled sample ``z = [x; y]`` at random (``permutations`` times, generator seeded
    with ``seed``) into sets of the original sizes. The p-value is the add-one estimate
    ``(1 + #{null statistic >= observed}) / (1 + permutations)``, which is never 0.

    Conventions: as :func:`energy_distance` (flattened samples, float64); the ``(N+M)²`` distance
    matrix is computed once and held in memory.
    """
    x, y = flat(x), flat(y)
    z = torch.cat([x, y])
    n, N = len(x), len(x) + len(y)
    d = torch.cdist(z, z)
    gen = torch.Generator().manual_seed(seed)

    def stat(idx: torch.Tensor) -> float:
        a, b = idx[:n], idx[n:]
        m = N - n
        return float(2 * d[a][:, b].mean() - d[a][:, a].sum() / (n * (n - 1)) - d[b][:, b].sum() / (m * (m - 1)))

    observed = stat(torch.arange(N))
    null = [stat(torch.randperm(N, generator=gen)) for _ in range(permutations)]
    p = (1 + sum(s >= observed for s in null)) / (1 + permutations)
    return observed, p


def _wasserstein_1d_pp(px: torch.Tensor, py: torch.Tensor, p: float) -> torch.Tensor:
    """``W_p^p`` between the columns of ``px [N, P]`` and ``py [M, P]`` (each column one 1-D
    empirical distribution with uniform weights): ``∫_0^1 |F⁻¹(t) − G⁻¹(t)|^p dt``. Returns ``[P]``."""
    px, py = px.sort(dim=0).values, py.sort(dim=0).values
    n, m = len(px), len(py)
    if n == m:
        return (px - py).abs().pow(p).mean(dim=0)
    # Unequal sizes: both quantile functions are step functions, constant between consecutive
    # points of {i/N} ∪ {j/M}. Work in integer units of 1/L, L = lcm(N, M), so the breakpoints are
    # exact; on the interval (t_k, t_{k+1}) the quantile index of a set of size N is floor(t·N)
    # (0-based), evaluated at the midpoint where t·N is never an integer.
    L = n * m // math.gcd(n, m)
    t = torch.unique(torch.cat([torch.arange(n + 1) * (L // n), torch.arange(m + 1) * (L // m)]))  # sorted
    two_mid = t[:-1] + t[1:]
    ix = (two_mid * n) // (2 * L)
    iy = (two_mid * m) // (2 * L)
    w = (t[1:] - t[:-1]).double().to(px.device) / L
    return (w[:, None] * (px[ix.to(px.device)] - py[iy.to(px.device)]).abs().pow(p)).sum(dim=0)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 256, seed: int = 0, p: float = 2) -> float:
    """Monte-Carlo sliced Wasserstein-``p`` distance between two sample sets.

    Papers: J. Rabin, G. Peyré, J. Delon and M. Bernot, "Wasserstein Barycenter and its Application
    to Texture Mixing", SSVM 2011; N. Bonneel, J. Rabin, G. Peyré and H. Pfister, "Sliced and Radon
    Wasserstein Barycenters of Measures", J. Math. Imaging Vis. 51, 2015 (no arXiv versions).

    Formula::

        SW_p(μ, ν) = ( E_{θ ~ U(S^{D−1})} W_p^p(θ#μ, θ#ν) )^{1/p}

    where ``θ#μ`` is the law of ``⟨θ, X⟩`` and, in one dimension, ``W_p^p = ∫_0^1 |F⁻¹(t) − G⁻¹(t)|^p dt``
    with ``F⁻¹, G⁻¹`` the empirical quantile functions. The expectation over directions is replaced
    by the mean over ``projections`` directions drawn uniformly on the sphere (normalised standard
    Gaussians from a CPU ``torch.Generator`` seeded with ``seed``, so the result is reproducible and
    both sets see the same directions). Each 1-D ``W_p`` is exact: with equal sizes it is the mean of
    ``|x_(i) − y_(i)|^p`` over sorted projections; with unequal sizes the two step quantile functions
    are integrated exactly over the merged breakpoints ``{i/N} ∪ {j/M}``.

    Known values: in one dimension (``D = 1``) ``SW_p = W_p`` exactly; for ``y = x + m`` (every
    sample shifted by the same vector) ``SW_2² = mean_θ ⟨m, θ⟩²``, whose expectation is ``‖m‖²/D``.

    Conventions: inputs ``[N, ...]``, ``[M, ...]`` flattened to vectors; float64; ``p >= 1``.
    Returns a Python float.
    """
    x, y = flat_pair(x, y)
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    if projections < 1:
        raise ValueError(f"projections must be >= 1, got {projections}")
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(projections, x.shape[1], generator=gen, dtype=torch.float64)
    theta = (theta / theta.norm(dim=1, keepdim=True)).to(x.device)
    cost = _wasserstein_1d_pp(x @ theta.T, y @ theta.T, p)
    return float(cost.mean() ** (1.0 / p))


def _median_bandwidth(z: torch.Tensor, max_samples: int, seed: int) -> float:
    if len(z) > max_samples:
        idx = torch.randperm(len(z), generator=torch.Generator().manual_seed(seed))[:max_samples]
        z = z[idx.to(z.device)]
    d = torch.pdist(z)
    if d.numel() == 0:
        raise ValueError("the median heuristic needs at least 2 pooled samples")
    sigma = float(np.median(d.cpu().numpy()))
    if not sigma > 0:
        raise ValueError("median pairwise distance is 0 (most pooled samples coincide); pass bandwidth explicitly")
    return sigma


def _rbf_sum(a: torch.Tensor, b: torch.Tensor, gamma: float, chunk_size: int | None) -> float:
    """``Σ_ij exp(−γ ‖a_i − b_j‖²)``, accumulated chunk by chunk in float64."""
    total = 0.0
    for _, d in cdist_chunks(a, b, chunk_size):
        total += float(torch.exp(-gamma * d.square()).sum())
    return total


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None, *, chunk_size: int | None = None,
        median_samples: int = 2048, seed: int = 0) -> float:
    """Unbiased estimate of the squared maximum mean discrepancy with a Gaussian RBF kernel.

    Paper: A. Gretton, K. M. Borgwardt, M. J. Rasch, B. Schölkopf and A. Smola, "A Kernel Two-Sample
    Test", JMLR 13, 2012 (preprint "A Kernel Method for the Two-Sample Problem", arXiv 0805.2368).

    Kernel ``k(a, b) = exp(−‖a − b‖² / (2 σ²))`` (so ``0 < k <= 1``). Formula (``MMD²_u``)::

        MMD²_u = 1/(N(N−1)) Σ_{i≠j} k(x_i, x_j) + 1/(M(M−1)) Σ_{i≠j} k(y_i, y_j) − 2/(NM) Σ_{i,j} k(x_i, y_j)

    an unbiased estimator of ``E k(X, X') + E k(Y, Y') − 2 E k(X, Y)``, which is 0 iff the
    distributions are equal (the Gaussian kernel is characteristic). Being unbiased, the estimate can
    be slightly negative when the distributions are equal (for ``y = x`` exactly it equals
    ``−2 (1 − mean_{i≠j} k(x_i, x_j)) / N``).

    ``bandwidth=None``: the median heuristic (used by Gretton et al. 2012): ``σ`` = median Euclidean
    distance between distinct pairs of the pooled sample ``[x; y]``; when the pooled sample has more
    than ``median_samples`` points the median is taken over a random subset of that many (seeded
    with ``seed``), which keeps memory bounded.

    Conventions: inputs ``[N, ...]``, ``[M, ...]`` flattened to vectors, ``N, M >= 2``; float64;
    kernel sums are computed in row chunks (``chunk_size`` rows, default: 2**22 matrix entries per
    chunk). Returns ``MMD²_u`` as a Python float (squared, *not* square-rooted).
    """
    x, y = flat_pair(x, y, min_n=2)
    sigma = _median_bandwidth(torch.cat([x, y]), median_samples, seed) if bandwidth is None else float(bandwidth)
    if not sigma > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    gamma = 1.0 / (2.0 * sigma**2)
    n, m = len(x), len(y)
    kxx = (_rbf_sum(x, x, gamma, chunk_size) - n) / (n * (n - 1))  # diagonal terms are k(x, x) = 1
    kyy = (_rbf_sum(y, y, gamma, chunk_size) - m) / (m * (m - 1))
    kxy = _rbf_sum(x, y, gamma, chunk_size) / (n * m)
    return float(kxx + kyy - 2 * kxy)
