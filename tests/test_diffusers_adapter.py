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
