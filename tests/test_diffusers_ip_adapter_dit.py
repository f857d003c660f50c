"""IP-Adapter on SD3 and Flux through steer's diffusers adapter.

Tiny random-weight SD3 and Flux pipelines (steer.integrations.tiny_diffusers) are saved and loaded back through
``from_pretrained``; a random IP-Adapter is written in the original checkpoints' layout (SD3.5: InstantX's
``image_proj.layers.{i}.{0,1,2}.*`` resampler and ``ip_adapter.{block}.*`` processors; Flux: XLabs'
``ip_adapter_proj_model.*`` and ``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.*``) and read by
the pipeline's own ``load_ip_adapter``. Flux gets a tiny CLIP image encoder too (its pipeline encodes a black image
for the negative branch when no negative embeds are given).

Checked: steer's ``cfg`` with the matched solver equals the pipeline's output for the same latents and embeds (SD3
CFG; Flux true CFG, with and without negative embeds, and the guidance-distilled path without CFG); the same with
raw images (``ip_adapter_image=``, ``negative_ip_adapter_image=``; SD3 with a tiny CLIP image encoder attached),
equal to steer's call with the embeds the pipeline's ``prepare_ip_adapter_image_embeds`` makes; the image prompt
moves the output; PAG's masked identity on SD3's and Flux's joint attention keeps the IP-Adapter processor (same
objects) and its image term on the perturbed rows, equal to the processor written out by hand (diffusers has no PAG
pipeline with an SD3 or Flux IP-Adapter to compare with); clear errors for wrong formats.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import diffusers  # noqa: E402

from steer import cond as condlib  # noqa: E402
from steer.integrations import diffusers as sd, tiny_diffusers as tiny  # noqa: E402
from steer.models import hooks  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

TOL = 1e-4
KW = {"height": 16, "width": 16, "max_sequence_length": 16}
PROMPT, NEGATIVE = "a red cat on a mat", "blurry"
SD3_IMAGE_DIM, SD3_IMAGE_TOKENS = 12, 5  # the tiny "SigLIP" hidden states the SD3.5 resampler reads
FLUX_IMAGE_DIM = 12  # the tiny CLIP image encoder's projection_dim


def _maxdiff(a, b) -> float:
    a, b = (x.double() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x)).double() for x in (a, b))
    return (a - b).abs().max().item()


def _latents(pipe, seed):
    shape = sd.denoiser(pipe, height=KW["height"], width=KW["width"]).sample_shape
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))


def _load(kind, root):
    diffusers.utils.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny.save(tiny.build(kind, seed=0), root / kind)
    return sd.load(root / kind)


# InstantX's SD3.5 resampler names -> diffusers' (the loader's _convert_ip_adapter_image_proj_to_diffusers reverses it)
_INSTANTX = {"ln0": "0.norm1", "ln1": "0.norm2", "attn.to_q": "0.to_q", "attn.to_kv": "0.to_kv",
             "attn.to_out.0": "0.to_out", "adaln_norm": "1.0", "ff.net.0.proj": "1.1", "ff.net.2": "1.3",
             "adaln_proj": "2.1"}


def _sd3_ip_adapter_file(net, folder, seed=3):
    """A random SD3.5 IP-Adapter: the time-conditioned resampler (IPAdapterTimeImageProjection, 4 layers, 1 head of
    64, 4 queries) under InstantX's names, and one SD3IPAdapterJointAttnProcessor2_0 per joint block."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    inner = net.config.attention_head_dim * net.config.num_attention_heads
    proj = IPAdapterTimeImageProjection(embed_dim=SD3_IMAGE_DIM, output_dim=inner, hidden_dim=64, heads=1,
                                        num_queries=4, timestep_in_dim=32)
    tensors = {}
    for key, value in proj.state_dict().items():
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            for ours, theirs in _INSTANTX.items():
                if rest.startswith(ours + "."):
                    rest = theirs + rest[len(ours):]
                    break
            key = f"layers.{i}.{rest}"
        tensors[f"image_proj.{key}"] = value.clone()
    for i in range(len(net.transformer_blocks)):
        proc = SD3IPAdapterJointAttnProcessor2_0(inner, inner, net.config.attention_head_dim, timesteps_emb_dim=64)
        for key, value in proc.state_dict().items():
            # larger than the default init (AdaLayerNorm's shift/scale ~0.1, k/v ~0.1): the 4 IP tokens compete
            # with 64 image tokens in that attention, and the term should be visible
            weight = torch.randn(value.shape) * 2 / math.sqrt(value.shape[-1]) if "_ip." in key else value.clone()
            tensors[f"ip_adapter.{i}.{key}"] = torch.randn(value.shape) / 4 if "norm_ip" in key else weight
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "ip-adapter.safetensors"))


