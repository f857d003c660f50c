"""Classification accuracy (e.g. of a classifier on conditionally generated samples)."""

from __future__ import annotations

import torch

__all__ = ["accuracy"]


def accuracy(logits_or_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy: fraction of samples whose highest-scoring class equals the label.

    No paper: the standard top-1 accuracy. For conditional generation it measures how often a
    classifier recognises the requested class in the generated sample (condition adherence).

    Formula: ``mean_n 1[argmax_c s_{n,c} = y_n]`` for scores ``s [N, C]`` (logits, log-probabilities
    or probabilities: all give the same argmax, since the maps between them are monotone per row)
    and integer labels ``y [N]``. Ties are resolved to the lowest class index (``torch.argmax``).

    Conventions: ``logits_or_probs [N, C]``, ``labels [N]`` integers in ``[0, C)`` (a one-hot
    ``[N, C]`` is also accepted and reduced with argmax). Returns a Python float in [0, 1].
    """
    s = torch.as_tensor(logits_or_probs)
    y = torch.as_tensor(labels)
    if s.ndim != 2:
        raise ValueError(f"logits_or_probs must be [N, C], got shape {tuple(s.shape)}")
    if y.ndim == 2 and y.shape == s.shape:
        y = y.argmax(dim=1)
    if y.ndim != 1 or len(y) != len(s):
        raise ValueError(f"labels must be [N] with N = {len(s)}, got shape {tuple(y.shape)}")
    if len(s) == 0:
        raise ValueError("accuracy of an empty batch is undefined")
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise ValueError("labels must be integers")
        y = y.long()
    if int(y.min()) < 0 or int(y.max()) >= s.shape[1]:
        raise ValueError(f"labels must lie in [0, {s.shape[1]}), got range [{int(y.min())}, {int(y.max())}]")
    return float((s.argmax(dim=1) == y.to(s.device)).double().mean())
