"""Perturbation hooks on diffusers attention (steer.integrations.diffusers_attention) on tiny random-weight models
built in-process: parity with diffusers' PAG processor, the official SEG and NAG (re-implemented here as attention
processors from the authors' code), the PAG authors' masked-identity joint attention on SD3, kept processors,
bit-identical clean rows, and the diffusers 0.42.1 defects reproduced as recorded deviations."""

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import (  # noqa: E402
    AttnProcessor2_0,
    JointAttnProcessor2_0,
    PAGCFGIdentitySelfAttnProcessor2_0,
    PAGCFGJointAttnProcessor2_0,
)

import steer  # noqa: E402
from steer import guidance as g  # noqa: E402
from steer.integrations.diffusers_attention import attention_sites, layers  # noqa: E402
from steer.models import hooks  # noqa: E402

GEN = torch.Generator().manual_seed(0)


def _randomise(model, std=1.0):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # no zero-initialised gates or outputs: every layer matters
            p.normal_(0, std / math.sqrt(max(1, p.shape[-1])) if p.ndim > 1 else std)
    return model.eval()


def tiny_unet():
    return _randomise(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8))


def tiny_sd3(qk_norm="rms_norm"):
    return _randomise(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=24, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=16, qk_norm=qk_norm))


def tiny_flux():
    return _randomise(FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=False, axes_dims_rope=(2, 2, 4)))


class UNetDenoiser:
    """The tests' own minimal steer Denoiser around a diffusers UNet (ε-prediction, τ = 1000 t − 1)."""

    def __init__(self, unet):
        self.net, self.path, self.prediction = unet, steer.get_path("vp-scaled-linear"), "eps"

    def sites(self):
        return attention_sites(self.net)

    def __call__(self, x, t, cond):
        return self.net(x, 1000 * t - 1, encoder_hidden_states=cond, return_dict=False)[0]


class SD3Denoiser:
    def __init__(self, net):
        self.net, self.path, self.prediction = net, steer.get_path("flow"), "flow"

    def sites(self):
        return attention_sites(self.net)

    def __call__(self, x, t, cond):
        text, pooled = cond
        return self.net(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=1000 * t,
                        return_dict=False)[0]


def unet_inputs(b=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 8, 8, generator=gen)
    text = torch.randn(b, 5, 24, generator=gen)
    return x, torch.full((b,), 0.6), text


def sd3_inputs(b=3, seed=1, text_len=7):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 8, 8, generator=gen)
    return x, torch.full((b,), 0.6), (torch.randn(b, text_len, 24, generator=gen), torch.randn(b, 12, generator=gen))


# ---------------------------------------------------------------------------------------------------------------
# Sites, names, the middle block


def test_layers_lists_names_roles_grids_and_the_middle_block_is_mid_block_attn1():
    unet = tiny_unet()
    table = layers(unet)
    rows = {lay.name: lay for lay in table}
    assert rows["mid_block.attentions.0.transformer_blocks.0.attn1"].role == "self"
    assert rows["mid_block.attentions.0.transformer_blocks.0.attn2"].role == "cross"
    assert rows["mid_block.attentions.0.transformer_blocks.0.attn1"].grid == (4, 4)  # one downsampler: 8 → 4
    assert rows["down_blocks.0.attentions.0.transformer_blocks.0.attn1"].grid == (8, 8)
    names = [lay.name for lay in table]
    assert names.index("mid_block.attentions.0.transformer_blocks.0") < names.index(
        "up_blocks.1.attentions.0.transformer_blocks.0")  # data-flow order: down, mid, up
    assert re.search(r"\nmid_block\.attentions\.0\.transformer_blocks\.0\.attn1 +attention +self +4x4\n", str(table))
    den = UNetDenoiser(unet)
    assert list(hooks.select_sites(den, hooks.IdentityAttention())) == [
        "mid_block.attentions.0.transformer_blocks.0.attn1"]
    assert list(hooks.select_sites(den, hooks.SkipLayer())) == ["mid_block.attentions.0.transformer_blocks.0"]
    # the marks survive a copy of the dict (an adapter may merge its sites), and SAG records one layer only
    marked = dict(attention_sites(unet))
    two = {n: s for n, s in marked.items() if n.endswith("attn1")}
    two["extra.attn1"] = copy.copy(two["mid_block.attentions.0.transformer_blocks.0.attn1"])
    fake = type("M", (), {"sites": lambda self: two})()
    assert list(hooks.select_sites(fake, hooks.IdentityAttention())) == [
        "mid_block.attentions.0.transformer_blocks.0.attn1", "extra.attn1"]
    assert list(hooks.select_sites(fake, hooks.RecordAttention())) == [
        "mid_block.attentions.0.transformer_blocks.0.attn1"]
    # PAG matches self-attention only, NAG cross-attention only, whatever the pattern
    assert all(n.endswith("attn1") for n in hooks.select_sites(den, hooks.IdentityAttention("*")))
    assert all(n.endswith("attn2") for n in hooks.select_sites(den, hooks.NormalizedCrossAttention("*")))
    # by index, in the order of layers(): the second self-attention layer is the mid block's
    assert list(hooks.select_sites(den, hooks.IdentityAttention(1))) == [
        "mid_block.attentions.0.transformer_blocks.0.attn1"]
    with pytest.raises(ValueError, match="layer index 9 is out of range; the model has 4 attention sites"):
        hooks.select_sites(den, hooks.IdentityAttention([9]))
    sd3 = [(lay.name, lay.role, lay.grid) for lay in layers(tiny_sd3())]
    assert ("transformer_blocks.1.attn", "joint", (4, 4)) in sd3
    flux = [(lay.name, lay.role) for lay in layers(tiny_flux())]
    assert ("transformer_blocks.0.attn", "joint") in flux and ("single_transformer_blocks.1.attn", "single") in flux


