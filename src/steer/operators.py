"""Measurement operators for inverse problems on images ``[B, C, H, W]``: ``y = A(x0) + n``.

Each is a small callable class with a readable ``repr`` that ``parse`` reads back (so specs and configs can name
them): ``Inpaint`` (a mask: keep the observed pixels), ``Downsample`` (average pooling by an integer factor:
super-resolution), ``GaussianBlur`` (a separable Gaussian kernel), ``GaussianNoise`` (the measurement noise
``n ~ N(0, σ_y² I)``, drawn per item from a generator). ``A`` is linear and differentiable for the first three,
which is what DPS, TFG, universal guidance and FlowChef differentiate through. All run on the input's device and
dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import build

__all__ = ["Operator", "Inpaint", "Downsample", "GaussianBlur", "GaussianNoise", "parse", "OPERATORS"]


class Operator:
    """A measurement operator ``A``: ``A(x)`` maps images ``[B, C, H, W]`` to measurements."""

    name = "operator"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def options(self) -> dict:
        return {}

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"


def _image(x: torch.Tensor, who: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{who} takes images [B, C, H, W], got shape {tuple(x.shape)}")


class Inpaint(Operator):
    """``A(x) = M ⊙ x`` with a 0/1 mask M (1 = observed). ``box=(top, left, height, width)`` hides a rectangle
    (box inpainting, the FlowChef and DPS benchmarks' setting); ``keep=p`` keeps each pixel with probability p
    (random inpainting; the same pixels for every item, from ``seed``); ``mask=`` gives M itself ([H, W] or
    broadcastable to the images)."""

    name = "inpaint"

    def __init__(self, box: tuple | list | None = None, keep: float | None = None, size: tuple | list = (8, 8),
                 seed: int = 0, mask: torch.Tensor | None = None):
        if sum(v is not None for v in (box, keep, mask)) != 1:
            raise ValueError("inpaint needs exactly one of box=(top, left, height, width), keep=p or mask=")
        self.box, self.keep, self.size, self.seed = box, keep, tuple(size), seed
        if mask is not None:
            m = torch.as_tensor(mask, dtype=torch.float32)
        elif box is not None:
            if len(box) != 4 or any(int(v) != v or v < 0 for v in box):
                raise ValueError(f"inpaint box must be four non-negative integers (top, left, height, width), got "
                                 f"{box!r}")
            top, left, h, w = map(int, box)
            m = torch.ones(self.size)
            m[top:top + h, left:left + w] = 0.0
        else:
            if not 0 < keep <= 1:
                raise ValueError(f"inpaint keep must be in (0, 1], got {keep!r}")
            g = torch.Generator().manual_seed(seed)
            m = (torch.rand(self.size, generator=g) < keep).float()
        self.mask = m

    def __call__(self, x):
        _image(x, "inpaint")
        return x * self.mask.to(device=x.device, dtype=x.dtype)

    def options(self):
        if self.box is not None:
            return {"box": tuple(self.box), "size": self.size}
        if self.keep is not None:
            return {"keep": self.keep, "size": self.size, "seed": self.seed}
        return {"mask": f"<{tuple(self.mask.shape)}, {float(self.mask.mean()):.2f} observed>"}


class Downsample(Operator):
    """``A(x)``: average pooling over ``factor × factor`` blocks (super-resolution by ``factor``)."""

    name = "downsample"

    def __init__(self, factor: int = 2):
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"downsample factor must be an integer >= 1, got {factor!r}")
        self.factor = factor

    def __call__(self, x):
        _image(x, "downsample")
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"downsample({self.factor}) needs H and W divisible by {self.factor}, got "
                             f"{tuple(x.shape[-2:])}")
        return F.avg_pool2d(x, self.factor)

    def upsample(self, y: torch.Tensor) -> torch.Tensor:
        """Nearest-neighbour upsampling (the ``Aᵀ`` of the pooling, times factor²): a baseline reconstruction."""
        return y.repeat_interleave(self.factor, -2).repeat_interleave(self.factor, -1)

    def options(self):
        return {"factor": self.factor}


class GaussianBlur(Operator):
    """``A(x) = k * x``: a normalised Gaussian kernel of standard deviation ``sigma`` pixels and odd ``size``,
    applied per channel with reflected borders (the DPS benchmark's Gaussian deblur, kernel 61 σ 3 on 256²)."""

    name = "blur"

    def __init__(self, sigma: float = 1.0, size: int = 5):
        if not sigma > 0 or not isinstance(size, int) or size < 1 or size % 2 == 0:
            raise ValueError(f"blur needs sigma > 0 and an odd integer size, got sigma={sigma!r}, size={size!r}")
        self.sigma, self.size = float(sigma), size
        r = torch.arange(size, dtype=torch.float64) - size // 2
        k = torch.exp(-0.5 * (r / self.sigma) ** 2)
        self.kernel = (k / k.sum()).float()

    def __call__(self, x):
        _image(x, "blur")
        c, p = x.shape[1], self.size // 2
        k = self.kernel.to(device=x.device, dtype=x.dtype)
        h = F.pad(x, (p, p, p, p), mode="reflect") if p else x
        h = F.conv2d(h, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(h, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)

    def options(self):
        return {"sigma": self.sigma, "size": self.size}


class GaussianNoise(Operator):
    """Measurement noise: ``y ↦ y + σ_y z``, ``z ~ N(0, I)`` drawn in float32 from ``generator`` (one per call, or a
    list of one per item, as the sampler's). Not part of the ``A`` that guidance differentiates."""

    name = "noise"

    def __init__(self, sigma: float = 0.05):
        if not sigma >= 0:
            raise ValueError(f"noise sigma must be >= 0, got {sigma!r}")
        self.sigma = float(sigma)

    def __call__(self, y, generator=None):
        if self.sigma == 0:
            return y
        if isinstance(generator, (list, tuple)):
            z = torch.stack([torch.randn(y.shape[1:], generator=g, device=g.device) for g in generator])
        else:
            z = torch.randn(y.shape, generator=generator, device=generator.device if generator else y.device)
        return y + self.sigma * z.to(device=y.device, dtype=y.dtype)

    def options(self):
        return {"sigma": self.sigma}


OPERATORS = {c.name: c for c in (Inpaint, Downsample, GaussianBlur, GaussianNoise)}


def parse(spec: "str | Operator | None"):
    """An operator from a spec string such as ``"downsample(2)"``, ``"inpaint(box=(2, 2, 4, 4))"`` or
    ``"blur(sigma=1.0, size=5)"`` (an operator or a callable passes through)."""
    if spec is None or not isinstance(spec, str):
        return spec
    return build(spec, OPERATORS, "operator")
