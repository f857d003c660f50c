"""steer.metrics against answers known independently of the implementation: closed forms,
hand-computed small cases, exact invariances, and sampling tolerances derived from the sample size."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch

import steer.metrics as M


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64)


def test_public_api():
    for name in ("energy_distance", "energy_test", "sliced_wasserstein", "mmd", "frechet_distance",
                 "frechet_distance_from_stats", "fd", "load_feature_network", "precision_recall",
                 "density_coverage", "accuracy", "saturation"):
        assert name in M.__all__ and callable(getattr(M, name)), name
        assert getattr(M, name).__doc__, name


# ---------------------------------------------------------------- energy distance (kept as it was)

def test_energy_distance_by_hand():
    # x = {0, 1}, y = {2, 4}: E|X−Y| = (2 + 4 + 1 + 3)/4 = 2.5; U-statistics E|X−X'| = 1, E|Y−Y'| = 2.
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[2.0], [4.0]])
    assert M.energy_distance(x, y) == pytest.approx(2 * 2.5 - 1 - 2, abs=1e-12)


# ---------------------------------------------------------------- Fréchet distance

def test_frechet_from_stats_diagonal_closed_form():
    # Diagonal covariances commute: Tr(Σa + Σb − 2(ΣaΣb)^½) = Σ_i (σa_i − σb_i)².
    g = np.random.default_rng(0)
    mu_a, mu_b = g.normal(size=6), g.normal(size=6)
    sa, sb = g.uniform(0.2, 3.0, size=6), g.uniform(0.2, 3.0, size=6)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((sa - sb) ** 2)
    for method in ("eigh", "sqrtm"):
        got = M.frechet_distance_from_stats(mu_a, np.diag(sa**2), mu_b, np.diag(sb**2), method=method)
        assert got == pytest.approx(expected, rel=1e-10)
    # torch inputs are accepted too
    got = M.frechet_distance_from_stats(torch.tensor(mu_a), torch.diag(torch.tensor(sa**2)),
                                        torch.tensor(mu_b), torch.diag(torch.tensor(sb**2)))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_from_stats_2x2_non_commuting_closed_form():
    # For 2×2 PSD A, B the eigenvalues λ1, λ2 of AB are real and ≥ 0, so
    # Tr (AB)^½ = √λ1 + √λ2 = sqrt(λ1 + λ2 + 2√(λ1λ2)) = sqrt(Tr AB + 2 sqrt(det A det B)).
    A = np.array([[2.0, 0.9], [0.9, 1.0]])
    B = np.array([[0.5, -0.3], [-0.3, 1.5]])
    assert abs(A @ B - B @ A).max() > 0.1  # genuinely non-commuting
    mu_a, mu_b = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    tr_sqrt = math.sqrt(np.trace(A @ B) + 2 * math.sqrt(np.linalg.det(A) * np.linalg.det(B)))
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(A) + np.trace(B) - 2 * tr_sqrt
    for method in ("eigh", "sqrtm"):
        assert M.frechet_distance_from_stats(mu_a, A, mu_b, B, method=method) == pytest.approx(expected, rel=1e-10)


def test_frechet_identical_sets_and_singular_covariances():
    x = randn(300, 8, seed=1)
    for method in ("eigh", "sqrtm"):
        assert M.frechet_distance(x, x, method=method) == pytest.approx(0.0, abs=1e-9)
    # Fewer samples than dimensions: both covariances are singular (rank 9 in 50 dims).
    a, b = randn(10, 50, seed=2), randn(10, 50, seed=3)
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    fe, fs = M.frechet_distance(a, b), M.frechet_distance(a, b, method="sqrtm")
    assert math.isfinite(fs) and fe == pytest.approx(fs, rel=1e-5)
    # symmetric, and invariant to a common translation (exact identities of the formula)
    assert M.frechet_distance(b, a) == pytest.approx(fe, rel=1e-9)
    assert M.frechet_distance(a + 3.0, b + 3.0) == pytest.approx(fe, rel=1e-9)


def test_frechet_sampled_matches_closed_form():
    # N(μa, diag σa²) vs N(μb, diag σb²): FD = ‖μa−μb‖² + Σ (σa_i − σb_i)². Delta method for the plug-in
    # estimate with n samples each: δFD ≈ 2Δμ·(ε_a − ε_b) + 2Σ Δσ_i (δσa_i − δσb_i), ε ~ N(0, σ²/n),
    # δσ ~ N(0, σ²/(2n)), so sd = 2 sqrt(Σ Δμ_i²(σa_i²+σb_i²)/n + Σ Δσ_i²(σa_i²+σb_i²)/(2n)); the mean term is
    # biased up by (Tr Σa + Tr Σb)/n. Tolerance: 5 sd + that bias (covariance terms add O(d·Tr/n)).
    n = 20000
    mu_a = torch.tensor([0.0, 1.0, -1.0, 0.5], dtype=torch.float64)
    mu_b = torch.tensor([0.3, 0.5, -1.0, 0.0], dtype=torch.float64)
    sa = torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64)
    sb = torch.tensor([1.5, 1.0, 0.5, 0.8], dtype=torch.float64)
    a = mu_a + sa * randn(n, 4, seed=4)
    b = mu_b + sb * randn(n, 4, seed=5)
    expected = float(((mu_a - mu_b) ** 2).sum() + ((sa - sb) ** 2).sum())
    v = sa**2 + sb**2
    sd = 2 * math.sqrt(float(((mu_a - mu_b) ** 2 * v).sum()) / n + float(((sa - sb) ** 2 * v).sum()) / (2 * n))
    bias = 4 * float(v.sum()) / n
    assert M.frechet_distance(a, b) == pytest.approx(expected, abs=5 * sd + bias)


# ---------------------------------------------------------------- feature networks and fd

def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3), torch.nn.Tanh())


def test_fd_in_feature_space_equals_fd_of_features():
    net = _net()
    x, y = randn(50, 1, 4, 4, seed=6), 0.5 + randn(40, 1, 4, 4, seed=7)
    with torch.no_grad():
        expected = M.frechet_distance(net(x.float()), net(y.float()))
    seen = []

    def features(batch):
        seen.append((len(batch), batch.dtype, torch.is_grad_enabled(), net.training))
        return net(batch.float())  # a plain callable gets the samples as they are

    assert M.fd(x, y, features, batch_size=7) == pytest.approx(expected, rel=1e-5)
    assert max(s[0] for s in seen) == 7 and not any(s[2] for s in seen)  # batched, no autograd
    # an nn.Module gets eval mode during the call, and its mode back afterwards; inputs cast to its dtype
    net.train()
    net.register_forward_hook(lambda m, i, o: seen.append(("hook", i[0].dtype, m.training)))
    assert M.fd(x, y, net, batch_size=16) == pytest.approx(expected, rel=1e-5)
    assert net.training and ("hook", torch.float32, False) in seen
    # features=None: raw flattened samples
    assert M.fd(x, y) == pytest.approx(M.frechet_distance(x.reshape(50, -1), y.reshape(40, -1)), rel=1e-12)


def test_load_feature_network_round_trips(tmp_path):
    net = _net()
    x = torch.randn(5, 1, 4, 4, generator=gen(8))
    ts, pk = tmp_path / "feat_ts.pt", tmp_path / "feat_pickled.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in recent torch
        torch.jit.save(torch.jit.script(net), str(ts))
    torch.save(net, pk)
    for path in (ts, str(pk)):
        loaded = M.load_feature_network(path)
        assert isinstance(loaded, torch.nn.Module) and not loaded.training
        torch.testing.assert_close(loaded(x), net(x))
        assert M.fd(x, x + 1, loaded) == pytest.approx(M.fd(x, x + 1, net), rel=1e-6)


def test_load_feature_network_errors(tmp_path):
    missing = tmp_path / "no_such_net.pt"
    with pytest.raises(FileNotFoundError, match="no_such_net.pt"):
        M.load_feature_network(missing)
    sd = tmp_path / "weights_only.pt"
    torch.save(_net().state_dict(), sd)
    with pytest.raises(TypeError, match="weights_only.pt.*state_dict"):
        M.load_feature_network(sd)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a model")
    with pytest.raises(ValueError, match="junk.pt"):
        M.load_feature_network(junk)


# ---------------------------------------------------------------- precision / recall, density / coverage

def test_manifold_metrics_identical_sets():
    x = randn(200, 5, seed=9)
    assert M.precision_recall(x, x.clone()) == {"precision": 1.0, "recall": 1.0}
    assert M.density_coverage(x, x.clone())["coverage"] == 1.0


def test_manifold_metrics_disjoint_supports():
    # Each set lies in a unit cube, so every k-NN radius is below its diameter √3; the cubes are ~100 apart.
    real = torch.rand(200, 3, generator=gen(10), dtype=torch.float64)
    fake = 100.0 + torch.rand(150, 3, generator=gen(11), dtype=torch.float64)
    assert M.precision_recall(real, fake, k=3) == {"precision": 0.0, "recall": 0.0}
    assert M.density_coverage(real, fake, k=5) == {"density": 0.0, "coverage": 0.0}


def test_manifold_metrics_by_hand():
    # 1-D, k = 1. Real {0, 1, 2, 3, −10}: radii 1, 1, 1, 1, 10.
    # Fake {0.5, 2.9, −1, 1.5, 6} (sorted −1, .5, 1.5, 2.9, 6): radii −1→1.5, .5→1, 1.5→1, 2.9→1.4, 6→3.1.
    # precision: 6 is 3 from the nearest real centre (radius 1) and outside −10's ball [−20, 0] → 4/5
    #            (−1 lies on the closed ball of 0 and inside −10's ball).
    # recall:    −10 is 9 from the nearest fake (radius 1.5) → 4/5.
    # density:   balls containing 0.5: {0, 1}; 2.9: {2, 3}; −1: {0, −10}; 1.5: {1, 2}; 6: none → 8/(1·5).
    # coverage:  every real point has a fake within its radius (−10: −1 at 9 ≤ 10) → 1.
    real = torch.tensor([0.0, 1.0, 2.0, 3.0, -10.0])[:, None]
    fake = torch.tensor([0.5, 2.9, -1.0, 1.5, 6.0])[:, None]
    for chunk in (None, 2):
        pr = M.precision_recall(real, fake, k=1, chunk_size=chunk)
        assert pr == pytest.approx({"precision": 0.8, "recall": 0.8})
        dc = M.density_coverage(real, fake, k=1, chunk_size=chunk)
        assert dc == pytest.approx({"density": 1.6, "coverage": 1.0})


def test_manifold_metrics_chunking_invariant():
    real, fake = randn(300, 4, seed=12), 0.3 + randn(250, 2, 2, seed=13)
    assert M.precision_recall(real, fake, chunk_size=7) == M.precision_recall(real, fake)
    assert M.density_coverage(real, fake, chunk_size=7) == pytest.approx(M.density_coverage(real, fake))
    with pytest.raises(ValueError, match="k"):
        M.precision_recall(real[:3], fake, k=3)


# ---------------------------------------------------------------- sliced Wasserstein

def test_sliced_wasserstein_identical_and_shift_in_1d():
    x = randn(500, 1, seed=14)
    assert M.sliced_wasserstein(x, x.clone()) == 0.0
    # In 1-D every direction is ±1, so SW_p = W_p exactly; a rigid shift by m has W_p = |m| for every p.
    for p in (1, 2, 3):
        assert M.sliced_wasserstein(x, x - 0.7, p=p, projections=3) == pytest.approx(0.7, rel=1e-12)


def test_sliced_wasserstein_1d_gaussians():
    # W2(N(0,1), N(m,1)) = |m|. With n samples each, SW = W2 of the empirical sets, whose leading
    # fluctuation is the difference of sample means (sd sqrt(2/n)); the centred part adds O(log log n / n).
    n, m = 4000, 1.5
    x, y = randn(n, 1, seed=15), m + randn(n, 1, seed=16)
    assert M.sliced_wasserstein(x, y, projections=4) == pytest.approx(m, abs=5 * math.sqrt(2 / n) + 0.01)


def test_sliced_wasserstein_shift_in_d_dims():
    # y = x + m: every projection is shifted by ⟨m, θ⟩ exactly, so SW_2² = mean_θ ⟨m, θ⟩². Over θ uniform
    # on S^{d−1}, ⟨m, θ⟩²/‖m‖² ~ Beta(1/2, (d−1)/2): mean 1/d, variance 2(d−1)/(d²(d+2)).
    d, P = 4, 4096
    m = torch.tensor([1.0, -2.0, 0.5, 1.0], dtype=torch.float64)
    x = randn(300, d, seed=17)
    sw2 = M.sliced_wasserstein(x, x + m, projections=P, seed=3) ** 2
    msq = float(m @ m)
    sd = msq * math.sqrt(2 * (d - 1) / (d * d * (d + 2)) / P)
    assert sw2 == pytest.approx(msq / d, abs=5 * sd)
    same = [M.sliced_wasserstein(x, x + m, projections=64, seed=5) for _ in range(2)]
    assert same[0] == same[1]  # reproducible for a given seed


def test_sliced_wasserstein_unequal_sizes_exact():
    x = randn(60, 1, seed=18)
    # the same empirical distribution with every point twice
    assert M.sliced_wasserstein(x, x.repeat(2, 1)) == pytest.approx(0.0, abs=1e-12)
    y = 0.4 + 2 * randn(45, 1, seed=19)
    # p = 1 against SciPy's exact 1-D W1 between empirical distributions
    assert M.sliced_wasserstein(x, y, p=1, projections=2) == pytest.approx(
        scipy.stats.wasserstein_distance(x[:, 0].numpy(), y[:, 0].numpy()), rel=1e-10)
    # p = 2 against equal-size replication (60·3 = 45·4 = 180 points each: same empirical laws)
    xs, ys = x.repeat(3, 1)[:, 0].sort().values, y.repeat(4, 1)[:, 0].sort().values
    w2 = math.sqrt(float(((xs - ys) ** 2).mean()))
    assert M.sliced_wasserstein(x, y, p=2, projections=2) == pytest.approx(w2, rel=1e-10)
    # and in several dimensions the unequal-size path agrees with replication for the same directions
    a, b = randn(20, 3, seed=20), randn(30, 3, seed=21) + 1
    assert M.sliced_wasserstein(a, b, projections=16) == pytest.approx(
        M.sliced_wasserstein(a.repeat(3, 1), b.repeat(2, 1), projections=16), rel=1e-10)


# ---------------------------------------------------------------- MMD

def test_mmd_by_hand_and_median_heuristic():
    # x = {0, 1}, y = {0, 2}, σ = 1: k(a, b) = exp(−(a−b)²/2).
    # U_xx = e^{−1/2}, U_yy = e^{−2}, mean k(x, y) = (1 + e^{−2} + 2e^{−1/2})/4 → MMD²_u = (e^{−2} − 1)/2.
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [2.0]])
    expected = (math.exp(-2) - 1) / 2
    assert M.mmd(x, y, bandwidth=1.0) == pytest.approx(expected, rel=1e-12)
    # pooled {0, 1, 0, 2}: pairwise distances 1, 0, 2, 1, 1, 2 → median 1
    assert M.mmd(x, y) == pytest.approx(expected, rel=1e-12)


def test_mmd_identical_and_equal_distributions():
    x = randn(400, 3, seed=22)
    # y = x exactly: MMD²_u = −2(1 − mean_{i≠j} k(x_i, x_j))/N ∈ [−2/N, 0]
    v = M.mmd(x, x.clone())
    assert -2 / len(x) <= v <= 0
    # Independent samples of one law: MMD²_u is a two-sample U-statistic with kernel h ∈ [−2, 2] and mean 0,
    # so Hoeffding's bound gives P(MMD²_u ≥ t) ≤ exp(−2⌊n/2⌋ t² / 16); at level 1e-6:
    n = 400
    bound = 4 * math.sqrt(math.log(1e6) / (2 * (n // 2)))
    assert abs(M.mmd(randn(n, 3, seed=23), randn(n, 3, seed=24))) < bound
    assert M.mmd(randn(n, 3, seed=23), 3.0 + randn(n, 3, seed=24)) > bound  # clearly different laws


def test_mmd_gaussians_closed_form():
    # X ~ N(0, s²I_d), Y ~ N(μ, s²I_d), k = exp(−‖a−b‖²/(2σ²)). For Z ~ N(c, τ²I_d):
    # E exp(−‖Z‖²/(2σ²)) = (σ²/(σ²+τ²))^{d/2} exp(−‖c‖²/(2(σ²+τ²))); differences X−X', Y−Y', X−Y have τ² = 2s²,
    # so MMD² = 2r − 2r exp(−‖μ‖²/(2(σ²+2s²))), r = (σ²/(σ²+2s²))^{d/2}.
    n, d, s, sig = 1000, 2, 1.0, 1.0
    mu = torch.tensor([1.0, 0.0], dtype=torch.float64)
    r = (sig**2 / (sig**2 + 2 * s**2)) ** (d / 2)
    expected = 2 * r * (1 - math.exp(-float(mu @ mu) / (2 * (sig**2 + 2 * s**2))))
    x, y = s * randn(n, d, seed=25), mu + s * randn(n, d, seed=26)
    got = M.mmd(x, y, bandwidth=sig, chunk_size=128)
    # first-order (Hoeffding projection) sd of MMD²_u, estimated from the kernel matrices:
    # sd = 2 sqrt(Var h_x / n + Var h_y / n), h_x(x_i) = mean_{j≠i} k(x_i, x_j) − mean_j k(x_i, y_j).
    k = lambda a, b: torch.exp(-torch.cdist(a, b) ** 2 / (2 * sig**2))
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    hx = (kxx.sum(1) - 1) / (n - 1) - kxy.mean(1)
    hy = (kyy.sum(1) - 1) / (n - 1) - kxy.mean(0)
    assert got == pytest.approx(float(hx.mean() + hy.mean()), rel=1e-10)  # the same estimator
    sd = 2 * math.sqrt(float(hx.var()) / n + float(hy.var()) / n)
    assert got == pytest.approx(expected, abs=5 * sd)


# ---------------------------------------------------------------- saturation, accuracy

def test_saturation_by_hand():
    x = torch.tensor([[[0.5, 2.0], [-3.0, 1.0]],
                      [[0.0, 0.0], [0.0, -1.5]]])
    # [-1, 1]: outside are 2, −3, −1.5 (1.0 is on the boundary) → 3/8; excess (1 + 2 + 0.5)/8.
    # sample 1: mean 0.125, population variance (0.375² + 1.875² + 3.125² + 0.875²)/4 = 3.546875;
    # sample 2: mean −0.375, variance (3·0.375² + 1.125²)/4 = 0.421875. max |x|: 3 and 1.5.
    out = M.saturation(x)
    assert out == pytest.approx({"frac_out": 3 / 8, "excess": 3.5 / 8,
                                 "contrast": (math.sqrt(3.546875) + math.sqrt(0.421875)) / 2, "max_abs": 2.25})
    # asymmetric range [0, 1]: outside 2 (by 1), −3 (by 3), −1.5 (by 1.5)
    out = M.saturation(x, lo=0.0, hi=1.0)
    assert out["frac_out"] == pytest.approx(3 / 8) and out["excess"] == pytest.approx(5.5 / 8)
    inside = M.saturation(torch.full((2, 3), 0.25))
    assert inside == {"frac_out": 0.0, "excess": 0.0, "contrast": 0.0, "max_abs": 0.25}


def test_accuracy_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.5], [0.0, 0.0, 5.0]])
    labels = torch.tensor([0, 1, 2, 2])  # argmax 0, 1, 0, 2 → 3 of 4
    assert M.accuracy(logits, labels) == 0.75
    assert M.accuracy(logits.softmax(1), labels) == 0.75
    assert M.accuracy(logits, torch.nn.functional.one_hot(labels, 3)) == 0.75
    with pytest.raises(ValueError):
        M.accuracy(logits, torch.tensor([0, 1, 2, 3]))
