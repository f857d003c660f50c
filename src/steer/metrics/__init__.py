"""Sample-quality metrics.

Conventions shared by every function: sample sets are tensors ``[N, ...]`` whose non-batch
dimensions are flattened (a sample is a vector); statistics are computed in float64; results are
Python floats or small dicts of floats. Each function's docstring names its paper and formula.

* Distances without features: :func:`energy_distance` (+ :func:`energy_test`),
  :func:`sliced_wasserstein`, :func:`mmd`.
* Fréchet distance: :func:`frechet_distance`, :func:`frechet_distance_from_stats`,
  :func:`gaussian_stats`; in a feature space: :func:`fd` with a ``features`` callable, e.g. from
  :func:`load_feature_network` (batched by :func:`extract_features`).
* Manifold estimates: :func:`precision_recall`, :func:`density_coverage`.
* Per-sample diagnostics: :func:`saturation`, :func:`accuracy`.
"""

from .classification import accuracy
from .distances import energy_distance, energy_test, mmd, sliced_wasserstein
from .features import extract_features, fd, load_feature_network
from .frechet import frechet_distance, frechet_distance_from_stats, gaussian_stats
from .images import saturation
from .manifold import density_coverage, precision_recall

__all__ = [
    "energy_distance", "energy_test", "sliced_wasserstein", "mmd",
    "frechet_distance", "frechet_distance_from_stats", "gaussian_stats",
    "fd", "extract_features", "load_feature_network",
    "precision_recall", "density_coverage",
    "saturation", "accuracy",
]
