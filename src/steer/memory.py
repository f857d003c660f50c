"""Memory held for backward: the bytes autograd keeps saved (``torch.autograd.graph.saved_tensors_hooks``), now and
at the most, device-agnostic. Gradient guidance is checked with it to hold at most one network graph at a time."""

from __future__ import annotations

import gc
from typing import Callable, Iterable

import torch

__all__ = ["peak_saved_bytes"]


class _Meter:
    def __init__(self, exclude: Iterable[torch.Tensor]):
        self.live = self.peak = 0
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(self, t: torch.Tensor):
        return _Held(self, t)


class _Held:
    """A saved tensor, counted while autograd holds it. It keeps ``t.detach()``, not ``t``: a saved output holds its
    own grad_fn, a reference cycle that only the garbage collector would free (and the count would lag)."""

    __slots__ = ("meter", "t", "n")

    def __init__(self, meter: _Meter, t: torch.Tensor):
        self.meter, self.t = meter, t.detach()
        st = t.untyped_storage()
        self.n = 0 if st.data_ptr() in meter.exclude else st.nbytes()
        meter.live += self.n
        meter.peak = max(meter.peak, meter.live)

    def __del__(self):
        self.meter.live -= self.n


def peak_saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, object]:
    """``(peak, fn())``: the most bytes autograd holds saved for backward at any moment while ``fn`` runs, counting
    each saved tensor's storage once per save, except the storages of ``exclude`` (a network's parameters, which
    exist anyway)."""
    gc.collect()
    meter = _Meter(exclude)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda h: h.t):
        out = fn()
    return meter.peak, out
