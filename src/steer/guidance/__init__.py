"""Guidance: branches → one batched evaluation → ``combine`` → guided x0.

A guidance object says which branches it needs at a noise level (``"cond"``, ``"uncond"``, ...) and combines
their x0 predictions. Spec strings (``"cfg(scale=4)"``) are parsed by ``parse``; ``REGISTRY`` maps names to
constructors.
"""

from .core import Guidance, CFG, cfg, parse, REGISTRY

__all__ = ["Guidance", "CFG", "cfg", "parse", "REGISTRY"]
