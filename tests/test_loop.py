"""The open loop: explicit state and resampling, the gradient policy, generators and batch invariance, honest
non-finite errors, bad inputs."""

import math
import weakref

import pytest
import torch

import steer
from steer import guidance as g
from steer.core import Branch
from steer.solvers import SOLVERS, Solver
from steer.testbeds import gmm
from steer.testbeds.toy import ToyLatentModel

DETERMINISTIC = [n for n, cls in SOLVERS.items() if not cls().stochastic]
STOCHASTIC = [n for n, cls in SOLVERS.items() if cls().stochastic]


@pytest.fixture(scope="module")
def toy():
    return ToyLatentModel((4, 16, 16))


def _double(model):
    return model.double() if isinstance(model, torch.nn.Module) else model


# ---------------------------------------------------------------------------------------------------
# Resampling the whole state


@pytest.mark.parametrize("solver", DETERMINISTIC)
@pytest.mark.parametrize("guidance", [None, "apg(scale=6, momentum=-0.5)", "adaptive(scale=4, threshold=0.999)"])
def test_resample_equals_sampling_the_reordered_noise(toy, solver, guidance):
    """Run 4 items to step k, resample rows [2, 0, 2, 3] (a repeat, a dropped row), finish; the rows equal those
    sampled from the start with the noise and conditions reordered: the solver history, the APG momentum and the
    Adaptive latch follow their rows."""
    z = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 10, 7, 10])  # the null label's rows latch Adaptive Guidance at once, the others late
    idx = torch.tensor([2, 0, 2, 3])
    steps, k = 8, 4
    it = steer.sampler(toy, noise=z, cond=labels, guidance=guidance, solver=solver, steps=steps)
    for step in it:
        if step.i == k - 1:
            it.resample(idx)
            state = list(it.ev.gstate.values())
    ref = steer.sample(toy, noise=z[idx], cond=labels[idx], guidance=guidance, solver=solver, steps=steps)
    assert torch.allclose(it.x, ref, atol=1e-5)
    if guidance and guidance.startswith("adaptive"):  # the latch differed across rows when resampled
        assert state[0].tolist() == [False, False, False, True]
    if guidance and guidance.startswith("apg"):
        assert state[0].shape == (4, 4, 16, 16)


def test_resample_without_resampling_state_differs(toy):
    """The check above can fail: resampling x alone (not the multistep history) gives another result."""
    z = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([2, 0, 2, 3])
    it = steer.sampler(toy, noise=z, cond=torch.tensor([1, 4, 7, 9]), solver="dpmpp_2m", steps=8)
    for step in it:
        if step.i == 3:
            it.x = it.x[idx]  # x only: the 2M history keeps the old rows
    ref = steer.sample(toy, noise=z[idx], cond=torch.tensor([1, 4, 7, 9])[idx], solver="dpmpp_2m", steps=8)
    assert (it.x - ref).abs().max() > 1e-3


@pytest.mark.parametrize("solver", STOCHASTIC)
def test_resample_with_per_item_generators(toy, solver):
    """With one generator per item, a row's first copy continues its own random stream (it equals the row sampled
    with the reordered seeds) and a repeated row's second copy gets a fresh stream (the copies diverge)."""
    seeds, idx = [10, 11, 12, 13], torch.tensor([2, 0, 2, 3])
    labels = torch.tensor([1, 4, 7, 9])
    it = steer.sampler(toy, cond=labels, solver=solver, steps=6, seed=seeds)
    for step in it:
        if step.i == 2:
            it.resample(idx)
    ref = steer.sample(toy, cond=labels[idx], solver=solver, steps=6, seed=[seeds[i] for i in idx])
    first = [0, 1, 3]
    assert torch.allclose(it.x[first], ref[first], atol=1e-5)
    assert (it.x[2] - it.x[0]).abs().max() > 1e-2


def test_resample_rejects_bad_indices(toy):
    it = steer.sampler(toy, cond=torch.tensor([1, 2]), steps=3, seed=0)
    next(iter(it))
    for bad in (torch.tensor([0, 2]), torch.tensor([[0, 1]]), torch.tensor([0.0, 1.0]),
                torch.tensor([], dtype=torch.long)):
        with pytest.raises(ValueError, match="resample"):
            it.resample(bad)


# ---------------------------------------------------------------------------------------------------
# The open loop


