"""steer on diffusers pipelines: a UNet or flow transformer as a steer Denoiser, and ``sample(pipe, ...)``.

``denoiser(pipe)`` wraps the pipeline's network with the path, prediction kind and timestep mapping its scheduler
config describes:

=================================  ============================  =========================  =====================
network                            path                          prediction                 network's timestep
=================================  ============================  =========================  =====================
``UNet2DConditionModel``           VP, the scheduler's β table   ``eps`` / ``v`` (the       ``τ = T·t − 1``
(SD1.5, SD2, SDXL)                 (``alphas_cumprod``)          config's prediction_type)
``SD3Transformer2DModel``          flow, shift from the config   ``flow`` (u = ε − x0)      ``1000·t``
``FluxTransformer2DModel``         flow, shift ``e^μ`` with μ    ``flow``                   ``t`` (Flux scales it)
                                   from the image size
=================================  ============================  =========================  =====================

The conditioning is a dict (a steer Cond: concatenated, indexed and repeated along the batch): the prompt
embeddings ``encoder_hidden_states``; SDXL adds ``text_embeds`` and ``time_ids``; SD3 and Flux add
``pooled_projections``; Flux adds ``txt_ids``/``img_ids`` (kept with a batch dimension so the Cond can be
concatenated; the network gets row 0) and, for guidance-distilled checkpoints (Flux-dev), the embedded guidance
scale ``guidance``. Flux-dev has no unconditional branch: CFG-family methods on it need a ``negative_prompt``.

``sample(pipe, prompt, guidance=..., solver=..., steps=...)`` encodes the prompts with the pipeline's own
``encode_prompt``, steps through the time grid the pipeline's own scheduler would use, evaluates every branch of
the guidance in one forward pass of the network per step (steer's loop batches them) and decodes with the
pipeline's VAE and image processor, so ``cfg`` with the solver matching the pipeline's scheduler reproduces the
pipeline's output (tests/test_diffusers_adapter.py).

Where this differs from diffusers: steer maps a fractional time to the fractional timestep ``T·t − 1`` (linear in
t), while diffusers' k-diffusion schedulers interpolate the timestep linearly in ``log σ̄``; the two agree on the
integer timesteps that "leading" and "trailing" spacings use, and differ by less than one timestep between them
(Euler "linspace", Karras sigmas). DDIM's ``clip_sample``/``thresholding`` options are not applied.

Attention hooks (PAG, SEG, TPG, NAG, SAG, skip-layer) reach the network through ``Denoiser.sites()``, which
delegates to ``steer.integrations.diffusers_attention``.

What users load into a pipeline is used as the pipeline uses it: LoRA (``pipe.load_lora_weights``; its scale as
``cross_attention_kwargs={"scale": s}`` / ``joint_attention_kwargs``, or ``pipe.set_adapters``), IP-Adapter
(``pipe.load_ip_adapter``; ``ip_adapter_image_embeds`` as the pipeline takes them: on UNet pipelines into
``added_cond_kwargs["image_embeds"]``, on SD3 and Flux into ``joint_attention_kwargs["ip_adapter_image_embeds"]``,
Flux with ``negative_ip_adapter_image_embeds`` for true CFG; or the raw ``ip_adapter_image``, encoded by the
pipeline's own ``prepare_ip_adapter_image_embeds``); the hooks wrap those processors and layers
(tests/test_diffusers_adapter.py, tests/test_diffusers_ip_adapter_dit.py).
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path as FilePath

import numpy as np
import torch

from ..paths import VP, Flow, get_path
from ..prediction import check_kind
from .diffusers_schedulers import _PREDICTION_TYPES, scheduler_levels, steer_noise

__all__ = ["DiffusersDenoiser", "denoiser", "sample", "load", "layers", "pipeline_grid", "matched_solver",
           "DEFAULT_GUIDANCE"]

_KIND_OF_PREDICTION = {v: k for k, v in _PREDICTION_TYPES.items()}  # diffusers prediction_type -> steer kind

DEFAULT_GUIDANCE = {"sd": "cfg(scale=7.5)", "sdxl": "cfg(scale=5.0)", "sd3": "cfg(scale=7.0)", "flux": None}
"""``guidance="default"``: each pipeline's own default (its ``__call__``'s guidance_scale; Flux: no CFG, its
distilled guidance is embedded, see ``embedded_guidance``)."""


def _family(pipe) -> str:
    """'sd', 'sdxl', 'sd3' or 'flux' from the pipeline's network and methods."""
    unet = getattr(pipe, "unet", None)
    if unet is not None and type(unet).__name__ == "UNet2DConditionModel":
        return "sdxl" if hasattr(pipe, "_get_add_time_ids") else "sd"
    name = type(getattr(pipe, "transformer", None)).__name__
    if name == "SD3Transformer2DModel":
        return "sd3"
    if name == "FluxTransformer2DModel":
        return "flux"
    raise TypeError(f"steer supports diffusers pipelines with a UNet2DConditionModel (SD1.5, SD2, SDXL), an "
                    f"SD3Transformer2DModel or a FluxTransformer2DModel; {type(pipe).__name__} has none of these")


def _network(pipe):
    return pipe.unet if _family(pipe) in ("sd", "sdxl") else pipe.transformer


_CACHE: dict = {}  # (what, key) -> VP path or (scheduler, grid): building them costs ~10 ms per call


def _key(config) -> str:
    return json.dumps(dict(config), sort_keys=True, default=str)


