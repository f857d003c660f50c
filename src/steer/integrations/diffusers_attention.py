"""Perturbation sites on diffusers models: PAG, SEG, SAG, TPG, NAG and skip-layer reach diffusers' attention through
the same hook API as the digits model (``steer.models.hooks``).

``attention_sites(module)`` returns ``{name: site}`` for a diffusers UNet (``BasicTransformerBlock`` inside
``Transformer2DModel``: ``attn1`` self-attention, ``attn2`` cross-attention), an SD3-style MMDiT
(``JointTransformerBlock``: ``attn`` joint attention over [image, text], ``attn2`` the image-only self-attention of
SD3.5's dual blocks) or Flux (``FluxTransformerBlock``: joint attention over [text, image];
``FluxSingleTransformerBlock``: one attention over the concatenated [text, image] sequence). Blocks are sites too
(``...transformer_blocks.3``), for TPG and skip-layer. ``layers(module)`` lists them (name, kind, role, token
grid): ``print(layers(pipe.unet))``.

How a site reaches the attention without replacing the processor: the ``Attention`` module's ``forward`` is wrapped;
while hooks are set, whatever processor is installed (LoRA, IP-Adapter, custom) runs under a ``TorchFunctionMode`` that
intercepts its (first) ``scaled_dot_product_attention`` call, computes it for the whole batch as usual and replaces the
perturbed rows only. Rows outside every perturbation are bit-identical to a run without hooks. The IP-Adapter
processors of UNets, SD3 (``SD3IPAdapterJointAttnProcessor2_0``) and Flux (``FluxIPAdapterAttnProcessor``) make
that first call for the text (UNet) or joint (SD3, Flux) attention; their second, the adapter's own attention of the
image queries over the image prompt's tokens (SD3: over [image, image-prompt] tokens), is left as it is on every
row, so perturbed rows keep their image prompt. Processors that never
call ``torch.nn.functional.scaled_dot_product_attention`` (attention slicing, xformers, flash backends of
``dispatch_attention_fn``) raise a clear error when a perturbation targets them; layers that no perturbation targets
are untouched.

Token layouts (the perturbations act on the image tokens only):
- UNet ``attn1``: all tokens are image tokens on the grid of the parent ``Transformer2DModel`` (captured from its
  input); ``attn2``: image queries, text keys/values.
- SD3 joint attention: [image, text]; Flux double-stream: [text, image] (RoPE after qk-norm, inside the processor);
  Flux single-stream: [text, image] with the text length passed by the block as per-call metadata.

"The middle block" (``layers=None``) on a UNet means ``mid_block.*.attn1`` (PAG's and SEG's choice: 1 layer on SD1.5,
10 on SDXL) and its transformer blocks; on a transformer, the middle block of the stack.
"""

from __future__ import annotations

import inspect
import math
import types
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..models import hooks

__all__ = ["attention_sites", "layers", "Layer", "Sites", "DiffusersAttentionSite", "DiffusersBlockSite"]

_BLOCKS = {"BasicTransformerBlock": "basic", "JointTransformerBlock": "joint", "FluxTransformerBlock": "flux_double",
           "FluxSingleTransformerBlock": "flux_single"}


class Sites(dict):
    """``{name: site}`` in model order; sites with ``is_middle`` set are the default ones (``layers=None``)."""


class Layer(NamedTuple):
    name: str
    kind: str  # "attention" or "block"
    role: str  # self, cross, joint, single (attention); block
    grid: tuple | None  # token grid (h, w) of the image tokens: the last one seen, else the config's default


class LayerTable(list):
    def __str__(self):
        rows = [("name", "kind", "role", "grid")] + [
            (lay.name, lay.kind, lay.role, "?" if lay.grid is None else f"{lay.grid[0]}x{lay.grid[1]}") for lay in self]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def layers(module) -> LayerTable:
    """The hookable layers of a diffusers model (a list of ``Layer``; ``print`` it for a table). Names go into
    ``layers=`` of pag/seg/sag/tpg/slg/nag (fnmatch patterns such as ``"mid_block.*.attn1"``) or are picked by index
    (``layers=[7, 8, 9]``: the 8th–10th site of the method's kind, in this order)."""
    return LayerTable(Layer(n, "attention" if isinstance(s, hooks.AttentionSite) else "block", s.role, s.grid_hint())
                      for n, s in attention_sites(module).items())