def _flux_ip_adapter_file(net, folder, seed=4):
    """A random XLabs Flux IP-Adapter: ImageProjection to 4 tokens of joint_attention_dim
    (``ip_adapter_proj_model.{proj,norm}``) and k/v projections per double-stream block."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    c, inner = net.config.joint_attention_dim, net.inner_dim
    tensors = {"ip_adapter_proj_model.proj.weight": torch.randn(4 * c, FLUX_IMAGE_DIM, generator=gen)
               / math.sqrt(FLUX_IMAGE_DIM),
               "ip_adapter_proj_model.proj.bias": torch.randn(4 * c, generator=gen),
               "ip_adapter_proj_model.norm.weight": 1 + 0.1 * torch.randn(c, generator=gen),
               "ip_adapter_proj_model.norm.bias": 0.1 * torch.randn(c, generator=gen)}
    for i in range(len(net.transformer_blocks)):
        for kv in "kv":
            name = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj"
            tensors[f"{name}.weight"] = torch.randn(inner, c, generator=gen) / math.sqrt(c)
            tensors[f"{name}.bias"] = 0.1 * torch.randn(inner, generator=gen)
    save_file(tensors, str(folder / "ip-adapter.safetensors"))


def _clip_image_encoder(folder, seed=5):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16, projection_dim=FLUX_IMAGE_DIM)
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(str(folder))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3ip")
    pipe = _load("sd3", root)
    _sd3_ip_adapter_file(pipe.transformer, root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_ip_adapter(str(root), weight_name="ip-adapter.safetensors", image_encoder_folder=None,
                             local_files_only=True)
    return pipe


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("fluxip")
    pipe = _load("flux", root)
    _flux_ip_adapter_file(pipe.transformer, root)
    _clip_image_encoder(root / "image_encoder")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_ip_adapter(str(root), weight_name="ip-adapter.safetensors",
                             image_encoder_pretrained_model_name_or_path=str(root / "image_encoder"),
                             image_encoder_dtype=torch.float32, local_files_only=True)
    return pipe


def _sd3_embeds(batch, seed=8):
    return torch.randn(batch, SD3_IMAGE_TOKENS, SD3_IMAGE_DIM, generator=torch.Generator().manual_seed(seed))


def _flux_embeds(seed=9):
    return [torch.randn(1, 1, FLUX_IMAGE_DIM, generator=torch.Generator().manual_seed(seed))]


# ---------------------------------------------------------------------------------------------------
# Parity with the pipelines


def test_sd3_ip_adapter_cfg_reproduces_the_pipeline(sd3):
    """StableDiffusion3Pipeline takes one tensor, [negative, positive] along the batch under CFG; its transformer
    projects it with the timestep (IPAdapterTimeImageProjection) into every joint block's processor."""
    procs = dict(sd3.transformer.attn_processors)
    kinds = {n.split(".")[0]: type(p).__name__ for n, p in procs.items()}  # (image_proj: the resampler's own)
    assert kinds == {"transformer_blocks": "SD3IPAdapterJointAttnProcessor2_0", "image_proj": "AttnProcessor2_0"}
    assert type(sd3.transformer.image_proj).__name__ == "IPAdapterTimeImageProjection"
    lat = _latents(sd3, seed=1)
    embeds = _sd3_embeds(2)
    kw = {"num_inference_steps": 3, "latents": lat, "output_type": "latent", **KW}
    ref = sd3(PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, ip_adapter_image_embeds=embeds, **kw).images
    out = sd.sample(sd3, PROMPT, negative_prompt=NEGATIVE, guidance="cfg(5.0)", solver="euler", steps=3, latents=lat,
                    output_type="latent", ip_adapter_image_embeds=embeds, **KW)
    assert _maxdiff(out, ref) < TOL  # measured 2.4e-6
    other = sd3(PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, ip_adapter_image_embeds=_sd3_embeds(2, seed=10),
                **kw).images
    assert _maxdiff(other, ref) > 0.02  # the image prompt acts (measured 0.065; steer to the pipeline 2e-6)
    # without CFG the tensor is the positive embeds alone (the pipeline at guidance_scale 1); a batch of 1 is
    # repeated over the prompts as the pipeline repeats it, a batch of one per prompt gives each its own (which the
    # pipeline cannot take: compared with its one-prompt calls)
    prompts, lat2 = [PROMPT, "a green dog"], torch.cat([lat, _latents(sd3, seed=5)])
    kw2 = dict(kw, latents=lat2)
    ref1 = sd3(prompts, guidance_scale=1.0, ip_adapter_image_embeds=embeds[1:], **kw2).images
    out1 = sd.sample(sd3, prompts, guidance=None, steps=3, latents=lat2, output_type="latent",
                     ip_adapter_image_embeds=embeds[1:], **KW)
    assert _maxdiff(out1, ref1) < TOL  # 4.8e-7
    each = _sd3_embeds(2, seed=14)
    ref2 = torch.cat([sd3(p, guidance_scale=1.0, ip_adapter_image_embeds=each[i:i + 1],
                          **dict(kw, latents=lat2[i:i + 1])).images for i, p in enumerate(prompts)])
    out2 = sd.sample(sd3, prompts, guidance=None, steps=3, latents=lat2, output_type="latent",
                     ip_adapter_image_embeds=each, **KW)
    assert _maxdiff(out2, ref2) < TOL  # 2.5e-7
    assert all(sd3.transformer.attn_processors[n] is p for n, p in procs.items())


