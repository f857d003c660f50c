"""Shared helpers for :mod:`steer.metrics` (private).

Conventions used throughout the package:

* A sample set is a tensor ``[N, ...]``; every non-batch dimension is flattened, so a sample is a
  vector of ``D = prod(shape[1:])`` numbers.
* Statistics are computed in float64 on the input's device, whatever the input dtype.
* Pairwise distances are Euclidean (``torch.cdist``) and are computed in row chunks, so that the
  ``N × M`` distance matrix never has to exist in memory at once.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

# Number of float64 entries of one chunk of a distance matrix: 2**22 entries = 32 MiB.
CHUNK_ENTRIES = 2**22


def flat(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """``[N, ...] -> [N, D]`` float64 (a sample is the vector of all its non-batch entries)."""
    x = torch.as_tensor(x)
    if x.ndim == 0:
        raise ValueError(f"{name} must have a batch dimension, got a scalar")
    return x.reshape(x.shape[0], -1).double()


def flat_pair(x: torch.Tensor, y: torch.Tensor, min_n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten two sample sets and check that they live in the same space and are large enough."""
    x, y = flat(x, "x"), flat(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"the two sample sets have different per-sample sizes: {x.shape[1]} vs {y.shape[1]}")
    if len(x) < min_n or len(y) < min_n:
        raise ValueError(f"need at least {min_n} samples in each set, got {len(x)} and {len(y)}")
    return x, y


def chunk_rows(n_cols: int, chunk_size: int | None) -> int:
    """Rows per chunk: the user's ``chunk_size`` or enough to fill :data:`CHUNK_ENTRIES`."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    return max(1, CHUNK_ENTRIES // max(1, n_cols))


def cdist_chunks(a: torch.Tensor, b: torch.Tensor, chunk_size: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, cdist(a[start:start + c], b))`` over row chunks of ``a``."""
    c = chunk_rows(len(b), chunk_size)
    for start in range(0, len(a), c):
        yield start, torch.cdist(a[start:start + c], b)


def knn_radii(x: torch.Tensor, k: int, chunk_size: int | None = None) -> torch.Tensor:
    """Distance from each row of ``x`` to its ``k``-th nearest *other* row of ``x`` (float64 ``[N]``).

    The distance of a point to itself (0) is the smallest entry of its row, so the ``k``-th other
    neighbour is the ``(k + 1)``-th smallest entry; exact duplicates count as neighbours.
    """
    if not 1 <= k < len(x):
        raise ValueError(f"k must satisfy 1 <= k < N (= {len(x)}), got k={k}")
    out = torch.empty(len(x), dtype=torch.float64, device=x.device)
    for start, d in cdist_chunks(x, x, chunk_size):
        out[start:start + len(d)] = d.kthvalue(k + 1, dim=1).values
    return out


def to_numpy64(a, name: str) -> np.ndarray:
    """Tensor / array-like -> float64 NumPy array (detached, on the CPU)."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    a = np.asarray(a, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains non-finite values")
    return a