def vp_path(scheduler_config) -> VP:
    """The VP path of a diffusers scheduler config: its ``alphas_cumprod`` table (diffusers computes it), named
    after steer's path when it is one of them."""
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")
    cfg = {k: scheduler_config[k] for k in keys if k in scheduler_config}
    key = ("vp", _key(cfg))
    if key not in _CACHE:
        ac = DDPMScheduler(**cfg).alphas_cumprod.double()
        path = VP(ac.numpy(), name="vp")
        for name in ("vp-scaled-linear", "vp-linear", "vp-cosine"):
            named = get_path(name, T=len(ac))
            if torch.equal(named.alphas_cumprod, ac):
                path = named
                break
        _CACHE[key] = path
    return _CACHE[key]


def _flux_mu(scheduler_config, image_seq_len: int) -> float:
    """Flux's resolution-dependent shift μ (diffusers' ``calculate_shift``: linear in the token count)."""
    get = scheduler_config.get
    base_len, max_len = get("base_image_seq_len", 256), get("max_image_seq_len", 4096)
    base, top = get("base_shift", 0.5), get("max_shift", 1.15)
    m = (top - base) / (max_len - base_len)
    return image_seq_len * m + (base - m * base_len)


def flow_path(scheduler_config, mu: float | None = None) -> Flow:
    """The flow path of a FlowMatch scheduler config: a static ``shift`` is SD3's time shift; with
    ``use_dynamic_shifting`` the shift is ``e^μ`` (Flux's resolution-dependent μ, ``_set_timesteps_kwargs``). The
    shift moves the default time grid only, never the ODE."""
    if scheduler_config.get("use_dynamic_shifting"):
        if mu is None:
            raise ValueError("this scheduler shifts by image size (use_dynamic_shifting): pass mu")
        exponential = scheduler_config.get("time_shift_type", "exponential") == "exponential"
        return Flow(shift=math.exp(mu)) if exponential else Flow()  # "linear" shifting is no time shift of Flow
    return Flow(shift=float(scheduler_config.get("shift", 1.0)))