def test_open_loop_steps_expose_the_state_and_the_guided_x0():
    """Euler on the flow path from t to t': x' = x + (t' − t)(ε̂ − x̂0), so the yielded x̂0 is recovered from two
    consecutive states; sigma is σ̄ = t/(1 − t); nfe counts CFG's two branches."""
    mix = gmm.toy(dim=2)
    den = mix.denoiser("flow", "flow")
    z = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    it = steer.sampler(den, noise=z, cond=torch.tensor([0, 1, 2]), guidance="cfg(2)", solver="euler", steps=5)
    prev, seen = it.x, []
    for step in it:
        t, t_next = step.t, float(it.timesteps[step.i + 1])
        # x' = (1 − t') x̂0 + t' ε̂ with ε̂ = (x − (1 − t) x̂0)/t
        expect = (1 - t_next) * step.x0 + t_next * (prev - (1 - t) * step.x0) / t if t > 0 else step.x0
        assert torch.allclose(step.x, expect, atol=1e-12)
        assert step.sigma == pytest.approx(t / (1 - t) if t < 1 else math.inf)
        seen.append(step.nfe)
        prev = step.x
    assert seen == [2, 4, 6, 8, 10] and torch.equal(it.x, prev)


def test_callback_can_replace_the_state():
    den = steer.denoiser(lambda x, t, c: torch.zeros_like(x), "flow", "x0")  # x̂0 = 0: x_t = t/s · x_s
    z = torch.ones(1, 2, dtype=torch.float64)
    out = steer.sample(den, noise=z, solver="euler", timesteps=[1.0, 0.5, 0.25],
                       callback=lambda step: step.x * 3 if step.i == 0 else None)
    assert torch.allclose(out, torch.full((1, 2), 0.25 * 3, dtype=torch.float64))  # 1 → 0.5 → ×3 → 0.75


def test_the_loops_noise_can_be_replaced(toy):
    """``it.noise`` is what stochastic solvers and guidance (``ctx.noise``) draw from; replaced by zeros, the seed of
    the solver's noise no longer matters."""
    seen, calls = [], []

    class Peek(g.Guidance):
        name = "peek"

        def branches(self, ctx):
            return ("cond",)

        def combine(self, preds, ctx):
            seen.append(ctx.noise)
            return preds["cond"]

    def zeros(like):
        calls.append(tuple(like.shape))
        return torch.zeros_like(like)

    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    run = lambda seed: steer.sampler(toy, noise=z, cond=torch.tensor([1, 2]), solver="euler_ancestral",  # noqa
                                     steps=4, seed=seed, guidance=Peek())
    default = [run(seed) for seed in (0, 1)]
    for it in default:
        for _ in it:
            pass
    assert not torch.equal(default[0].x, default[1].x)
    replaced = [run(seed) for seed in (0, 1)]
    for it in replaced:
        it.noise = zeros
        for _ in it:
            pass
    assert torch.equal(replaced[0].x, replaced[1].x)
    assert calls and all(c == (2, 4, 16, 16) for c in calls) and seen[-1] is zeros
    with pytest.raises(ValueError, match="noise"):
        replaced[0].noise = 3


def test_replacing_x_with_another_shape_is_an_error(toy):
    it = steer.sampler(toy, cond=torch.tensor([1]), steps=3, seed=0)
    with pytest.raises(ValueError, match="shape"):
        it.x = torch.zeros(2, 4, 16, 16)


# ---------------------------------------------------------------------------------------------------
# The gradient policy


class _Net(torch.nn.Module):
    """A model whose parameters require grad, as a diffusers UNet's do by default."""

    path, prediction = steer.get_path("flow"), "flow"

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x, t, cond):
        return self.lin(x) * t[:, None]


def test_sampling_builds_no_graph_whatever_the_parameters_say():
    net = _Net()
    assert all(p.requires_grad for p in net.parameters())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        out = steer.sample(net, noise=torch.randn(2, 8), cond=torch.ones(2), uncond=torch.zeros(2),
                           guidance="apg(scale=3)", solver="dpmpp_2m", steps=20)
    assert out.grad_fn is None and not out.requires_grad
    assert saved == []  # nothing kept for a backward pass: memory cannot grow with the steps
    assert torch.is_grad_enabled()  # and the caller's grad mode is untouched


