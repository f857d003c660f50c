"""steer on diffusers pipelines: tiny random-weight pipelines built from configs (steer.integrations.tiny_diffusers:
real CLIP/T5 text encoders and tokenizers, UNet or SD3/Flux transformer, VAE), saved to a temporary folder and
loaded back through ``from_pretrained`` (``steer.integrations.diffusers.load``), then sampled by the pipeline itself
and by ``steer.integrations.diffusers.sample`` from the same latents.

Differential tests: steer's ``cfg`` with the solver matching the pipeline's scheduler (ddim ↔ DDIMScheduler, euler
↔ EulerDiscreteScheduler, dpmpp_2m ↔ DPMSolverMultistepScheduler, flow euler ↔ FlowMatchEulerDiscreteScheduler)
reproduces the pipeline's own output to 1e-4 (max abs; the random UNets' latents reach magnitudes of ~50, and the
measured differences, 1e-6 to 4e-5, are float32 rounding), for SD-style ε, v-prediction, SDXL, SD3 and
guidance-distilled Flux with true CFG.
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
SIZE = {"height": 16, "width": 16}
PROMPT, NEGATIVE = "a red cat on a mat", "blurry"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each tiny pipeline built from its config and saved once: {kind: folder}."""
    diffusers.utils.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("pipelines")
    out = {}
    for kind in tiny.KINDS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tiny.save(tiny.build(kind, seed=0), root / kind)
        out[kind] = root / kind
    return out


@pytest.fixture(scope="module")
def pipes(folders):
    """Each pipeline loaded back through DiffusionPipeline.from_pretrained (the real loading path)."""
    return {kind: sd.load(folder) for kind, folder in folders.items()}


def _kwargs(kind):
    return {**SIZE, **({"max_sequence_length": 16} if kind in ("sd3", "flux") else {})}


def _latents(pipe, seed=1, batch=1):
    model = sd.denoiser(pipe, **SIZE)
    return torch.randn((batch, *model.sample_shape), generator=torch.Generator().manual_seed(seed))


def _with_scheduler(pipe, name, **overrides):
    """Swap in another scheduler class from the pipeline's config, as a diffusers user does."""
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **overrides)
    return pipe


def _maxdiff(a, b) -> float:
    a, b = (x.double() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x)).double() for x in (a, b))
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------------
# The adapters: path, prediction kind, timestep mapping, conditioning.


