"""The Denoiser protocol: ``model(x_t, t, cond) -> Tensor`` with ``.path`` and ``.prediction``.

``t`` is a float tensor of shape ``[batch]`` holding the continuous time in [0, 1] (t = 1 noise);
``cond`` is passed through, concatenated along the batch when branches are batched.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

from ..paths import Path, get_path
from ..prediction import check_kind

__all__ = ["Denoiser", "FunctionDenoiser", "denoiser", "register_model", "get_model", "MODELS"]

MODELS: dict[str, Callable] = {}  # name -> loader of a Denoiser (filled by the testbeds and by users)


def register_model(name: str, loader: Callable) -> None:
    """Make ``loader()`` reachable by ``name`` (in spec strings such as ``autoguidance(guide='flow-weak')``)."""
    MODELS[name] = loader


def get_model(name: str):
    """A fresh instance of the model registered as ``name``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS)) or 'none'}")
    return MODELS[name]()


@runtime_checkable
class Denoiser(Protocol):
    path: Path
    prediction: str

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor: ...


class FunctionDenoiser:
    """A plain function ``fn(x, t, cond)`` made into a Denoiser."""

    def __init__(self, fn: Callable, path: "str | Path", prediction: str, sample_shape=None):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.path = get_path(path)
        self.prediction = check_kind(prediction)
        self.sample_shape = None if sample_shape is None else tuple(sample_shape)

    def __call__(self, x, t, cond):
        return self.fn(x, t, cond)

    def __repr__(self) -> str:
        return (f"denoiser({getattr(self.fn, '__name__', 'fn')}, path={self.path.name!r}, "
                f"prediction={self.prediction!r})")


def denoiser(fn: Callable, path: "str | Path", prediction: str, sample_shape=None) -> FunctionDenoiser:
    """Wrap ``fn(x, t, cond) -> prediction`` as a Denoiser on ``path`` predicting ``prediction``."""
    return FunctionDenoiser(fn, path, prediction, sample_shape)