def test_flux_ip_adapter_true_cfg_and_distilled_reproduce_the_pipeline(flux):
    """FluxPipeline takes ip_adapter_image_embeds and negative_ip_adapter_image_embeds (lists, one tensor per
    adapter) and swaps them between its two calls under true CFG; without negative embeds it encodes a black image
    with its image encoder (so does steer). Without CFG (Flux-dev's distilled guidance only) the positive ones."""
    procs = dict(flux.transformer.attn_processors)
    kinds = {n.split(".")[0]: type(p).__name__ for n, p in procs.items()}
    assert kinds == {"transformer_blocks": "FluxIPAdapterAttnProcessor",
                     "single_transformer_blocks": "FluxAttnProcessor"}
    lat = _latents(flux, seed=2)
    pos, neg = _flux_embeds(9), _flux_embeds(11)
    kw = {"num_inference_steps": 3, "latents": lat, "output_type": "latent", **KW}
    skw = {"steps": 3, "latents": lat, "output_type": "latent", "embedded_guidance": 3.5, **KW}
    ref = flux(PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=3.0, guidance_scale=3.5, ip_adapter_image_embeds=pos,
               negative_ip_adapter_image_embeds=neg, **kw).images
    out = sd.sample(flux, PROMPT, negative_prompt=NEGATIVE, guidance="cfg(3.0)", ip_adapter_image_embeds=pos,
                    negative_ip_adapter_image_embeds=neg, **skw)
    assert _maxdiff(out, ref) < TOL  # measured 1.3e-6
    black = flux(PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=3.0, guidance_scale=3.5,
                 ip_adapter_image_embeds=pos, **kw).images
    out_black = sd.sample(flux, PROMPT, negative_prompt=NEGATIVE, guidance="cfg(3.0)", ip_adapter_image_embeds=pos,
                          **skw)
    assert _maxdiff(out_black, black) < TOL  # 1.9e-6
    assert _maxdiff(black, ref) > 0.01  # the negative image embeds act on the negative branch (2.8)
    distilled = flux(PROMPT, guidance_scale=3.5, ip_adapter_image_embeds=pos, **kw).images
    out_distilled = sd.sample(flux, PROMPT, guidance=None, ip_adapter_image_embeds=pos, **skw)
    assert _maxdiff(out_distilled, distilled) < TOL  # 2.4e-7
    other = flux(PROMPT, guidance_scale=3.5, ip_adapter_image_embeds=_flux_embeds(12), **kw).images
    assert _maxdiff(other, distilled) > 0.05  # the image prompt acts (1.2)
    assert all(flux.transformer.attn_processors[n] is p for n, p in procs.items())


