"""Exact ground truth: class-conditional Gaussian mixtures in any dimension.

``p(x0) = Σ_k π_k N(μ_k, Σ_k)``, component k belonging to class ``labels[k]``. Under ``x_t = α x0 + σ ε`` the
marginal is ``Σ_k π_k N(α μ_k, C_k)`` with ``C_k = α² Σ_k + σ² I``, and everything below is closed form
(reference notes D4): the posterior responsibilities ``w_k(x)``, the denoiser
``E[x0|x] = Σ_k w_k (μ_k + α Σ_k C_k⁻¹ (x − α μ_k))``, the exact classifier ``p(c|x_t) = Σ_{k∈c} w_k``.
Class-conditional quantities restrict the mixture to the class's components; the null label
(``n_classes``) or ``cond=None`` gives the unconditional mixture. All math runs in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..models import denoiser, register_model
from ..paths import Path, get_path
from ..prediction import check_kind, convert

__all__ = ["GaussianMixture", "GMMDenoiser", "toy", "single_gaussian_ode", "conditional_pair", "linear_tilt",
           "cfg_tilted_sample", "linear_posterior"]


class GaussianMixture:
    def __init__(self, means, covs=None, stds=None, weights=None, labels=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must have shape [K, D], got {tuple(self.means.shape)}")
        K, D = self.means.shape
        self.K, self.dim = K, D
        if covs is not None:
            covs = torch.as_tensor(covs, dtype=torch.float64)
            if covs.shape != (K, D, D):
                raise ValueError(f"covs must have shape [K, D, D] = [{K}, {D}, {D}], got {tuple(covs.shape)}")
            d, U = torch.linalg.eigh(0.5 * (covs + covs.transpose(1, 2)))
            if (d <= 0).any():
                raise ValueError("covariances must be positive definite")
        else:
            stds = torch.ones(K, dtype=torch.float64) if stds is None else torch.as_tensor(stds, dtype=torch.float64)
            stds = stds.expand(K)
            if (stds <= 0).any():
                raise ValueError("stds must be > 0")
            d = (stds**2)[:, None].expand(K, D).clone()
            U = torch.eye(D, dtype=torch.float64).expand(K, D, D).clone()
        self.eigvals, self.eigvecs = d, U  # Σ_k = U diag(d) Uᵀ
        w = (torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None
             else torch.as_tensor(weights, dtype=torch.float64))
        if w.shape != (K,) or (w <= 0).any():
            raise ValueError("weights must be K positive numbers")
        self.log_weights = torch.log(w / w.sum())
        self.labels = torch.zeros(K, dtype=torch.long) if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self.n_classes = int(self.labels.max()) + 1
        self.null_label = self.n_classes

    @property
    def covs(self) -> torch.Tensor:
        return self.eigvecs @ torch.diag_embed(self.eigvals) @ self.eigvecs.transpose(1, 2)

    # -- core closed forms -------------------------------------------------------------------------

    def _mask(self, labels, batch: int) -> torch.Tensor:
        """Additive log-mask [B, K]: 0 for the components of each item's class, −inf otherwise."""
        if labels is None:
            return torch.zeros(batch, self.K, dtype=torch.float64)
        labels = torch.as_tensor(labels).reshape(-1).long().cpu()
        if labels.numel() == 1 and batch != 1:
            labels = labels.expand(batch)
        if ((labels < 0) | (labels > self.null_label)).any():
            raise ValueError(f"labels must be in 0..{self.n_classes - 1} or the null label {self.null_label}")
        keep = (labels[:, None] == self.labels[None]) | (labels[:, None] == self.null_label)
        return torch.where(keep, 0.0, -math.inf).double()

    def _terms(self, x, alpha, sigma, labels):
        """Per-component rotated residuals, variances and log responsibilities."""
        x = x.reshape(x.shape[0], -1).double().cpu()
        B = x.shape[0]
        a = torch.as_tensor(alpha, dtype=torch.float64).expand(B)[:, None, None]
        s = torch.as_tensor(sigma, dtype=torch.float64).expand(B)[:, None, None]
        diff = x[:, None, :] - a * self.means[None]
        y = torch.einsum("kij,bki->bkj", self.eigvecs, diff)
        c = a**2 * self.eigvals[None] + s**2
        log_n = -0.5 * (y**2 / c + torch.log(2 * math.pi * c)).sum(-1)
        logw = self.log_weights[None] + log_n + self._mask(labels, B)
        return y, c, a, logw

    def posterior_mean(self, x, alpha, sigma, labels=None) -> torch.Tensor:
        """``E[x0 | x_t = x, c]`` for ``x_t = α x0 + σ ε`` (α, σ scalars or per-item)."""
        y, c, a, logw = self._terms(x, alpha, sigma, labels)
        resp = torch.softmax(logw, dim=1)
        ek = self.means[None] + torch.einsum("kij,bkj->bki", self.eigvecs, a * self.eigvals[None] / c * y)
        return (resp[..., None] * ek).sum(1)

    def log_marginal(self, x, alpha, sigma, labels=None) -> torch.Tensor:
        """``log p_t(x | c)`` (or ``log p_t(x)`` for the null label / None)."""
        logw = self._terms(x, alpha, sigma, labels)[3]
        prior = torch.logsumexp(self.log_weights[None] + self._mask(labels, logw.shape[0]), dim=1)
        return torch.logsumexp(logw, dim=1) - prior

    def classifier_log_probs(self, x, t, path: "str | Path") -> torch.Tensor:
        """Exact ``log p(c | x_t)`` for every class, shape [B, n_classes]."""
        path = get_path(path)
        t = torch.as_tensor(t, dtype=torch.float64)
        logw = self._terms(x, path.alpha(t), path.sigma(t), None)[3]
        logw = logw - torch.logsumexp(logw, dim=1, keepdim=True)
        onehot = self.labels[None] == torch.arange(self.n_classes)[:, None]  # [C, K]
        return torch.logsumexp(torch.where(onehot[None], logw[:, None, :], -math.inf), dim=2)

    def sample(self, n: int, labels=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact samples of ``p(x0 | c)`` (float64, shape [n, D])."""
        logw = self.log_weights[None].expand(n, self.K) + self._mask(labels, n)
        k = torch.multinomial(torch.softmax(logw, 1), 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + torch.einsum("bij,bj->bi", self.eigvecs[k], self.eigvals[k].sqrt() * z)

    # -- models and reference solutions -----------------------------------------------------------

    def denoiser(self, path: "str | Path" = "flow", prediction: str = "eps", sample_shape=None) -> "GMMDenoiser":
        return GMMDenoiser(self, get_path(path), check_kind(prediction), sample_shape)

    def ode_solution(self, x, t_start: float, t_end: float, path: "str | Path", labels=None,
                     rtol: float = 1e-11, atol: float = 1e-11) -> torch.Tensor:
        """Reference probability-flow ODE solution from ``(x, t_start)`` to ``t_end`` (scipy DOP853).

        Integrated in the variance-normalised angle form ``y = x/sqrt(α²+σ²)``, ``θ = atan2(σ, α)``,
        ``dy/dθ = −sin θ · x̂0 + cos θ · ε̂``, which is smooth from pure noise (θ = π/2) onwards and the
        same ODE for every path with the same σ̄ (trajectories of different paths are rescalings).
        """
        from scipy.integrate import solve_ivp

        path = get_path(path)
        shape, dtype = x.shape, x.dtype
        B = shape[0]
        a0, s0 = float(path.alpha(t_start)), float(path.sigma(t_start))
        a1, s1 = float(path.alpha(t_end)), float(path.sigma(t_end))
        th0, th1 = math.atan2(s0, a0), math.atan2(s1, a1)
        to_data = s1 == 0  # integrate to σ̄ = 1e-7, then x(0) = x̂0 there (error O(σ̄²))
        if to_data:
            th1 = 1e-7
        y0 = (x.reshape(B, -1).double().cpu() / math.hypot(a0, s0)).numpy().ravel()

        def f(th, y):
            yt = torch.from_numpy(y).reshape(B, self.dim)
            c, s = math.cos(th), math.sin(th)
            x0 = self.posterior_mean(yt, c, s, labels)
            return (-s * x0 + c * (yt - c * x0) / s).numpy().ravel()

        sol = solve_ivp(f, (th0, th1), y0, method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        y1 = torch.from_numpy(sol.y[:, -1]).reshape(B, self.dim)
        if to_data:
            return (a1 * self.posterior_mean(y1, math.cos(th1), math.sin(th1), labels)).reshape(shape).to(dtype)
        y1 = y1 * math.hypot(a1, s1)
        return y1.reshape(shape).to(dtype)


class GMMDenoiser:
    """The exact denoiser of a GaussianMixture as a steer Denoiser (cond: class labels [B] or None)."""

    def __init__(self, gmm: GaussianMixture, path: Path, prediction: str, sample_shape=None):
        self.gmm, self.path, self.prediction = gmm, path, prediction
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else (gmm.dim,)
        if math.prod(self.sample_shape) != gmm.dim:
            raise ValueError(f"sample_shape {self.sample_shape} does not hold {gmm.dim} values")

    def null_cond(self, cond, batch: int) -> torch.Tensor:
        return torch.full((batch,), self.gmm.null_label, dtype=torch.long)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        t64 = torch.as_tensor(t, dtype=torch.float64).cpu().expand(x.shape[0])
        x64 = x.double().cpu()
        x0 = self.gmm.posterior_mean(x64, self.path.alpha(t64), self.path.sigma(t64), cond).reshape(x.shape)
        out = convert(x0, "x0", self.prediction, x64, t64, self.path)
        return out.to(dtype=x.dtype, device=x.device)

    def __repr__(self):
        return f"GMMDenoiser(path={self.path.name!r}, prediction={self.prediction!r}, dim={self.gmm.dim})"


def toy(dim: int = 2, n_classes: int = 3, per_class: int = 2, seed: int = 0, spread: float = 2.0) -> GaussianMixture:
    """A reproducible class-conditional mixture with full (anisotropic) covariances."""
    g = np.random.default_rng(seed)
    K = n_classes * per_class
    means = g.normal(size=(K, dim)) * spread
    A = g.normal(size=(K, dim, dim)) * 0.3
    covs = A @ A.transpose(0, 2, 1) + 0.05 * np.eye(dim)[None]
    weights = g.uniform(0.5, 1.5, size=K)
    labels = np.repeat(np.arange(n_classes), per_class)
    return GaussianMixture(means, covs=covs, weights=weights, labels=labels)


def single_gaussian_ode(x, t_start: float, t_end: float, path: "str | Path", mean=0.0, std: float = 1.0):
    """Closed-form PF-ODE solution for data ``N(mean, std² I)``:
    ``x_t = α_t μ + sqrt((α_t² s² + σ_t²)/(α_T² s² + σ_T²)) (x_T − α_T μ)``."""
    path = get_path(path)
    a0, s0 = float(path.alpha(t_start)), float(path.sigma(t_start))
    a1, s1 = float(path.alpha(t_end)), float(path.sigma(t_end))
    k = math.sqrt((a1**2 * std**2 + s1**2) / (a0**2 * std**2 + s0**2))
    mean = torch.as_tensor(mean, dtype=x.dtype)
    return a1 * mean + k * (x - a0 * mean)


register_model("gmm-flow", lambda: toy(dim=2).denoiser("flow", "flow"))  # named models for configs and specs
register_model("gmm-vp", lambda: toy(dim=2).denoiser("vp-linear", "eps"))


def conditional_pair(cond: GaussianMixture, uncond: GaussianMixture, path: "str | Path" = "flow",
                     prediction: str = "x0"):
    """The exact denoiser of two separate mixtures as one model: label 1 is ``cond``, any other label ``uncond``
    (``null_cond``: label 0), for conditional/unconditional pairs that are not one mixture and its classes, such as
    cond N(1, 0.5²) and uncond N(0, 1) (reference notes D5: CFG's tilted target for w = 3 is N(1.2, 0.316²)).
    Computed in float64 on the CPU, returned as ``prediction`` in the input's dtype and device."""
    path = get_path(path)
    check_kind(prediction)

    def fn(x, t, c):
        t64 = torch.as_tensor(t, dtype=torch.float64).cpu().expand(x.shape[0])
        x64, c = x.double().cpu(), torch.as_tensor(c).cpu()
        a, s = path.alpha(t64), path.sigma(t64)
        x0 = torch.where((c == 1)[:, None], cond.posterior_mean(x64, a, s), uncond.posterior_mean(x64, a, s))
        return convert(x0, "x0", prediction, x64, t64, path).to(dtype=x.dtype, device=x.device)

    model = denoiser(fn, path, prediction, sample_shape=(cond.dim,))
    model.null_cond = lambda c, batch: torch.zeros(batch, dtype=torch.long)
    return model


# ---------------------------------------------------------------------------------------------------
# Exact targets for guidance and particle methods: reward-tilted mixtures, the CFG-tilted target and the posterior
# of a linear-Gaussian inverse problem.


def linear_tilt(gmm: GaussianMixture, b, lmbda: float, label=None) -> GaussianMixture:
    """The exact mixture ``p(x0 | c) exp(λ bᵀx0) / Z`` (reference notes D4): components ``N(μ_k + λ Σ_k b, Σ_k)``
    with weights ``∝ π_k exp(λ bᵀμ_k + ½ λ² bᵀ Σ_k b)``, restricted to the components of class ``label`` (all
    components for None or the null label)."""
    b = torch.as_tensor(b, dtype=torch.float64).reshape(-1)
    keep = torch.ones(gmm.K, dtype=torch.bool) if label is None or label == gmm.null_label else gmm.labels == label
    covs = gmm.covs[keep]
    means = gmm.means[keep] + lmbda * covs @ b
    logw = gmm.log_weights[keep] + lmbda * gmm.means[keep] @ b + 0.5 * lmbda**2 * torch.einsum("i,kij,j->k", b, covs, b)
    return GaussianMixture(means, covs=covs, weights=torch.softmax(logw, 0), labels=gmm.labels[keep])


def cfg_tilted_sample(gmm: GaussianMixture, label: int, w: float, n: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Exact samples of the CFG-tilted target ``p(x)^{1−w} p(x|c)^w ∝ p(x|c) p(c|x)^{w−1}`` (w ≥ 1) by rejection
    from ``p(x|c)``: accept with probability ``p(c|x)^{w−1} ≤ 1``. Float64, shape [n, D]."""
    if w < 1:
        raise ValueError(f"cfg_tilted_sample needs w >= 1 (the acceptance p(c|x)^(w-1) is then <= 1), got {w}")
    out, have = [], 0
    while have < n:
        x = gmm.sample(4 * (n - have) + 64, labels=label, generator=generator)
        log_pc = gmm.classifier_log_probs(x, 0.0, "flow")[:, label]
        u = torch.rand(len(x), generator=generator, dtype=torch.float64)
        acc = x[torch.log(u) < (w - 1) * log_pc]
        out.append(acc)
        have += len(acc)
    return torch.cat(out)[:n]


def linear_posterior(gmm: GaussianMixture, A, y, sigma_y: float) -> GaussianMixture:
    """``p(x0 | y)`` for ``y = A x0 + N(0, σ_y² I)`` with the mixture as prior: components
    ``S_k = (Σ_k⁻¹ + AᵀA/σ_y²)⁻¹``, means ``S_k (Σ_k⁻¹ μ_k + Aᵀy/σ_y²)``, weights
    ``∝ π_k N(y; A μ_k, A Σ_k Aᵀ + σ_y² I)``."""
    A, y = torch.as_tensor(A, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64).reshape(-1)
    S, m, logw = [], [], []
    for k in range(gmm.K):
        P = torch.linalg.inv(gmm.covs[k])
        Sk = torch.linalg.inv(P + A.T @ A / sigma_y**2)
        S.append(Sk)
        m.append(Sk @ (P @ gmm.means[k] + A.T @ y / sigma_y**2))
        C = A @ gmm.covs[k] @ A.T + sigma_y**2 * torch.eye(len(y), dtype=torch.float64)
        r = y - A @ gmm.means[k]
        logw.append(gmm.log_weights[k] - 0.5 * r @ torch.linalg.solve(C, r) - 0.5 * torch.logdet(2 * math.pi * C))
    return GaussianMixture(torch.stack(m), covs=torch.stack(S), weights=torch.softmax(torch.stack(logw), 0),
                           labels=gmm.labels)