def _set_timesteps_kwargs(pipe, family: str, steps: int, shape) -> dict:
    """The arguments the pipeline's ``__call__`` gives its scheduler's ``set_timesteps`` for ``steps`` steps and
    latents of ``shape`` (unpacked): Flux always passes μ from its token count and ``sigmas = linspace(1, 1/N,
    N)``; SD3 passes μ only with ``use_dynamic_shifting`` (``max_shift`` default 1.16); UNet pipelines nothing."""
    config = pipe.scheduler.config
    if family == "flux":
        kwargs = {"mu": _flux_mu(config, (shape[2] // 2) * (shape[3] // 2))}
        if not config.get("use_flow_sigmas", False):
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        return kwargs
    if family == "sd3" and config.get("use_dynamic_shifting"):
        p = pipe.transformer.config.patch_size
        return {"mu": _flux_mu({"max_shift": 1.16, **config}, (shape[2] // p) * (shape[3] // p))}
    return {}


class DiffusersDenoiser(torch.nn.Module):
    """A diffusers UNet or flow transformer as a steer Denoiser ``model(x, t, cond)`` (see the module docstring).

    ``x`` is in the pipeline's latent layout (Flux: packed tokens ``[B, N, 4C]``); ``t`` is steer's continuous time
    (``t = 1`` noise); ``cond`` the dict described above. The network runs on its own device and dtype; the output
    has the dtype of ``x``. ``sites()`` exposes the attention layers to steer's hooks.
    """

    def __init__(self, net, family: str, path, prediction: str, sample_shape=None, call_kwargs=None):
        super().__init__()
        if family not in ("sd", "sdxl", "sd3", "flux"):
            raise ValueError(f"unknown model family {family!r}; allowed: sd, sdxl, sd3, flux")
        self.net, self.family, self.path = net, family, get_path(path)
        self.prediction = check_kind(prediction)
        self.sample_shape = None if sample_shape is None else tuple(sample_shape)
        self.call_kwargs = dict(call_kwargs or {})  # cross_attention_kwargs / joint_attention_kwargs (LoRA scale…)
        self.net_dtype = net.dtype  # read once: diffusers' ModelMixin.dtype walks every submodule

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The network's timestep at steer time ``t`` (see the module docstring's table)."""
        if self.family in ("sd", "sdxl"):  # in t's dtype (no float64 on every device); float32 t is exact to 6e-5
            return (t * self.path.T - 1).float()
        return t.float() * 1000  # flow: diffusers' timesteps are sigmas·1000 in float32

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        if not isinstance(cond, dict) or "encoder_hidden_states" not in cond:
            raise ValueError("a diffusers Denoiser needs cond = {'encoder_hidden_states': ..., ...} (see "
                             "steer.integrations.diffusers.encode)")
        dtype = self.net_dtype
        tau = self.timestep(t.reshape(-1).expand(x.shape[0]))
        h = cond["encoder_hidden_states"].to(dtype)
        if self.family in ("sd", "sdxl"):
            added = {}
            if "text_embeds" in cond:
                added = {"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"]}
            if "image_embeds" in cond:  # IP-Adapter: one tensor per loaded adapter, projected by encoder_hid_proj
                added["image_embeds"] = [e.to(dtype) for e in cond["image_embeds"]]
            out = self.net(x.to(dtype), tau, encoder_hidden_states=h, added_cond_kwargs=added or None,
                           cross_attention_kwargs=self.call_kwargs.get("cross_attention_kwargs"), return_dict=False)[0]
        elif self.family == "sd3":
            out = self.net(hidden_states=x.to(dtype), timestep=tau, encoder_hidden_states=h,
                           pooled_projections=cond["pooled_projections"].to(dtype),
                           joint_attention_kwargs=self._joint_kwargs(cond, dtype), return_dict=False)[0]
        else:
            guidance = cond.get("guidance")
            # FluxPipeline passes the time (timestep / 1000) rounded to the network's dtype
            out = self.net(hidden_states=x.to(dtype), timestep=tau.to(dtype) / 1000, guidance=guidance,
                           pooled_projections=cond["pooled_projections"].to(dtype), encoder_hidden_states=h,
                           txt_ids=cond["txt_ids"][0], img_ids=cond["img_ids"][0],
                           joint_attention_kwargs=self._joint_kwargs(cond, dtype), return_dict=False)[0]
        return out.to(x.dtype)

    def _joint_kwargs(self, cond: dict, dtype) -> dict | None:
        """SD3's and Flux's ``joint_attention_kwargs``: the call's own (LoRA scale) plus, with an IP-Adapter, the
        image embeds of these rows as their pipelines put them there (SD3: one tensor, projected with the timestep
        by ``image_proj``; Flux: one tensor per adapter, projected by ``encoder_hid_proj``)."""
        kwargs = self.call_kwargs.get("joint_attention_kwargs")
        if "image_embeds" not in cond:
            return kwargs
        e = cond["image_embeds"]
        e = e.to(dtype) if isinstance(e, torch.Tensor) else [t.to(dtype) for t in e]
        return {**(kwargs or {}), "ip_adapter_image_embeds": e}

    def sites(self) -> dict:
        """The network's attention sites for steer's hooks (from ``steer.integrations.diffusers_attention``)."""
        return _attention_sites(self.net)

    def extra_repr(self) -> str:
        return f"family={self.family!r}, path={self.path.name!r}, prediction={self.prediction!r}"


def _hooks_module():
    try:
        from . import diffusers_attention
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.diffusers_attention":
            raise
        raise NotImplementedError(
            "attention hooks for diffusers models (steer.integrations.diffusers_attention) are not part of this "
            "build: PAG, SEG, SAG, TPG, NAG and skip-layer cannot reach a diffusers network yet; CFG-family "
            "guidance works without them") from None
    return diffusers_attention


def _attention_sites(net) -> dict:
    return _hooks_module().attention_sites(net)


def layers(pipe):
    """The hookable layers of a pipeline's network in order (``steer.integrations.diffusers_attention.layers``:
    ``print`` it for a table of name, kind, role and token grid); the names (or fnmatch patterns such as
    ``"mid_block.*.attn1"``, or indices) go into ``layers=`` of perturbation methods."""
    return _hooks_module().layers(_network(pipe))


def _size(pipe, family: str, height, width) -> tuple[int, int]:
    net = _network(pipe)
    if family == "flux":
        default = 128 * pipe.vae_scale_factor
        return height or default, width or default
    default = net.config.sample_size * pipe.vae_scale_factor
    return height or default, width or default


def _latent_shape(pipe, family: str, batch: int, height: int, width: int) -> tuple[int, ...]:
    """The shape of the initial noise the pipeline draws (Flux: before packing)."""
    f = pipe.vae_scale_factor
    net = _network(pipe)
    if family == "flux":
        h, w = 2 * (int(height) // (f * 2)), 2 * (int(width) // (f * 2))
        return (batch, net.config.in_channels // 4, h, w)
    return (batch, net.config.in_channels, int(height) // f, int(width) // f)


def _pack(latents: torch.Tensor) -> torch.Tensor:
    """Flux's 2×2 patch packing ``[B, C, H, W] -> [B, HW/4, 4C]``."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _flux_image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Flux's image token ids ``(0, row, column)`` of the packed ``h/2 × w/2`` grid."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def _attention_kwargs(family: str, cross_attention_kwargs, joint_attention_kwargs) -> dict:
    """The per-call keyword arguments of the network under the name its pipeline's ``__call__`` uses: UNet
    pipelines take ``cross_attention_kwargs``, SD3 and Flux ``joint_attention_kwargs`` (``{"scale": s}``: the LoRA
    scale)."""
    unet = family in ("sd", "sdxl")
    given, other = ((cross_attention_kwargs, joint_attention_kwargs) if unet
                    else (joint_attention_kwargs, cross_attention_kwargs))
    if other is not None:
        right, wrong = (("cross_attention_kwargs", "joint_attention_kwargs") if unet
                        else ("joint_attention_kwargs", "cross_attention_kwargs"))
        raise ValueError(f"a {family} pipeline takes {right}=, not {wrong}=")
    if given is not None and not isinstance(given, dict):
        raise ValueError(f"cross_attention_kwargs / joint_attention_kwargs must be a dict, got {type(given).__name__}")
    if given is None:
        return {}
    return {"cross_attention_kwargs" if unet else "joint_attention_kwargs": dict(given)}


def denoiser(pipe, height: int | None = None, width: int | None = None, cross_attention_kwargs: dict | None = None,
             joint_attention_kwargs: dict | None = None) -> DiffusersDenoiser:
    """The pipeline's network as a steer Denoiser, with the path of its scheduler config (Flux and dynamically
    shifted SD3.5: the shift for an image of ``height × width``, default the pipeline's default size).

    ``cross_attention_kwargs`` (UNet pipelines) or ``joint_attention_kwargs`` (SD3, Flux) go to every network call,
    as the pipeline's ``__call__`` passes them (``{"scale": 0.5}``: the LoRA scale of adapters loaded with
    ``pipe.load_lora_weights``)."""
    family = _family(pipe)
    net = _network(pipe)
    call = _attention_kwargs(family, cross_attention_kwargs, joint_attention_kwargs)
    config = pipe.scheduler.config
    height, width = _size(pipe, family, height, width)
    shape = _latent_shape(pipe, family, 1, height, width)
    if family in ("sd", "sdxl"):
        kind = config.get("prediction_type", "epsilon")
        if kind not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {kind!r} for a UNet; allowed: epsilon, v_prediction, sample")
        return DiffusersDenoiser(net, family, vp_path(config), _KIND_OF_PREDICTION[kind], shape[1:], call)
    path = flow_path(config, _set_timesteps_kwargs(pipe, family, 1, shape).get("mu"))
    if family == "flux":
        tokens = (shape[2] // 2) * (shape[3] // 2)
        return DiffusersDenoiser(net, family, path, "flow", (tokens, shape[1] * 4), call)
    return DiffusersDenoiser(net, family, path, "flow", shape[1:], call)


def pipeline_grid(pipe, steps: int, height: int | None = None, width: int | None = None, path=None):
    """The time grid the pipeline's own scheduler steps through for ``steps`` steps at ``height × width``, set up
    as the pipeline's ``__call__`` sets it up (``_set_timesteps_kwargs``). Returns ``(scheduler, grid)``: a fresh
    scheduler of the pipeline's class and config (the pipeline's own is untouched) and the decreasing float64
    steer times it steps through (``scheduler_levels``) on ``path`` (default: the pipeline Denoiser's)."""
    family = _family(pipe)
    height, width = _size(pipe, family, height, width)
    path = path if path is not None else denoiser(pipe, height, width).path
    kwargs = _set_timesteps_kwargs(pipe, family, steps, _latent_shape(pipe, family, 1, height, width))
    key = ("grid", type(pipe.scheduler).__name__, _key(pipe.scheduler.config), steps, repr(kwargs), repr(path))
    if key not in _CACHE:
        sch = type(pipe.scheduler).from_config(pipe.scheduler.config)
        if "sigmas" in kwargs:
            sch.set_timesteps(**kwargs)
        else:
            sch.set_timesteps(steps, **kwargs)
        _CACHE[key] = sch, scheduler_levels(sch, path)[1]
    sch, grid = _CACHE[key]
    return sch, grid.clone()


def matched_solver(scheduler) -> str:
    """The steer solver that takes the same steps as a diffusers scheduler (``dpmpp_2m`` where none does)."""
    name, cfg = type(scheduler).__name__, scheduler.config
    if name in ("EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"):
        return "euler"
    if name in ("HeunDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"):
        return "heun"
    if name == "EulerAncestralDiscreteScheduler":
        return "euler_ancestral"
    if name == "DDIMScheduler":
        return "ddim"
    if name == "DPMSolverMultistepScheduler" and cfg.get("algorithm_type") == "dpmsolver++":
        return {2: "dpmpp_2m", 3: "dpmpp_3m"}.get(cfg.get("solver_order"), "dpmpp_2m")
    if name == "UniPCMultistepScheduler":
        return f"unipc(order={cfg.get('solver_order', 2)})"
    return "dpmpp_2m"


@dataclass
class Encoded:
    """Prompt conditionings of one call: ``cond`` and ``uncond`` (None without a negative branch)."""

    cond: dict
    uncond: dict | None


def encode(pipe, prompt=None, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
           num_images_per_prompt: int = 1, negative: bool = True, height: int | None = None, width: int | None = None,
           embedded_guidance: float | None = 3.5, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None,
           max_sequence_length: int | None = None, device=None, ip_adapter_image_embeds=None,
           lora_scale: float | None = None, negative_ip_adapter_image_embeds=None, ip_adapter_image=None,
           negative_ip_adapter_image=None) -> Encoded:
    """Encode prompts with the pipeline's own ``encode_prompt`` into steer conditionings (see the module docstring).

    ``negative=False`` skips the negative branch (guidance without an unconditional branch). Flux encodes a
    negative only when ``negative_prompt``/``negative_prompt_embeds`` is given, as its pipeline does for true CFG.
    ``lora_scale`` scales the text encoders' LoRA layers as the pipeline's ``__call__`` does with the ``"scale"`` of
    its ``cross_attention_kwargs``/``joint_attention_kwargs``.

    IP-Adapter image embeddings (an adapter loaded with ``pipe.load_ip_adapter``), in the format of the pipeline's
    argument of that name; they go to ``cond``/``uncond`` as ``image_embeds``. A batch of 1 is repeated over the
    prompts (as the pipelines repeat it); a batch equal to the number of images gives each its own.

    - SD1.5/SD2/SDXL: ``ip_adapter_image_embeds`` a list with one tensor per adapter, ``[batch, images, dim]``
      (or 4-D); with ``negative`` the negative embeds come first along the batch (``torch.cat([negative,
      positive])``), as the pipeline takes them under CFG. They reach the UNet in ``added_cond_kwargs``.
    - SD3 (SD3.5 IP-Adapter): one tensor ``[batch, tokens, dim]`` (the image encoder's penultimate hidden states),
      the negative first along the batch with ``negative``, as ``StableDiffusion3Pipeline`` takes it. It reaches the
      transformer in ``joint_attention_kwargs``, projected there with the timestep (``image_proj``).
    - Flux (XLabs IP-Adapter): ``ip_adapter_image_embeds`` and ``negative_ip_adapter_image_embeds`` separately, each
      a list with one ``[batch, images, dim]`` tensor per adapter (or one tensor), as ``FluxPipeline`` takes them.
      The negative ones serve the negative prompt's branch (true CFG); when they are not given, the pipeline's image
      encoder encodes a black image as ``FluxPipeline`` does (without an image encoder: an error).

    ``ip_adapter_image`` (and on Flux ``negative_ip_adapter_image``), the raw image(s) as the pipelines take them
    (one per adapter), instead of the embeds: encoded by the pipeline's own ``prepare_ip_adapter_image_embeds`` with
    its image encoder, under CFG (``negative``) with the negative embeds it makes (SD/SDXL: the encoder's embeds of
    a zero image, or zeros; SD3: zeros; Flux: a black image's, or ``negative_ip_adapter_image``'s).
    """
    family = _family(pipe)
    for image, embeds, name in ((ip_adapter_image, ip_adapter_image_embeds, "ip_adapter_image"),
                                (negative_ip_adapter_image, negative_ip_adapter_image_embeds,
                                 "negative_ip_adapter_image")):
        if image is not None and embeds is not None:
            raise ValueError(f"pass {name}= or {name}_embeds=, not both (as the pipelines' check_inputs)")
    if negative_ip_adapter_image is not None and family != "flux":
        raise ValueError(f"negative_ip_adapter_image= is FluxPipeline's argument; a {family} pipeline makes the "
                         "negative image embeds itself under CFG")
    if negative_ip_adapter_image_embeds is not None and family != "flux":
        raise ValueError(f"negative_ip_adapter_image_embeds= is FluxPipeline's argument; a {family} pipeline takes the "
                         "negative image embeds in ip_adapter_image_embeds (torch.cat([negative, positive]))")
    enc = _encode_prompts(pipe, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
                          negative, height, width, embedded_guidance, pooled_prompt_embeds,
                          negative_pooled_prompt_embeds, max_sequence_length, device, lora_scale)
    if ip_adapter_image is not None or negative_ip_adapter_image is not None:
        cond_device = enc.cond["encoder_hidden_states"].device
        if ip_adapter_image is not None:
            ip_adapter_image_embeds = _encode_image(pipe, family, ip_adapter_image, negative, cond_device,
                                                    "ip_adapter_image")
        if negative_ip_adapter_image is not None:
            negative_ip_adapter_image_embeds = _encode_image(pipe, family, negative_ip_adapter_image, False,
                                                             cond_device, "negative_ip_adapter_image")
    if negative_ip_adapter_image_embeds is not None and ip_adapter_image_embeds is None:
        raise ValueError("negative_ip_adapter_image_embeds= / negative_ip_adapter_image= needs "
                         "ip_adapter_image_embeds= or ip_adapter_image= (the positive ones)")
    if ip_adapter_image_embeds is None:
        if family == "flux" and type(getattr(pipe.transformer, "encoder_hid_proj", None)).__name__ == \
                "MultiIPAdapterImageProjection":  # its processors fail on a call without image tokens
            raise ValueError("this Flux pipeline has an IP-Adapter loaded (pipe.load_ip_adapter) and its attention "
                             "processors need image embeds on every call: pass ip_adapter_image_embeds= (FluxPipeline "
                             "needs them too), or call pipe.unload_ip_adapter()")
        return enc
    cond_device = enc.cond["encoder_hidden_states"].device
    batch = enc.cond["encoder_hidden_states"].shape[0]
    if family == "flux":
        proj = _ip_projection(pipe, family)
        pos = _flux_image_embeds(ip_adapter_image_embeds, proj, batch, cond_device, "ip_adapter_image_embeds")
        enc.cond["image_embeds"] = pos
        if enc.uncond is not None:
            if negative_ip_adapter_image_embeds is None:
                negative_ip_adapter_image_embeds = _black_image_embeds(pipe, proj, height, width, cond_device)
            enc.uncond["image_embeds"] = _flux_image_embeds(negative_ip_adapter_image_embeds, proj, batch,
                                                            cond_device, "negative_ip_adapter_image_embeds")
        return enc
    pos, neg = _image_embeds(pipe, ip_adapter_image_embeds, batch, negative, cond_device)
    enc.cond["image_embeds"] = pos
    if enc.uncond is not None:
        enc.uncond["image_embeds"] = neg
    return enc


def _encode_image(pipe, family: str, image, negative: bool, device, what: str):
    """IP-Adapter embeds of raw images by the pipeline's own ``prepare_ip_adapter_image_embeds`` (one image per
    adapter; SD/SDXL/SD3 with ``do_classifier_free_guidance=negative``: ``[negative, positive]`` along the batch),
    in the format ``ip_adapter_image_embeds`` takes."""
    _ip_projection(pipe, family, what)
    if getattr(pipe, "image_encoder", None) is None or getattr(pipe, "feature_extractor", None) is None:
        raise ValueError(f"{what}= needs the IP-Adapter's image encoder, and this pipeline has none loaded: load it "
                         "with pipe.load_ip_adapter(..., image_encoder_folder=...) (or set pipe.image_encoder and "
                         "pipe.feature_extractor), or pass the precomputed ip_adapter_image_embeds=")
    with torch.no_grad():  # (the pipelines check the number of images against the adapters)
        if family == "flux":
            return pipe.prepare_ip_adapter_image_embeds(image, None, device, 1)
        return pipe.prepare_ip_adapter_image_embeds(image, None, device, 1, negative)


def _ip_projection(pipe, family: str, what: str = "ip_adapter_image_embeds"):
    """The loaded IP-Adapter's image projection (a clear error when none is loaded)."""
    net = _network(pipe)
    proj = {"sd": getattr(net, "encoder_hid_proj", None), "sdxl": getattr(net, "encoder_hid_proj", None),
            "sd3": getattr(net, "image_proj", None), "flux": getattr(net, "encoder_hid_proj", None)}[family]
    expected = "IPAdapterTimeImageProjection" if family == "sd3" else "MultiIPAdapterImageProjection"
    if type(proj).__name__ != expected:
        where = "UNet" if family in ("sd", "sdxl") else "transformer"
        raise ValueError(f"{what}= needs an IP-Adapter loaded into the {where} "
                         "(pipe.load_ip_adapter)")
    return proj


def _rows(e: torch.Tensor, batch: int, device, what: str) -> torch.Tensor:
    if e.shape[0] not in (1, batch):
        raise ValueError(f"{what}: each part has batch {e.shape[0]}; allowed: 1 (repeated over the prompts) or "
                         f"{batch}")
    return e.to(device).expand(batch, *e.shape[1:]) if e.shape[0] == 1 else e.to(device)


def _image_embeds(pipe, embeds, batch: int, negative: bool, device) -> tuple[list, list | None]:
    """IP-Adapter image embeddings of SD/SDXL/SD3 as the pipeline's ``prepare_ip_adapter_image_embeds`` takes
    precomputed ones: ``(positive, negative)`` with ``batch`` rows each (lists of tensors; SD3: one tensor)."""
    family = _family(pipe)
    proj = _ip_projection(pipe, family)
    what = "ip_adapter_image_embeds"
    if family == "sd3":
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
            got = f"a {type(embeds).__name__}" if not isinstance(embeds, torch.Tensor) else f"{embeds.ndim}-D"
            raise ValueError(f"on SD3 {what} is one 3-D tensor [batch, tokens, dim] (the image encoder's hidden "
                             f"states; the negative first along the batch under guidance), as "
                             f"StableDiffusion3Pipeline takes it; got {got}")
        dim = proj.proj_in.in_features
        if embeds.shape[-1] != dim:
            raise ValueError(f"{what} has width {embeds.shape[-1]}; the loaded IP-Adapter takes {dim}")
        parts = [embeds]
    else:
        n_adapters = len(proj.image_projection_layers)
        if not isinstance(embeds, (list, tuple)) or not all(isinstance(e, torch.Tensor) and e.ndim in (3, 4)
                                                             for e in embeds):
            raise ValueError(f"{what} must be a list of 3-D or 4-D tensors (one per IP-Adapter), as the "
                             "pipeline's argument of that name")
        if len(embeds) != n_adapters:
            raise ValueError(f"{what} has {len(embeds)} tensors for {n_adapters} loaded IP-Adapter(s)")
        parts = list(embeds)

    def done(es):
        return es[0] if family == "sd3" else es

    if not negative:
        return done([_rows(e, batch, device, what) for e in parts]), None
    if any(e.shape[0] % 2 for e in parts):
        raise ValueError(f"with guidance, {what} holds the negative embeds then the positive ones along the batch "
                         "(torch.cat([negative, positive]), as the pipeline takes them under CFG): its batch must be "
                         "even")
    halves = [e.chunk(2) for e in parts]
    return (done([_rows(p, batch, device, what) for _, p in halves]),
            done([_rows(n, batch, device, what) for n, _ in halves]))


def _flux_image_embeds(embeds, proj, batch: int, device, what: str) -> list:
    """Flux's IP-Adapter embeds as ``FluxPipeline`` takes them: one ``[batch, images, dim]`` tensor per adapter
    (a bare tensor is one adapter's), ``batch`` rows each."""
    if isinstance(embeds, torch.Tensor):
        embeds = [embeds]
    if not isinstance(embeds, (list, tuple)) or not all(isinstance(e, torch.Tensor) and e.ndim == 3 for e in embeds):
        raise ValueError(f"on Flux {what} is a list of 3-D tensors [batch, images, dim] (one per IP-Adapter), as "
                         "FluxPipeline takes it")
    layers = proj.image_projection_layers
    if len(embeds) != len(layers):
        raise ValueError(f"{what} has {len(embeds)} tensors for {len(layers)} loaded IP-Adapter(s)")
    for e, layer in zip(embeds, layers):
        dim = getattr(getattr(layer, "image_embeds", None), "in_features", e.shape[-1])
        if e.shape[-1] != dim:
            raise ValueError(f"{what} has width {e.shape[-1]}; the loaded IP-Adapter takes {dim}")
    return [_rows(e, batch, device, what) for e in embeds]


def _black_image_embeds(pipe, proj, height, width, device) -> list:
    """FluxPipeline's negative image embeds when none are given: its image encoder's embeds of a black image, one
    per adapter."""
    if getattr(pipe, "image_encoder", None) is None or getattr(pipe, "feature_extractor", None) is None:
        raise ValueError("the negative prompt's branch (true CFG) needs negative_ip_adapter_image_embeds=: "
                         "FluxPipeline encodes a black image with its image encoder when they are not given, and "
                         "this pipeline has none loaded")
    family = _family(pipe)
    height, width = _size(pipe, family, height, width)
    black = [np.zeros((width, height, 3), dtype=np.uint8)] * len(proj.image_projection_layers)
    with torch.no_grad():
        return pipe.prepare_ip_adapter_image_embeds(black, None, device, 1)


def _encode_prompts(pipe, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
                    negative, height, width, embedded_guidance, pooled_prompt_embeds, negative_pooled_prompt_embeds,
                    max_sequence_length, device, lora_scale) -> Encoded:
    family = _family(pipe)
    device = pipe._execution_device if device is None else device
    height, width = _size(pipe, family, height, width)
    n = num_images_per_prompt
    if family == "sd":
        pe, ne = pipe.encode_prompt(prompt, device, n, negative, negative_prompt, prompt_embeds=prompt_embeds,
                                    negative_prompt_embeds=negative_prompt_embeds, lora_scale=lora_scale)
        return Encoded({"encoder_hidden_states": pe}, {"encoder_hidden_states": ne} if negative else None)
    if family == "sdxl":
        pe, ne, pp, npp = pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=n,
                                             do_classifier_free_guidance=negative, negative_prompt=negative_prompt,
                                             prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                             pooled_prompt_embeds=pooled_prompt_embeds,
                                             negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                                             lora_scale=lora_scale)
        proj = (int(pp.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim)
        ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=pe.dtype,
                                     text_encoder_projection_dim=proj).to(device).repeat(pe.shape[0], 1)
        cond = {"encoder_hidden_states": pe, "text_embeds": pp, "time_ids": ids}
        return Encoded(cond, {"encoder_hidden_states": ne, "text_embeds": npp, "time_ids": ids} if negative else None)
    if family == "sd3":
        extra = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        pe, ne, pp, npp = pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None,
                                             negative_prompt=negative_prompt, do_classifier_free_guidance=negative,
                                             prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                             pooled_prompt_embeds=pooled_prompt_embeds,
                                             negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                                             device=device, num_images_per_prompt=n, lora_scale=lora_scale,
                                             **extra)
        return Encoded({"encoder_hidden_states": pe, "pooled_projections": pp},
                       {"encoder_hidden_states": ne, "pooled_projections": npp} if negative else None)
    # flux
    extra = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    shape = _latent_shape(pipe, family, 1, height, width)
    img_ids = _flux_image_ids(shape[2], shape[3], device, pipe.transformer.dtype)

    def one(p, embeds, pooled):
        pe, pp, txt_ids = pipe.encode_prompt(prompt=p, prompt_2=None, prompt_embeds=embeds,
                                             pooled_prompt_embeds=pooled, device=device, num_images_per_prompt=n,
                                             lora_scale=lora_scale, **extra)
        b = pe.shape[0]
        c = {"encoder_hidden_states": pe, "pooled_projections": pp,
             "txt_ids": txt_ids.expand(b, *txt_ids.shape[-2:]), "img_ids": img_ids.expand(b, *img_ids.shape)}
        if pipe.transformer.config.guidance_embeds:
            if embedded_guidance is None:
                raise ValueError("this Flux checkpoint is guidance-distilled: pass embedded_guidance= (Flux-dev: 3.5)")
            c["guidance"] = torch.full((b,), float(embedded_guidance), device=device, dtype=torch.float32)
        return c

    cond = one(prompt, prompt_embeds, pooled_prompt_embeds)
    has_negative = negative_prompt is not None or negative_prompt_embeds is not None
    return Encoded(cond, one(negative_prompt, negative_prompt_embeds, negative_pooled_prompt_embeds)
                   if negative and has_negative else None)


def _decode(pipe, family: str, latents: torch.Tensor, output_type: str, height: int, width: int, generator,
            dtype):
    """The pipeline's own decoding: VAE (with its scaling, shift, SDXL's upcast and latent statistics), safety
    checker and watermark where the pipeline has them, then ``image_processor.postprocess``."""
    if output_type == "latent":
        return latents
    vae = pipe.vae
    if family == "sd":
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        image, nsfw = pipe.run_safety_checker(image, latents.device, dtype)
        denorm = [True] * image.shape[0] if nsfw is None else [not x for x in nsfw]
        return pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denorm)
    if family == "sdxl":
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            pipe.upcast_vae()
            latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type=output_type)
    if family == "flux":
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    image = vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)