def _image(seed):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8))


def test_flux_ip_adapter_image_reproduces_the_pipeline(flux):
    """ip_adapter_image= / negative_ip_adapter_image= (PIL images) through the image encoder load_ip_adapter loaded:
    steer's true CFG equals FluxPipeline's with the negative image given and omitted (then both encode a black
    image), and equals steer's own call with the embeds FluxPipeline.prepare_ip_adapter_image_embeds makes of the
    same images; without CFG (the distilled guidance only) the positive image alone."""
    lat = _latents(flux, seed=2)
    img, neg_img = _image(1), _image(2)
    kw = {"num_inference_steps": 3, "latents": lat, "output_type": "latent", **KW}
    skw = {"steps": 3, "latents": lat, "output_type": "latent", "embedded_guidance": 3.5, **KW}
    cfg = {"negative_prompt": NEGATIVE, "true_cfg_scale": 3.0, "guidance_scale": 3.5}
    ref = flux(PROMPT, ip_adapter_image=img, negative_ip_adapter_image=neg_img, **cfg, **kw).images
    out = sd.sample(flux, PROMPT, negative_prompt=NEGATIVE, guidance="cfg(3.0)", ip_adapter_image=img,
                    negative_ip_adapter_image=neg_img, **skw)
    assert _maxdiff(out, ref) < TOL  # measured 1.2e-6
    prep = lambda im: flux.prepare_ip_adapter_image_embeds(im, None, "cpu", 1)  # noqa: E731
    via = sd.sample(flux, PROMPT, negative_prompt=NEGATIVE, guidance="cfg(3.0)", ip_adapter_image_embeds=prep(img),
                    negative_ip_adapter_image_embeds=prep(neg_img), **skw)
    assert _maxdiff(out, via) < 1e-6  # 0
    black = flux(PROMPT, ip_adapter_image=img, **cfg, **kw).images
    out_black = sd.sample(flux, PROMPT, negative_prompt=NEGATIVE, guidance="cfg(3.0)", ip_adapter_image=img, **skw)
    assert _maxdiff(out_black, black) < TOL  # 2.1e-6
    assert _maxdiff(black, ref) > 0.01  # the negative image acts on the negative branch (2.1)
    distilled = flux(PROMPT, guidance_scale=3.5, ip_adapter_image=img, **kw).images
    out_distilled = sd.sample(flux, PROMPT, guidance=None, ip_adapter_image=img, **skw)
    assert _maxdiff(out_distilled, distilled) < TOL  # 2.7e-7
    other = sd.sample(flux, PROMPT, guidance=None, ip_adapter_image=neg_img, **skw)
    assert _maxdiff(other, distilled) > 0.05  # the image acts (0.42)


