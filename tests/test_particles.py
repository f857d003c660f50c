"""Particle steering (steer.particles): resampling, weights, FK steering, FK correctors, SVDD, search."""
import math

import pytest
import torch

import steer
from steer import particles as P, rewards
from steer.metrics import energy_distance
from steer.testbeds import gmm as G

# ---------------------------------------------------------------------------------------------------
# Resampling


@pytest.mark.parametrize("scheme", P.RESAMPLERS)
def test_resampling_is_unbiased(scheme):
    """Expected offspring counts are K·w_i: the mean count over R = 4000 independent draws lies within 5 standard
    errors (empirical sd/√R; a false failure has probability < 1e-5 over the 7 particles) of K·w_i."""
    K, R = 7, 4000
    w = torch.tensor([0.31, 0.02, 0.17, 0.005, 0.245, 0.15, 0.09], dtype=torch.float64)
    gens = [torch.Generator().manual_seed(i) for i in range(R)]
    idx = P.resample_index(w.expand(R, K), K, scheme, gens)
    counts = torch.nn.functional.one_hot(idx, K).sum(1).double()  # [R, K]
    mean, se = counts.mean(0), counts.std(0) / math.sqrt(R)
    assert torch.all((mean - K * w).abs() <= 5 * se + 1e-12), (mean, K * w)
    lo, hi = torch.floor(K * w), torch.ceil(K * w)
    if scheme == "systematic":
        assert torch.all((counts >= lo) & (counts <= hi))
    if scheme == "residual":
        assert torch.all(counts >= lo)
    if scheme == "stratified":
        assert torch.all((counts >= lo - 1) & (counts <= hi + 1))
    assert torch.all(counts.sum(1) == K)


@pytest.mark.parametrize("scheme", ["systematic", "stratified", "residual"])
def test_resampling_is_exact_for_integer_counts(scheme):
    w = torch.tensor([3, 0, 1, 4], dtype=torch.float64) / 8
    for seed in range(20):
        idx = P.resample_index(w, 8, scheme, torch.Generator().manual_seed(seed))
        assert torch.bincount(idx, minlength=4).tolist() == [3, 0, 1, 4]


def test_extreme_log_weights_stay_finite():
    lw = torch.tensor([[1e4, -1e4, 0.0, -math.inf], [-1e4, -1e4, -1e4, -1e4], [-math.inf] * 4])
    n = P.normalize(lw)
    assert torch.isfinite(n[:, :3]).all() and n[0, 3] == -math.inf
    torch.testing.assert_close(n.exp().sum(1), torch.ones(3))
    torch.testing.assert_close(P.ess(lw), torch.tensor([1.0, 4.0, 4.0]))
    assert P.resample_index(n[0].exp(), 4, "multinomial", torch.Generator().manual_seed(0)).tolist() == [0] * 4
    eng = P.SMC(3, 4, "systematic", "every", [torch.Generator().manual_seed(i) for i in range(3)])
    eng.add(lw.reshape(-1))
    index = eng.check(0)
    assert index[:4].tolist() == [0] * 4 and torch.equal(eng.log_w, torch.zeros(3, 4))
    eng.add(torch.full((12,), float("nan")))
    with pytest.raises(FloatingPointError, match="NaN"):
        eng.check(1)


def test_weights_accumulate_when_resampling_is_skipped():
    """An ESS schedule that does not fire keeps the weights (the reference FK code overwrites them)."""
    eng = P.SMC(2, 4, "systematic", 0.5, [torch.Generator().manual_seed(i) for i in range(2)])
    a, b = torch.tensor([0.1, 0.0, 0.2, 0.0, 5.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 0.3, 0.0, 0.1, 5.0, 0, 0, 0])
    eng.add(a)
    assert eng.check(0) is not None  # group 1 (ESS ≈ 1.03 < 2) resamples, group 0 does not
    eng.add(b)
    torch.testing.assert_close(eng.log_w[0], (a + b)[:4])
    torch.testing.assert_close(eng.log_w[1], b[4:])
    d = eng.diagnostics()
    assert d["resampled"].tolist() == [[False, True]]