def attention_sites(module) -> Sites:
    """Perturbation sites of a diffusers UNet, SD3-style or Flux transformer (installed once, then cached)."""
    cached = module.__dict__.get("_steer_sites")
    if cached is not None:
        return cached
    sites, blocks = Sites(), []
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}  # a UNet in data-flow order (it registers up first)
    named = sorted(module.named_modules(), key=lambda nm: order.get(nm[0].split(".")[0], 3))
    for name, m in named:
        kind = _BLOCKS.get(type(m).__name__)
        if kind is None:
            continue
        block = DiffusersBlockSite(m, name, kind)
        sites[name] = block
        blocks.append(block)
        for attr, role in _attention_roles(m, kind):
            site = DiffusersAttentionSite(getattr(m, attr), f"{name}.{attr}", role, kind)
            sites[f"{name}.{attr}"] = site
            block.attention.append(site)
    if not sites:
        raise ValueError(f"{type(module).__name__} has no diffusers transformer blocks (BasicTransformerBlock, "
                         "JointTransformerBlock, FluxTransformerBlock, FluxSingleTransformerBlock) to hook")
    singles = [b for b in blocks if b.kind == "flux_single"]
    if singles:
        singles[0].first_single = True
    _install_grid_capture(module, sites)
    for n, s in sites.items():  # the middle block of a UNet: its self-attention layers and transformer blocks
        s.is_middle = n.startswith("mid_block.") and (isinstance(s, hooks.BlockSite) or n.endswith(".attn1"))
    module.__dict__["_steer_sites"] = sites
    return sites


def _attention_roles(block, kind):
    if kind == "basic":
        out = [("attn1", "cross" if getattr(block, "only_cross_attention", False) else "self")]
        if getattr(block, "attn2", None) is not None:
            out.append(("attn2", "self" if getattr(block, "norm2", None) is not None
                        and getattr(block.attn2, "is_cross_attention", True) is False else "cross"))
        return out
    if kind == "joint":
        out = [("attn", "joint")]
        if getattr(block, "attn2", None) is not None:
            out.append(("attn2", "self"))
        return out
    return [("attn", "joint" if kind == "flux_double" else "single")]


# ---------------------------------------------------------------------------------------------------------------
# Token grids