# ---------------------------------------------------------------------------------------------------------------
# UNet: PAG against diffusers, SEG against the official code, kept processors, clean rows


def test_unet_pag_equals_diffusers_pag_processor_and_its_guided_prediction():
    """Batch [uncond, cond, cond]: diffusers' PAGCFGIdentitySelfAttnProcessor2_0 on the mid block's attn1 (the PAG
    pipelines' default "mid") equals steer's identity attention on the last rows through the hook."""
    unet = tiny_unet()
    den = UNetDenoiser(unet)
    x, t, text = unet_inputs()
    x = x[1:2].repeat(3, 1, 1, 1)  # one state, three branches: [uncond, cond, cond]
    text[2] = text[1]
    ref = copy.deepcopy(unet)
    ref.mid_block.attentions[0].transformer_blocks[0].attn1.set_processor(PAGCFGIdentitySelfAttnProcessor2_0())
    with torch.no_grad():
        expect = ref(x, 1000 * t - 1, encoder_hidden_states=text).sample
        with hooks.perturb(den, {(2, 3): hooks.IdentityAttention()}):
            got = den(x, t, text)
        plain = den(x, t, text)
    assert torch.allclose(got, expect, atol=1e-6), (got - expect).abs().max()
    assert torch.equal(got[:2], plain[:2]) and (got[2] - plain[2]).abs().max() > 1e-3
    # the guided prediction: steer's cfg(w) + pag(s + 1) is the PAG pipeline's ε_u + w(ε_c − ε_u) + s(ε_c − ε_p)
    w, s = 3.0, 2.0
    eps = expect[0] + w * (expect[1] - expect[0]) + s * (expect[1] - expect[2])
    seen = []
    steer.sample(den, noise=x[1:2], cond=text[1:2], uncond=text[0:1], guidance=g.cfg(w) + g.pag(s + 1),
                 solver="ddim", timesteps=[0.6, 0.3], callback=lambda step: seen.append(step.x0))
    p = steer.core.points(den.path, [0.6])[0]
    x_start = x[1:2] * math.hypot(p.alpha, p.sigma)  # the loop's first state
    assert torch.allclose(x_start, x[1:2], atol=1e-6)  # VP: α² + σ² = 1
    assert torch.allclose(seen[0], (x[1:2] - p.sigma * eps) / p.alpha, rtol=1e-5, atol=1e-4)


class OfficialSEGInf:
    """Official SEG (SEG-SDXL's processor) at σ = ∞, written out: the perturbed rows' queries become their mean over
    the token grid, then ordinary attention."""

    def __init__(self, rows):
        self.rows = rows

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b, n, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        split = lambda z: z.view(b, -1, attn.heads, z.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        q = q.clone()
        q[self.rows] = q[self.rows].mean(dim=2, keepdim=True).expand_as(q[self.rows])
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def test_unet_seg_at_infinite_blur_equals_the_official_seg():
    unet = tiny_unet()
    den = UNetDenoiser(unet)
    x, t, text = unet_inputs()
    ref = copy.deepcopy(unet)
    ref.mid_block.attentions[0].transformer_blocks[0].attn1.set_processor(OfficialSEGInf(slice(2, 3)))
    with torch.no_grad():
        expect = ref(x, 1000 * t - 1, encoder_hidden_states=text).sample
        with hooks.perturb(den, {(2, 3): hooks.SmoothedEnergy(None, math.inf)}):
            got = den(x, t, text)
        plain = den(x, t, text)
    assert torch.allclose(got, expect, atol=1e-6), (got - expect).abs().max()
    assert torch.equal(got[:2], plain[:2]) and (got[2] - plain[2]).abs().max() > 1e-3


class ScaledProcessor(AttnProcessor2_0):
    """A user's custom processor: ordinary attention, output scaled by 1.5."""

    def __call__(self, *args, **kwargs):
        return 1.5 * super().__call__(*args, **kwargs)


def test_a_preinstalled_processor_is_kept_and_clean_rows_are_bit_identical():
    unet = tiny_unet()
    attn1 = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    attn1.set_processor(ScaledProcessor())
    den = UNetDenoiser(unet)
    attention_sites(unet)
    x, t, text = unet_inputs()
    with torch.no_grad():
        plain = den(x, t, text)
        with hooks.perturb(den, {(2, 3): hooks.IdentityAttention()}):
            got = den(x, t, text)
    assert torch.equal(got[:2], plain[:2])  # rows outside the perturbation: bit-identical to no hooks
    assert isinstance(attn1.processor, ScaledProcessor)  # wrapped, not replaced
    # the perturbed row by hand: the custom processor's own computation with SA(Q, K, V) = V, so its 1.5 stays
    ref = copy.deepcopy(unet)
    block = ref.mid_block.attentions[0].transformer_blocks[0]
    block.attn1.forward = lambda hidden_states, **kw: 1.5 * block.attn1.to_out[1](
        block.attn1.to_out[0](block.attn1.to_v(hidden_states)))
    with torch.no_grad():
        by_hand = ref(x, 1000 * t - 1, encoder_hidden_states=text).sample
    assert torch.allclose(got[2], by_hand[2], atol=1e-6)
    # a processor that never calls scaled_dot_product_attention cannot be perturbed: a clear error, not a no-op
    from diffusers.models.attention_processor import AttnProcessor

    attn1.set_processor(AttnProcessor())
    with torch.no_grad(), hooks.perturb(den, {(2, 3): hooks.IdentityAttention()}):
        with pytest.raises(RuntimeError, match="does not call torch.nn.functional.scaled_dot_product_attention"):
            den(x, t, text)


@pytest.mark.parametrize("kind", ["slg", "tpg"])
def test_unet_block_sites_slice_keyword_arguments_by_row(kind):
    """BasicTransformerBlock is called with keywords (encoder_hidden_states=, timestep=, ...): the perturbed rows see
    their own rows of each, and equal a copy of the UNet with that block replaced by hand."""
    unet = tiny_unet()
    den = UNetDenoiser(unet)
    x, t, text = unet_inputs()
    ref = copy.deepcopy(unet)
    block = ref.mid_block.attentions[0].transformer_blocks[0]
    inner = block.forward
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(5))
    if kind == "slg":
        block.forward = lambda hidden_states, **kw: hidden_states
        p = hooks.SkipLayer()
    else:
        block.forward = lambda hidden_states, **kw: inner(hidden_states[:, perm], **kw)
        p = hooks.TokenShuffle(None, seed=5)
    with torch.no_grad():
        by_hand = ref(x, 1000 * t - 1, encoder_hidden_states=text).sample
        with hooks.perturb(den, {(1, 3): p}):
            got = den(x, t, text)
        plain = den(x, t, text)
    assert torch.equal(got[:1], plain[:1])
    assert torch.allclose(got[1:], by_hand[1:], atol=1e-6), (got[1:] - by_hand[1:]).abs().max()
    assert (got[1:] - plain[1:]).abs().max() > 1e-3