@pytest.fixture(scope="module")
def sd3_image(sd3):
    """sd3 (sharing its transformer and IP-Adapter) with a tiny CLIP image encoder whose penultimate hidden states
    (5 tokens of 12: class token and 2×2 patches) are what the SD3.5 resampler reads."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(6)
    cfg = CLIPVisionConfig(hidden_size=SD3_IMAGE_DIM, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=16, projection_dim=8)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusion3Pipeline.from_pipe(
            sd3, image_encoder=CLIPVisionModelWithProjection(cfg).eval(), feature_extractor=processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sd3_ip_adapter_image_reproduces_the_pipeline(sd3_image):
    """ip_adapter_image= on SD3: the image encoder's penultimate hidden states, zeros as the negative embeds under
    CFG (StableDiffusion3Pipeline.prepare_ip_adapter_image_embeds); steer's cfg equals the pipeline's and steer's
    call with those embeds."""
    pipe, img, lat = sd3_image, _image(1), _latents(sd3_image, seed=1)
    kw = {"num_inference_steps": 3, "latents": lat, "output_type": "latent", **KW}
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, ip_adapter_image=img, **kw).images
    out = sd.sample(pipe, PROMPT, negative_prompt=NEGATIVE, guidance="cfg(5.0)", solver="euler", steps=3, latents=lat,
                    output_type="latent", ip_adapter_image=img, **KW)
    assert _maxdiff(out, ref) < TOL  # measured 2.4e-6
    embeds = pipe.prepare_ip_adapter_image_embeds(img, None, "cpu", 1, True)
    assert embeds.shape == (2, SD3_IMAGE_TOKENS, SD3_IMAGE_DIM) and not embeds[0].any()
    via = sd.sample(pipe, PROMPT, negative_prompt=NEGATIVE, guidance="cfg(5.0)", solver="euler", steps=3, latents=lat,
                    output_type="latent", ip_adapter_image_embeds=embeds, **KW)
    assert _maxdiff(out, via) < 1e-6  # 0
    other = pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, ip_adapter_image=_image(2), **kw).images
    assert _maxdiff(other, ref) > 1e-3  # the image acts (0.038)


# ---------------------------------------------------------------------------------------------------
# PAG on SD3's and Flux's joint attention wraps the IP-Adapter processor


class SD3IPAdapterPAGByHand:
    """SD3IPAdapterJointAttnProcessor2_0 written out with explicit softmaxes, and the PAG authors' masked identity on
    the joint attention of rows ``rows``: there each image query attends to its own image key and every text key;
    text queries attend as usual. The IP-Adapter term (image queries over [image keys, IP tokens], RMS-normed, times
    the adapter's scale) is added on every row, the perturbed ones included."""

    def __init__(self, ip, rows):
        self.ip, self.rows = ip, rows

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, ip_hidden_states=None,
                 temb=None):
        b, n, _ = hidden_states.shape
        split = lambda z: z.view(b, -1, attn.heads, z.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
        merge = lambda z: z.transpose(1, 2).flatten(2)  # noqa: E731
        ident = lambda z: z  # noqa: E731
        q0, k0, v0 = (split(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        q, k = (attn.norm_q or ident)(q0), (attn.norm_k or ident)(k0)
        eq, ek, ev = (split(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        eq, ek = (attn.norm_added_q or ident)(eq), (attn.norm_added_k or ident)(ek)
        q, k, v = torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v0, ev], 2)
        d = q.shape[-1]
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        allowed = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool)
        allowed[:n, :n] = torch.eye(n, dtype=torch.bool)
        logits[self.rows] = logits[self.rows].masked_fill(~allowed, -math.inf)
        out = merge(torch.softmax(logits, -1) @ v)
        img, txt = out[:, :n], out[:, n:]
        ip = self.ip.norm_ip(ip_hidden_states, temb=temb)
        ik, iv = split(self.ip.to_k_ip(ip)), split(self.ip.to_v_ip(ip))
        qi = self.ip.norm_q(q0)
        ki = torch.cat([self.ip.norm_k(k0), self.ip.norm_ip_k(ik)], 2)
        vi = torch.cat([v0, iv], 2)
        img = img + self.ip.scale * merge(torch.softmax((qi @ ki.transpose(-1, -2)) / math.sqrt(d), -1) @ vi)
        img = attn.to_out[1](attn.to_out[0](img))
        return img, (txt if attn.context_pre_only else attn.to_add_out(txt))


def test_sd3_pag_keeps_the_ip_adapter_term_on_the_perturbed_rows(sd3):
    """Rows [uncond, cond, cond] with image embeds [negative, positive, positive]; PAG on transformer_blocks.0.attn
    for the third row. steer intercepts the processor's first attention call (the joint one) and leaves its second
    (the IP-Adapter's) as it is: equal to the processor written out by hand; the other rows are bit-identical to no
    hooks; the perturbed row sees its image prompt. A cfg + pag run leaves every processor object in place."""
    model = sd.denoiser(sd3, height=16, width=16)
    enc = sd.encode(sd3, PROMPT, NEGATIVE, ip_adapter_image_embeds=_sd3_embeds(2), max_sequence_length=16,
                    height=16, width=16)
    cond3 = condlib.cat([enc.uncond, enc.cond, enc.cond])
    x = _latents(sd3, seed=3).repeat(3, 1, 1, 1)
    t = torch.full((3,), 0.6)
    attn = sd3.transformer.transformer_blocks[0].attn
    own = attn.processor
    with torch.no_grad():
        plain = model(x, t, cond3)
        with hooks.perturb(model, {(2, 3): hooks.IdentityAttention("transformer_blocks.0.attn")}):
            got = model(x, t, cond3)
        attn.set_processor(SD3IPAdapterPAGByHand(own, slice(2, 3)))
        try:
            expect = model(x, t, cond3)
            other = model(x, t, condlib.cat([enc.uncond, enc.cond, dict(enc.cond, image_embeds=_sd3_embeds(1, 13))]))
            own.scale = 0.0  # the by-hand processor without the IP term
            no_ip = model(x, t, cond3)
        finally:
            own.scale = 0.5
            attn.set_processor(own)
    assert _maxdiff(got, expect) < 1e-5  # measured 2.4e-7 (explicit softmax against SDPA)
    assert torch.equal(got[:2], plain[:2])
    assert _maxdiff(got[2], plain[2]) > 1e-3  # PAG acts (0.021)
    # the image term is there on the perturbed row: another image moves it, removing the term moves it (0.0064, 0.018)
    assert _maxdiff(expect[2], other[2]) > 1e-3 and _maxdiff(got[2], no_ip[2]) > 1e-3
    procs = dict(sd3.transformer.attn_processors)
    sd.sample(sd3, PROMPT, negative_prompt=NEGATIVE, guidance="cfg(5.0) + pag(3.0)", steps=2, output_type="latent",
              ip_adapter_image_embeds=_sd3_embeds(2), seed=0, **KW)
    assert all(sd3.transformer.attn_processors[n] is p for n, p in procs.items())


class FluxIPAdapterPAGByHand:
    """FluxIPAdapterAttnProcessor (double-stream) written out with explicit softmaxes, and the masked identity on the
    joint attention over [text, image] of rows ``rows`` (image→image block the identity, as on SD3). The IP-Adapter
    term (the qk-normed image queries, before RoPE, over each adapter's tokens, times its scale) is returned for
    every row, the perturbed ones included; the block adds it after its feed-forward."""

    def __init__(self, ip, rows):
        self.ip, self.rows = ip, rows

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 ip_hidden_states=None, ip_adapter_masks=None):
        from diffusers.models.embeddings import apply_rotary_emb

        b, n, _ = hidden_states.shape
        m = encoder_hidden_states.shape[1]
        heads = lambda z: z.unflatten(-1, (attn.heads, -1))  # noqa: E731  [b, tokens, heads, d]
        q = attn.norm_q(heads(attn.to_q(hidden_states)))
        k = attn.norm_k(heads(attn.to_k(hidden_states)))
        v = heads(attn.to_v(hidden_states))
        eq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
        ek = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
        ev = heads(attn.add_v_proj(encoder_hidden_states))
        qq, kk = (apply_rotary_emb(torch.cat(z, 1), image_rotary_emb, sequence_dim=1) for z in ((eq, q), (ek, k)))
        vv = torch.cat([ev, v], 1)
        qq, kk, vv = (z.transpose(1, 2) for z in (qq, kk, vv))  # [b, heads, tokens, d]
        d = qq.shape[-1]
        logits = (qq @ kk.transpose(-1, -2)) / math.sqrt(d)
        allowed = torch.ones(m + n, m + n, dtype=torch.bool)
        allowed[m:, m:] = torch.eye(n, dtype=torch.bool)
        logits[self.rows] = logits[self.rows].masked_fill(~allowed, -math.inf)
        out = (torch.softmax(logits, -1) @ vv).transpose(1, 2).flatten(2)
        txt, img = out[:, :m], out[:, m:]
        img, txt = attn.to_out[1](attn.to_out[0](img)), attn.to_add_out(txt)
        ip_out = torch.zeros_like(img)
        qi = q.transpose(1, 2)
        for tokens, scale, to_k_ip, to_v_ip in zip(ip_hidden_states, self.ip.scale, self.ip.to_k_ip, self.ip.to_v_ip):
            ki = to_k_ip(tokens).reshape(b, -1, attn.heads, d).transpose(1, 2)
            vi = to_v_ip(tokens).reshape(b, -1, attn.heads, d).transpose(1, 2)
            ip_out = ip_out + scale * (torch.softmax((qi @ ki.transpose(-1, -2)) / math.sqrt(d), -1) @ vi
                                       ).transpose(1, 2).flatten(2)
        return img, txt, ip_out


def test_flux_pag_keeps_the_ip_adapter_term_on_the_perturbed_rows(flux):
    """As on SD3, for Flux's double-stream IP-Adapter processor: rows [negative, positive, positive] with their own
    image embeds, PAG on transformer_blocks.0.attn for the third row, against the processor written out by hand."""
    model = sd.denoiser(flux, height=16, width=16)
    enc = sd.encode(flux, PROMPT, NEGATIVE, ip_adapter_image_embeds=_flux_embeds(9),
                    negative_ip_adapter_image_embeds=_flux_embeds(11), max_sequence_length=16, height=16, width=16)
    cond3 = condlib.cat([enc.uncond, enc.cond, enc.cond])
    x = _latents(flux, seed=4).repeat(3, 1, 1)
    t = torch.full((3,), 0.6)
    attn = flux.transformer.transformer_blocks[0].attn
    own = attn.processor
    with torch.no_grad():
        plain = model(x, t, cond3)
        with hooks.perturb(model, {(2, 3): hooks.IdentityAttention("transformer_blocks.0.attn")}):
            got = model(x, t, cond3)
        attn.set_processor(FluxIPAdapterPAGByHand(own, slice(2, 3)))
        try:
            expect = model(x, t, cond3)
            other = model(x, t, condlib.cat([enc.uncond, enc.cond, dict(enc.cond, image_embeds=_flux_embeds(13))]))
            own.scale = [0.0]  # the by-hand processor without the IP term
            no_ip = model(x, t, cond3)
        finally:
            own.scale = [1.0]
            attn.set_processor(own)
    assert _maxdiff(got, expect) < 1e-5  # measured 3.6e-7
    assert torch.equal(got[:2], plain[:2])
    assert _maxdiff(got[2], plain[2]) > 1e-3  # PAG acts (0.10)
    # the image term is there on the perturbed row: another image moves it, removing the term moves it (1.2, 1.4)
    assert _maxdiff(expect[2], other[2]) > 1e-3 and _maxdiff(got[2], no_ip[2]) > 1e-3
    procs = dict(flux.transformer.attn_processors)
    sd.sample(flux, PROMPT, guidance="pag(3.0)", steps=2, output_type="latent", embedded_guidance=3.5,
              ip_adapter_image_embeds=_flux_embeds(9), seed=0, **KW)
    assert all(flux.transformer.attn_processors[n] is p for n, p in procs.items())


# ---------------------------------------------------------------------------------------------------
# Errors


def test_ip_adapter_embeds_errors_on_sd3_and_flux(sd3, flux, monkeypatch):
    call = {"steps": 1, "output_type": "latent", **KW}
    with pytest.raises(ValueError, match="on SD3 ip_adapter_image_embeds is one 3-D tensor .* got a list"):
        sd.sample(sd3, PROMPT, guidance="cfg(3)", ip_adapter_image_embeds=[_sd3_embeds(2)], **call)
    with pytest.raises(ValueError, match="batch must be even"):
        sd.sample(sd3, PROMPT, guidance="cfg(3)", ip_adapter_image_embeds=_sd3_embeds(3), **call)
    with pytest.raises(ValueError, match="has width 7; the loaded IP-Adapter takes 12"):
        sd.sample(sd3, PROMPT, guidance="cfg(3)", ip_adapter_image_embeds=torch.zeros(2, 5, 7), **call)
    with pytest.raises(ValueError, match="negative_ip_adapter_image_embeds= is FluxPipeline's argument"):
        sd.sample(sd3, PROMPT, guidance="cfg(3)", ip_adapter_image_embeds=_sd3_embeds(2),
                  negative_ip_adapter_image_embeds=_sd3_embeds(1), **call)
    with pytest.raises(ValueError, match="on Flux ip_adapter_image_embeds is a list of 3-D tensors"):
        sd.sample(flux, PROMPT, guidance=None, ip_adapter_image_embeds=[torch.zeros(1, 1, 1, 12)], **call)
    with pytest.raises(ValueError, match="2 tensors for 1 loaded IP-Adapter"):
        sd.sample(flux, PROMPT, guidance=None, ip_adapter_image_embeds=_flux_embeds() * 2, **call)
    with pytest.raises(ValueError, match="allowed: 1 .* or 1"):
        sd.sample(flux, PROMPT, guidance=None, ip_adapter_image_embeds=[torch.zeros(2, 1, 12)], **call)
    with pytest.raises(ValueError, match="has an IP-Adapter loaded .* pass ip_adapter_image_embeds="):
        sd.sample(flux, PROMPT, guidance=None, **call)  # (FluxPipeline: TypeError 'NoneType' object is not iterable)
    with pytest.raises(ValueError, match="needs ip_adapter_image_embeds="):
        sd.sample(flux, PROMPT, guidance=None, negative_ip_adapter_image_embeds=_flux_embeds(), **call)
    with pytest.raises(ValueError, match="pass negative_ip_adapter_image= or negative_ip_adapter_image_embeds=, not"):
        sd.sample(flux, PROMPT, negative_prompt=NEGATIVE, guidance="cfg(3)", ip_adapter_image=_image(1),
                  negative_ip_adapter_image=_image(2), negative_ip_adapter_image_embeds=_flux_embeds(), **call)
    with pytest.raises(ValueError, match="negative_ip_adapter_image= needs ip_adapter_image_embeds= or "
                                         "ip_adapter_image="):
        sd.sample(flux, PROMPT, negative_prompt=NEGATIVE, guidance="cfg(3)", negative_ip_adapter_image=_image(2),
                  **call)
    monkeypatch.setattr(flux, "image_encoder", None)
    with pytest.raises(ValueError, match="needs negative_ip_adapter_image_embeds=.*black image"):
        sd.sample(flux, PROMPT, negative_prompt=NEGATIVE, guidance="cfg(3)", ip_adapter_image_embeds=_flux_embeds(),
                  **call)
    with pytest.raises(ValueError, match=r"ip_adapter_image= needs the IP-Adapter's image encoder.*"
                                         r"pipe.load_ip_adapter\(\.\.\., image_encoder_folder=\.\.\.\)"):
        sd.sample(flux, PROMPT, guidance=None, ip_adapter_image=_image(1), **call)
    monkeypatch.setattr(sd3.transformer, "image_proj", None)  # as a pipeline without load_ip_adapter
    with pytest.raises(ValueError, match="needs an IP-Adapter loaded into the transformer"):
        sd.sample(sd3, PROMPT, guidance="cfg(3)", ip_adapter_image_embeds=_sd3_embeds(2), **call)