# ---------------------------------------------------------------------------------------------------
# FK steering


def _reference_fk_step(kind, lmbda, rs, population_rs, product, final):
    """The official FK steering potential (zacharyhorvitz/Fk-Diffusion-Steering, fkd_class.py FKD.resample),
    re-implemented: returns (w, candidate rewards)."""
    if kind == "max":
        rs = torch.maximum(rs, population_rs)
        w = torch.exp(lmbda * rs)
    elif kind == "sum":
        rs = rs + population_rs
        w = torch.exp(lmbda * rs)
    else:
        w = torch.exp(lmbda * (rs - population_rs))
    if final and kind in ("max", "sum"):
        w = torch.exp(lmbda * rs) / product
    return w.clamp(0, 1e10), rs


@pytest.mark.parametrize("kind", ["diff", "max", "sum"])
def test_fk_potentials_match_the_reference_when_it_resamples_every_time(kind):
    g = torch.Generator().manual_seed(3)
    K, lmbda, steps = 6, 0.7, 5
    pop, prod = torch.zeros(K, dtype=torch.float64), torch.ones(K, dtype=torch.float64)
    r_prev, log_prod = torch.zeros(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64)
    for i in range(steps):
        rs = torch.randn(K, generator=g, dtype=torch.float64)
        final = i == steps - 1
        w_ref, rs_ref = _reference_fk_step(kind, lmbda, rs, pop, prod, final)
        log_g, r_prev = P.fk_potential(kind, rs, r_prev, log_prod, lmbda, final)
        if final and kind != "diff":
            # recorded deviation: the reference divides exp(λ·combined reward) (max or sum over the path) by the
            # product; ours divides exp(λ r(x0)), so that every path's product is exp(λ r(x0)) as the paper states
            torch.testing.assert_close(w_ref, torch.exp(lmbda * rs_ref) / prod)
            torch.testing.assert_close(log_g.exp(), torch.exp(lmbda * rs) / prod)
            break
        torch.testing.assert_close(log_g.exp(), w_ref)
        log_prod = log_prod + log_g
        idx = torch.randint(K, (K,), generator=g)  # the same ancestors for both
        pop, prod = rs_ref[idx], prod[idx] * w_ref[idx]
        r_prev, log_prod = r_prev[idx], log_prod[idx]


@pytest.fixture(scope="module")
def toy():
    return G.toy(dim=2)


def test_fk_steering_keeps_weights_the_reference_drops(toy):
    """Without a resampling, FK-diff's final weights are λ r(x0) (the potentials telescope); the reference keeps
    only the last potential, λ (r_N − r_{N−1})."""
    model, b, lmbda = toy.denoiser("flow", "flow"), torch.tensor([1.0, -0.5]), 0.8
    res = steer.smc(model, cond=torch.tensor([1]), method="fk_steering", reward=rewards.linear(b), lmbda=lmbda,
                    particles=8, steps=12, seed=0, ess_threshold=1e-9, output="weighted")
    assert not res.diagnostics["resampled"].any()
    r = res.particles[0].double() @ b.double()
    torch.testing.assert_close(res.log_weights[0], torch.log_softmax(lmbda * r, 0), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.rewards[0].double(), r, atol=1e-5, rtol=0)


