"""Conditioning that can be concatenated along the batch, indexed and repeated.

A condition is ``None``, a tensor (batch first), a dict of conditions, or a list/tuple of them.
"""

from __future__ import annotations

import torch

__all__ = ["cat", "batch_size", "expand", "take"]


def cat(conds: list):
    """Concatenate conditions of one structure along the batch dimension."""
    first = conds[0]
    if first is None:
        if any(c is not None for c in conds):
            raise ValueError("cannot batch a None condition with a non-None one")
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(conds, dim=0)
    if isinstance(first, dict):
        return {k: cat([c[k] for c in conds]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(cat(list(items)) for items in zip(*conds))
    raise TypeError(f"unsupported condition type {type(first).__name__}; use a tensor, dict, list or None")


def batch_size(cond) -> int | None:
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond.shape[0] if cond.ndim else None
    if isinstance(cond, dict):
        sizes = [batch_size(v) for v in cond.values()]
    elif isinstance(cond, (list, tuple)):
        sizes = [batch_size(v) for v in cond]
    else:
        return None
    sizes = [s for s in sizes if s is not None]
    return sizes[0] if sizes else None


def expand(cond, n: int):
    """Broadcast a condition with batch 1 to batch ``n`` (other batch sizes pass through)."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        if cond.ndim == 0:
            return cond.expand(n)
        return cond.expand(n, *cond.shape[1:]) if cond.shape[0] == 1 and n != 1 else cond
    if isinstance(cond, dict):
        return {k: expand(v, n) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(expand(v, n) for v in cond)
    return cond


def take(cond, index: torch.Tensor):
    """The rows ``index`` of a condition (repeats allowed); entries without a batch pass through."""
    if isinstance(cond, torch.Tensor):
        return cond.index_select(0, index.to(cond.device)) if cond.ndim else cond
    if isinstance(cond, dict):
        return {k: take(v, index) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(take(v, index) for v in cond)
    return cond