class _GradProbe(g.Guidance):
    """A guidance with one branch that asks for gradients: it returns the conditional x̂0 and records
    d‖x̂0‖²/dx of the grad branch, and whether the plain branch carried a graph."""

    name = "grad_probe"

    def __init__(self):
        self.grads, self.plain_graph, self.alive = [], [], []

    def branch_specs(self):
        return {"probe": Branch("cond", grad=True)}

    def branches(self, ctx):
        return ("cond", "probe")

    def combine(self, preds, ctx):
        x0 = preds["probe"]
        (grad,) = torch.autograd.grad(x0.pow(2).sum(), ctx.inputs["probe"])
        self.grads.append((ctx.x.clone(), ctx.point, grad))
        self.plain_graph.append(preds["cond"].requires_grad)
        self.alive.append(weakref.ref(x0))
        return preds["cond"]


def test_a_grad_branch_gets_gradients_and_the_others_no_graph():
    """Linear denoiser x̂0 = 0.5 x: d‖x̂0‖²/dx = 0.5 x. The probe's graph is freed after each evaluation."""
    den = steer.denoiser(lambda x, t, c: 0.5 * x, "flow", "x0")
    probe = _GradProbe()
    steer.sample(den, noise=torch.randn(3, 4, dtype=torch.float64), guidance=probe, solver="heun", steps=3)
    assert len(probe.grads) == 5  # heun: 2 evaluations per step, 1 on the last
    for x, _, grad in probe.grads:
        assert torch.allclose(grad, 0.5 * x)
    assert probe.plain_graph == [False] * 5
    assert all(ref() is None for ref in probe.alive)


# ---------------------------------------------------------------------------------------------------
# Generators, devices, dtypes, batch invariance


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_batch_invariance_with_per_item_generators(toy, solver):
    """An item seeded on its own gets the same sample alone and in any batch, stochastic solvers included."""
    labels = torch.tensor([3, 5, 8])
    batch = steer.sample(toy, cond=labels, solver=solver, steps=6, seed=[7, 8, 9], guidance="cfg(3)")
    for j in range(3):
        alone = steer.sample(toy, cond=labels[j:j + 1], solver=solver, steps=6, seed=[7 + j], guidance="cfg(3)")
        assert torch.allclose(batch[j:j + 1], alone, atol=1e-5), j
    swapped = steer.sample(toy, cond=labels[[2, 0]], solver=solver, steps=6, seed=[9, 7], guidance="cfg(3)")
    assert torch.allclose(swapped, batch[[2, 0]], atol=1e-5)


def test_generators_list_equals_seeds(toy):
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    a = steer.sample(toy, cond=torch.tensor([1, 2]), solver="euler_ancestral", steps=4, generator=gens)
    b = steer.sample(toy, cond=torch.tensor([1, 2]), solver="euler_ancestral", steps=4, seed=[1, 2])
    assert torch.equal(a, b)


def test_dtype_and_device_arguments(toy):
    x = steer.sample(toy, cond=torch.tensor([1]), steps=3, seed=0, dtype=torch.bfloat16, device="cpu")
    ref = steer.sample(toy, cond=torch.tensor([1]), steps=3, seed=0)
    assert x.dtype == torch.bfloat16 and x.device.type == "cpu" and ref.dtype == torch.float32
    assert ((x.float() - ref).norm() / ref.norm()) < 0.05  # the same noise, drawn in float32 and cast


def test_the_model_receives_t_in_float32_for_half_states():
    seen = []
    den = steer.denoiser(lambda x, t, c: seen.append(t.dtype) or torch.zeros_like(x), "vp-linear", "x0")
    steer.sample(den, noise=torch.randn(2, 3, dtype=torch.bfloat16), solver="euler", steps=2)
    assert seen == [torch.float32, torch.float32]


def test_timesteps_as_a_tensor_keep_float64():
    den = steer.denoiser(lambda x, t, c: torch.zeros_like(x), "vp-linear", "x0")
    res = steer.sample(den, noise=torch.randn(1, 2), timesteps=torch.tensor([0.9, 0.3], dtype=torch.float64),
                       return_info=True)
    assert res.timesteps.dtype == torch.float64 and res.timesteps[0].item() == 0.9


# ---------------------------------------------------------------------------------------------------
# Non-finite values: who made them


def _flow(fn):
    return steer.denoiser(fn, "flow", "flow")