@pytest.mark.parametrize("potential", ["diff"])
def test_fk_steering_samples_the_linear_reward_tilted_mixture(toy, potential):
    """p(x|c) exp(λ bᵀx): the exact tilted mixture (steer.testbeds.gmm.linear_tilt). One particle per condition,
    drawn from the final weights, G = 200 conditions × K = 16 particles, 25 DDIM(η = 1) steps; energy distance
    below the 99th percentile of exact-vs-exact distances at the same sizes, while the untilted base is ≥ 5× that."""
    model, b, lmbda, label = toy.denoiser("flow", "flow"), torch.tensor([1.0, 0.5]), 0.7, 1
    target = G.linear_tilt(toy, b, lmbda, label)
    gen = torch.Generator().manual_seed(7)
    ref = target.sample(3000, generator=gen)
    n = 200
    res = steer.smc(model, cond=torch.full((n,), label), method="fk_steering", reward=rewards.linear(b),
                    lmbda=lmbda, particles=16, steps=25, seed=1, potential=potential, output="weighted")
    pick = torch.multinomial(res.log_weights.exp(), 1, generator=gen)[:, 0]
    x = res.particles[torch.arange(n), pick].double()
    null = sorted(energy_distance(target.sample(n, generator=gen), ref) for _ in range(30))
    q99 = null[-1]
    base = toy.sample(n, labels=label, generator=gen)
    ed, ed_base = energy_distance(x, ref), energy_distance(base, ref)
    assert ed < q99, (ed, q99)
    assert ed_base > 5 * q99, (ed_base, q99)


# ---------------------------------------------------------------------------------------------------
# FK correctors


def test_fkc_weight_matches_the_reference_increment():
    """martaskrt/fkc-diffusion edm_sampler_new: d_a = −w(w−1)‖s_u − s_c‖² dt t (EDM, σ = t), re-implemented;
    ours is B (1 − e^{−h}) from ε̂ on any path."""
    g = torch.Generator().manual_seed(0)
    w, t, t_next = 3.0, 2.5, 1.9
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64) * t
    d_u, d_c = torch.randn(2, 5, 3, 4, 4, generator=g, dtype=torch.float64)
    s_u, s_c = (d_u - x) / t**2, (d_c - x) / t**2
    ref = -w * (w - 1) * (s_u - s_c).pow(2).sum((-1, -2, -3)) * (t_next - t) * t
    eps = {"cond": (x - d_c) / t, "uncond": (x - d_u) / t}
    ours = P.fkc_increment(eps, {"cond": w, "uncond": 1 - w}, -math.log(t), -math.log(t_next))
    torch.testing.assert_close(ours, ref)


def _gaussian_pair():
    """cond N(1, 0.5²), uncond N(0, 1) (reference notes D5): the CFG-tilted target for w = 3 is N(1.2, 0.316²)."""
    model = G.conditional_pair(G.GaussianMixture([[1.0]], stds=[0.5]), G.GaussianMixture([[0.0]], stds=[1.0]))
    return model, model.path


