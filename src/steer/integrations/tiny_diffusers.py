"""Tiny random-weight diffusers pipelines built from configs, for tests and benchmarks (nothing is downloaded).

``build(kind, seed)`` returns a pipeline of kind ``"sd"`` (SD1.5-style ε UNet), ``"sd-v"`` (SD2-style
v-prediction), ``"sdxl"`` (two CLIP encoders, added text/time conditions), ``"sd3"`` (MMDiT with two CLIP and
a T5 encoder) or ``"flux"`` (guidance-distilled Flux with CLIP and T5), each with real text encoders and
tokenizers whose vocabularies are written here (byte-level BPE without merges for CLIP, a character unigram
model for T5), so prompts go through the pipelines' own ``encode_prompt``. ``save(pipe, folder)`` writes it as a
diffusers folder; ``steer.integrations.diffusers.load`` reads it back through ``from_pretrained``.
"""

from __future__ import annotations

import torch

__all__ = ["KINDS", "build", "save", "SCHEDULERS"]

KINDS = ("sd", "sd-v", "sdxl", "sd3", "flux")

# SD1.5's scheduler config (its model_index ships a PNDMScheduler with these entries).
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "skip_prk_steps": True}
SCHEDULERS = {
    "sd": ("PNDMScheduler", {**SD_SCHEDULER, "prediction_type": "epsilon"}),
    "sd-v": ("DDIMScheduler", {**SD_SCHEDULER, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    "sdxl": ("EulerDiscreteScheduler", {**SD_SCHEDULER, "prediction_type": "epsilon", "timestep_spacing": "leading",
                                        "interpolation_type": "linear"}),
    "sd3": ("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 3.0}),
    "flux": ("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 3.0,
                                                 "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                                                 "base_image_seq_len": 256, "max_image_seq_len": 4096}),
}
"""Scheduler class and config per kind (as the real checkpoints ship them, SDXL's Euler "leading")."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_tokenizer():
    """A CLIP tokenizer over single bytes (no merges): every character is one token, ``</w>`` marks word ends."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def t5_tokenizer():
    """A T5 tokenizer over single characters (a unigram model with equal scores)."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def _clip(hidden: int, projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden,
                         intermediate_size=2 * hidden, num_attention_heads=2, num_hidden_layers=2, vocab_size=514,
                         max_position_embeddings=77, projection_dim=hidden, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=72, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, relative_attention_num_buckets=8)
    return T5EncoderModel(cfg).eval()


def _vae(latent_channels: int, seed: int, flow: bool):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    extra = {"use_quant_conv": False, "use_post_quant_conv": False, "shift_factor": 0.0609,
             "scaling_factor": 1.5035} if flow else {}
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=16, **extra).eval()


def _scheduler(kind: str):
    import diffusers

    name, cfg = SCHEDULERS[kind]
    return getattr(diffusers, name).from_config(cfg)  # from_config keeps the entries a class does not take


def build(kind: str, seed: int = 0):
    """A tiny pipeline of ``kind`` (see the module docstring), float32 on the CPU, weights drawn from ``seed``.

    Images are 16×16 (a 2× VAE: 8×8 latents; Flux packs them into 16 tokens).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tiny pipeline {kind!r}; allowed: {', '.join(KINDS)}")
    import diffusers

    if kind in ("sd", "sd-v", "sdxl"):
        xl = kind == "sdxl"
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32 if xl else 16, attention_head_dim=4, norm_num_groups=4,
            **({"addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 16 + 6 * 8, "use_linear_projection": True} if xl else {}),
        ).eval()
        common = {"vae": _vae(4, seed + 1, False), "unet": unet, "scheduler": _scheduler(kind),
                  "tokenizer": clip_tokenizer()}
        if not xl:
            return diffusers.StableDiffusionPipeline(text_encoder=_clip(16, False, seed + 2), safety_checker=None,
                                                     feature_extractor=None, requires_safety_checker=False, **common)
        return diffusers.StableDiffusionXLPipeline(text_encoder=_clip(16, False, seed + 2),
                                                   text_encoder_2=_clip(16, True, seed + 3),
                                                   tokenizer_2=clip_tokenizer(), add_watermarker=False, **common)
    if kind == "sd3":
        torch.manual_seed(seed)
        net = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                              caption_projection_dim=16, pooled_projection_dim=32).eval()
        return diffusers.StableDiffusion3Pipeline(
            transformer=net, scheduler=_scheduler(kind), vae=_vae(4, seed + 1, True),
            text_encoder=_clip(16, True, seed + 2), tokenizer=clip_tokenizer(),
            text_encoder_2=_clip(16, True, seed + 3), tokenizer_2=clip_tokenizer(),
            text_encoder_3=_t5(32, seed + 4), tokenizer_3=t5_tokenizer())
    torch.manual_seed(seed)
    net = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                           pooled_projection_dim=16, guidance_embeds=True,
                                           axes_dims_rope=(2, 2, 4)).eval()
    return diffusers.FluxPipeline(transformer=net, scheduler=_scheduler(kind), vae=_vae(4, seed + 1, True),
                                  text_encoder=_clip(16, False, seed + 2), tokenizer=clip_tokenizer(),
                                  text_encoder_2=_t5(32, seed + 4), tokenizer_2=t5_tokenizer())


def save(pipe, folder) -> None:
    """Write ``pipe`` as a diffusers folder (safetensors weights, configs, tokenizer files)."""
    pipe.save_pretrained(str(folder))