def test_loaded_pipelines_are_the_saved_ones(folders, pipes):
    assert type(pipes["sd"]).__name__ == "StableDiffusionPipeline"
    assert type(pipes["sdxl"]).__name__ == "StableDiffusionXLPipeline"
    assert type(pipes["sd3"]).__name__ == "StableDiffusion3Pipeline"
    assert type(pipes["flux"]).__name__ == "FluxPipeline"
    fresh = tiny.build("sd", seed=0)  # same seed: the loaded weights are the built ones
    for (name, a), b in zip(fresh.unet.state_dict().items(), pipes["sd"].unet.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        sd.load(folders["sd"] / "unet")


def test_paths_predictions_and_shifts(pipes):
    m = sd.denoiser(pipes["sd"])
    assert (m.family, m.path.name, m.prediction, m.sample_shape) == ("sd", "vp-scaled-linear", "eps", (4, 8, 8))
    assert sd.denoiser(pipes["sd-v"]).prediction == "v"
    assert sd.denoiser(pipes["sdxl"]).family == "sdxl"
    m3 = sd.denoiser(pipes["sd3"])
    assert (m3.path.kind, m3.path.shift, m3.prediction) == ("flow", 3.0, "flow")
    # Flux: shift e^μ, μ linear in the packed token count from (256, 0.5) to (4096, 1.15) (Flux's calculate_shift)
    for side, tokens in ((16, 16), (32, 64)):
        mf = sd.denoiser(pipes["flux"], height=side, width=side)
        mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
        assert mf.sample_shape == (tokens, 16)
        assert mf.path.shift == pytest.approx(math.exp(mu), rel=1e-12)


def test_timestep_mapping_matches_the_pipeline_call(pipes):
    """The Denoiser called at steer time t gives the network's output at the timestep the pipeline passes."""
    torch.manual_seed(0)
    pipe = pipes["sd"]
    m = sd.denoiser(pipe)
    enc = sd.encode(pipe, PROMPT, negative=False)
    x = torch.randn(1, 4, 8, 8)
    for tau in (999, 500, 0):  # the grid time of integer timestep τ is (τ + 1)/T
        t = torch.tensor([(tau + 1) / 1000])
        with torch.no_grad():
            ref = pipe.unet(x, tau, encoder_hidden_states=enc.cond["encoder_hidden_states"]).sample
            assert _maxdiff(m(x, t, enc.cond), ref) < 1e-5
    pipe = pipes["flux"]
    m = sd.denoiser(pipe, **SIZE)
    enc = sd.encode(pipe, PROMPT, negative=False, embedded_guidance=3.5, max_sequence_length=16, **SIZE)
    x = torch.randn(1, *m.sample_shape)
    t = torch.tensor([0.75])
    with torch.no_grad():  # Flux takes the time itself (it multiplies by 1000) and the guidance scale
        ref = pipe.transformer(hidden_states=x, timestep=t, guidance=torch.tensor([3.5]),
                               pooled_projections=enc.cond["pooled_projections"],
                               encoder_hidden_states=enc.cond["encoder_hidden_states"],
                               txt_ids=enc.cond["txt_ids"][0], img_ids=enc.cond["img_ids"][0]).sample
        assert _maxdiff(m(x, t, enc.cond), ref) < 1e-6
    assert torch.equal(enc.cond["img_ids"][0, 5], torch.tensor([0.0, 1.0, 1.0]))  # token 5 of the 4×4 grid


def test_sdxl_conditioning_has_added_text_and_time_ids(pipes):
    enc = sd.encode(pipes["sdxl"], PROMPT, NEGATIVE, num_images_per_prompt=2, **SIZE)
    assert set(enc.cond) == {"encoder_hidden_states", "text_embeds", "time_ids"}
    assert enc.cond["encoder_hidden_states"].shape == (2, 77, 32)  # both CLIP encoders' hidden states side by side
    assert enc.cond["text_embeds"].shape == (2, 16)
    assert enc.cond["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2  # original size, crop, target size
    assert not torch.equal(enc.cond["text_embeds"], enc.uncond["text_embeds"])


# ---------------------------------------------------------------------------------------------------
# Differential tests: steer's cfg with the matched solver against the pipeline's own output.

CASES = [
    # kind, scheduler class, its config overrides, steer solver (None: matched to the scheduler), steps, CFG scale
    ("sd", "DDIMScheduler", {}, "ddim", 5, 7.5),
    ("sd", "DPMSolverMultistepScheduler", {}, "dpmpp_2m", 6, 7.5),
    ("sd", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, "euler", 5, 5.0),
    ("sd-v", "DDIMScheduler", {}, None, 4, 5.0),
    ("sdxl", "EulerDiscreteScheduler", {}, "euler", 5, 5.0),
    ("sdxl", "DPMSolverMultistepScheduler", {}, "dpmpp_2m", 5, 5.0),
    ("sd3", "FlowMatchEulerDiscreteScheduler", {}, "euler", 4, 7.0),
    ("flux", "FlowMatchEulerDiscreteScheduler", {}, None, 4, 3.0),
]


@pytest.mark.parametrize("kind,scheduler,overrides,solver,steps,scale", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_cfg_reproduces_the_pipeline(pipes, kind, scheduler, overrides, solver, steps, scale):
    pipe = pipes[kind]
    original = pipe.scheduler
    try:
        _with_scheduler(pipe, scheduler, **overrides)
        lat = _latents(pipe)
        if kind == "flux":  # guidance-distilled: embedded guidance 3.5 plus true CFG with a negative prompt
            ref = pipe(PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=scale, guidance_scale=3.5,
                       num_inference_steps=steps, latents=lat, output_type="latent", **_kwargs(kind)).images
        else:
            ref = pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=scale, num_inference_steps=steps,
                       latents=lat, output_type="latent", **_kwargs(kind)).images
        out, info = sd.sample(pipe, PROMPT, negative_prompt=NEGATIVE, guidance=f"cfg(scale={scale})", solver=solver,
                              steps=steps, latents=lat, output_type="latent", embedded_guidance=3.5,
                              return_info=True, **_kwargs(kind))
    finally:
        pipe.scheduler = original
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert _maxdiff(out, ref) < TOL
    assert info.nfe == 2 * steps and info.forward_passes == steps  # both branches in one forward pass per step
    assert ref.abs().max() > 1  # not a degenerate (all-zero) output


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "flux"])
def test_decoded_images_match_the_pipeline(pipes, kind):
    """The pipeline's VAE decode and image processor (pil and np), here without guidance on Flux (distilled)."""
    pipe = pipes[kind]
    original = pipe.scheduler
    if kind == "sd":  # SD1.5 ships PNDM, which no steer solver matches; the others ship a matched scheduler
        _with_scheduler(pipe, "DDIMScheduler")
    lat = _latents(pipe, seed=2)
    call = {"guidance_scale": 3.5} if kind == "flux" else {"guidance_scale": 4.0}
    try:
        ref = pipe(PROMPT, num_inference_steps=3, latents=lat, output_type="np", **call, **_kwargs(kind)).images
        out = sd.sample(pipe, PROMPT, guidance=None if kind == "flux" else "cfg(4.0)", steps=3, latents=lat,
                        output_type="np", **_kwargs(kind))
        pil = sd.sample(pipe, PROMPT, guidance=None if kind == "flux" else "cfg(4.0)", steps=3, latents=lat,
                        **_kwargs(kind))
    finally:
        pipe.scheduler = original
    assert out.shape == ref.shape == (1, 16, 16, 3)
    assert 0.05 < ref.std()  # not a blank image
    assert _maxdiff(out, ref) < TOL
    assert pil[0].size == (16, 16)
    assert np.abs(np.asarray(pil[0], dtype=np.float64) - np.round(ref[0] * 255)).max() <= 1


def test_generator_draws_the_pipelines_initial_latents(pipes):
    """Without latents, a generator draws the same initial noise as the pipeline's; Euler with "trailing" spacing
    starts from σ̄_max·z (its init_noise_sigma), which steer's start reproduces; a list of two prompts."""
    pipe = pipes["sd"]
    original = pipe.scheduler
    try:
        _with_scheduler(pipe, "EulerDiscreteScheduler", timestep_spacing="trailing")
        assert pipe.scheduler.init_noise_sigma == pytest.approx(float(pipe.scheduler.sigmas[0]))
        prompts = [PROMPT, "a green dog"]
        ref = pipe(prompts, guidance_scale=6.0, num_inference_steps=4, generator=torch.Generator().manual_seed(7),
                   output_type="latent", **SIZE).images
        out = sd.sample(pipe, prompts, guidance="cfg(6.0)", steps=4, generator=torch.Generator().manual_seed(7),
                        output_type="latent", **SIZE)
        same_seed = sd.sample(pipe, prompts, guidance="cfg(6.0)", steps=4, seed=7, output_type="latent", **SIZE)
    finally:
        pipe.scheduler = original
    assert out.shape == (2, 4, 8, 8)
    assert _maxdiff(out, ref) < TOL
    assert torch.equal(out, same_seed)  # seed=7 is a CPU generator seeded with 7


def test_default_grid_is_the_pipelines_scheduler(pipes):
    """The PNDM scheduler SD1.5 ships ("leading" spacing, steps_offset 1): steer steps through its timesteps."""
    pipe = pipes["sd"]
    _, grid = sd.pipeline_grid(pipe, 5)
    assert torch.allclose(grid[:-1], torch.tensor([801.0, 601, 401, 201, 1], dtype=torch.float64).add(1) / 1000)
    assert grid[-1] == pytest.approx(1 / 1000)  # to alphas_cumprod[0] (set_alpha_to_one=False)
    assert sd.matched_solver(pipe.scheduler) == "dpmpp_2m"  # PNDM has no steer counterpart
    _, grid = sd.pipeline_grid(pipes["flux"], 4, **SIZE)
    mu = 0.5 + (1.15 - 0.5) * (16 - 256) / (4096 - 256)
    t = np.linspace(1.0, 0.25, 4)
    expected = math.exp(mu) / (math.exp(mu) + (1 / t - 1))  # Flux's exponential time shift of linspace(1, 1/N, N)
    assert np.allclose(grid[:-1].numpy(), expected, atol=1e-7) and grid[-1] == 0


