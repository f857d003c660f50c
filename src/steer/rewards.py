"""Rewards for particle steering and search: plain callables ``reward(x0) -> [B]`` (higher is better).

- ``linear(b)``: ``bᵀx`` (its exact tilted Gaussian mixture is ``steer.testbeds.gmm.linear_tilt``).
- ``gmm_log_likelihood(gmm, label)``: the exact ``log p(x | c)`` of a Gaussian-mixture testbed.
- ``digit_log_prob(target)``: the shipped digit classifier's ``log p(target | x)`` (the digits testbed).
- ``brightness()``, ``contrast()``: simple image statistics (the mean and the standard deviation of a sample).

Per-sample reductions run in float32 or better.
"""

from __future__ import annotations

import torch

__all__ = ["linear", "gmm_log_likelihood", "digit_log_prob", "brightness", "contrast"]


def _f(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).double() if x.dtype == torch.float64 else x.flatten(1).float()


def linear(b) -> callable:
    """``r(x) = bᵀx`` (x flattened)."""
    b = torch.as_tensor(b, dtype=torch.float64).reshape(-1)

    def reward(x):
        xf = _f(x)
        return xf @ b.to(xf)

    return reward


def gmm_log_likelihood(gmm, label=None) -> callable:
    """The exact log-density ``log p(x | label)`` of a ``steer.testbeds.gmm.GaussianMixture`` (None: ``log p(x)``)."""

    def reward(x):
        return gmm.log_marginal(x.reshape(x.shape[0], -1), 1.0, 0.0, label).to(x.device)

    return reward


def digit_log_prob(target: int, classifier=None) -> callable:
    """``log p(target | x)`` under the digit classifier (default: the shipped one, ``digits.load("classifier")``),
    for 1×8×8 digits in [−1, 1]. Costs one classifier forward pass per call."""
    if not 0 <= int(target) <= 9:
        raise ValueError(f"target must be a digit 0-9, got {target!r}")
    if classifier is None:
        from .testbeds import digits

        classifier = digits.load("classifier")

    def reward(x):
        net = classifier.to(x.device)
        with torch.no_grad():
            return torch.log_softmax(net(x.float()).float(), dim=1)[:, int(target)]

    return reward


def brightness() -> callable:
    """The mean pixel value of each sample."""
    return lambda x: _f(x).mean(1)


def contrast() -> callable:
    """The standard deviation of each sample's pixels."""
    return lambda x: _f(x).std(1)