def test_hooks_in_bfloat16_follow_the_float32_result():
    """The hooks keep the model's dtype (masks, means, NAG norms accumulated in float32 and cast back): in bfloat16
    each perturbed forward stays within bfloat16's error of the float32 one, like the clean forward."""
    unet = tiny_unet()
    x, t, text = unet_inputs(b=2)
    cases = {"pag": ({(0, 1): hooks.IdentityAttention()}, None), "seg": ({(0, 1): hooks.SmoothedEnergy(None)}, None),
             "nag": ({(0, 1): hooks.NormalizedCrossAttention("*", 4.0)}, {(0, 1): (1, 2)}),
             "slg": ({(0, 1): hooks.SkipLayer()}, None)}
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        den = UNetDenoiser(copy.deepcopy(unet).to(dtype))
        with torch.no_grad():
            out[dtype, "clean"] = den(x.to(dtype), t, text.to(dtype))
            for name, (rows, refs) in cases.items():
                with hooks.perturb(den, rows, refs):
                    out[dtype, name] = den(x.to(dtype), t, text.to(dtype))
    for name in ["clean", *cases]:
        half, full = out[torch.bfloat16, name], out[torch.float32, name]
        assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
        assert float((half.float() - full).norm() / full.norm()) < 3e-2, name
        if name != "clean":
            assert (full[0] - out[torch.float32, "clean"][0]).abs().max() > 1e-3  # the hook acted


# ---------------------------------------------------------------------------------------------------------------
# NAG: the authors' UNet cross-attention algorithm


class OfficialNAGUNet:
    """The official NAG UNet processor (ChenDarYen/Normalized-Attention-Guidance, NAGAttnProcessor2_0), written out:
    the image batch is [uncond, cond], the text batch [uncond, cond, nag_negative]; the cond rows' queries are tiled
    onto the negative text, and the cond output becomes the L1-normalised extrapolation."""

    def __init__(self, scale, tau=2.5, alpha=0.5):
        self.scale, self.tau, self.alpha = scale, tau, alpha

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        if encoder_hidden_states is None:
            return AttnProcessor2_0()(attn, hidden_states)
        nb = hidden_states.shape[0]  # 2·o images, 3·o texts
        o = encoder_hidden_states.shape[0] - nb
        q = attn.to_q(hidden_states)
        q = torch.cat([q, q[o:2 * o]])
        k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        split = lambda z: z.view(3 * o, -1, attn.heads, z.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
        z = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)
        zp, zn = z[o:2 * o], z[2 * o:]
        zg = zp * self.scale - zn * (self.scale - 1)
        ratio = zg.abs().sum(-1, keepdim=True) / zp.abs().sum(-1, keepdim=True)
        zg = zg * torch.minimum(ratio, torch.full_like(ratio, self.tau)) / ratio
        zg = zg * self.alpha + zp * (1 - self.alpha)
        out = torch.cat([z[:o], zg])
        return attn.to_out[1](attn.to_out[0](out))


