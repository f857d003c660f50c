"""A cheap class-conditional latent model of any shape, with hookable attention: for checking every method and
solver at Stable-Diffusion-like latent sizes (4×64×64, 16×128×128) in every dtype and on every device, in
seconds.

The data are Gaussian, ``x0 ~ N(μ_c, s² I)`` with a fixed random mean image per class (the null class 10 has the
mean of the class means); the model's x̂0 is the exact posterior mean ``μ + α s²/(α² s² + σ²) (x − α μ)`` plus a
small correction computed by one transformer block on an 8×8 grid of pooled tokens, whose cross-attention reads four
tokens embedded from the label. The block, its self-attention and its cross-attention are perturbation sites
(``sites()``), so PAG, SEG, SAG, TPG, NAG (both forms) and skip-layer guidance act on it.
The network computes in float32 and returns the dtype of its input, as a half-precision model's output would be.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import hooks
from ..paths import Path, get_path
from ..prediction import check_kind, convert

__all__ = ["ToyLatentModel", "example_guidance"]

NULL = 10
GRID = 8  # tokens per side


class _Block(hooks.BlockSite):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = hooks.SelfAttention(dim, heads=2)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm3, self.cross = nn.LayerNorm(dim), hooks.CrossAttention(dim, dim, heads=2)

    def inner(self, h, context):
        h = h + self.attn(self.norm1(h), (GRID, GRID))
        h = h + self.cross(self.norm3(h), context)
        return h + self.mlp(self.norm2(h))

    def forward(self, h, context):
        return self.run(h, context)


class ToyLatentModel(nn.Module):
    """``model(x, t, labels)`` for x of shape ``[B, *sample_shape]``; see the module docstring."""

    def __init__(self, sample_shape=(4, 64, 64), path: "str | Path" = "flow", prediction: str = "flow",
                 spread: float = 0.5, correction: float = 0.1, seed: int = 0, dim: int = 16):
        super().__init__()
        self.sample_shape = tuple(sample_shape)
        self.path, self.prediction = get_path(path), check_kind(prediction)
        self.spread, self.correction = float(spread), float(correction)
        gen = torch.Generator().manual_seed(seed)
        c = self.sample_shape[0]
        means = torch.randn((NULL, *self.sample_shape), generator=gen) * 0.5
        self.register_buffer("means", torch.cat([means, means.mean(0, keepdim=True)]))
        self.inp, self.out = nn.Linear(c, dim), nn.Linear(dim, c)
        self.block = _Block(dim)
        self.label_tokens = nn.Embedding(NULL + 1, 4 * dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def sites(self) -> dict:
        return {"block": self.block, "block.attn": self.block.attn, "block.cross": self.block.cross}

    def null_cond(self, cond=None, batch: int | None = None) -> torch.Tensor:
        batch = batch if batch is not None else (1 if cond is None else len(cond))
        return torch.full((batch,), NULL, dtype=torch.long, device=self.means.device)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        b = x.shape[0]
        xf, t = x.float(), t.reshape(-1).to(x.device, torch.float64)
        labels = torch.full((b,), NULL, device=x.device) if cond is None else torch.as_tensor(cond, device=x.device)
        mu = self.means[labels.long().reshape(-1).expand(b)]
        shape = (-1,) + (1,) * (x.ndim - 1)
        a, s = self.path.alpha(t).float().reshape(shape), self.path.sigma(t).float().reshape(shape)
        gain = a * self.spread**2 / (a * a * self.spread**2 + s * s)
        x0 = mu + gain * (xf - a * mu)
        tokens = F.adaptive_avg_pool2d(x0, GRID).flatten(2).transpose(1, 2)  # [B, 64, C]
        context = self.label_tokens(labels.long().reshape(-1).expand(b)).reshape(b, 4, -1)
        h = self.out(self.block(self.inp(tokens), context))
        h = h.transpose(1, 2).reshape(b, -1, GRID, GRID)
        x0 = x0 + self.correction * torch.tanh(F.interpolate(h, size=x.shape[-2:], mode="nearest"))
        return convert(x0, "x0", self.prediction, xf, t, self.path).to(x.dtype)


def example_guidance(name: str, shape=(4, 64, 64), guide: str = "toy-guide"):
    """A runnable instance of the registered method ``name`` on a ToyLatentModel of ``shape``, for checks over every
    method: its spec string, or, for gradient guidance (whose classifier, loss or measurement is not a literal), the
    object built on a 2× super-resolution measurement of zeros. ``guide`` is the registered guide model for
    autoguidance."""
    from .. import guidance as g

    y = torch.zeros(1, shape[0], shape[1] // 2, shape[2] // 2)
    loss = lambda x0: x0.float().pow(2).flatten(1).mean(1)  # noqa: E731
    built = {"classifier": lambda: g.classifier(2.0, classifier=lambda x, t, p: x.flatten(1)[:, :10] * 0.1),
             "dps": lambda: g.dps(0.5, operator="downsample(2)", y=y),
             "universal": lambda: g.universal(1.0, 1, 2, loss=loss),
             "tfg": lambda: g.tfg(0.5, 0.5, 0.1, operator="downsample(2)", y=y, clip=False),
             "flowchef": lambda: g.flowchef(1.0, operator="downsample(2)", y=y)}
    if name in built:
        return built[name]()
    return f"autoguidance(guide={guide!r})" if name == "autoguidance" else name