def test_flux_without_a_negative_prompt_has_no_unconditional_branch(pipes):
    pipe = pipes["flux"]
    lat = _latents(pipe, seed=3)
    with pytest.raises(ValueError, match="no unconditional branch|does not have: pass negative_prompt="):
        sd.sample(pipe, PROMPT, guidance="cfg(3.0)", steps=2, latents=lat, output_type="latent", **_kwargs("flux"))
    ref = pipe(PROMPT, guidance_scale=2.0, num_inference_steps=3, latents=lat, output_type="latent",
               **_kwargs("flux")).images
    out = sd.sample(pipe, PROMPT, guidance="default", embedded_guidance=2.0, steps=3, latents=lat,
                    output_type="latent", **_kwargs("flux"))
    assert _maxdiff(out, ref) < TOL


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_bfloat16_pipeline_is_as_accurate_as_the_pipeline(folders, pipes, kind):
    """A bfloat16 pipeline: the network runs in bfloat16, steer's state and arithmetic in float32; against the
    float32 pipeline's result, steer's bfloat16 error is within 1.25× the bfloat16 pipeline's own (measured: SD3
    0.057 vs 0.067, Flux 0.036 vs 0.035 at 3 steps; with its state and solver in bfloat16, SD3 was 0.109)."""
    pipe = sd.load(folders[kind], dtype=torch.bfloat16)
    assert sd.denoiser(pipe).net.dtype == torch.bfloat16
    lat = _latents(pipe, seed=4)
    call = {"guidance_scale": 3.5} if kind == "flux" else {"guidance_scale": 5.0}
    spec = None if kind == "flux" else "cfg(5.0)"
    ref32 = pipes[kind](PROMPT, num_inference_steps=3, latents=lat, output_type="latent", **call,
                        **_kwargs(kind)).images
    ref16 = pipe(PROMPT, num_inference_steps=3, latents=lat.bfloat16(), output_type="latent", **call,
                 **_kwargs(kind)).images
    out = sd.sample(pipe, PROMPT, guidance=spec, steps=3, latents=lat.bfloat16(), output_type="latent",
                    **_kwargs(kind))
    assert out.dtype == ref16.dtype == torch.bfloat16
    err_steer, err_pipe = _maxdiff(out, ref32), _maxdiff(ref16, ref32)
    assert 0 < err_steer < 1.25 * err_pipe, (err_steer, err_pipe)


def test_sites_delegate_to_the_attention_hooks(pipes):
    model = sd.denoiser(pipes["sd"])
    try:
        from steer.integrations.diffusers_attention import attention_sites
    except ModuleNotFoundError:
        with pytest.raises(NotImplementedError, match="diffusers_attention"):
            model.sites()
        with pytest.raises(NotImplementedError, match="not part of this build"):
            hooks.select_sites(model, hooks.IdentityAttention(None))
        return
    assert list(model.sites()) == list(attention_sites(pipes["sd"].unet))
    assert [lay.name for lay in sd.layers(pipes["sd"])] == list(model.sites())


def test_pag_reproduces_the_diffusers_pag_pipeline(pipes):
    """CFG + PAG through the adapter and the hooks (the middle block) against StableDiffusionPAGPipeline."""
    pytest.importorskip("steer.integrations.diffusers_attention")
    pipe = pipes["sd"]
    original = pipe.scheduler
    try:
        _with_scheduler(pipe, "DDIMScheduler")
        pag = diffusers.StableDiffusionPAGPipeline.from_pipe(pipe, pag_applied_layers=["mid"])
        lat = _latents(pipe, seed=5)
        ref = pag(PROMPT, guidance_scale=5.0, pag_scale=3.0, num_inference_steps=4, latents=lat,
                  output_type="latent", **SIZE).images
        out, info = sd.sample(pipe, PROMPT, guidance="cfg(5.0) + pag(scale=4.0)", solver="ddim", steps=4,
                              latents=lat, output_type="latent", return_info=True, **SIZE)
    finally:
        pipe.scheduler = original
    assert info.nfe == 12 and info.forward_passes == 4  # three branches in one forward pass per step
    assert _maxdiff(out, ref) < TOL


# ---------------------------------------------------------------------------------------------------
# The command line.