def test_unet_nag_equals_the_official_processor_and_stacks_with_cfg_in_two_rows():
    unet = tiny_unet()
    den = UNetDenoiser(unet)
    x, t, text = unet_inputs(b=2)
    pos, neg = text[:1], text[1:]
    xx = torch.cat([x[:1], x[:1]])
    ref = copy.deepcopy(unet)
    ref.set_attn_processor({n: OfficialNAGUNet(4.0) if "attn2" in n else AttnProcessor2_0()
                            for n in ref.attn_processors})
    with torch.no_grad():
        # official: [uncond, cond] images, [uncond, cond, negative] texts (here the negative prompt is the uncond one)
        expect = ref(xx, 1000 * t - 1, encoder_hidden_states=torch.cat([neg, pos, neg])).sample
        p = hooks.NormalizedCrossAttention("*", 4.0)
        with hooks.perturb(den, {(0, 1): p}, {(0, 1): (1, 2)}):  # rows: [cond (NAG), uncond (its negative)]
            got = den(xx, t, torch.cat([pos, neg]))
        plain = den(xx, t, torch.cat([pos, neg]))
    assert torch.allclose(got[0], expect[1], atol=1e-5), (got[0] - expect[1]).abs().max()
    assert torch.equal(got[1], plain[1]) and torch.allclose(expect[0], plain[1], atol=1e-6)
    assert (got[0] - plain[0]).abs().max() > 1e-3
    # cfg(w) + nag(φ) is D_u + w (D_nag − D_u) from 2 rows per step; nag alone is D_nag
    w = 3.0
    res_x0 = []
    res = steer.sample(den, noise=x[:1], cond=pos, uncond=neg, guidance=g.cfg(w) + g.nag(4.0), solver="ddim",
                       timesteps=[0.6, 0.3], callback=lambda step: res_x0.append(step.x0), return_info=True)
    pt = steer.core.points(den.path, [0.6])[0]
    eps = expect[0] + w * (expect[1] - expect[0])
    assert torch.allclose(res_x0[0], (x[:1] - pt.sigma * eps) / pt.alpha, rtol=1e-5, atol=1e-4)
    assert res.nfe == 2 and res.forward_passes == 1
    alone = []
    steer.sample(den, noise=x[:1], cond=pos, uncond=neg, guidance="nag(scale=4)", solver="ddim",
                 timesteps=[0.6, 0.3], callback=lambda step: alone.append(step.x0))
    assert torch.allclose(alone[0], (x[:1] - pt.sigma * expect[1]) / pt.alpha, rtol=1e-5, atol=1e-4)


def test_nag_blend_norms_and_variants():
    zp = torch.tensor([[[1.0, -2.0, 2.0]]])
    zn = torch.tensor([[[0.0, 1.0, 0.0]]])
    p = hooks.NormalizedCrossAttention(None, scale=3.0, tau=2.0)
    zt = 3 * zp - 2 * zn  # (3, −8, 6)
    l1 = zt * 2.0 / (17 / 5)  # ρ = 17/5 > τ
    assert torch.allclose(p.blend(zp, zn, "cross"), 0.5 * l1 + 0.5 * zp)  # UNet: L1, α = 0.5
    l2 = zt * 2.0 / (math.sqrt(109) / 3)  # ρ = √109/3 > τ
    assert torch.allclose(p.blend(zp, zn, "joint"), 0.25 * l2 + 0.75 * zp)  # joint (Flux code): L2, α = 0.25
    assert torch.allclose(hooks.NormalizedCrossAttention(None, scale=1.0).blend(zp, zn), zp)
    with pytest.raises(ValueError, match="norm must be 'l1', 'l2' or None"):
        g.nag(norm="l3")
    # the official nag needs cross-attention; the ComfyUI variant is nag_comfy
    from steer.testbeds import digits

    with pytest.raises(ValueError, match=r"has no attention sites \(roles cross, joint, single\)"):
        steer.sample(digits.load("flow"), cond=torch.tensor([1]), guidance="nag(scale=3)", steps=2, seed=0)
    assert repr(g.parse("nag_comfy(scale=3)")) == "nag_comfy(scale=3)"


# ---------------------------------------------------------------------------------------------------------------
# SD3 joint attention


