"""Perturbing chosen layers of a network for chosen rows of the batch (perturbation guidance).

A model that supports perturbations exposes **sites**: ``model.sites()`` returns ``{name: site}`` where each site
is an ``AttentionSite`` (a self-attention layer) or a ``BlockSite`` (a whole transformer block). A
**perturbation** (PAG's identity attention, SEG's query blur, TPG's token shuffle, skip-layer) acts at the sites
whose names match its ``layers`` and only on the batch rows of its branch, so a perturbed branch runs in the same
batched forward pass as the clean ones: ``with perturb(model, {(start, stop): perturbation}): model(x, t, c)``.
Rows outside every range, and sites outside ``layers``, compute exactly what they would without hooks.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Perturbation", "IdentityAttention", "SmoothedEnergy", "TokenShuffle", "SkipLayer", "NormalizedAttention",
           "NormalizedCrossAttention", "RecordAttention", "AttentionSite", "CrossAttention",
           "BlockSite", "SelfAttention", "perturb", "select_sites"]


class Perturbation:
    """Base class. ``layers`` are site-name patterns (fnmatch, e.g. ``"blocks.3.attn"``, ``"blocks.*.attn"``) or
    indices into the model's sites of the perturbation's kind and roles (``3``: the 4th such site).

    ``roles``: the attention roles a perturbation acts on (a site without a ``role`` is plain self-attention):
    ``self``, ``cross`` (queries from the image, keys/values from the text), ``joint`` (one softmax over image and
    text tokens, SD3/Flux double-stream) and ``single`` (Flux single-stream). ``enabled`` lets a method switch its
    hooks off for an evaluation without removing them."""

    name = "perturbation"
    site_kind = "attention"  # or "block"
    roles = ("self", "joint", "single")
    enabled = True
    one_site = False  # by default (layers=None), act on one site of the middle block only (SAG's recorded map)

    def __init__(self, layers=None):
        single = isinstance(layers, (str, int))
        self.layers = None if layers is None else ((layers,) if single else tuple(layers))
        if self.layers is not None and not self.layers:
            raise ValueError(f"{self.name} needs at least one layer pattern (or None for the middle block)")

    def reset(self) -> None:
        """Called at the start of every sampling call (restarts any random stream)."""

    def attention(self, q, k, v, grid):
        """Replace ``softmax(QKᵀ/√d) V`` for the perturbed rows (q, k, v: [b, heads, tokens, head_dim])."""
        raise NotImplementedError

    def block(self, fn, x):
        """Replace ``fn(x)`` (a whole block) for the perturbed rows (x: [b, tokens, dim])."""
        raise NotImplementedError

    def __repr__(self):
        return f"{self.name}(layers={'mid' if self.layers is None else list(self.layers)})"


class IdentityAttention(Perturbation):
    """PAG (Ahn et al., ECCV 2024, arXiv 2403.17377): the attention map becomes the identity, ``SA(Q, K, V) = V``."""

    name = "identity_attention"

    def attention(self, q, k, v, grid):
        return v


class SmoothedEnergy(Perturbation):
    """SEG (Hong, NeurIPS 2024, arXiv 2408.00760): blur the queries with a 2-D Gaussian of std ``sigma`` over the
    token grid with reflect padding, by the official code's rule (SusungHong/SEG-SDXL ``gaussian_blur_2d``): ``m + 1 −
    (m mod 2)`` taps with ``m = ⌈6σ⌉``, clipped to the grid side ``n`` (``n + 1`` taps for an even side; the
    smaller side on a non-square grid, where the official code assumes a square); ``sigma=inf`` (or > 9999, as
    the reference) replaces every query by the mean query."""

    name = "smoothed_energy"

    def __init__(self, layers, sigma: float = math.inf):
        super().__init__(layers)
        if sigma <= 0:
            raise ValueError(f"seg blur sigma must be > 0 (inf for the infinite blur), got {sigma}")
        self.sigma = float(sigma)

    def attention(self, q, k, v, grid):
        if self.sigma > 9999:
            q = q.mean(dim=2, keepdim=True).expand_as(q)
        else:
            q = _blur_tokens(q, grid, self.sigma)
        return F.scaled_dot_product_attention(q, k, v)


def _blur_tokens(q: torch.Tensor, grid: tuple[int, int], sigma: float) -> torch.Tensor:
    b, h, n, d = q.shape
    gh, gw = grid
    m = math.ceil(6 * sigma)
    side = min(gh, gw)
    size = min(m + 1 - m % 2, side + 1 - side % 2)  # the reflect pad (size // 2) stays below the side
    if size <= 1:
        return q
    x = torch.arange(size, dtype=torch.float64) - size // 2  # the kernel in float64, then in q's dtype
    k1 = torch.exp(-(x**2) / (2 * sigma**2))
    k1 = (k1 / k1.sum()).to(device=q.device, dtype=q.dtype)
    img = q.permute(0, 1, 3, 2).reshape(b * h * d, 1, gh, gw)
    pad = size // 2
    img = F.pad(img, (pad, pad, pad, pad), mode="reflect")
    img = F.conv2d(F.conv2d(img, k1.reshape(1, 1, 1, -1)), k1.reshape(1, 1, -1, 1))
    return img.reshape(b, h, d, n).permute(0, 1, 3, 2)


class TokenShuffle(Perturbation):
    """TPG (Rajabi et al. 2025, arXiv 2506.10036): a random permutation of the token order of the hidden states
    entering the chosen blocks (the same permutation for every row, fresh at every call, drawn from ``seed`` so runs
    repeat); the order is not restored."""

    name = "token_shuffle"
    site_kind = "block"

    def __init__(self, layers, seed: int = 0):
        super().__init__(layers)
        self.seed = int(seed)
        self.gen = torch.Generator().manual_seed(self.seed)

    def reset(self):
        self.gen.manual_seed(self.seed)

    def block(self, fn, x):
        perm = torch.randperm(x.shape[1], generator=self.gen).to(x.device, non_blocking=True)  # no sync
        return fn(x[:, perm])


class SkipLayer(Perturbation):
    """Skip-layer guidance (SD3.5; Stability AI): the chosen blocks are skipped (identity) for the perturbed rows."""

    name = "skip_layer"
    site_kind = "block"

    def block(self, fn, x):
        return x


class NormalizedAttention(Perturbation):
    """NAG (Chen et al., NeurIPS 2025, "Normalized Attention Guidance", arXiv 2505.21179), in the form of ComfyUI's
    NAGuidance for self-attention: with ``Z⁺`` the attention output of the perturbed (positive) rows and ``Z⁻``
    that of the reference (negative) rows, ``Z̃ = φ Z⁺ − (φ − 1) Z⁻``, ``ρ = ‖Z̃‖₁/‖Z⁺‖₁`` per token,
    ``Ẑ = Z̃ min(ρ, τ)/ρ``, ``Z = α Ẑ + (1 − α) Z⁺``."""

    name = "normalized_attention"
    needs_reference = True
    roles = ("self", "joint", "single")

    def __init__(self, layers=None, scale: float = 5.0, tau: float = 1.5, alpha: float = 0.5):
        super().__init__(layers)
        self.scale, self.tau, self.alpha = float(scale), float(tau), float(alpha)

    def blend(self, z_pos, z_neg):
        z = self.scale * z_pos - (self.scale - 1) * z_neg
        rho = z.abs().sum(-1, keepdim=True) / z_pos.abs().sum(-1, keepdim=True).clamp_min(1e-12)
        z_hat = z * torch.clamp(rho, max=self.tau) / rho.clamp_min(1e-12)
        return self.alpha * z_hat + (1 - self.alpha) * z_pos


class NormalizedCrossAttention(Perturbation):
    """NAG as its authors wrote it (Chen et al., NeurIPS 2025, arXiv 2505.21179; ChenDarYen/Normalized-Attention-
    Guidance, ``NAGAttnProcessor2_0`` for UNets, ``NAGFluxAttnProcessor2_0`` for Flux): in cross-attention (UNet
    ``attn2``) and in the image tokens of joint attention, ``Z⁺ = Attn(Q, K⁺, V⁺)`` and ``Z⁻ = Attn(Q, K⁻, V⁻)`` with
    the *same* image queries and the negative prompt's keys/values (read from the reference rows of the same batch),
    ``Z̃ = φ Z⁺ − (φ − 1) Z⁻``, ``ρ = ‖Z̃‖/‖Z⁺‖`` per token over the features (heads merged),
    ``Ẑ = Z̃ min(ρ, τ)/ρ``, ``Z = α Ẑ + (1 − α) Z⁺``. ``norm``/``alpha`` None: the official code's choice per
    architecture (UNet cross-attention: L1, α = 0.5; joint attention: L2, α = 0.25)."""

    name = "normalized_cross_attention"
    needs_reference = True
    roles = ("cross", "joint", "single")
    hint = "; models without cross-attention (the digits testbed) take nag_comfy, ComfyUI's self-attention variant"

    def __init__(self, layers=None, scale: float = 5.0, tau: float = 2.5, alpha: float | None = None,
                 norm: str | None = None, own_negative: bool = False):
        super().__init__(layers)
        self.own_negative = bool(own_negative)  # joint attention: the reference rows are NAG's own negative stream
        if norm not in (None, "l1", "l2"):
            raise ValueError(f"nag: norm must be 'l1', 'l2' or None (the official choice per architecture), "
                             f"got {norm!r}")
        self.scale, self.tau, self.alpha, self.norm = float(scale), float(tau), alpha, norm

    def blend(self, z_pos, z_neg, role: str = "cross"):
        """The NAG blend of [b, tokens, features] attention outputs (norms accumulated in float32)."""
        joint = role != "cross"
        order = {"l1": 1, "l2": 2}[self.norm or ("l2" if joint else "l1")]
        alpha = self.alpha if self.alpha is not None else (0.25 if joint else 0.5)
        z = self.scale * z_pos - (self.scale - 1) * z_neg
        n_pos = torch.linalg.vector_norm(z_pos, order, dim=-1, keepdim=True, dtype=torch.float32)
        n_z = torch.linalg.vector_norm(z, order, dim=-1, keepdim=True, dtype=torch.float32)
        rho = n_z / n_pos
        z_hat = z * (torch.clamp(rho, max=self.tau) / rho).to(z.dtype)
        return alpha * z_hat + (1 - alpha) * z_pos


class RecordAttention(Perturbation):
    """Leaves the output unchanged and keeps the attention probabilities ``softmax(QKᵀ/√d)`` of its rows
    (``.maps``: [b, heads, tokens, tokens]) for SAG."""

    name = "record_attention"
    one_site = True

    def __init__(self, layers=None):
        super().__init__(layers)
        self.maps = None

    def attention(self, q, k, v, grid):
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        self.maps = probs
        return probs @ v


class _Site(nn.Module):
    def __init__(self):
        super().__init__()
        self.hooks: list[tuple] = []  # (start, stop, perturbation[, reference rows (start, stop)])


class AttentionSite(_Site):
    """Marks a self-attention layer as a perturbation site; subclasses compute q, k, v and call ``attend``."""

    def attend(self, q, k, v, grid):
        if not self.hooks:
            return F.scaled_dot_product_attention(q, k, v)
        clean = F.scaled_dot_product_attention(q, k, v)
        out = clean.clone()
        for start, stop, p, *ref in self.hooks:
            if not p.enabled:
                continue
            if isinstance(p, NormalizedCrossAttention):  # official NAG: same queries, the reference rows' keys/values
                r0, r1 = ref[0]
                zn = F.scaled_dot_product_attention(q[start:stop], k[r0:r1], v[r0:r1]).transpose(1, 2)
                zp = clean[start:stop].transpose(1, 2)
                blended = p.blend(zp.flatten(2), zn.flatten(2), getattr(self, "role", "self"))
                out[start:stop] = blended.reshape(zp.shape).transpose(1, 2)
            elif ref:  # NAG (ComfyUI): blend with the reference rows' outputs (heads merged into features per token)
                r0, r1 = ref[0]
                zp, zn = clean[start:stop].transpose(1, 2), clean[r0:r1].transpose(1, 2)
                shape = zp.shape
                out[start:stop] = p.blend(zp.flatten(2), zn.flatten(2)).reshape(shape).transpose(1, 2)
            else:
                out[start:stop] = p.attention(q[start:stop], k[start:stop], v[start:stop], grid)
        return out


class SelfAttention(AttentionSite):
    """Multi-head self-attention over tokens [B, N, D] on a ``grid`` of N = h·w tokens (a hookable site)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, grid):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = self.attend(q, k, v, grid)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class CrossAttention(AttentionSite):
    """Multi-head cross-attention (a hookable site of role ``cross``): queries from tokens [B, N, D], keys and values
    from a context [B, M, C]."""

    role = "cross"

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(context_dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x, context):
        b, n, d = x.shape
        q = self.q(x).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
        k, v = self.kv(context).reshape(b, -1, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(self.attend(q, k, v, None).transpose(1, 2).reshape(b, n, d))


class BlockSite(_Site):
    """Marks a block (``fn: x -> x``) as a perturbation site; subclasses implement ``inner`` and call ``run``."""

    def run(self, x, *args):
        fn = lambda h: self.inner(h, *args)  # noqa: E731
        if not self.hooks:
            return fn(x)
        out = fn(x).clone()
        for start, stop, p, *_ in self.hooks:
            if not p.enabled:
                continue
            sub = tuple(a[start:stop] if isinstance(a, torch.Tensor) and a.shape[:1] == x.shape[:1] else a
                        for a in args)
            out[start:stop] = p.block(lambda h: self.inner(h, *sub), x[start:stop])
        return out


def select_sites(model, perturbation: Perturbation) -> dict[str, _Site]:
    """The sites of ``model`` that ``perturbation`` acts on; a clear error when none match."""
    if not hasattr(model, "sites"):
        raise ValueError(f"{perturbation!r} needs a model with hookable layers (a .sites() method); "
                         f"{type(model).__name__} has none")
    attention = perturbation.site_kind == "attention"
    kind = AttentionSite if attention else BlockSite
    every = model.sites()
    sites = {n: s for n, s in every.items()
             if isinstance(s, kind) and (not attention or getattr(s, "role", "self") in perturbation.roles)}
    what = f"{perturbation.site_kind} site"
    roles = f" (roles {', '.join(perturbation.roles)})" if attention else ""
    if not sites:
        hint = getattr(perturbation, "hint", "")
        raise ValueError(f"{perturbation!r}: {type(model).__name__} has no {what}s{roles}{hint}")
    names = list(sites)
    if perturbation.layers is None:  # the middle block: the sites the model marks (a UNet mid_block), else the middle
        middle = [n for n, s in sites.items() if getattr(s, "is_middle", False)]
        middle = middle[:1] if perturbation.one_site else middle
        return {n: sites[n] for n in middle} if middle else {names[len(names) // 2]: sites[names[len(names) // 2]]}
    chosen = {}
    for pat in perturbation.layers:
        if isinstance(pat, int):
            if not -len(names) <= pat < len(names):
                raise ValueError(f"{perturbation!r}: layer index {pat} is out of range; the model has {len(names)} "
                                 f"{what}s{roles} (0..{len(names) - 1})")
            chosen[names[pat]] = sites[names[pat]]
        else:
            chosen.update((n, s) for n, s in sites.items() if fnmatch.fnmatch(n, pat))
    if not chosen:
        raise ValueError(f"{perturbation!r}: no {what} matches {list(perturbation.layers)}{roles}; "
                         f"available: {', '.join(sites)}")
    return {n: s for n, s in sites.items() if n in chosen}


@contextlib.contextmanager
def perturb(model, rows: dict[tuple[int, int], Perturbation],
            refs: dict[tuple[int, int], tuple[int, int]] | None = None):
    """Apply each perturbation to its batch rows ``[start, stop)`` during the ``with`` block; ``refs`` gives the
    reference rows of perturbations that need them (NAG's negative branch)."""
    touched = []
    refs = refs or {}
    try:
        for (start, stop), p in rows.items():
            if not p.enabled:
                continue
            if getattr(p, "needs_reference", False) and (start, stop) not in refs:
                raise ValueError(f"{p!r} needs reference rows (its negative branch) in the same batch")
            hook = (start, stop, p, refs[(start, stop)]) if (start, stop) in refs else (start, stop, p)
            for site in select_sites(model, p).values():
                site.hooks.append(hook)
                touched.append(site)
        yield
    finally:
        for site in touched:
            site.hooks.clear()
