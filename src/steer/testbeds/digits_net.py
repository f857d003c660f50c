"""The digits testbed's network: a small class-conditional diffusion transformer (DiT-style) on 1×8×8 images.

2×2 patches (16 tokens on a 4×4 grid), learned position embeddings, adaptive layer norm with zero-initialised gates
(adaLN-Zero, Peebles & Xie 2023, arXiv 2212.09748) conditioned on a sinusoidal embedding of t plus a label embedding
(labels 0–9 and the null label 10 for classifier-free guidance). Each block and each block's self-attention is a
perturbation site (``steer.models.hooks``), named ``blocks.{i}`` and ``blocks.{i}.attn``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..models.hooks import BlockSite, SelfAttention

__all__ = ["DigitsNet", "DigitClassifier", "NoisyDigitClassifier", "NULL_LABEL"]

NULL_LABEL = 10


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of t ∈ [0, 1] (scaled by 1000, as DDPM-style networks expect)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(BlockSite):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x, c, grid):
        return self.run(x, c, grid)

    def inner(self, x, c, grid):
        s1, sc1, g1, s2, sc2, g2 = self.ada(c).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(_modulate(self.norm1(x), s1, sc1), grid)
        return x + g2[:, None] * self.mlp(_modulate(self.norm2(x), s2, sc2))


class DigitsNet(nn.Module):
    def __init__(self, dim: int = 96, depth: int = 6, heads: int = 4, patch: int = 2, size: int = 8, channels: int = 1,
                 n_labels: int = 11):
        super().__init__()
        self.config = dict(dim=dim, depth=depth, heads=heads, patch=patch, size=size, channels=channels,
                           n_labels=n_labels)
        self.patch, self.size, self.channels = patch, size, channels
        self.grid = (size // patch, size // patch)
        n_tokens = self.grid[0] * self.grid[1]
        self.patch_in = nn.Linear(patch * patch * channels, dim)
        self.pos = nn.Parameter(torch.randn(1, n_tokens, dim) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label = nn.Embedding(n_labels, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Linear(dim, patch * patch * channels)
        for m in (self.ada_out[1], self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def sites(self) -> dict:
        out = {}
        for i, b in enumerate(self.blocks):
            out[f"blocks.{i}"] = b
            out[f"blocks.{i}.attn"] = b.attn
        return out

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        p, gh, gw = self.patch, *self.grid
        tokens = x.reshape(b, self.channels, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, -1)
        h = self.patch_in(tokens) + self.pos
        c = self.t_mlp(timestep_embedding(t, h.shape[-1])) + self.label(labels.long())
        for block in self.blocks:
            h = block(h, c, self.grid)
        shift, scale = self.ada_out(c).chunk(2, dim=1)
        h = self.out(_modulate(self.norm_out(h), shift, scale))
        h = h.reshape(b, gh, gw, self.channels, p, p).permute(0, 3, 1, 4, 2, 5)
        return h.reshape(b, self.channels, self.size, self.size)


class DigitClassifier(nn.Module):
    """A small CNN for 1×8×8 digits in [−1, 1]; ``features`` gives the penultimate layer (for Fréchet distance)."""

    def __init__(self, width: int = 32, n_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.AvgPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(), nn.AvgPool2d(2), nn.Flatten(),
            nn.Linear(2 * width * 4, 128), nn.GELU())
        self.head = nn.Linear(128, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class NoisyDigitClassifier(nn.Module):
    """A noise-conditional digit classifier ``p(c | x_t)`` for classifier guidance (Dhariwal & Nichol 2021,
    arXiv 2105.05233, §4): a small CNN whose convolutions are modulated (FiLM) by an embedding of the noise level.

    It is path-independent: ``forward(x_t, t, path)`` sees ``x̃ = x_t / sqrt(α² + σ²) = cos θ · x0 + sin θ · ε``
    and the angle ``θ = atan2(σ, α) ∈ [0, π/2]``, which every Gaussian path (VP, flow, EDM) maps to in the same way,
    so one network guides the ε model (vp-cosine) and the flow model alike. ``t`` is a float (the loop's time) or a
    tensor of times; ``path`` a steer path or its name. ``logits(x̃, θ)`` is the network itself (θ: a [B] tensor).
    The network reads ``cos θ · x̃``, so its gradient in x_t vanishes at pure noise as the exact classifier's does
    (``∇ log p(c | x_t) = (α/σ²)(E[x0 | x_t, c] − E[x0 | x_t])``): at vp-cosine's t = 1, where α = 5e−5, any
    gradient left there is amplified by α_next/α ≈ 2000 in the first solver step.
    """

    def __init__(self, width: int = 32, n_classes: int = 10, emb: int = 64):
        super().__init__()
        self.config = dict(width=width, n_classes=n_classes, emb=emb)
        self.emb = emb
        self.t_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, 2 * (2 * width + 2 * width)))
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(2 * width * 4, 128)
        self.head = nn.Linear(128, n_classes)
        self._splits = [width, width, width, width, 2 * width, 2 * width]

    def logits(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        e = timestep_embedding(theta.float() * (2 / math.pi), self.emb)  # θ/(π/2) ∈ [0, 1], as t
        s1, b1, s2, b2, s3, b3 = self.t_mlp(e).split(self._splits, dim=1)
        film = lambda h, s, b: h * (1 + s[:, :, None, None]) + b[:, :, None, None]  # noqa: E731
        gelu = nn.functional.gelu
        h = gelu(film(self.conv1(x.float() * theta.float().cos()[:, None, None, None]), s1, b1))
        h = self.pool(gelu(film(self.conv2(h), s2, b2)))
        h = self.pool(gelu(film(self.conv3(h), s3, b3)))
        return self.head(gelu(self.fc(h.flatten(1))))

    def forward(self, x: torch.Tensor, t, path) -> torch.Tensor:
        from ..paths import get_path

        path = get_path(path)
        tt = torch.as_tensor(t, dtype=torch.float64)
        if tt.device.type != "cpu":  # a device tensor of times: one copy (the loop passes a float instead)
            tt = tt.cpu()
        a, s = path.alpha(tt), path.sigma(tt)
        theta = torch.atan2(s, a).reshape(-1).to(device=x.device, dtype=torch.float32)
        scale = torch.rsqrt(a * a + s * s).reshape(-1).to(device=x.device, dtype=torch.float32)
        b = x.shape[0]
        theta, scale = theta.expand(b), scale.expand(b)
        return self.logits(x.float() * scale[:, None, None, None], theta).to(x.dtype)