class MaskedIdentityJoint:
    """The PAG authors' SD3 perturbed path (diffusers PAGJointAttnProcessor2_0, PR #8861), written out for the rows
    ``rows`` and *with* SD3.5's qk-norm: the image→image block of the joint attention is the identity (each image query
    sees its own image key and every text key), text queries attend as usual. ``mode="seg"`` instead replaces the
    image queries by their mean (SEG at σ = ∞ on image tokens only)."""

    def __init__(self, rows, mode="pag"):
        self.rows, self.mode = rows, mode

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kw):
        b, n, _ = hidden_states.shape
        split = lambda z: z.view(b, -1, attn.heads, z.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
        q, k, v = (split(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        eq, ek, ev = (split(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        q, k, v = torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2)
        out = F.scaled_dot_product_attention(q, k, v)
        r = self.rows
        if self.mode == "pag":
            mask = torch.zeros(q.shape[2], q.shape[2])
            mask[:n, :n] = -math.inf
            mask[:n, :n].fill_diagonal_(0)
            out[r] = F.scaled_dot_product_attention(q[r], k[r], v[r], attn_mask=mask)
        else:
            qr = q[r].clone()
            qr[:, :, :n] = qr[:, :, :n].mean(dim=2, keepdim=True)
            out[r] = F.scaled_dot_product_attention(qr, k[r], v[r])
        out = out.transpose(1, 2).flatten(2)
        img, txt = out[:, :n], out[:, n:]
        img = attn.to_out[1](attn.to_out[0](img))
        return img, (None if attn.context_pre_only else attn.to_add_out(txt))


@pytest.mark.parametrize("mode", ["pag", "seg"])
def test_sd3_pag_is_the_masked_identity_and_seg_blurs_image_queries_only(mode):
    net = tiny_sd3()
    den = SD3Denoiser(net)
    x, t, cond = sd3_inputs()
    ref = copy.deepcopy(net)
    ref.transformer_blocks[1].attn.set_processor(MaskedIdentityJoint(slice(2, 3), mode))
    p = hooks.IdentityAttention("transformer_blocks.1.attn") if mode == "pag" else hooks.SmoothedEnergy(
        "transformer_blocks.1.attn", math.inf)
    with torch.no_grad():
        expect = SD3Denoiser(ref)(x, t, cond)
        with hooks.perturb(den, {(2, 3): p}):
            got = den(x, t, cond)
        plain = den(x, t, cond)
    assert torch.allclose(got, expect, atol=1e-5), (got - expect).abs().max()
    assert torch.equal(got[:2], plain[:2]) and (got[2] - plain[2]).abs().max() > 1e-3


def test_sd3_pag_text_outputs_unchanged_and_whole_sequence_identity_differs():
    """At the joint attention itself: the masked identity leaves the text outputs as they were; the identity over
    the whole joint sequence (diffusers' PAG guider) changes them and the image outputs."""
    net = tiny_sd3()
    attn = net.transformer_blocks[1].attn
    attention_sites(net)
    site = net._steer_sites["transformer_blocks.1.attn"]
    gen = torch.Generator().manual_seed(3)
    h, e = torch.randn(2, 16, 16, generator=gen), torch.randn(2, 7, 16, generator=gen)
    with torch.no_grad():
        img0, txt0 = attn(hidden_states=h, encoder_hidden_states=e)
        site.hooks.append((1, 2, hooks.IdentityAttention()))
        img1, txt1 = attn(hidden_states=h, encoder_hidden_states=e)
        site.hooks.clear()
    assert torch.equal(txt1, txt0) and torch.equal(img1[0], img0[0])
    assert (img1[1] - img0[1]).abs().max() > 1e-2


def test_sd3_tpg_shuffles_the_image_tokens_entering_a_joint_block():
    net = tiny_sd3()
    den = SD3Denoiser(net)
    x, t, cond = sd3_inputs()
    ref = copy.deepcopy(net)
    block = ref.transformer_blocks[1]
    inner = block.forward
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(2))
    block.forward = lambda hidden_states, encoder_hidden_states, temb, **kw: inner(
        hidden_states[:, perm], encoder_hidden_states, temb, **kw)
    with torch.no_grad():
        expect = SD3Denoiser(ref)(x, t, cond)
        with hooks.perturb(den, {(1, 3): hooks.TokenShuffle("transformer_blocks.1", seed=2)}):
            got = den(x, t, cond)
        plain = den(x, t, cond)
    assert torch.equal(got[:1], plain[:1])
    assert torch.allclose(got[1:], expect[1:], atol=1e-5) and (got[1:] - plain[1:]).abs().max() > 1e-3


def test_sd3_skip_layer_passes_both_streams_through_and_the_last_block_returns_none():
    net = tiny_sd3()
    den = SD3Denoiser(net)
    x, t, cond = sd3_inputs()
    ref = copy.deepcopy(net)
    ref.transformer_blocks[1].forward = lambda hidden_states, encoder_hidden_states, **kw: (
        encoder_hidden_states, hidden_states)
    ref.transformer_blocks[2].forward = lambda hidden_states, encoder_hidden_states, **kw: (None, hidden_states)
    with torch.no_grad():
        expect = SD3Denoiser(ref)(x, t, cond)
        with hooks.perturb(den, {(1, 3): hooks.SkipLayer(["transformer_blocks.1", "transformer_blocks.2"])}):
            got = den(x, t, cond)
        plain = den(x, t, cond)
    assert torch.equal(got[:1], plain[:1])
    assert torch.allclose(got[1:], expect[1:], atol=1e-6) and (got[1:] - plain[1:]).abs().max() > 1e-3


def _sd3_qkv(attn, h, e):
    """SD3 joint attention's queries, keys and values over [image, text], with qk-norm (written out)."""
    b = h.shape[0]
    split = lambda z: z.view(b, -1, attn.heads, z.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
    q, k, v = (split(f(h)) for f in (attn.to_q, attn.to_k, attn.to_v))
    eq, ek, ev = (split(f(e)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    q, k, eq, ek = attn.norm_q(q), attn.norm_k(k), attn.norm_added_q(eq), attn.norm_added_k(ek)
    return torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2)


def test_sd3_nag_and_sag_at_the_joint_attention():
    """NAG in joint attention: the positive row's image queries against [its image keys/values, the negative row's
    text keys/values], L2 blend with α = 0.25 (the official Flux processor's choice), image tokens only; SAG's
    recorded maps are the image×image block of the joint softmax with each row renormalised to 1 (attention among
    the image tokens, so that SAG's "received > 1" threshold keeps its meaning), and recording leaves the output as
    it was."""
    net = tiny_sd3()
    attn = net.transformer_blocks[1].attn
    attention_sites(net)
    site = net.__dict__["_steer_sites"]["transformer_blocks.1.attn"]
    gen = torch.Generator().manual_seed(8)
    h, e = torch.randn(2, 16, 16, generator=gen), torch.randn(2, 7, 16, generator=gen)
    phi, tau = 4.0, 2.5
    with torch.no_grad():
        img0, txt0 = attn(hidden_states=h, encoder_hidden_states=e)
        site.hooks.append((0, 1, hooks.NormalizedCrossAttention(None, phi, tau), (1, 2)))
        img1, txt1 = attn(hidden_states=h, encoder_hidden_states=e)
        site.hooks.clear()
        rec = hooks.RecordAttention()
        site.hooks.append((1, 2, rec))
        img2, txt2 = attn(hidden_states=h, encoder_hidden_states=e)
        site.hooks.clear()
        q, k, v = _sd3_qkv(attn, h, e)
        zp = F.scaled_dot_product_attention(q[:1], k[:1], v[:1])[:, :, :16].transpose(1, 2).flatten(2)
        kn, vn = torch.cat([k[:1, :, :16], k[1:, :, 16:]], 2), torch.cat([v[:1, :, :16], v[1:, :, 16:]], 2)
        zn = F.scaled_dot_product_attention(q[:1, :, :16], kn, vn).transpose(1, 2).flatten(2)
        zt = phi * zp - (phi - 1) * zn
        rho = zt.norm(dim=-1, keepdim=True) / zp.norm(dim=-1, keepdim=True)
        expect = attn.to_out[0](0.25 * zt * torch.clamp(rho, max=tau) / rho + 0.75 * zp)
        maps = torch.softmax(q[1:] @ k[1:].transpose(-1, -2) / math.sqrt(8), -1)[..., :16, :16]
        maps = maps / maps.sum(-1, keepdim=True)
    assert torch.allclose(img1[0], expect[0], atol=1e-5) and (img1[0] - img0[0]).abs().max() > 1e-3
    assert torch.equal(txt1, txt0) and torch.equal(img1[1], img0[1])  # text outputs and the negative row: as before
    assert torch.allclose(rec.maps, maps, atol=1e-6) and rec.maps.shape == (1, 2, 16, 16)
    assert torch.equal(img2, img0) and torch.equal(txt2, txt0)


def test_nag_outside_its_interval_leaves_the_conditional_branch_clean():
    unet = tiny_unet()
    den = UNetDenoiser(unet)
    x, t, text = unet_inputs(b=2)
    kw = dict(noise=x[:1], cond=text[:1], uncond=text[1:], solver="ddim", timesteps=[0.6, 0.3])
    plain = steer.sample(den, guidance="cfg(scale=3)", **kw)
    off = steer.sample(den, guidance="cfg(scale=3) + nag(scale=4, sigma_hi=0.1)", return_info=True, **kw)
    assert torch.allclose(off.x, plain, atol=1e-6) and off.nfe == 2  # (a stack's sum rounds differently: 1e-7)
    on = steer.sample(den, guidance="cfg(scale=3) + nag(scale=4)", **kw)
    assert (on - plain).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Flux: double- and single-stream sites


def flux_call(net, x, t, text, pooled):
    txt_ids = torch.zeros(text.shape[1], 3)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"),
                          -1).reshape(-1, 3)
    return net(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t, img_ids=img_ids,
               txt_ids=txt_ids, return_dict=False)[0]


@pytest.mark.parametrize("mode", ["seg", "pag"])
@pytest.mark.parametrize("layer", ["transformer_blocks.0.attn", "single_transformer_blocks.1.attn"])
def test_flux_seg_and_pag_act_on_the_image_tokens_of_double_and_single_stream_attention(layer, mode):
    """Flux orders tokens [text, image] (a single-stream block learns the text length from its call). SEG at σ = ∞:
    the image queries become their mean; PAG: the image→image block of the attention is the identity (masked, as the
    PAG authors' SD3 code); both compared with Flux's own processor with the change made by hand on a copy."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    net = tiny_flux()
    attention_sites(net)
    gen = torch.Generator().manual_seed(4)
    x, text, pooled, t = (torch.randn(3, 16, 16, generator=gen), torch.randn(3, 6, 24, generator=gen),
                          torch.randn(3, 12, generator=gen), torch.full((3,), 0.6))
    ref = copy.deepcopy(net)
    site = ref.get_submodule(layer)

    class MeanImageQueries(FluxAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            n_img = 16
            real = F.scaled_dot_product_attention

            def sdpa(query, key, value, **kw):
                out = real(query, key, value, **kw)
                if mode == "seg":
                    query = query.clone()
                    query[2:3, :, -n_img:] = query[2:3, :, -n_img:].mean(dim=2, keepdim=True)
                    out[2:3] = real(query[2:3], key[2:3], value[2:3], **kw)
                else:
                    n = query.shape[2]
                    mask = torch.zeros(n, n)
                    mask[-n_img:, -n_img:] = -math.inf
                    mask[-n_img:, -n_img:].fill_diagonal_(0)
                    out[2:3] = real(query[2:3], key[2:3], value[2:3], attn_mask=mask)
                return out

            F.scaled_dot_product_attention = sdpa
            try:
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
            finally:
                F.scaled_dot_product_attention = real

    site.set_processor(MeanImageQueries())
    with torch.no_grad():
        expect = flux_call(ref, x, t, text, pooled)
        with hooks.perturb(type("D", (), {"sites": lambda self: attention_sites(net)})(),
                           {(2, 3): hooks.SmoothedEnergy(layer, math.inf) if mode == "seg"
                            else hooks.IdentityAttention(layer)}):
            got = flux_call(net, x, t, text, pooled)
        plain = flux_call(net, x, t, text, pooled)
    assert torch.allclose(got, expect, atol=1e-5), (got - expect).abs().max()
    assert torch.equal(got[:2], plain[:2]) and (got[2] - plain[2]).abs().max() > 1e-4


class OfficialFluxNAG:
    """The official Flux NAG processor (ChenDarYen/Normalized-Attention-Guidance, NAGFluxAttnProcessor2_0), written
    out: double-stream calls get one image row and two text rows [positive, negative] — the image queries/keys/values
    are tiled onto the negative text; single-stream calls get two rows [positive, negative] of [text, image]; both
    halves attend on their own; the positive image output becomes the L2-normalised extrapolation (and, in single
    stream, so does the negative half's)."""

    def __init__(self, phi, tau, alpha, text_len):
        self.phi, self.tau, self.alpha, self.text_len = phi, tau, alpha, text_len

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        split = lambda z: z.unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)  # noqa: E731
        q, k, v = (split(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        if encoder_hidden_states is not None:
            q, k, v = (z.repeat(2, 1, 1, 1) for z in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        n = self.text_len
        if encoder_hidden_states is not None:
            eq, ek, ev = (split(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], 2), torch.cat([ek, k], 2), torch.cat([ev, v], 2)
            n = encoder_hidden_states.shape[1]
        q, k = apply_rotary_emb(q, image_rotary_emb), apply_rotary_emb(k, image_rotary_emb)
        o = q.shape[0] // 2
        zp = F.scaled_dot_product_attention(q[:o], k[:o], v[:o]).transpose(1, 2).flatten(2)
        zn = F.scaled_dot_product_attention(q[o:], k[o:], v[o:]).transpose(1, 2).flatten(2)
        ip, ineg = zp[:, n:], zn[:, n:]
        guided = ip * self.phi - ineg * (self.phi - 1)
        ratio = guided.norm(dim=-1, keepdim=True) / ip.norm(dim=-1, keepdim=True)
        guided = guided * torch.minimum(ratio, torch.full_like(ratio, self.tau)) / ratio
        guided = guided * self.alpha + ip * (1 - self.alpha)
        if encoder_hidden_states is not None:
            return attn.to_out[0](guided), attn.to_add_out(torch.cat([zp[:, :n], zn[:, :n]]))
        zp[:, n:], zn[:, n:] = guided, guided
        return torch.cat([zp, zn])


def official_flux_nag(ref, x, t, text, pooled, phi, tau, alpha):
    """The official NAG Flux transformer's forward (its transformer_flux.py), written out: the image stream has the
    positive row only in the double-stream blocks (its modulation truncated to that row), the text stream both
    prompts; the image tokens are tiled into both rows before the single-stream blocks; the positive row is kept."""
    ref.set_attn_processor(OfficialFluxNAG(phi, tau, alpha, text.shape[1]))
    for blk in ref.transformer_blocks:
        norm1 = blk.norm1.forward
        blk.norm1.forward = lambda h, emb=None, norm1=norm1, **kw: norm1(h, emb=emb[:h.shape[0]], **kw)
    txt_ids = torch.zeros(text.shape[1], 3)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"),
                          -1).reshape(-1, 3)
    h = ref.x_embedder(x[:1])
    temb = ref.time_text_embed(t * 1000, pooled)
    e = ref.context_embedder(text)
    rope = ref.pos_embed(torch.cat([txt_ids, img_ids]))
    for blk in ref.transformer_blocks:
        e, h = blk(hidden_states=h, encoder_hidden_states=e, temb=temb, image_rotary_emb=rope)
    h = h.repeat(2, 1, 1)
    for blk in ref.single_transformer_blocks:
        e, h = blk(hidden_states=h, encoder_hidden_states=e, temb=temb, image_rotary_emb=rope)
    return ref.proj_out(ref.norm_out(h[:1], temb[:1]))


def test_flux_nag_with_its_own_negative_stream_equals_the_official_flux_code():
    net = tiny_flux()
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(1, 16, 16, generator=gen).repeat(2, 1, 1)
    text, pooled, t = torch.randn(2, 6, 24, generator=gen), torch.randn(2, 12, generator=gen), torch.full((2,), 0.7)
    phi, tau = 4.0, 2.5
    ref = copy.deepcopy(net)
    den = type("D", (), {"sites": lambda self: attention_sites(net)})()
    with torch.no_grad():
        expect = official_flux_nag(ref, x, t, text, pooled, phi, tau, 0.25)
        own = hooks.NormalizedCrossAttention("*", phi, tau, own_negative=True)
        with hooks.perturb(den, {(0, 1): own}, {(0, 1): (1, 2)}):  # rows [positive (NAG), its negative stream]
            got = flux_call(net, x, t, text, pooled)
        with hooks.perturb(den, {(0, 1): hooks.NormalizedCrossAttention("*", phi, tau)}, {(0, 1): (1, 2)}):
            shared = flux_call(net, x, t, text, pooled)
        plain = flux_call(net, x, t, text, pooled)
    assert torch.allclose(got[0], expect[0], atol=1e-5), (got[0] - expect[0]).abs().max()
    assert (got[0] - plain[0]).abs().max() > 1e-2
    # the default reads the negative text stream from rows that keep their own image tokens: a documented deviation
    assert (shared[0] - expect[0]).abs().max() > 1e-4 and torch.equal(shared[1], plain[1])


# ---------------------------------------------------------------------------------------------------------------
# diffusers 0.42.1 defects, reproduced as recorded deviations


def test_diffusers_pag_joint_processor_skips_qk_norm_where_steer_does_not():
    """diffusers' PAGCFGJointAttnProcessor2_0 never applies norm_q/norm_k, so on an SD3.5-style model (qk_norm) even
    its clean rows differ from the model's own JointAttnProcessor2_0; steer's clean rows are bit-identical and its
    perturbed row is the masked identity with qk-norm (test above)."""
    net = tiny_sd3()
    den = SD3Denoiser(net)
    x, t, cond = sd3_inputs()
    ref = copy.deepcopy(net)
    ref.transformer_blocks[1].attn.set_processor(PAGCFGJointAttnProcessor2_0())
    assert isinstance(net.transformer_blocks[1].attn.processor, JointAttnProcessor2_0)
    with torch.no_grad():
        diffusers_pag = SD3Denoiser(ref)(x, t, cond)
        with hooks.perturb(den, {(2, 3): hooks.IdentityAttention("transformer_blocks.1.attn")}):
            got = den(x, t, cond)
        plain = den(x, t, cond)
    assert (diffusers_pag[:2] - plain[:2]).abs().max() > 1e-3  # diffusers: clean rows wrong on qk-norm models
    assert torch.equal(got[:2], plain[:2])
    # without qk-norm (SD3 medium 1.0) the two agree on every row: the masked identity is the same algorithm
    net = tiny_sd3(qk_norm=None)
    den = SD3Denoiser(net)
    ref = copy.deepcopy(net)
    ref.transformer_blocks[1].attn.set_processor(PAGCFGJointAttnProcessor2_0())
    with torch.no_grad():
        diffusers_pag = SD3Denoiser(ref)(x, t, cond)
        with hooks.perturb(den, {(2, 3): hooks.IdentityAttention("transformer_blocks.1.attn")}):
            got = den(x, t, cond)
    assert torch.allclose(got, diffusers_pag, atol=1e-5), (got - diffusers_pag).abs().max()


def test_diffusers_skip_layer_hook_returns_joint_block_outputs_in_the_wrong_order():
    """diffusers' TransformerBlockSkipHook returns (hidden_states, encoder_hidden_states) for every block, while SD3's
    JointTransformerBlock (and Flux's blocks) return (encoder_hidden_states, hidden_states): with equal lengths the
    streams are silently swapped, otherwise the model crashes. steer's skip returns them in the block's order."""
    from diffusers.hooks import LayerSkipConfig, apply_layer_skip

    net = tiny_sd3()
    gen = torch.Generator().manual_seed(6)
    h, e, temb = torch.randn(1, 16, 16, generator=gen), torch.randn(1, 16, 16, generator=gen), torch.randn(1, 16)
    ref = copy.deepcopy(net)
    apply_layer_skip(ref, LayerSkipConfig(indices=[1], fqn="transformer_blocks"))
    with torch.no_grad():
        first, second = ref.transformer_blocks[1](hidden_states=h, encoder_hidden_states=e, temb=temb)
        attention_sites(net)
        site = net._steer_sites["transformer_blocks.1"]
        site.hooks.append((0, 1, hooks.SkipLayer()))
        ours = net.transformer_blocks[1](hidden_states=h, encoder_hidden_states=e, temb=temb)
        site.hooks.clear()
    assert torch.equal(first, h) and torch.equal(second, e)  # diffusers: (hidden, encoder) — swapped
    assert torch.equal(ours[0], e) and torch.equal(ours[1], h)  # the block's own order: (encoder, hidden)
    x, t, cond = sd3_inputs(b=1, text_len=7)  # unequal lengths (16 image tokens, 7 text tokens): a crash
    with torch.no_grad(), pytest.raises(RuntimeError):
        SD3Denoiser(ref)(x, t, cond)


def test_diffusers_seg_guider_never_registers_its_hooks_and_swaps_the_blur_branches():
    from diffusers import SmoothedEnergyGuidance
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceConfig, _gaussian_blur_2d

    sd3 = tiny_sd3()
    guider = SmoothedEnergyGuidance(guidance_scale=3.0, seg_guidance_scale=2.8,
                                    seg_guidance_config=SmoothedEnergyGuidanceConfig(indices=[1],
                                                                                    fqn="transformer_blocks"))
    guider.set_state(step=5, num_inference_steps=10, timestep=torch.tensor(500))
    assert guider.num_conditions == 3  # it asks for the SEG branch...
    for _ in range(guider.num_conditions):  # ...and the loop prepares the model once per branch
        guider.prepare_models(sd3)
    registry = HookRegistry.check_if_exists_or_initialize(sd3.transformer_blocks[1].attn.to_q)
    assert registry.hooks == {} and guider._count_prepared == 0  # never counted, never hooked: SEG is inert
    # the blur: σ above the "infinite" threshold gives a (clipped) Gaussian, a finite σ gives the mean — swapped
    q = torch.randn(1, 16, 3, generator=torch.Generator().manual_seed(7))
    mean = q.mean(dim=1, keepdim=True).expand_as(q)
    assert torch.allclose(_gaussian_blur_2d(q.clone(), 3, 1.0, 9999.0), mean, atol=1e-6)
    assert (_gaussian_blur_2d(q.clone(), 7, 1e7, 9999.0) - mean).abs().max() > 1e-2
    qh = q.reshape(1, 1, 16, 3)
    assert torch.allclose(hooks.SmoothedEnergy(None, math.inf).attention(qh, qh, qh, (4, 4)),
                          F.scaled_dot_product_attention(mean.reshape(1, 1, 16, 3), qh, qh), atol=1e-6)
    assert (hooks._blur_tokens(qh, (4, 4), 1.0) - mean.reshape(1, 1, 16, 3)).abs().max() > 1e-2