def test_fkc_corrects_cfg_to_the_tilted_target():
    """FKC with w = 3 on the exact Gaussian pair: energy distance to exact N(1.2, 0.316²) samples within the 99th
    percentile of exact-vs-exact distances (300 conditions × 24 particles, 60 Karras steps of dpmpp_2m_sde); plain
    CFG with the same SDE solver is ≥ 5× further."""
    model, path = _gaussian_pair()
    sb = (80 ** (1 / 7) + torch.arange(60, dtype=torch.float64) / 59 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    ts = torch.cat([path.t_from_sigma_bar(sb), torch.zeros(1, dtype=torch.float64)])  # Karras σ̄ grid
    n, gen = 300, torch.Generator().manual_seed(5)
    mu, sd = 1.2, math.sqrt(1 / (1 / 0.25 * 3 - 2))  # precisions: 3·4 − 2·1 = 10
    ref = mu + sd * torch.randn(3000, 1, generator=gen, dtype=torch.float64)
    res = steer.smc(model, cond=torch.ones(n, dtype=torch.long), guidance="cfg(scale=3)", method="fkc", particles=24,
                    timesteps=ts, seed=0, output="weighted", dtype=torch.float64)
    pick = torch.multinomial(res.log_weights.exp(), 1, generator=gen)[:, 0]
    x = res.particles[torch.arange(n), pick]
    cfg = steer.sample(model, cond=torch.ones(n, dtype=torch.long), guidance="cfg(scale=3)", solver="dpmpp_2m_sde",
                       timesteps=ts, seed=list(range(n)), dtype=torch.float64)
    null = sorted(energy_distance(mu + sd * torch.randn(n, 1, generator=gen, dtype=torch.float64), ref)
                  for _ in range(30))
    ed, ed_cfg = energy_distance(x, ref), energy_distance(cfg, ref)
    assert ed < null[-1], (ed, null[-1])
    assert ed_cfg > 5 * max(ed, null[-1]), (ed_cfg, ed, null[-1])


def test_fkc_corrects_cfg_on_a_2d_class_conditional_mixture():
    """FKC with w = 1.5 on ``gmm.toy()`` (3 classes × 2 anisotropic components), class 0: the weighted mean and std
    of each coordinate, per condition, averaged over 32 conditions × 256 particles (100 Karras steps, ESS < K/2) lie
    within 4 standard errors of the exact tilted target's (rejection sampling, 100,000 draws); CFG's SDE alone does
    not. Measured: first coordinate 0.867 ± 0.012 (exact 0.864, CFG's SDE 1.00), std 0.696 ± 0.011 (0.716)."""
    mix = G.toy()
    model = mix.denoiser("flow", "x0")
    ref = G.cfg_tilted_sample(mix, 0, 1.5, 100_000, generator=torch.Generator().manual_seed(1))
    sb = (80 ** (1 / 7) + torch.arange(100, dtype=torch.float64) / 99 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    ts = torch.cat([model.path.t_from_sigma_bar(sb), torch.zeros(1, dtype=torch.float64)])
    n = 32
    run = lambda schedule: steer.smc(model, cond=torch.zeros(n, dtype=torch.long), guidance="cfg(scale=1.5)",  # noqa
                                     method="fkc", particles=256, timesteps=ts, seed=list(range(n)),
                                     output="weighted", dtype=torch.float64, schedule=schedule)

    def stats(res, weighted):
        w = res.log_weights.exp() if weighted else torch.full(res.log_weights.shape, 1 / 256, dtype=torch.float64)
        m = (w[..., None] * res.particles).sum(1)
        return m, (w[..., None] * (res.particles - m[:, None]) ** 2).sum(1).sqrt()

    m, s = stats(run(0.5), True)
    se = lambda v: v.std(0) / math.sqrt(n)  # noqa: E731
    assert torch.all((m.mean(0) - ref.mean(0)).abs() < 4 * se(m)), (m.mean(0), ref.mean(0), se(m))
    assert torch.all((s.mean(0) - ref.std(0)).abs() < 4 * se(s)), (s.mean(0), ref.std(0), se(s))
    m_cfg, _ = stats(run([]), False)
    assert (m_cfg.mean(0)[0] - ref.mean(0)[0]).abs() > 4 * se(m)[0], (m_cfg.mean(0), ref.mean(0))


def test_fkc_weights_in_half_precision():
    """The weights use ε̂_c − ε̂_u, small against ε̂; taken in float32 from the model's own (flow) output, FKC with
    w = 3 in bfloat16 and float16 lands where float32 does (64 conditions × 64 particles, 30 Karras steps: weighted
    std 0.3137 and 0.3106 against 0.3102; from the state-dtype ε̂ of the rounded x̂0, as before, bfloat16 gave
    0.2768)."""
    model = G.conditional_pair(G.GaussianMixture([[1.0]], stds=[0.5]), G.GaussianMixture([[0.0]], stds=[1.0]),
                               prediction="flow")
    ts = steer.paths.karras(model.path, 30, sigma_max=80)

    def stats(dtype):
        res = steer.smc(model, cond=torch.ones(64, dtype=torch.long), method="fkc", guidance="cfg(scale=3)",
                        particles=64, timesteps=ts, seed=0, dtype=dtype, output="weighted")
        assert res.samples.dtype == dtype and torch.isfinite(res.samples).all()
        w, x = res.log_weights.exp(), res.particles[..., 0].double()
        m = (w * x).sum(1)
        return m.mean(), (w * (x - m[:, None]) ** 2).sum(1).sqrt().mean()

    ref = stats(torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        got = stats(dtype)
        assert abs(got[0] - ref[0]) < 0.02 and abs(got[1] - ref[1]) < 0.015, (dtype, got, ref)


def test_fkc_refuses_what_it_cannot_correct(toy):
    model = toy.denoiser("flow", "flow")
    with pytest.raises(ValueError, match="reverse SDE"):
        steer.smc(model, cond=torch.tensor([0]), method="fkc", solver="dpmpp_2m", steps=4)
    with pytest.raises(ValueError, match="reverse SDE"):
        steer.smc(model, cond=torch.tensor([0]), method="fkc", solver="ddim(eta=0.5)", steps=4)
    with pytest.raises(ValueError, match="plain"):
        steer.smc(model, cond=torch.tensor([0]), method="fkc", guidance="apg(scale=3)", steps=4)
    with pytest.raises(ValueError, match="sum to a positive"):
        steer.smc(model, cond=torch.tensor([0]), method="fkc", experts={"cond": 0.5, "uncond": -0.5}, steps=4)
    with pytest.raises(ValueError, match="starts below pure noise"):  # the flow grid's default starts at α = 0
        steer.smc(model, cond=torch.tensor([0]), method="fkc", experts={"cond": 1.0}, beta=2.0, steps=4)


def test_fkc_experts_give_the_tweedie_x0_of_the_combined_score():
    """For any exponents, x̂0 of ``Σ β_i s_i`` is ``(x + σ² Σ β_i s_i)/α`` (Tweedie, s_i = (α x̂0_i − x)/σ²),
    computed here from the scores; Σ β_i x̂0_i alone is that only when Σβ = 1."""
    g = torch.Generator().manual_seed(1)
    x, x0c, x0n = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    point = steer.core.points(steer.get_path("vp-cosine"), [0.6])[0]
    a, s = point.alpha, point.sigma
    for betas in ({"cond": 2.0}, {"cond": 1.0, "negative": 1.0}, {"cond": 3.0, "negative": -2.0}):
        preds = {"cond": x0c, "negative": x0n}
        score = sum(b * (a * preds[k] - x) / s**2 for k, b in betas.items())
        ctx = steer.core.Ctx(x, point, 0, steer.get_path("vp-cosine"))
        torch.testing.assert_close(P._Experts(betas).combine(preds, ctx), (x + s**2 * score) / a)


@pytest.mark.parametrize("case", ["tempered", "product"])
def test_fkc_samples_tempered_and_product_targets(case):
    """Exponents not summing to 1, on the exact Gaussian pair: p(x|c)^2 = N(1, 0.354²) (tempering, β = 2) and
    p(x|c)·p(x) = N(0.8, 0.447²) (product of experts, precisions 4 + 1). 32 conditions × 256 particles, 60 Karras
    steps, resampling at ESS < K/2: the weighted mean and standard deviation of each condition's population, averaged
    over the conditions, lie within 4 standard errors (their spread over the conditions / √32) of the exact values;
    the SDE with the combined score alone (never resampled, weights ignored) fails the same test on the standard
    deviation."""
    model, path = _gaussian_pair()
    sb = (80 ** (1 / 7) + torch.arange(60, dtype=torch.float64) / 59 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    ts = torch.cat([path.t_from_sigma_bar(sb), torch.zeros(1, dtype=torch.float64)])
    n = 32
    if case == "tempered":
        opts, mu, sd = {"experts": {"cond": 1.0}, "beta": 2.0}, 1.0, math.sqrt(0.5**2 / 2)
    else:
        opts, mu, sd = ({"experts": {"cond": 1.0, "negative": 1.0}, "negative": torch.zeros(n, dtype=torch.long)},
                        0.8, math.sqrt(1 / 5))
    run = lambda schedule: steer.smc(model, cond=torch.ones(n, dtype=torch.long), method="fkc", particles=256,  # noqa
                                     timesteps=ts, seed=list(range(n)), output="weighted", dtype=torch.float64,
                                     schedule=schedule, **opts)
    res = run(0.5)
    w, x = res.log_weights.exp(), res.particles[..., 0]
    m = (w * x).sum(1)
    s = (w * (x - m[:, None]) ** 2).sum(1).sqrt()
    for est, exact in ((m, mu), (s, sd)):
        assert abs(est.mean() - exact) < 4 * est.std() / math.sqrt(n), (case, est.mean().item(), exact)
    plain = run([]).particles[..., 0].std(1)
    assert abs(plain.mean() - sd) > 4 * s.std() / math.sqrt(n), (case, plain.mean().item(), sd)


# ---------------------------------------------------------------------------------------------------
# Layout, randomness


@pytest.mark.parametrize("method,opts", [("fkc", {"guidance": "cfg(scale=2)"}),
                                         ("fk_steering", {"reward": rewards.linear([1.0, 0.0]), "lmbda": 2.0})])
def test_results_do_not_depend_on_the_order_and_batching_of_conditions(toy, method, opts):
    model = toy.denoiser("flow", "flow")
    run = lambda c, s: steer.smc(model, cond=torch.tensor(c), method=method, particles=4, steps=8, seed=s,  # noqa
                                 solver="ddim(eta=1)", output="weighted", schedule=0.9, **opts) \
        if method == "fkc" else steer.smc(model, cond=torch.tensor(c), method=method, particles=4, steps=8, seed=s,
                                          ess_threshold=0.9, output="weighted", **opts)
    a, b, c = run([0, 1, 2], [5, 6, 7]), run([2, 0], [7, 5]), run([1], [6])
    pairs = ((b.particles[0], a.particles[2]), (b.particles[1], a.particles[0]), (c.particles[0], a.particles[1]))
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.log_weights[0], a.log_weights[2], rtol=1e-5, atol=1e-5)
    assert a.diagnostics["resampled"].any()


def test_duplicated_particles_receive_independent_noise(toy):
    model = toy.denoiser("flow", "flow")
    s = P._setup(model, torch.tensor([0, 1]), None, None, [3, 4], None, None, None, None)
    it = P._sampler(model, s, 4, None, "ddim(eta=1)", 6, None)
    for step in it:
        if step.i == 1:
            it.resample(torch.tensor([2, 2, 2, 2, 5, 5, 5, 5]))
    x = it.x
    assert torch.equal(it.ev.conds["cond"], torch.tensor([0] * 4 + [1] * 4))
    d = torch.cdist(x, x) + torch.eye(8) * 1e9
    assert d.min() > 1e-3  # all eight rows differ after the copies continued


# ---------------------------------------------------------------------------------------------------
# SVDD and search


def test_svdd_selection_hands_the_best_candidate_to_every_row():
    """SVDD's selection (α = 0): of each particle's M candidate rows, the one with the highest value gives its
    (x̂0, ε̂) to all M rows; with α > 0 the choice follows softmax(v/α) (checked on its frequencies)."""
    path = steer.get_path("flow")
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    x0 = torch.tensor([[0.0, 0], [2, 0], [1, 0], [-1, 0], [5, 0], [3, 0]])  # 2 particles × M = 3 candidates
    ctx = steer.guidance.Ctx.at(x, path, 0.5)
    sel = P._Select(None, rewards.linear([1.0, 0.0]), 3, 0.0, [torch.Generator()], 2)
    d = sel.combine({"cond": x0}, ctx)
    assert d.x0[:, 0].tolist() == [2.0] * 3 + [5.0] * 3
    torch.testing.assert_close(d.eps, ctx.point.eps(x, x0)[[1, 1, 1, 4, 4, 4]])
    soft = P._Select(None, rewards.linear([1.0, 0.0]), 3, 1.0, [torch.Generator().manual_seed(1)], 2)
    picks = torch.stack([soft.combine({"cond": x0}, ctx).x0[0, 0] for _ in range(2000)])
    freq = torch.stack([(picks == v).double().mean() for v in (0.0, 2.0, 1.0)])
    want = torch.softmax(torch.tensor([0.0, 2.0, 1.0], dtype=torch.float64), 0)
    assert torch.all((freq - want).abs() < 5 * (want * (1 - want) / 2000).sqrt())


def test_svdd_counts_m_evaluations_per_step(toy):
    model, b = toy.denoiser("flow", "flow"), torch.tensor([1.0, 1.0])
    res = steer.smc(model, cond=torch.tensor([0, 2]), method="svdd", reward=rewards.linear(b), candidates=6,
                    steps=10, seed=0)
    assert res.nfe == 10 * 6 * 2  # M NFE per step per chain, no re-evaluation of the chosen candidate
    assert res.samples.shape == (2, 2) and res.rewards.shape == (2, 1)
    torch.testing.assert_close(res.rewards[:, 0], res.samples @ b)


def test_best_of_n_returns_the_best_of_the_deterministic_samples(toy):
    model, b = toy.denoiser("flow", "flow"), torch.tensor([0.3, -1.0])
    res = steer.smc(model, cond=torch.tensor([0, 1]), method="best_of_n", reward=rewards.linear(b), particles=5,
                    solver="euler", steps=8, seed=[1, 2])
    assert res.nfe == 2 * 5 * 8
    torch.testing.assert_close(res.rewards, (res.particles @ b))
    torch.testing.assert_close(res.samples, res.particles[torch.arange(2), res.rewards.argmax(1)])
    assert (res.log_weights == 0).sum() == 2


def test_zero_order_search_neighbours_and_monotone_progress(toy):
    n = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    nb = P._neighbours(n, 5, 0.95, torch.Generator().manual_seed(1))
    flat, nbf = n.reshape(-1).double(), nb.reshape(5, -1).double()
    torch.testing.assert_close(nbf.norm(dim=1), flat.norm().expand(5), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(nbf @ flat / flat.norm() ** 2, torch.full((5,), 0.95, dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)
    model, b = toy.denoiser("flow", "flow"), torch.tensor([1.0, 0.0])
    res = steer.smc(model, cond=torch.tensor([0, 1]), method="noise_search", kind="zero_order", budget=12,
                    neighbors=3, reward=rewards.linear(b), solver="euler", steps=6, seed=0)
    hist = res.diagnostics["best_reward"]
    assert hist.shape == (4, 2) and torch.all(hist[1:] >= hist[:-1])
    torch.testing.assert_close(res.rewards[:, 0].double(), (res.samples @ b).double())
    assert res.nfe == 2 * 12 * 6


def test_bad_options_are_explained(toy):
    model = toy.denoiser("flow", "flow")
    with pytest.raises(ValueError, match="stochastic"):
        steer.smc(model, cond=torch.tensor([0]), method="fk_steering", reward=rewards.linear([1, 0]), solver="euler")
    with pytest.raises(ValueError, match="ancestral"):
        steer.smc(model, cond=torch.tensor([0]), method="svdd", reward=rewards.linear([1, 0]), solver="dpmpp_2m_sde")
    with pytest.raises(ValueError, match="unknown particle method"):
        steer.smc(model, method="nope")
    with pytest.raises(ValueError, match="one per row"):
        steer.smc(model, cond=torch.tensor([0]), method="best_of_n", reward=lambda x: x.sum(), steps=2)