def _install_grid_capture(module, sites: Sites) -> None:
    """Pre-forward hooks that record the token grid of the image tokens on the sites that need it."""
    attn_sites = [s for s in sites.values() if isinstance(s, DiffusersAttentionSite)]
    if type(module).__name__ == "UNet2DConditionModel" or any(s.block_kind == "basic" for s in attn_sites):
        _unet_default_grids(module, attn_sites)
        for name, m in module.named_modules():
            if type(m).__name__ != "Transformer2DModel":
                continue
            m.__dict__["_steer_grid_sites"] = [s for s in attn_sites if s.name.startswith(f"{name}.") or name == ""]
            m.register_forward_pre_hook(_t2d_grid, with_kwargs=True)
        return
    patch = getattr(getattr(module, "config", None), "patch_size", 1) or 1
    size = getattr(getattr(module, "config", None), "sample_size", None)
    if isinstance(size, int) and type(module).__name__ != "FluxTransformer2DModel":
        for s in attn_sites:
            s.default_grid = (size // patch, size // patch)

    module.__dict__["_steer_grid_sites"] = attn_sites
    module.register_forward_pre_hook(_dit_grid, with_kwargs=True)


def _t2d_grid(mod, args, kwargs):
    hs = args[0] if args else kwargs.get("hidden_states")
    if isinstance(hs, torch.Tensor) and hs.ndim == 4:
        for s in mod.__dict__["_steer_grid_sites"]:
            s.grid = tuple(hs.shape[-2:])


def _dit_grid(mod, args, kwargs):
    hs = args[0] if args else kwargs.get("hidden_states")
    ids = kwargs.get("img_ids")
    patch = getattr(getattr(mod, "config", None), "patch_size", 1) or 1
    if isinstance(hs, torch.Tensor) and hs.ndim == 4:  # SD3: a latent [B, C, H, W], patchified inside
        grid = (hs.shape[-2] // patch, hs.shape[-1] // patch)
    elif isinstance(ids, torch.Tensor):  # Flux: packed tokens; positions (0, row, col) per token, read lazily
        grid = ids
    else:
        grid = None
    for s in mod.__dict__["_steer_grid_sites"]:
        s.grid = grid


def _unet_default_grids(unet, attn_sites) -> None:
    """Grids at the config's sample size: each down block with a downsampler halves the grid, each up block with an
    upsampler doubles it."""
    size = getattr(getattr(unet, "config", None), "sample_size", None)
    if size is None:
        return
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    factors, f = {}, 1
    for i, b in enumerate(getattr(unet, "down_blocks", [])):
        factors[f"down_blocks.{i}."] = f
        f *= 2 if getattr(b, "downsamplers", None) else 1
    factors["mid_block."] = f
    for j, b in enumerate(getattr(unet, "up_blocks", [])):
        factors[f"up_blocks.{j}."] = f
        f //= 2 if getattr(b, "upsamplers", None) else 1
    for s in attn_sites:
        for prefix, fac in factors.items():
            if s.name.startswith(prefix):
                s.default_grid = (h // fac, w // fac)


def _grid_from(grid, n_img: int) -> tuple[int, int]:
    if isinstance(grid, torch.Tensor):  # Flux image ids: one host read, only for the methods that need the grid
        ids = grid.reshape(-1, grid.shape[-1])
        grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
    if grid is not None and grid[0] * grid[1] == n_img:
        return tuple(grid)
    side = math.isqrt(n_img)
    if side * side == n_img:
        return side, side
    raise ValueError(f"cannot tell the token grid of {n_img} image tokens (not square, and no grid was captured)")


# ---------------------------------------------------------------------------------------------------------------
# Attention sites


class DiffusersAttentionSite(hooks.AttentionSite):
    """A diffusers attention layer as a perturbation site (its processor is kept; see the module docstring)."""

    def __init__(self, module, name: str, role: str, block_kind: str):
        super().__init__()
        object.__setattr__(self, "module", module)  # not a submodule: the site is not part of the model
        self.name, self.role, self.block_kind = name, role, block_kind
        self.grid = None  # the image-token grid of the current call (a tensor of Flux image ids until read)
        self.default_grid = None
        self.text_len = None  # Flux single-stream: the text length of the current call (set by its block)
        module.__dict__["_steer_site"] = self
        module.forward = types.MethodType(_attention_forward, module)  # a deepcopy rebinds it to the copy

    def grid_hint(self):
        g = self.grid
        return g if isinstance(g, tuple) else self.default_grid

    def _layout(self, hs, ehs) -> tuple[slice, slice | None]:
        """(image tokens, text tokens) in the attention's query sequence."""
        n = hs.shape[1] if hs.ndim == 3 else hs.shape[-2] * hs.shape[-1]
        if self.role in ("self", "cross"):
            return slice(0, n), None
        if self.role == "single":
            if self.text_len is None:
                raise RuntimeError(f"{self.name}: the text length of this single-stream call is unknown (the block "
                                   "passes it; call the attention through its block)")
            return slice(self.text_len, n), slice(0, self.text_len)
        m = ehs.shape[1]
        if self.block_kind == "joint":  # SD3: [image, text]
            return slice(0, n), slice(n, n + m)
        return slice(m, m + n), slice(0, m)  # Flux: [text, image]


def _attention_forward(module, *args, **kwargs):
    self = module.__dict__["_steer_site"]
    if not self.hooks or not any(getattr(h[2], "enabled", True) for h in self.hooks):
        return type(module).forward(module, *args, **kwargs)
    hs = args[0] if args else kwargs.get("hidden_states")
    ehs = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
    mode = _Intercept(self, self._layout(hs, ehs))
    with mode:
        out = type(module).forward(module, *args, **kwargs)
    if not mode.seen:
        proc = type(getattr(module, "processor", None)).__name__
        raise RuntimeError(f"{self.name}: its attention processor {proc} does not call "
                           "torch.nn.functional.scaled_dot_product_attention, so steer's perturbations cannot "
                           "reach it; allowed on the perturbed layers: processors that call it (AttnProcessor2_0, "
                           "IPAdapterAttnProcessor2_0, LoRA-loaded layers, the 'native' attention backend, custom "
                           "ones); attention slicing (SlicedAttnProcessor) and xformers do not: call "
                           "pipe.disable_attention_slicing(), or set_processor(AttnProcessor2_0()) on the perturbed "
                           "layers only")
    return out


class _Intercept(TorchFunctionMode):
    """Runs the processor; its first scaled_dot_product_attention call gets the site's perturbations on their rows."""

    def __init__(self, site: DiffusersAttentionSite, layout):
        super().__init__()
        self.site, self.layout, self.seen = site, layout, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or self.seen:
            return func(*args, **kwargs)
        self.seen = True
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        call = dict(zip(names, args))
        call.update(kwargs)
        q, k, v = call.pop("query"), call.pop("key"), call.pop("value")
        clean = func(q, k, v, **call)
        return _perturb_rows(self.site, self.layout, q, k, v, call, clean)


def _rows_mask(mask, rows: slice, batch: int):
    if isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[0] == batch and batch > 1:
        return mask[rows]
    return mask


def _add_mask(mask, extra):
    if mask is None:
        return extra
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=extra.dtype, device=mask.device).masked_fill(~mask, -math.inf)
    return mask + extra


def _perturb_rows(site, layout, q, k, v, call, clean):
    img, txt = layout
    batch = q.shape[0]
    out = None
    for start, stop, p, *ref in site.hooks:
        if not getattr(p, "enabled", True):
            continue
        rows = slice(start, stop)
        rcall = dict(call, attn_mask=_rows_mask(call.get("attn_mask"), rows, batch))
        if isinstance(p, hooks.RecordAttention):  # SAG: keep the maps (image queries × image keys), output unchanged
            block = _probs(q[rows], k[rows], rcall)[..., img, img]
            # each image query's attention among the image tokens, its row summing to 1 as in a self-attention map,
            # so that SAG's "received > 1" still means above the mean (the text's share would empty the mask)
            p.maps = block / block.sum(-1, keepdim=True)
            continue
        if out is None:
            out = clean.clone()
        if isinstance(p, hooks.IdentityAttention):
            out[rows] = _identity(q[rows], k[rows], v[rows], rcall, site.role, img)
        elif isinstance(p, hooks.SmoothedEnergy):
            qr = q[rows].clone()
            qi = qr[:, :, img]
            if p.sigma > 9999:
                qr[:, :, img] = qi.mean(dim=2, keepdim=True).expand_as(qi)
            else:
                qr[:, :, img] = hooks._blur_tokens(qi, _grid_from(site.grid or site.default_grid, qi.shape[2]),
                                                   p.sigma)
            out[rows] = F.scaled_dot_product_attention(qr, k[rows], v[rows], **rcall)
        elif isinstance(p, hooks.NormalizedCrossAttention):
            refrows = slice(*ref[0])
            out[rows], neg = _nag(p, site.role, q, k, v, rows, refrows, img, txt, call, clean, batch)
            if neg is not None:
                out[refrows] = neg
        elif isinstance(p, hooks.NormalizedAttention):  # ComfyUI's variant: blend the two rows' outputs (image part)
            refrows = slice(*ref[0])
            zp, zn = clean[rows][:, :, img], clean[refrows][:, :, img]
            blended = p.blend(_merge(zp), _merge(zn))
            o = clean[rows].clone()
            o[:, :, img] = _split(blended, zp.shape)
            out[rows] = o
        elif isinstance(p, hooks.Perturbation) and type(p).attention is not hooks.Perturbation.attention:
            if site.role != "self":
                raise ValueError(f"{p!r} is defined for plain self-attention, not the {site.role} attention of "
                                 f"{site.name}")
            out[rows] = p.attention(q[rows], k[rows], v[rows], site.grid_hint())
        else:
            raise ValueError(f"{p!r} cannot act on the attention layer {site.name}")
    return clean if out is None else out


def _merge(z):  # [b, heads, n, d] -> [b, n, heads·d]
    return z.transpose(1, 2).flatten(2)


def _split(z, shape):
    b, h, n, d = shape
    return z.reshape(b, n, h, d).transpose(1, 2)


def _probs(q, k, call):
    scale = call.get("scale") or 1 / math.sqrt(q.shape[-1])
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale
    mask = call.get("attn_mask")
    if mask is not None:
        logits = logits.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else logits + mask.float()
    return torch.softmax(logits, dim=-1).to(q.dtype)


def _identity(q, k, v, call, role, img):
    """PAG. Self-attention: ``SA(Q, K, V) = V``. Joint attention (the PAG authors' SD3 code, diffusers'
    PAGJointAttnProcessor2_0): only the image→image block of the attention becomes the identity — each image query
    attends to its own image key and to every text key; text queries attend as before."""
    if role == "self":
        return v
    n = q.shape[2]
    mask = torch.zeros(n, n, dtype=q.dtype, device=q.device)
    block = mask[img, img]
    block.fill_(-math.inf)
    block.fill_diagonal_(0)
    return F.scaled_dot_product_attention(q, k, v, **dict(call, attn_mask=_add_mask(call.get("attn_mask"), mask)))


def _nag(p, role, q, k, v, rows, refrows, img, txt, call, clean, batch):
    """NAG (official): ``Z⁺`` the positive rows' attention; ``Z⁻`` the same image queries against the negative rows'
    keys/values (cross-attention: all of them; joint attention: the text part, the positive rows' image keys/values
    kept). Returns the positive rows' output and, with ``p.own_negative`` on joint attention, the negative rows' (the
    official Flux code: the negative text stream attends to the positive image tokens; in single-stream attention
    the negative rows attend on their own and both rows' image outputs are the guided ones)."""
    zp = clean[rows]
    own = p.own_negative and role != "cross"
    if role == "single" and own:
        zn = clean[refrows]
    else:
        if role == "cross":
            kn, vn = k[refrows], v[refrows]
        else:
            kn, vn = k[rows].clone(), v[rows].clone()
            kn[:, :, txt], vn[:, :, txt] = k[refrows][:, :, txt], v[refrows][:, :, txt]
        qn = q[rows][:, :, img]
        if own:  # the negative text queries too: the negative stream's text attends to [its text, positive image]
            qn = q[rows].clone()
            qn[:, :, txt] = q[refrows][:, :, txt]
        mask = _rows_mask(call.get("attn_mask"), refrows if role == "cross" else rows, batch)
        zn = F.scaled_dot_product_attention(qn, kn, vn, **dict(call, attn_mask=mask if own else _mask_queries(mask,
                                                                                                            img)))
    zni = zn[:, :, img] if own else zn
    out = zp.clone()
    zpi = zp[:, :, img]
    out[:, :, img] = _split(p.blend(_merge(zpi), _merge(zni), role), zpi.shape)
    if not own:
        return out, None
    neg = zn.clone() if role == "single" else clean[refrows].clone()
    if role != "single":
        neg[:, :, txt] = zn[:, :, txt]
    neg[:, :, img] = out[:, :, img]
    return out, neg


def _mask_queries(mask, img):
    if isinstance(mask, torch.Tensor) and mask.ndim >= 2 and mask.shape[-2] > 1:
        return mask[..., img, :]
    return mask


# ---------------------------------------------------------------------------------------------------------------
# Block sites


_NOT_BATCHED = {"image_rotary_emb"}


class DiffusersBlockSite(hooks.BlockSite):
    """A diffusers transformer block as a perturbation site (TPG, skip-layer). Its arguments (keywords included) are
    sliced by row for the perturbed rows; joint blocks return ``(encoder_hidden_states, hidden_states)`` (``None``
    first in SD3's last block), and skip-layer passes both streams through."""

    role = "block"

    def __init__(self, module, name: str, kind: str):
        super().__init__()
        object.__setattr__(self, "module", module)
        self.name, self.kind, self.attention = name, kind, []
        self.first_single = False
        module.__dict__["_steer_site"] = self
        module.forward = types.MethodType(_block_forward, module)

    def grid_hint(self):
        return self.attention[0].grid_hint() if self.attention else None

    def _identity(self, sub, clean):
        if self.kind == "basic":
            return sub["hidden_states"]
        ehs = sub.get("encoder_hidden_states")
        return (None if clean[0] is None else ehs), sub["hidden_states"]


def _block_forward(module, *args, **kwargs):
    self = module.__dict__["_steer_site"]
    inner = type(module).forward
    if self.kind == "flux_single":  # the text length of this call, for the single-stream attention
        ehs = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        for s in self.attention:
            s.text_len = None if ehs is None else ehs.shape[1]
        if self.first_single:  # NAG with its own negative stream: it enters the single blocks with the guided image
            args, kwargs = _nag_transition(self, args, kwargs)
    if not self.hooks or not any(getattr(h[2], "enabled", True) for h in self.hooks):
        return inner(module, *args, **kwargs)
    arguments = dict(inspect.signature(inner).bind(module, *args, **kwargs).arguments)
    del arguments[next(iter(arguments))]  # self
    clean = inner(module, *args, **kwargs)
    b = arguments["hidden_states"].shape[0]
    out = [t.clone() if isinstance(t, torch.Tensor) else t for t in (clean if isinstance(clean, tuple) else (clean,))]
    for start, stop, p, *_ in self.hooks:
        if not getattr(p, "enabled", True):
            continue
        sub = {n: (a if n in _NOT_BATCHED else _take_rows(a, start, stop, b)) for n, a in arguments.items()}
        if isinstance(p, hooks.SkipLayer):
            res = self._identity(sub, clean)
        else:
            res = p.block(lambda h, sub=sub: inner(module, **dict(sub, hidden_states=h)), sub["hidden_states"])
        for i, r in enumerate(res if isinstance(res, tuple) else (res,)):
            if isinstance(r, torch.Tensor):
                out[i][start:stop] = r
    return tuple(out) if isinstance(clean, tuple) else out[0]


def _nag_transition(self, args, kwargs):
    own = [h for s in self.attention for h in s.hooks
           if isinstance(h[2], hooks.NormalizedCrossAttention) and h[2].enabled and h[2].own_negative]
    if not own:
        return args, kwargs
    hs = (args[0] if args else kwargs["hidden_states"]).clone()
    for start, stop, _, (r0, r1) in own:
        hs[r0:r1] = hs[start:stop]
    return ((hs, *args[1:]), kwargs) if args else (args, dict(kwargs, hidden_states=hs))


def _take_rows(a, start, stop, batch):
    if isinstance(a, torch.Tensor):
        return a[start:stop] if a.ndim and a.shape[0] == batch else a
    if isinstance(a, dict):
        return {k: _take_rows(v, start, stop, batch) for k, v in a.items()}
    if isinstance(a, (list, tuple)):  # a UNet with an IP-Adapter: encoder_hidden_states = (text, [image tokens])
        return type(a)(_take_rows(v, start, stop, batch) for v in a)
    return a
