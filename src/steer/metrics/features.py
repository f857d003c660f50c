"""Feature networks for feature-space metrics: loading a user-supplied torch module from a file,
batched feature extraction, and the Fréchet distance in a feature space (``fd``)."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from ._util import flat
from .frechet import frechet_distance

__all__ = ["load_feature_network", "extract_features", "fd"]

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def load_feature_network(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a feature network (a ``torch.nn.Module``) from a local file, in eval mode.

    No paper: this is plumbing for :func:`fd` and any other feature-space metric (e.g. a digit
    classifier's penultimate layer, or an Inception network exported by the user).

    Accepted formats, tried in this order:

    1. TorchScript (``torch.jit.save`` of a scripted/traced module), loaded with ``torch.jit.load``;
    2. a whole pickled module (``torch.save(module, path)``), loaded with
       ``torch.load(path, weights_only=False)``. Unpickling runs arbitrary code and needs the
       module's class to be importable: load only files you trust.

    A ``state_dict`` (or anything else that is not an ``nn.Module``) is refused with a ``TypeError``
    naming the file; a missing path raises ``FileNotFoundError`` naming it; a file neither loader can
    read raises ``ValueError`` naming it and both loaders' errors.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"feature network file not found: {str(p)!r}")
    if not p.is_file():
        raise FileNotFoundError(f"feature network path is not a file: {str(p)!r}")
    try:
        with warnings.catch_warnings():  # recent torch marks TorchScript deprecated; it still loads
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(p), map_location=map_location)
    except Exception as jit_err:  # not TorchScript: try a pickled module
        try:
            net = torch.load(str(p), map_location=map_location, weights_only=False)
        except Exception as pickle_err:
            raise ValueError(
                f"cannot load a feature network from {str(p)!r}: not TorchScript ({type(jit_err).__name__}: "
                f"{jit_err}) and not a pickled module ({type(pickle_err).__name__}: {pickle_err})") from pickle_err
    if not isinstance(net, torch.nn.Module):
        hint = " (a state_dict: save the whole module with torch.save(module) or torch.jit.save)" \
            if isinstance(net, dict) else ""
        raise TypeError(f"{str(p)!r} does not contain a torch.nn.Module but a {type(net).__name__}{hint}")
    return net.eval()


@contextlib.contextmanager
def _eval_mode(fn: FeatureFn):
    """Put an ``nn.Module`` in eval mode for the duration, restoring its previous mode afterwards."""
    if isinstance(fn, torch.nn.Module) and fn.training:
        fn.eval()
        try:
            yield
        finally:
            fn.train()
    else:
        yield


def _module_device_dtype(fn: FeatureFn) -> tuple[Optional[torch.device], Optional[torch.dtype]]:
    if isinstance(fn, torch.nn.Module):
        for t in fn.parameters():
            return t.device, (t.dtype if t.is_floating_point() else None)
        for t in fn.buffers():
            return t.device, (t.dtype if t.is_floating_point() else None)
    return None, None


def extract_features(x: torch.Tensor, features: Optional[FeatureFn], batch_size: int = 256) -> torch.Tensor:
    """Map samples to feature vectors in batches: ``[N, ...] -> [N, D]`` float64 on the CPU.

    ``features`` is any callable from a batch ``[B, ...]`` to ``[B, ...]`` features (typically an
    ``nn.Module``, e.g. from :func:`load_feature_network`); ``None`` means the identity (raw-sample
    space). It is evaluated under ``torch.no_grad()`` on batches of ``batch_size`` samples; an
    ``nn.Module`` is switched to eval mode for the call (its mode restored afterwards), and each batch
    is moved to the device and floating dtype of the module's first parameter/buffer. Per-sample
    outputs are flattened over their non-batch dimensions.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if features is None:
        return flat(x).cpu()
    device, dtype = _module_device_dtype(features)
    out = []
    with torch.no_grad(), _eval_mode(features):
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size]
            if device is not None:
                xb = xb.to(device=device, dtype=dtype if (dtype is not None and xb.is_floating_point()) else None)
            fb = features(xb)
            if not isinstance(fb, torch.Tensor) or fb.ndim == 0 or fb.shape[0] != len(xb):
                raise ValueError(f"features must map a batch of {len(xb)} samples to a tensor [{len(xb)}, ...], "
                                 f"got {type(fb).__name__} {tuple(getattr(fb, 'shape', ()))}")
            out.append(fb.reshape(len(xb), -1).double().cpu())
    return torch.cat(out) if out else torch.empty(0, 0, dtype=torch.float64)


def fd(x: torch.Tensor, y: torch.Tensor, features: Optional[FeatureFn] = None, *, batch_size: int = 256,
       method: str = "eigh") -> float:
    """Fréchet distance between two sample sets in the feature space of ``features``.

    Paper: M. Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium", NeurIPS 2017, arXiv 1706.08500 (FID is this quantity with Inception-v3 features).

    Formula: with ``φ = features`` and ``μ, Σ`` the mean and unbiased covariance of ``φ(x_i)`` and of
    ``φ(y_j)``: ``‖μ_x − μ_y‖² + Tr(Σ_x + Σ_y − 2 (Σ_x Σ_y)^{1/2})``.

    Conventions: ``x [N, ...]`` and ``y [M, ...]`` are passed through ``features`` in batches of
    ``batch_size`` under ``torch.no_grad()`` (see :func:`extract_features`; ``features=None`` uses the
    flattened samples themselves); features are flattened per sample and the statistics computed in
    float64 (:func:`frechet_distance`). Returns a Python float.
    """
    fx = extract_features(x, features, batch_size)
    fy = extract_features(y, features, batch_size)
    return frechet_distance(fx, fy, method=method)
