"""Distances between sample sets (for the exact testbed). Issue-4 metrics build on this module."""

from __future__ import annotations

import torch

__all__ = ["energy_distance", "energy_test"]


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).double()


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Squared energy distance ``2 E|X − Y| − E|X − X'| − E|Y − Y'|`` (Székely & Rizzo), unbiased
    (U-statistic) within-set terms. Zero in expectation iff the distributions are equal."""
    x, y = _flat(x), _flat(y)
    n, m = len(x), len(y)
    dxy = torch.cdist(x, y).mean()
    dxx = torch.cdist(x, x).sum() / (n * (n - 1))
    dyy = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * dxy - dxx - dyy)


def energy_test(x: torch.Tensor, y: torch.Tensor, permutations: int = 200, seed: int = 0) -> tuple[float, float]:
    """Permutation test of equal distributions with the energy statistic: ``(distance, p-value)``."""
    x, y = _flat(x), _flat(y)
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