def test_nan_in_the_noise_is_named():
    z = torch.randn(1, 2)
    z[0, 1] = math.nan
    with pytest.raises(steer.NonFiniteError, match="input noise"):
        steer.sample(_flow(lambda x, t, c: torch.zeros_like(x)), noise=z, solver="euler", steps=3)


def test_nan_from_the_model_on_the_last_step_is_caught():
    den = _flow(lambda x, t, c: torch.full_like(x, math.nan) if float(t[0]) < 0.3 else torch.zeros_like(x))
    with pytest.raises(steer.NonFiniteError, match=r"model returned NaN or inf at step 3 .* branch\(es\) cond"):
        steer.sample(den, noise=torch.randn(1, 2), solver="euler", steps=4)  # t = 1, .75, .5, .25


def test_nan_from_one_branch_names_it():
    den = _flow(lambda x, t, c: torch.where(c[:, None] == 10, math.nan, 0.0).expand_as(x).clone())
    den.null_cond = lambda cond, batch: torch.full((batch,), 10)
    with pytest.raises(steer.NonFiniteError, match=r"step 0 .* cond, uncond"):
        steer.sample(den, noise=torch.randn(2, 2), cond=torch.tensor([1, 2]), guidance="cfg(3)", steps=3)


class _Broken(g.Guidance):
    name = "broken"

    def combine(self, preds, ctx):
        return preds["cond"] / 0.0 if ctx.step == 1 else preds["cond"]


def test_nan_from_the_guidance_names_the_guidance():
    den = _flow(lambda x, t, c: torch.ones_like(x))
    with pytest.raises(steer.NonFiniteError, match=r"guidance made NaN or inf at step 1"):
        steer.sample(den, noise=torch.randn(1, 2), guidance=_Broken(), solver="euler", steps=4)


class _BadSolver(Solver):
    name = "bad"

    def step(self, i, x, state, denoise, noise):
        denoise(x, state["pts"][i].t)
        return x * math.inf, state


def test_nan_from_the_solver_names_the_solver():
    with pytest.raises(steer.NonFiniteError, match="solver update"):
        steer.sample(_flow(lambda x, t, c: torch.zeros_like(x)), noise=torch.randn(1, 2), solver=_BadSolver(), steps=3)


def test_large_finite_half_values_are_not_reported():
    """A float16 state whose plain float16 sum would overflow 65504 is finite: no error."""
    den = _flow(lambda x, t, c: torch.zeros_like(x))
    out = steer.sample(den, noise=torch.full((1, 100_000), 1.0, dtype=torch.float16), solver="euler", steps=2)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_generators_and_seeds_are_clear():
    den = ToyLatentModel((4, 8, 8))
    for kwargs, msg in (({"seed": "abc"}, "seed must be an int"), ({"seed": [1, 2, 3]}, "3 generators"),
                        ({"generator": 5}, "generator must be"),
                        ({"seed": 1, "generator": torch.Generator()}, "not both"),
                        ({"seed": 1, "dtype": torch.long}, "dtype must be")):
        with pytest.raises(ValueError, match=msg):
            steer.sample(den, cond=torch.tensor([1, 2]), steps=2, **kwargs)


def test_uncond_of_the_wrong_batch_is_caught_before_the_model():
    calls = []
    den = _flow(lambda x, t, c: calls.append(1) or torch.zeros_like(x))
    with pytest.raises(ValueError, match="uncond has batch 3"):
        steer.sample(den, noise=torch.randn(2, 2), cond=torch.zeros(2), uncond=torch.zeros(3), guidance="cfg(2)")
    assert calls == []


def test_a_model_returning_a_tuple_is_explained():
    den = _flow(lambda x, t, c: (x,))
    with pytest.raises(TypeError, match="returned a tuple.*return_dict=False"):
        steer.sample(den, noise=torch.randn(1, 2), steps=2)


def test_named_guide_models_come_from_the_registry():
    assert "flow-weak" in steer.models.MODELS
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        g.autoguidance(2.0, guide="nope")


@pytest.mark.parametrize("spec", ["restart(intervals=5)", "restart(intervals=[(3, 2, 0.3, 0.06)])",
                                  "restart(intervals=[(3, 2, 'a', 1)])"])
def test_bad_restart_intervals_are_explained(spec):
    with pytest.raises(ValueError, match=r"restart intervals must be a list of \(n >= 2, K >= 0"):
        steer.get_solver(spec)