def _default_steps(pipe) -> int:
    default = inspect.signature(pipe.__call__).parameters.get("num_inference_steps")
    return int(default.default) if default is not None and isinstance(default.default, int) else 25


def sample(pipe, prompt=None, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
           guidance="default", solver=None, steps: int | None = None, seed: int | None = None, generator=None,
           latents: torch.Tensor | None = None, height: int | None = None, width: int | None = None,
           output_type: str = "pil", num_images_per_prompt: int = 1, embedded_guidance: float | None = 3.5,
           pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, timesteps=None,
           max_sequence_length: int | None = None, ip_adapter_image_embeds=None,
           cross_attention_kwargs: dict | None = None, joint_attention_kwargs: dict | None = None,
           negative_ip_adapter_image_embeds=None, return_info: bool = False, ip_adapter_image=None,
           negative_ip_adapter_image=None):
    """Generate images with a diffusers pipeline's networks and any steer guidance and solver.

    Arguments as the pipeline's ``__call__``: ``prompt``/``negative_prompt`` (or their embeddings; SDXL, SD3 and
    Flux also take the pooled ones), ``height``/``width`` (default the pipeline's), ``latents`` (the same initial
    latents as the pipeline's ``latents=``, scaled by its scheduler's ``init_noise_sigma`` convention as the
    pipeline scales them; Flux: packed), ``generator`` (draws the initial latents as the pipeline does) or ``seed``
    (a CPU generator), ``output_type`` ("pil", "np", "pt" or "latent"), ``num_images_per_prompt``;
    ``cross_attention_kwargs`` (SD, SDXL) / ``joint_attention_kwargs`` (SD3, Flux) go to every network call, their
    ``"scale"`` also to the text encoders (the LoRA scale of ``pipe.load_lora_weights``; ``pipe.set_adapters`` and
    ``pipe.fuse_lora`` act on the networks themselves and need nothing here); ``ip_adapter_image_embeds`` (an
    IP-Adapter loaded with ``pipe.load_ip_adapter``) in the pipeline's format: SD, SDXL a list with one tensor per
    adapter, SD3 one tensor, the negative embeds first along the batch whenever ``guidance`` is not None (steer then
    encodes a negative prompt), as those pipelines take them under CFG; Flux a list with one tensor per adapter and
    ``negative_ip_adapter_image_embeds`` for the negative prompt's branch (true CFG), as ``FluxPipeline`` takes them
    (see ``encode``); or the raw images, ``ip_adapter_image`` (and on Flux ``negative_ip_adapter_image``), which the
    pipeline's own ``prepare_ip_adapter_image_embeds`` encodes with its image encoder, with its negative embeds
    whenever steer's guidance has a negative branch. Hooks wrap the installed attention processors (LoRA,
    IP-Adapter), they do not replace them.

    steer's own: ``guidance`` is a steer spec string or object (``"apg(scale=10, eta=0) + pag(3)"``), ``None``
    for the conditional model alone, or ``"default"`` for the pipeline's default CFG (``DEFAULT_GUIDANCE``);
    ``solver`` a steer solver (default: the one matching the pipeline's scheduler, ``matched_solver``); ``steps``
    (default the pipeline's ``num_inference_steps``) on the time grid the pipeline's scheduler would use
    (``pipeline_grid``), or ``timesteps``, an explicit decreasing list of steer times. ``embedded_guidance`` is
    the distilled guidance scale of guidance-distilled Flux (the pipeline's ``guidance_scale``).

    Returns what ``pipe(...).images`` holds (with ``return_info=True``, ``(images, steer SampleResult)``).
    """
    import steer
    from ..guidance import parse

    family = _family(pipe)
    if output_type not in ("pil", "np", "pt", "latent"):
        raise ValueError(f"output_type must be one of pil, np, pt, latent; got {output_type!r}")
    if seed is not None and generator is not None:
        raise ValueError("pass seed= or generator=, not both")
    if seed is not None:
        generator = torch.Generator("cpu").manual_seed(int(seed))
    if isinstance(guidance, str) and guidance == "default":
        guidance = DEFAULT_GUIDANCE[family]
    guide = parse(guidance)
    height, width = _size(pipe, family, height, width)
    device = pipe._execution_device  # (a slow property in diffusers: read once)
    model = denoiser(pipe, height, width, cross_attention_kwargs, joint_attention_kwargs)
    lora_scale = (cross_attention_kwargs or joint_attention_kwargs or {}).get("scale")
    enc = encode(pipe, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
                 negative=guide is not None, height=height, width=width, embedded_guidance=embedded_guidance,
                 pooled_prompt_embeds=pooled_prompt_embeds,
                 negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, max_sequence_length=max_sequence_length,
                 device=device, ip_adapter_image_embeds=ip_adapter_image_embeds, lora_scale=lora_scale,
                 negative_ip_adapter_image_embeds=negative_ip_adapter_image_embeds,
                 ip_adapter_image=ip_adapter_image, negative_ip_adapter_image=negative_ip_adapter_image)
    steps = _default_steps(pipe) if steps is None else steps
    scheduler, grid = pipeline_grid(pipe, steps, height, width, model.path)
    if timesteps is not None:
        grid = torch.as_tensor(timesteps, dtype=torch.float64)
    solver = matched_solver(pipe.scheduler) if solver is None else solver

    dtype = enc.cond["encoder_hidden_states"].dtype
    batch = enc.cond["encoder_hidden_states"].shape[0]
    if latents is None:
        from diffusers.utils.torch_utils import randn_tensor

        latents = randn_tensor(_latent_shape(pipe, family, batch, height, width), generator=generator, device=device,
                               dtype=dtype)
        if family == "flux":
            latents = _pack(latents)
    else:
        latents = latents.to(device=device, dtype=dtype)
    # The network runs in the pipeline's dtype; the sampler state, solver and guidance arithmetic in float32 or
    # better (half-precision latents would round every update; the latents are small beside the activations).
    state_dtype = torch.promote_types(latents.dtype, torch.float32)
    # The pipeline starts from latents · init_noise_sigma in its scheduler's coordinates; steer from
    # noise · sqrt(α² + σ²) at grid[0]: steer_noise gives the noise with the same starting state.
    noise = steer_noise(scheduler, latents.to(state_dtype), model.path, grid)
    try:
        res = steer.sample(model, noise=noise, cond=enc.cond, uncond=enc.uncond, guidance=guide, solver=solver,
                           timesteps=grid, generator=generator, return_info=True)
    except ValueError as e:
        if family == "flux" and enc.uncond is None and "'uncond' conditioning" in str(e):
            raise ValueError(f"{guide!r} needs an unconditional branch, which guidance-distilled Flux does not have: "
                             "pass negative_prompt= (the pipeline's true CFG), or use a method without one (pag, "
                             "seg, slg, ...) with embedded_guidance=") from None
        raise
    with torch.no_grad():
        images = _decode(pipe, family, res.x.to(dtype), output_type, height, width, generator, dtype)
    if hasattr(pipe, "maybe_free_model_hooks"):
        pipe.maybe_free_model_hooks()
    return (images, res) if return_info else images


def load(path, dtype: torch.dtype | None = None, device=None):
    """A diffusers pipeline from a local folder (``DiffusionPipeline.from_pretrained(path)``; nothing is
    downloaded), in ``dtype`` (default: as saved) on ``device`` (default: the CPU)."""
    from diffusers import DiffusionPipeline

    folder = FilePath(path)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json); steer loads local "
                                "folders only and downloads nothing")
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    pipe = DiffusionPipeline.from_pretrained(str(folder), **kwargs)
    if dtype is not None:  # from_pretrained leaves some networks (a float32-saved SD3 transformer) as saved
        pipe = pipe.to(dtype)
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