def test_cli_sample_diffusers_writes_the_image(folders, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from steer.cli import app

    runner = CliRunner()
    out = tmp_path / "img.png"
    res = runner.invoke(app, ["sample", "--diffusers", str(folders["sd"]), "--prompt", PROMPT, "--guidance",
                              "apg(scale=5, eta=0)", "--solver", "euler", "--steps", "3", "--height", "16",
                              "--width", "16", "--out", str(out)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "wrote a 16x16 image" in res.output and "3 steps, 6 NFE" in res.output
    assert Image.open(out).size == (16, 16)
    for extra, named in ((["--model", "digits"], "--model"), (["--n", "4"], "--n"), (["--dim", "3"], "--dim")):
        res = runner.invoke(app, ["sample", "--diffusers", str(folders["sd"]), "--prompt", "x", "--out", str(out),
                                  *extra], env={"COLUMNS": "200"})
        assert res.exit_code == 2 and f"it does not take {named}" in res.output
    res = runner.invoke(app, ["sample", "--prompt", "x"], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "--prompt set a diffusers pipeline" in res.output
    res = runner.invoke(app, ["sample", "--diffusers", str(folders["sd"]), "--prompt", "x", "--out",
                              str(tmp_path / "a.npy")], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "--out NAME.png" in res.output


# ---------------------------------------------------------------------------------------------------
# What users load into their pipelines: LoRA (pipe.load_lora_weights, PEFT), IP-Adapter (pipe.load_ip_adapter),
# attention slicing. The hooks wrap the installed processors and LoRA layers; none of them is replaced.

STEPS, SCALE = 4, 5.0


def _ddim(pipe):
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def _both(pipe, steer_guidance, call=None, **kwargs):
    """(pipeline's latents, steer's latents) for the same prompt, latents and DDIM steps; ``call`` is the
    pipeline's guidance arguments, ``steer_guidance`` steer's spec."""
    lat = _latents(pipe, seed=6)
    call = {"guidance_scale": SCALE} if call is None else call
    pipeline = kwargs.pop("pipeline", pipe)
    ref = pipeline(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, latents=lat, output_type="latent",
                   **call, **kwargs, **SIZE).images
    out = sd.sample(pipe, PROMPT, negative_prompt=NEGATIVE, guidance=steer_guidance, solver="ddim", steps=STEPS,
                    latents=lat, output_type="latent", **kwargs, **SIZE)
    return ref, out


@pytest.fixture(scope="module")
def base_sd(folders):
    """The tiny SD pipeline without LoRA or IP-Adapter, with DDIM (steer's ddim takes its steps)."""
    return _ddim(sd.load(folders["sd"]))


@pytest.fixture(scope="module")
def lora_folder(folders, tmp_path_factory):
    """A random rank-4 LoRA on every attention projection of the tiny SD UNet (q, k, v, out), written by the
    pipeline's save_lora_weights."""
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    maker = sd.load(folders["sd"])
    maker.unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                           init_lora_weights=False))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():  # B ≠ 0: the LoRA changes every projection
        for name, p in maker.unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    folder = tmp_path_factory.mktemp("lora")
    diffusers.StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(maker.unet))
    return folder


@pytest.fixture(scope="module")
def lora_pipe(folders, lora_folder):
    """The tiny SD pipeline with the LoRA read back by load_lora_weights (the real loading path, PEFT)."""
    pipe = _ddim(sd.load(folders["sd"]))
    pipe.load_lora_weights(str(lora_folder), adapter_name="tiny")
    return pipe


def test_cli_sample_diffusers_with_a_lora(folders, lora_folder, tmp_path):
    """``steer sample --diffusers PATH --lora FOLDER --lora-scale 0.5`` writes the image that
    ``sample(pipe, ..., cross_attention_kwargs={"scale": 0.5})`` makes from the pipeline with that LoRA loaded."""
    from PIL import Image
    from typer.testing import CliRunner

    from steer.cli import app

    runner, out = CliRunner(), tmp_path / "lora.png"
    args = ["sample", "--diffusers", str(folders["sd"]), "--prompt", PROMPT, "--guidance", "cfg(3)", "--solver",
            "euler", "--steps", "3", "--height", "16", "--width", "16", "--out", str(out)]
    res = runner.invoke(app, [*args, "--lora", str(lora_folder), "--lora-scale", "0.5"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    pipe = sd.load(folders["sd"])
    pipe.load_lora_weights(str(lora_folder))
    want = sd.sample(pipe, PROMPT, guidance="cfg(3)", solver="euler", steps=3, seed=0, height=16, width=16,
                     cross_attention_kwargs={"scale": 0.5})[0]
    got = Image.open(out)
    assert got.tobytes() == want.tobytes()
    plain = sd.sample(sd.load(folders["sd"]), PROMPT, guidance="cfg(3)", solver="euler", steps=3, seed=0, height=16,
                      width=16)[0]
    assert got.tobytes() != plain.tobytes()  # the LoRA is in the image
    res = runner.invoke(app, [*args, "--lora-scale", "0.5"], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "--lora-scale scales a LoRA: pass --lora PATH" in res.output
    res = runner.invoke(app, [*args, "--lora", str(tmp_path / "missing")], env={"COLUMNS": "200"})
    assert res.exit_code == 1 and "cannot load the LoRA in" in res.output


def test_lora_cfg_and_pag_reproduce_the_pipelines(lora_pipe, base_sd):
    """A LoRA loaded with pipe.load_lora_weights: steer's cfg equals the pipeline's output and cfg + pag equals
    StableDiffusionPAGPipeline built from the same components (the PAG-perturbed layer's V is the LoRA's)."""
    attn1 = lora_pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1
    assert type(attn1.to_v).__module__.startswith("peft.")  # the perturbed layer carries the LoRA
    ref, out = _both(lora_pipe, f"cfg({SCALE})")
    assert _maxdiff(out, ref) < TOL
    without, _ = _both(base_sd, f"cfg({SCALE})")
    assert _maxdiff(ref, without) > 0.5  # the LoRA is active (measured 9.8)
    pag = diffusers.StableDiffusionPAGPipeline.from_pipe(lora_pipe, pag_applied_layers=["mid"])
    ref_pag, out_pag = _both(lora_pipe, f"cfg({SCALE}) + pag(scale=4.0)", {"guidance_scale": SCALE, "pag_scale": 3.0},
                             pipeline=pag)
    assert _maxdiff(out_pag, ref_pag) < TOL
    assert _maxdiff(ref_pag, ref) > 0.1  # PAG moves it (3.2)
    assert type(attn1.to_v).__module__.startswith("peft.")  # still there after the hooks


def test_lora_scale_through_cross_attention_kwargs_and_set_adapters(lora_pipe, base_sd):
    """``cross_attention_kwargs={"scale": s}`` reaches the UNet on every call (and the text encoders, as the
    pipeline passes it as lora_scale); scale 0 is the network without the LoRA; set_adapters' weight needs nothing."""
    half, out_half = _both(lora_pipe, f"cfg({SCALE})", cross_attention_kwargs={"scale": 0.5})
    assert _maxdiff(out_half, half) < TOL
    assert lora_pipe._lora_scale == 0.5  # what the pipeline's encode_prompt records from its lora_scale
    full, _ = _both(lora_pipe, f"cfg({SCALE})")
    without, _ = _both(base_sd, f"cfg({SCALE})")
    assert min(_maxdiff(half, full), _maxdiff(half, without)) > 0.5  # in between (measured 6.4 and 5.2)
    _, out_zero = _both(lora_pipe, f"cfg({SCALE})", cross_attention_kwargs={"scale": 0.0})
    assert _maxdiff(out_zero, without) < TOL  # W + 0·BA = W
    lora_pipe.set_adapters(["tiny"], adapter_weights=[0.5])
    try:
        _, out_weighted = _both(lora_pipe, f"cfg({SCALE})")
    finally:
        lora_pipe.set_adapters(["tiny"], adapter_weights=[1.0])
    assert _maxdiff(out_weighted, half) < TOL
    with pytest.raises(ValueError, match="takes cross_attention_kwargs=, not joint_attention_kwargs="):
        sd.sample(lora_pipe, PROMPT, joint_attention_kwargs={"scale": 0.5}, steps=1, output_type="latent", **SIZE)


IMAGE_DIM = 12  # the tiny IP-Adapter's image-embedding width (a CLIP image encoder's projection_dim)


def _ip_adapter_file(unet, folder, seed=3):
    """A random IP-Adapter in the original checkpoints' layout (``image_proj.*``: ImageProjection to 4 tokens;
    ``ip_adapter.{1,3,5,…}.to_{k,v}_ip.weight``: one pair per cross-attention layer, in the UNet's processor
    order), as pipe.load_ip_adapter reads it."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    d = unet.config.cross_attention_dim
    tensors = {"image_proj.proj.weight": torch.randn(4 * d, IMAGE_DIM, generator=gen) / math.sqrt(IMAGE_DIM),
               "image_proj.proj.bias": torch.randn(4 * d, generator=gen),
               "image_proj.norm.weight": 1 + 0.1 * torch.randn(d, generator=gen),
               "image_proj.norm.bias": 0.1 * torch.randn(d, generator=gen)}
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_q.in_features
        for kv in "kv":
            tensors[f"ip_adapter.{key}.to_{kv}_ip.weight"] = torch.randn(hidden, d, generator=gen) / math.sqrt(d)
        key += 2
    save_file(tensors, str(folder / "ip-adapter.safetensors"))


@pytest.fixture(scope="module")
def ip_pipe(folders, tmp_path_factory):
    """The tiny SD pipeline with a random IP-Adapter loaded by pipe.load_ip_adapter (no image encoder: the embeds
    are passed precomputed, ip_adapter_image_embeds)."""
    pipe = _ddim(sd.load(folders["sd"]))
    folder = tmp_path_factory.mktemp("ip")
    _ip_adapter_file(pipe.unet, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_ip_adapter(str(folder), subfolder="", weight_name="ip-adapter.safetensors",
                             image_encoder_folder=None, local_files_only=True)
    return pipe


def _image_embeds(batch, seed=8):
    return torch.randn(batch, 1, IMAGE_DIM, generator=torch.Generator().manual_seed(seed))


def test_ip_adapter_cfg_and_pag_reproduce_the_pipelines(ip_pipe, base_sd):
    """ip_adapter_image_embeds as the pipeline takes them ([negative, positive] under CFG): steer's cfg equals the
    pipeline's, cfg + pag equals StableDiffusionPAGPipeline's (its perturbed rows get the positive image embeds,
    the IP-Adapter processor of attn2 running on them); the hooks leave every processor in place."""
    procs = dict(ip_pipe.unet.attn_processors)
    kinds = {n.rsplit(".", 2)[-2]: type(p).__name__ for n, p in procs.items()}
    assert kinds == {"attn1": "AttnProcessor2_0", "attn2": "IPAdapterAttnProcessor2_0"}  # PAG's attn1, IP's attn2
    embeds = [_image_embeds(2)]
    ref, out = _both(ip_pipe, f"cfg({SCALE})", ip_adapter_image_embeds=embeds)
    assert _maxdiff(out, ref) < TOL
    without, _ = _both(base_sd, f"cfg({SCALE})")
    assert _maxdiff(ref, without) > 0.5  # the image prompt acts (measured 3.8)
    pag = diffusers.StableDiffusionPAGPipeline.from_pipe(ip_pipe, pag_applied_layers=["mid"])
    ref_pag, out_pag = _both(ip_pipe, f"cfg({SCALE}) + pag(scale=4.0)", {"guidance_scale": SCALE, "pag_scale": 3.0},
                             pipeline=pag, ip_adapter_image_embeds=embeds)
    assert _maxdiff(out_pag, ref_pag) < TOL and _maxdiff(ref_pag, ref) > 0.1  # PAG moves it by 0.45
    sd.sample(ip_pipe, PROMPT, negative_prompt=NEGATIVE, guidance=f"cfg({SCALE}) + seg(3.0)", solver="ddim",
              steps=2, output_type="latent", ip_adapter_image_embeds=embeds, seed=0, **SIZE)
    after = ip_pipe.unet.attn_processors
    assert all(after[n] is p for n, p in procs.items())  # the same processor objects: wrapped, never replaced
    # without guidance the embeds are the positive ones alone (the pipeline at guidance_scale 1: no CFG); a batch of
    # one is repeated over the prompts as the pipeline repeats it
    lat = _latents(ip_pipe, seed=9, batch=2)
    ref1 = ip_pipe([PROMPT, "a green dog"], guidance_scale=1.0, num_inference_steps=3, latents=lat,
                   output_type="latent", ip_adapter_image_embeds=[_image_embeds(1)], **SIZE).images
    out1 = sd.sample(ip_pipe, [PROMPT, "a green dog"], guidance=None, solver="ddim", steps=3, latents=lat,
                     output_type="latent", ip_adapter_image_embeds=[_image_embeds(1)], **SIZE)
    assert _maxdiff(out1, ref1) < TOL


def test_ip_adapter_embeds_errors(ip_pipe, base_sd):
    call = {"steps": 1, "output_type": "latent", **SIZE}
    with pytest.raises(ValueError, match="batch must be even"):
        sd.sample(ip_pipe, PROMPT, guidance="cfg(3)", ip_adapter_image_embeds=[_image_embeds(3)], **call)
    with pytest.raises(ValueError, match="2 tensors for 1 loaded IP-Adapter"):
        sd.sample(ip_pipe, PROMPT, guidance="cfg(3)", ip_adapter_image_embeds=[_image_embeds(2)] * 2, **call)
    with pytest.raises(ValueError, match="list of 3-D or 4-D tensors"):
        sd.sample(ip_pipe, PROMPT, guidance="cfg(3)", ip_adapter_image_embeds=_image_embeds(2), **call)
    with pytest.raises(ValueError, match="allowed: 1 .* or 2"):
        sd.sample(ip_pipe, [PROMPT, "x"], guidance="cfg(3)", ip_adapter_image_embeds=[_image_embeds(6)], **call)
    with pytest.raises(ValueError, match="needs an IP-Adapter loaded"):
        sd.sample(base_sd, PROMPT, guidance="cfg(3)", ip_adapter_image_embeds=[_image_embeds(2)], **call)


def _clip_image_encoder(projection_dim, hidden_size=16, seed=5):
    """A tiny random CLIP image encoder (2 patches of 16 on a 32-pixel crop) and its image processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16, projection_dim=projection_dim)
    return (CLIPVisionModelWithProjection(cfg).eval(),
            CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))


def _image(seed):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ip_image_pipe(ip_pipe):
    """ip_pipe (sharing its UNet and IP-Adapter) with a tiny CLIP image encoder as its image_encoder."""
    encoder, processor = _clip_image_encoder(IMAGE_DIM)
    return diffusers.StableDiffusionPipeline.from_pipe(ip_pipe, image_encoder=encoder, feature_extractor=processor)


def test_ip_adapter_image_reproduces_the_pipeline(ip_image_pipe):
    """ip_adapter_image= (a PIL image): steer's cfg equals the pipeline's call with the same image (its image
    encoder's embeds, zeros as the negative ones), and steer's own call with the embeds that the pipeline's
    prepare_ip_adapter_image_embeds makes of it; without guidance the positive embeds alone (guidance_scale 1)."""
    pipe, img = ip_image_pipe, _image(1)
    ref, out = _both(pipe, f"cfg({SCALE})", ip_adapter_image=img)
    assert _maxdiff(out, ref) < TOL  # measured 6.7e-6
    embeds = pipe.prepare_ip_adapter_image_embeds(img, None, "cpu", 1, True)
    via = sd.sample(pipe, PROMPT, negative_prompt=NEGATIVE, guidance=f"cfg({SCALE})", solver="ddim", steps=STEPS,
                    latents=_latents(pipe, seed=6), output_type="latent", ip_adapter_image_embeds=embeds, **SIZE)
    assert _maxdiff(out, via) < 1e-6  # measured 0 (the same embeds)
    other, _ = _both(pipe, f"cfg({SCALE})", ip_adapter_image=_image(2))
    assert _maxdiff(other, ref) > 0.5  # the image acts (measured 3.0)
    lat = _latents(pipe, seed=9, batch=2)
    ref1 = pipe([PROMPT, "a green dog"], guidance_scale=1.0, num_inference_steps=3, latents=lat, output_type="latent",
                ip_adapter_image=img, **SIZE).images
    out1 = sd.sample(pipe, [PROMPT, "a green dog"], guidance=None, solver="ddim", steps=3, latents=lat,
                     output_type="latent", ip_adapter_image=img, **SIZE)
    assert _maxdiff(out1, ref1) < TOL  # 9.5e-7


def test_ip_adapter_image_errors(ip_pipe, ip_image_pipe, base_sd):
    call = {"steps": 1, "output_type": "latent", **SIZE}
    with pytest.raises(ValueError, match="pass ip_adapter_image= or ip_adapter_image_embeds=, not both"):
        sd.sample(ip_image_pipe, PROMPT, guidance="cfg(3)", ip_adapter_image=_image(1),
                  ip_adapter_image_embeds=[_image_embeds(2)], **call)
    with pytest.raises(ValueError, match=r"needs the IP-Adapter's image encoder.*pipe.load_ip_adapter\(\.\.\., "
                                         r"image_encoder_folder=\.\.\.\)"):
        sd.sample(ip_pipe, PROMPT, guidance="cfg(3)", ip_adapter_image=_image(1), **call)
    with pytest.raises(ValueError, match="negative_ip_adapter_image= is FluxPipeline's argument"):
        sd.sample(ip_image_pipe, PROMPT, guidance="cfg(3)", ip_adapter_image=_image(1),
                  negative_ip_adapter_image=_image(2), **call)
    with pytest.raises(ValueError, match="ip_adapter_image= needs an IP-Adapter loaded into the UNet"):
        sd.sample(base_sd, PROMPT, guidance="cfg(3)", ip_adapter_image=_image(1), **call)
    with pytest.raises(ValueError, match="must have same length as the number of IP Adapters"):  # the pipeline's
        sd.sample(ip_image_pipe, PROMPT, guidance="cfg(3)", ip_adapter_image=[_image(1), _image(2)], **call)


def test_attention_slicing_runs_cfg_and_names_itself_under_perturbations(folders, base_sd):
    """pipe.enable_attention_slicing() installs SlicedAttnProcessor, which never calls scaled_dot_product_attention:
    guidance without hooks runs through it (equal to the sliced pipeline and to the unsliced result); a perturbation
    on a sliced layer raises an error naming the processor and what is allowed; the default processor on the
    perturbed layer alone (slicing kept elsewhere) gives the unsliced PAG pipeline's result."""
    pipe = _ddim(sd.load(folders["sd"]))
    pipe.enable_attention_slicing()
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"SlicedAttnProcessor"}
    ref, out = _both(pipe, f"cfg({SCALE})")
    unsliced, _ = _both(base_sd, f"cfg({SCALE})")
    assert _maxdiff(out, ref) < TOL and _maxdiff(out, unsliced) < TOL
    with pytest.raises(RuntimeError, match=r"attn1: its attention processor SlicedAttnProcessor does not call "
                                           r"torch.nn.functional.scaled_dot_product_attention.*allowed.*"
                                           r"disable_attention_slicing"):
        sd.sample(pipe, PROMPT, negative_prompt=NEGATIVE, guidance=f"cfg({SCALE}) + pag(4.0)", steps=2,
                  output_type="latent", seed=0, **SIZE)
    sites = sd.denoiser(pipe).sites()
    assert not any(s.hooks for s in sites.values())  # the failed call left no hook behind
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.set_processor(AttnProcessor2_0())
    pag = diffusers.StableDiffusionPAGPipeline.from_pipe(base_sd, pag_applied_layers=["mid"])
    ref_pag, _ = _both(base_sd, f"cfg({SCALE}) + pag(scale=4.0)", {"guidance_scale": SCALE, "pag_scale": 3.0},
                       pipeline=pag)
    _, out_pag = _both(pipe, f"cfg({SCALE}) + pag(scale=4.0)")
    assert _maxdiff(out_pag, ref_pag) < TOL


class SEGInfByHand:
    """SEG at σ = ∞ on the rows given, written out as a self-attention processor: those rows' queries become their
    mean over the tokens, then ordinary attention."""

    def __init__(self, rows):
        self.rows = rows

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b, n, _ = hidden_states.shape
        split = lambda z: z.view(b, n, attn.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = (split(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        q = q.clone()
        q[self.rows] = q[self.rows].mean(dim=2, keepdim=True).expand_as(q[self.rows])
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def test_pag_and_seg_hooks_keep_the_ip_adapter_branch_on_the_perturbed_rows(ip_pipe):
    """Rows [uncond, cond, cond] with image embeds [negative, positive, positive]: PAG and SEG perturb the middle
    block's self-attention (attn1) of the third row; the IP-Adapter lives in the cross-attention (attn2), so the
    perturbed row keeps its image prompt. Compared with diffusers' PAGCFGIdentitySelfAttnProcessor2_0 and SEG
    (σ = ∞) written as a processor, each installed in place of attn1's processor."""
    from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0

    model = sd.denoiser(ip_pipe)
    neg_pos = [_image_embeds(2)]
    enc = sd.encode(ip_pipe, PROMPT, NEGATIVE, ip_adapter_image_embeds=neg_pos)
    cond3 = condlib.cat([enc.uncond, enc.cond, enc.cond])
    x = _latents(ip_pipe, seed=10).repeat(3, 1, 1, 1)
    t = torch.full((3,), 0.6)
    attn1 = ip_pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1
    own = attn1.processor
    sites = [n for n, s in model.sites().items() if s.is_middle and isinstance(s, hooks.AttentionSite)]
    assert sites == ["mid_block.attentions.0.transformer_blocks.0.attn1"]  # PAG's and SEG's layer: no IP processor
    with torch.no_grad():
        plain = model(x, t, cond3)
        for perturbation, by_hand in ((hooks.IdentityAttention(), PAGCFGIdentitySelfAttnProcessor2_0()),
                                      (hooks.SmoothedEnergy(None, math.inf), SEGInfByHand(slice(2, 3)))):
            with hooks.perturb(model, {(2, 3): perturbation}):
                got = model(x, t, cond3)
            attn1.set_processor(by_hand)
            try:
                expect = model(x, t, cond3)
                other_image = model(x, t, condlib.cat([enc.uncond, enc.cond, dict(
                    enc.cond, image_embeds=[_image_embeds(1, seed=12)])]))
            finally:
                attn1.set_processor(own)
            assert _maxdiff(got, expect) < 1e-6, perturbation  # measured: 0 (bit-identical) for both
            assert torch.equal(got[:2], plain[:2])  # the other rows: bit-identical to no hooks
            assert _maxdiff(got[2], plain[2]) > 1e-3  # the perturbation acts (measured PAG 0.045, SEG 0.0049)
            assert _maxdiff(expect[2], other_image[2]) > 1e-2  # the perturbed row sees its image prompt (0.18)
            assert attn1.processor is own


@pytest.mark.parametrize("kind", ["tpg", "slg"])
def test_block_hooks_slice_the_ip_adapter_tokens_by_row(ip_pipe, kind):
    """With an IP-Adapter the UNet hands its blocks encoder_hidden_states = (text, [image tokens]): TPG and
    skip-layer slice that tuple by row too (the perturbed rows see their own image tokens) and equal the mid block's
    transformer block replaced by hand on every row."""
    model = sd.denoiser(ip_pipe)
    enc = sd.encode(ip_pipe, PROMPT, NEGATIVE, ip_adapter_image_embeds=[_image_embeds(2)])
    cond3 = condlib.cat([enc.uncond, enc.cond, enc.cond])
    x = _latents(ip_pipe, seed=13).repeat(3, 1, 1, 1)
    t = torch.full((3,), 0.5)
    block = ip_pipe.unet.mid_block.attentions[0].transformer_blocks[0]
    model.sites()  # installs the sites (they wrap block.forward) before the by-hand swap below saves it
    wrapped = block.forward
    inner = type(block).forward
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(5))  # the mid block's 4×4 tokens
    if kind == "slg":
        by_hand, p = (lambda hidden_states, **kw: hidden_states), hooks.SkipLayer()
    else:
        by_hand, p = (lambda hidden_states, **kw: inner(block, hidden_states[:, perm], **kw)), hooks.TokenShuffle(
            None, seed=5)
    with torch.no_grad():
        plain = model(x, t, cond3)
        with hooks.perturb(model, {(1, 3): p}):
            got = model(x, t, cond3)
        block.forward = by_hand
        try:
            expect = model(x, t, cond3)
        finally:
            block.forward = wrapped
    assert torch.equal(got[:1], plain[:1])
    assert _maxdiff(got[1:], expect[1:]) < 1e-6
    assert _maxdiff(got[1:], plain[1:]) > 1e-3


class NAGWithIPAdapterByHand:
    """The IP-Adapter's cross-attention (IPAdapterAttnProcessor2_0 without masks, written out) with NAG on its text
    attention, for rows [positive, negative]: the positive row's queries against the negative row's text keys/values
    give Z⁻, the positive row's text attention becomes blend(Z⁺, Z⁻), then each row adds its image-prompt term
    ``scale · Attn(Q, K_ip, V_ip)`` as the processor does."""

    def __init__(self, ip_processor, nag):
        self.ip, self.nag = ip_processor, nag

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        text, ip_tokens = encoder_hidden_states
        b, n, _ = hidden_states.shape
        split = lambda z: z.reshape(b, -1, attn.heads, z.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
        merge = lambda z: z.transpose(1, 2).flatten(2)  # noqa: E731
        sdpa = torch.nn.functional.scaled_dot_product_attention
        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(text)), split(attn.to_v(text))
        z = merge(sdpa(q, k, v))
        z_neg = merge(sdpa(q[:1], k[1:2], v[1:2]))
        z = torch.cat([self.nag.blend(z[:1], z_neg, "cross"), z[1:]])
        for tokens, scale, to_k_ip, to_v_ip in zip(ip_tokens, self.ip.scale, self.ip.to_k_ip, self.ip.to_v_ip):
            z = z + scale * merge(sdpa(q, split(to_k_ip(tokens)), split(to_v_ip(tokens))))
        return attn.to_out[1](attn.to_out[0](z))


def test_nag_guides_the_text_part_of_the_ip_adapter_cross_attention(ip_pipe, base_sd):
    """NAG acts in the cross-attention, where the IP-Adapter processor is: steer intercepts the processor's first
    attention call (the text one), so the image-prompt term is added unchanged, as the processor written out with
    NAG on its text attention (every attn2). With the adapter's scale at 0, steer's cfg + nag equals it on the
    pipeline without the IP-Adapter. (The official NAG pipelines replace the cross-attention processors, dropping
    the IP-Adapter: there is no official IP-Adapter form to compare with.)"""
    model = sd.denoiser(ip_pipe)
    enc = sd.encode(ip_pipe, PROMPT, NEGATIVE, ip_adapter_image_embeds=[_image_embeds(2)])
    cond2 = condlib.cat([enc.cond, enc.uncond])  # rows: [positive (NAG), negative (its reference)]
    x = _latents(ip_pipe, seed=19).repeat(2, 1, 1, 1)
    t = torch.full((2,), 0.7)
    nag = hooks.NormalizedCrossAttention("*", 4.0)
    own = dict(ip_pipe.unet.attn_processors)
    with torch.no_grad():
        plain = model(x, t, cond2)
        with hooks.perturb(model, {(0, 1): nag}, {(0, 1): (1, 2)}):
            got = model(x, t, cond2)
        ip_pipe.unet.set_attn_processor({n: NAGWithIPAdapterByHand(p, nag) if n.endswith("attn2.processor") else p
                                         for n, p in own.items()})
        try:
            expect = model(x, t, cond2)
        finally:
            ip_pipe.unet.set_attn_processor(own)
    assert _maxdiff(got, expect) < 1e-5  # measured: 0 (bit-identical)
    assert torch.equal(got[1:], plain[1:]) and _maxdiff(got[:1], plain[:1]) > 1e-3  # NAG acts (0.23)
    kw = {"negative_prompt": NEGATIVE, "guidance": f"cfg({SCALE}) + nag(4.0)", "solver": "ddim", "steps": 3,
          "output_type": "latent", "seed": 0, **SIZE}
    without = sd.sample(base_sd, PROMPT, **kw)
    ip_pipe.set_ip_adapter_scale(0.0)
    try:
        off = sd.sample(ip_pipe, PROMPT, ip_adapter_image_embeds=[_image_embeds(2)], **kw)
    finally:
        ip_pipe.set_ip_adapter_scale(1.0)
    assert _maxdiff(off, without) < TOL


def test_ip_adapter_on_sdxl_reproduces_the_pipeline(folders, tmp_path):
    """SDXL: the image embeds join the added conditions (text_embeds, time_ids) in added_cond_kwargs."""
    pipe = sd.load(folders["sdxl"])
    _ip_adapter_file(pipe.unet, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip-adapter.safetensors",
                             image_encoder_folder=None, local_files_only=True)
    lat = _latents(pipe, seed=14)
    embeds = [_image_embeds(2, seed=15)]
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=SCALE, num_inference_steps=3, latents=lat,
               output_type="latent", ip_adapter_image_embeds=embeds, **SIZE).images
    out = sd.sample(pipe, PROMPT, negative_prompt=NEGATIVE, guidance=f"cfg({SCALE})", steps=3, latents=lat,
                    output_type="latent", ip_adapter_image_embeds=embeds, **SIZE)
    assert _maxdiff(out, ref) < TOL
    other = sd.sample(pipe, PROMPT, negative_prompt=NEGATIVE, guidance=f"cfg({SCALE})", steps=3, latents=lat,
                      output_type="latent", ip_adapter_image_embeds=[_image_embeds(2, seed=16)], **SIZE)
    assert _maxdiff(other, ref) > 0.1  # the image prompt acts (measured 5.2)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_lora_scale_through_joint_attention_kwargs(folders, tmp_path, kind):
    """SD3 and Flux take the LoRA scale as joint_attention_kwargs (their pipelines' name for it)."""
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    maker = sd.load(folders[kind])
    maker.transformer.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                                  init_lora_weights=False))
    gen = torch.Generator().manual_seed(17)
    with torch.no_grad():
        for name, p in maker.transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    type(maker).save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(maker.transformer))
    pipe = sd.load(folders[kind])
    pipe.load_lora_weights(str(tmp_path))
    lat = _latents(pipe, seed=18)
    call = {"true_cfg_scale": 3.0, "guidance_scale": 3.5} if kind == "flux" else {"guidance_scale": 3.0}
    kw = {"num_inference_steps": 3, "latents": lat, "output_type": "latent", **_kwargs(kind)}
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, joint_attention_kwargs={"scale": 0.5}, **call, **kw).images
    full = pipe(PROMPT, negative_prompt=NEGATIVE, **call, **kw).images
    out = sd.sample(pipe, PROMPT, negative_prompt=NEGATIVE, guidance="cfg(3.0)", steps=3, latents=lat,
                    output_type="latent", joint_attention_kwargs={"scale": 0.5}, **_kwargs(kind))
    assert _maxdiff(out, ref) < TOL
    assert _maxdiff(ref, full) > 0.05  # the scale acts (measured SD3 0.11, Flux 0.17; steer to the pipeline 1e-6)
    with pytest.raises(ValueError, match="takes joint_attention_kwargs=, not cross_attention_kwargs="):
        sd.sample(pipe, PROMPT, cross_attention_kwargs={"scale": 0.5}, steps=1, output_type="latent",
                  **_kwargs(kind))
