"""k-nearest-neighbour manifold metrics: improved precision / recall and density / coverage.

Each set's "manifold" is the union of closed balls around its samples, the radius of the ball
around a sample being the distance to its k-th nearest neighbour within its own set. Distances are
Euclidean on flattened samples, in float64, computed with ``torch.cdist`` in row chunks (default:
2**22 entries, 32 MiB, per chunk), so 10k × 10k comparisons run in bounded memory.
"""

from __future__ import annotations

import torch

from ._util import cdist_chunks, flat_pair, knn_radii

__all__ = ["precision_recall", "density_coverage"]


def _fraction_inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
                     chunk_size: int | None) -> float:
    """Fraction of ``queries`` within distance ``radii[i]`` of at least one ``centres[i]``."""
    inside = 0
    for _, d in cdist_chunks(queries, centres, chunk_size):
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / len(queries)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, *,
                     chunk_size: int | None = None) -> dict[str, float]:
    """Improved precision and recall of a generated set against a real one.

    Paper: T. Kynkäänniemi, T. Karras, S. Laine, J. Lehtinen and T. Aila, "Improved Precision and
    Recall Metric for Assessing Generative Models", NeurIPS 2019, arXiv 1904.06991.

    Formula: with ``NND_k(a; A)`` the distance from ``a`` to its k-th nearest neighbour in ``A``
    (``a`` itself excluded) and ``f(q; A) = 1`` iff ``‖q − a‖ <= NND_k(a; A)`` for some ``a ∈ A``::

        precision = 1/M Σ_j f(fake_j; real)     (generated samples inside the real manifold)
        recall    = 1/N Σ_i f(real_i; fake)     (real samples inside the generated manifold)

    The paper uses ``k = 3`` with VGG-16 features; here the caller chooses the feature space (pass
    features, or raw samples). Identical sets give precision = recall = 1; sets whose supports are
    farther apart than every radius give 0.

    Conventions: ``real [N, ...]``, ``fake [M, ...]`` flattened; ``1 <= k < min(N, M)``; closed
    balls (``<=``, as the authors' code); float64; chunked distances. Returns
    ``{"precision": float, "recall": float}``.
    """
    real, fake = flat_pair(real, fake)
    r_real = knn_radii(real, k, chunk_size)
    r_fake = knn_radii(fake, k, chunk_size)
    return {"precision": _fraction_inside(fake, real, r_real, chunk_size),
            "recall": _fraction_inside(real, fake, r_fake, chunk_size)}


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5, *,
                     chunk_size: int | None = None) -> dict[str, float]:
    """Density and coverage of a generated set against a real one.

    Paper: M. F. Naeem, S. J. Oh, Y. Uh, Y. Choi and J. Yoo, "Reliable Fidelity and Diversity
    Metrics for Generative Models", ICML 2020, arXiv 2002.09797.

    Formula: with ``B(x, r)`` the closed ball and ``NND_k(x_i)`` the distance from real sample ``x_i``
    to its k-th nearest other real sample (only real-sample balls are used)::

        density  = 1/(k M) Σ_j Σ_i 1[ fake_j ∈ B(real_i, NND_k(real_i)) ]
        coverage = 1/N     Σ_i 1[ ∃ j : fake_j ∈ B(real_i, NND_k(real_i)) ]

    Density counts how many real-sample neighbourhoods contain each generated sample (expectation
    about 1 when the two distributions are equal, unbounded above); coverage is the fraction of real
    samples whose neighbourhood contains at least one generated sample (1 for identical sets).

    Conventions: ``real [N, ...]``, ``fake [M, ...]`` flattened; ``1 <= k < N``; closed balls
    (``<=``; the authors' code uses ``<``, which differs only on ties); float64; chunked distances.
    Returns ``{"density": float, "coverage": float}``.
    """
    real, fake = flat_pair(real, fake)
    r_real = knn_radii(real, k, chunk_size)
    hits = 0
    for _, d in cdist_chunks(fake, real, chunk_size):
        hits += int((d <= r_real[None, :]).sum())
    covered = 0
    for start, d in cdist_chunks(real, fake, chunk_size):
        covered += int((d.min(dim=1).values <= r_real[start:start + len(d)]).sum())
    return {"density": hits / (k * len(fake)), "coverage": covered / len(real)}
