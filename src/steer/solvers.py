"""ODE and SDE solvers over a denoiser, written in the data-prediction form with ``λ = log(α/σ)``.

One implementation serves VP, EDM and flow paths. A solver is configuration only; its state is explicit, in the
spirit of Optax: ``state = solver.init(path, grid)`` once per sampling call, then ``x, state = solver.step(i, x,
state, denoise, noise)`` for each grid interval ``i`` (time ``s``) → ``i + 1`` (time ``t``). ``denoise(x, t)``
returns a ``Denoised`` holding the (guided) ``x0`` and, optionally, a separate noise estimate ``eps`` to re-noise
with (CFG++); ``noise(x)`` draws standard normal noise shaped like ``x``. The state is a dict: its tensors (multistep
history, momentum) are batch-first, so ``steer.core.take`` can reorder its rows; everything else in it (the path,
the grid's time points) is shared by all rows.

Notation in the docstrings: ``m = x̂0``, ``ε̂ = (x − α_s m)/σ_s``, ``h = λ_t − λ_s``, ``σ̄ = σ/α`` (EDM's σ). Steps
that end at σ = 0 or start at α = 0 have ``h = ∞``; multistep methods then fall back to their first-order member,
which is exact in that limit's form (``x_t = α_t m + σ_t ε̂``). Every solver is first order on its first step unless
its docstring says otherwise.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import torch

from .core import Denoised, TimePoint, points
from .paths import Path, karras
from .spec import build

__all__ = ["Denoised", "Solver", "SOLVERS", "get_solver", "solver_table"]


def _h(p: TimePoint, q: TimePoint) -> float:
    return q.lam - p.lam if math.isfinite(p.lam) and math.isfinite(q.lam) else math.inf


def _eps(x, d: Denoised, p: TimePoint):
    return d.eps if d.eps is not None else p.eps(x, d.x0)


Noise = Callable[[torch.Tensor], torch.Tensor]


class Solver:
    """Base class: ``init(path, grid)`` returns the state of one sampling call; ``step`` advances it by one
    grid interval and returns ``(x, state)``."""

    name = ""
    order = 1
    stochastic = False
    paper = ""
    nfe_per_step = 1
    supports_renoise = False  # honours Denoised.eps / x0_hist (needed by CFG++)

    def __init__(self, **options):
        if options:
            raise TypeError(f"{self.name} takes no option(s) {', '.join(options)}")

    def options(self) -> dict:
        return {}

    def init(self, path: Path, grid: torch.Tensor) -> dict:
        return {"path": path, "pts": points(path, grid)}

    def step(self, i: int, x: torch.Tensor, state: dict, denoise, noise: Noise) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{self.name}({opts})"


def _order_cap(solver: Solver, state: dict, i: int) -> int:
    """diffusers' ``lower_order_final``: with fewer than 15 steps, the last step is first order and the one
    before it at most second order (DPM-Solver's advice for few-step sampling; a heuristic, not the method)."""
    n = len(state["pts"]) - 1
    if not getattr(solver, "lower_order_final", False) or n >= 15:
        return 3
    return 1 if i == n - 1 else (2 if i == n - 2 else 3)


def _ddim_step(x, d: Denoised, p: TimePoint, q: TimePoint, eta: float, noise: Noise):
    """``x_t = α_t m + sqrt(σ_t² − c²) ε̂ + c z``, ``c = η σ_t sqrt(1 − e^{−2h})``."""
    if eta == 0 and d.eps is None:  # x_t = α_t m + σ_t (x − α_s m)/σ_s, as one combination of x and m
        cx, cm = q.sigma / p.sigma, q.alpha - q.sigma * p.alpha / p.sigma
        if abs(cx + cm - 1) < 1e-12:  # flow and EDM paths: an interpolation, one operation
            return torch.lerp(x, d.x0, cm)
        return torch.add(x * cx, d.x0, alpha=cm)
    e = _eps(x, d, p)
    if eta == 0 or q.sigma == 0:
        return torch.add(q.alpha * d.x0, e, alpha=q.sigma)
    c = min(eta * q.sigma * math.sqrt(-math.expm1(-2 * _h(p, q))), q.sigma)
    return q.alpha * d.x0 + math.sqrt(q.sigma**2 - c**2) * e + c * noise(x)


class Euler(Solver):
    """Euler on the probability-flow ODE (EDM, Karras et al. 2022, arXiv 2206.00364, Alg. 1 without Heun).

    In EDM's coordinates ``x̄ = x/α``: ``x̄_t = x̄_s + (σ̄_t − σ̄_s) ε̂``, i.e. ``x_t = α_t m + σ_t ε̂``. The same
    update is DDIM(η = 0) on every path, and flow Euler ``x_t = x_s + (t − s) û`` on rectified flow.
    Order 1, 1 NFE per step.
    """

    supports_renoise = True

    name, order = "euler", 1
    paper = "Karras et al. 2022, Elucidating the Design Space of Diffusion-Based Generative Models, arXiv 2206.00364"

    def step(self, i, x, state, denoise, noise):
        p, q = state["pts"][i], state["pts"][i + 1]
        return _ddim_step(x, denoise(x, p.t), p, q, 0.0, noise), state


class DDIM(Solver):
    """DDIM (Song et al. 2021, Denoising Diffusion Implicit Models, arXiv 2010.02502).

    ``x_t = α_t m + sqrt(σ_t² − c²) ε̂ + c z`` with ``c = η σ_t sqrt(1 − e^{−2h})`` (on VP this is the paper's
    ``σ_η``). η = 0 (default) is deterministic and equals Euler and DPM-Solver-1; η = 1 is DDPM's ancestral
    step with the posterior ("fixed small") variance. Order 1, 1 NFE per step.

    ``time_shift=True`` adds the Time-Shift Sampler (Li et al., ICLR 2024, arXiv 2305.15583) in its
    ADM/DDIM form: while ``s > cutoff``, find τ* in ``[s − window/2, s + window/2]`` (1/1000 resolution) whose
    ``σ(τ)²`` is closest to the per-sample variance of ``x_s``, keep the network at the nominal ``s`` and move
    the target time to ``t + (τ* − s)``. Defaults window 0.08, cutoff 0.3 (their ADM CIFAR-10 README: 80 and
    300 of 1000 steps). The placement of the shift is one of several in the authors' code.
    """

    supports_renoise = True

    name, order, paper = "ddim", 1, "Song et al. 2021, Denoising Diffusion Implicit Models, arXiv 2010.02502"

    def __init__(self, eta: float = 0.0, time_shift: bool = False, window: float = 0.08, cutoff: float = 0.3):
        if eta < 0:
            raise ValueError(f"ddim eta must be >= 0, got {eta}")
        self.eta, self.time_shift, self.window, self.cutoff = float(eta), bool(time_shift), float(window), float(cutoff)
        self.stochastic = self.eta > 0

    def options(self):
        return {"eta": self.eta, "time_shift": self.time_shift, "window": self.window, "cutoff": self.cutoff}

    def step(self, i, x, state, denoise, noise):
        p, q = state["pts"][i], state["pts"][i + 1]
        d = denoise(x, p.t)
        if not (self.time_shift and p.t > self.cutoff and q.sigma > 0):
            return _ddim_step(x, d, p, q, self.eta, noise), state
        # candidates τ and the coefficients at their shifted targets, tabulated on the host and looked up per sample
        path = state["path"]
        tau = torch.arange(p.t - self.window / 2, p.t + self.window / 2 + 1e-9, 1e-3, dtype=torch.float64).clamp(0, 1)
        t_new = (q.t + tau - p.t).clamp(1e-6, 1.0)
        table = torch.stack([path.sigma(tau) ** 2, path.alpha(t_new), path.sigma(t_new)])
        table = table.to(x.device, torch.float32, non_blocking=True)
        var = x.flatten(1).float().var(dim=1)
        j = (var[:, None] - table[0][None]).abs().argmin(dim=1)
        shape = (-1,) + (1,) * (x.ndim - 1)
        a, s = table[1][j].reshape(shape).to(x.dtype), table[2][j].reshape(shape).to(x.dtype)
        return a * d.x0 + s * _eps(x, d, p), state  # the shift applies to deterministic DDIM only


class DDPM(DDIM):
    """DDPM ancestral sampling (Ho et al. 2020, arXiv 2006.11239) on a strided chain.

    Posterior mean plus noise: ``variance="small"`` (default) uses the posterior variance
    ``β̃ = σ_t²(1 − e^{−2h})`` (identical to DDIM η = 1), ``"large"`` uses the forward variance
    ``β = σ_s²(1 − e^{−2h})``. No noise on a step that ends at σ = 0. Order 1, 1 NFE per step.
    """

    name, paper = "ddpm", "Ho et al. 2020, Denoising Diffusion Probabilistic Models, arXiv 2006.11239"
    stochastic = True

    def __init__(self, variance: str = "small"):
        if variance not in ("small", "large"):
            raise ValueError(f"ddpm variance must be 'small' or 'large', got {variance!r}")
        super().__init__(eta=1.0)
        self.variance = variance

    def options(self):
        return {"variance": self.variance}

    def step(self, i, x, state, denoise, noise):
        p, q = state["pts"][i], state["pts"][i + 1]
        d = denoise(x, p.t)
        x = _ddim_step(x, d, p, q, 1.0, noise)
        if self.variance == "large" and q.sigma > 0:
            small, large = q.sigma**2 * -math.expm1(-2 * _h(p, q)), p.sigma**2 * -math.expm1(-2 * _h(p, q))
            x = x + math.sqrt(large - small) * noise(x)  # adds the missing variance to the same mean
        return x, state


class EulerAncestral(Solver):
    """Ancestral Euler (k-diffusion ``sample_euler_ancestral``; Karras et al. 2022, arXiv 2206.00364).

    In EDM coordinates: ``σ_up = min(σ̄_t, η sqrt(σ̄_t²(σ̄_s² − σ̄_t²)/σ̄_s²))``, ``σ_down = sqrt(σ̄_t² − σ_up²)``,
    ``x̄_t = m + σ_down ε̂ + σ_up z``. For η ≤ 1 it coincides with DDIM(η). Order 1, 1 NFE per step; η = 1.
    """

    supports_renoise = True

    name, order, stochastic = "euler_ancestral", 1, True
    paper = "Karras et al. 2022 / k-diffusion, arXiv 2206.00364"

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0):
        self.eta, self.s_noise = float(eta), float(s_noise)

    def options(self):
        return {"eta": self.eta, "s_noise": self.s_noise}

    def step(self, i, x, state, denoise, noise):
        p, q = state["pts"][i], state["pts"][i + 1]
        d = denoise(x, p.t)
        e = _eps(x, d, p)
        if q.sigma == 0:
            return q.alpha * d.x0, state
        sp, sq = p.sigma_bar, q.sigma_bar
        up = (min(sq, self.eta * sq) if math.isinf(sp)
              else min(sq, self.eta * math.sqrt(sq**2 * (sp**2 - sq**2) / sp**2)))
        down = math.sqrt(sq**2 - up**2)
        return q.alpha * (d.x0 + down * e + up * self.s_noise * noise(x)), state


class Heun(Solver):
    """Heun's second-order method (EDM, Karras et al. 2022, arXiv 2206.00364, Algorithm 1).

    ``d = ε̂`` in EDM coordinates ``x̄ = x/α``, ``σ̄``: Euler predictor, then the trapezoid
    ``x̄_t = x̄_s + (σ̄_t − σ̄_s)(d_1 + d_2)/2``; on flow paths the same in ``(x, t)`` with ``d = û``
    (diffusers' FlowMatchHeun, ComfyUI). The last step to σ = 0 is a plain Euler step (EDM).
    Steps starting from α = 0 (flow t = 1) in EDM coordinates fall back to Euler, and so does a step in EDM
    coordinates over more than two decades of σ̄ (``σ̄_s/σ̄_t > HEUN_MAX_RATIO = 100``): the trapezoid assumes ε̂
    linear in σ̄ over the step, and its error grows like ``Δσ̄·(ε̂_t − ε̂_s)/2``. vp-cosine's default grid starts with
    such a step (σ̄ 2.0e4 → 6.4, its t = 1 has ᾱ ≈ 2e−9): with the trapezoid there, Heun's error against the exact
    ODE solution was 1.9e2 at 10 NFE on the exact testbed (benchmarks/solver_table.py); the Euler step is the
    first-order member, exact in the limit σ̄_s → ∞, as multistep solvers do at h = ∞. EDM's, diffusers' and
    ComfyUI's grids never take such a step, so parity with them is unchanged. Order 2, 2 NFE per step (1 on the
    steps that fall back).
    """

    name, order, nfe_per_step = "heun", 2, 2
    paper = "Karras et al. 2022, Elucidating the Design Space of Diffusion-Based Generative Models, arXiv 2206.00364"

    def step(self, i, x, state, denoise, noise):
        return heun_step(state["path"], x, denoise, state["pts"][i], state["pts"][i + 1]), state


HEUN_MAX_RATIO = 100.0  # σ̄_s/σ̄_t above which a Heun step in EDM coordinates is an Euler step (see Heun)


def heun_step(path: Path, x, denoise, p: TimePoint, q: TimePoint):
    d1 = denoise(x, p.t)
    e1 = _eps(x, d1, p)
    x_pred = torch.add(q.alpha * d1.x0, e1, alpha=q.sigma)
    if q.sigma == 0 or (path.kind != "flow" and p.sigma_bar > HEUN_MAX_RATIO * q.sigma_bar):
        return x_pred
    d2 = denoise(x_pred, q.t)
    e2 = _eps(x_pred, d2, q)
    if path.kind == "flow":  # trapezoid on u = ε̂ − x̂0 in (x, t)
        return torch.add(x, (e1 - d1.x0) + (e2 - d2.x0), alpha=0.5 * (q.t - p.t))
    if p.alpha == 0:
        return x_pred
    # α_t (x̄_s + Δσ̄ (e1 + e2)/2)
    return torch.add((q.alpha / p.alpha) * x, e1 + e2, alpha=0.5 * q.alpha * (q.sigma_bar - p.sigma_bar))


class Midpoint(Solver):
    """Explicit midpoint (RK2) on the probability-flow ODE.

    Flow paths, in ``(x, t)``: ``x_m = x_s + (Δt/2) û(x_s, s)``, ``x_t = x_s + Δt û(x_m, (s + t)/2)``. Other
    paths, in EDM coordinates: the same with ``d = ε̂`` and σ̄ in place of t. Order 2, 2 NFE per step.
    """

    name, order, nfe_per_step = "midpoint", 2, 2
    paper = "Runge–Kutta midpoint rule on the PF-ODE; flow form as in rectified-flow samplers"

    def init(self, path, grid):
        state = super().init(path, grid)
        pts = state["pts"]
        if path.kind == "flow":
            mids = [(p.t + q.t) / 2 for p, q in zip(pts, pts[1:])]
        else:  # σ̄ midpoints where both ends are finite and positive
            mids = [float(path.t_from_sigma_bar((p.sigma_bar + q.sigma_bar) / 2)) if p.alpha > 0 else p.t
                    for p, q in zip(pts, pts[1:])]
        state["mid"] = points(path, mids)
        return state

    def step(self, i, x, state, denoise, noise):
        p, q, m = state["pts"][i], state["pts"][i + 1], state["mid"][i]
        d1 = denoise(x, p.t)
        e1 = _eps(x, d1, p)
        if state["path"].kind == "flow":
            x_mid = x + (m.t - p.t) * (e1 - d1.x0)
            d2 = denoise(x_mid, m.t)
            return x + (q.t - p.t) * (_eps(x_mid, d2, m) - d2.x0), state
        if p.alpha == 0:
            return q.alpha * d1.x0 + q.sigma * e1, state
        x_mid = m.alpha * d1.x0 + m.sigma * e1
        d2 = denoise(x_mid, m.t)
        return q.alpha * (x / p.alpha + (q.sigma_bar - p.sigma_bar) * _eps(x_mid, d2, m)), state


class DPMpp2M(Solver):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095), data prediction, multistep.

    ``r = h_{−1}/h``, ``D1 = (m_0 − m_{−1})/r``; ``x_t = (σ_t/σ_s) x_s + α_t (1 − e^{−h}) (m_0 + D1/2)``,
    written as ``x_t = α_t m_0 + σ_t ε̂ + α_t (1 − e^{−h}) D1/2`` so a separate re-noise estimate can enter.
    First step (and any step with ``h = ∞``) is DPM-Solver-1 = DDIM; ``lower_order_final`` (default, as
    diffusers) makes the last step first order when there are fewer than 15 steps. Order 2, 1 NFE per step.

    ``momentum=β`` (< 1) adds Polyak heavy-ball momentum on the update direction (Wizadwongsa et al. 2023,
    "Diffusion Sampling with Momentum for Mitigating Divergence Artifacts", arXiv 2307.11118):
    ``v_n = (1 − β) v_{n−1} + β (m_0 + D1/2)``, ``x_t = (σ_t/σ_s) x_s + α_t (1 − e^{−h}) v_n``. β = 1 (default)
    is plain 2M; the paper proves the HB variant first order and suggests β ≈ 0.8 for low-step, high-CFG runs.

    State: ``prev`` (λ and m of the previous step), ``velocity`` (momentum).
    """

    supports_renoise = True

    name, order = "dpmpp_2m", 2
    paper = ("Lu et al. 2022, DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models, "
             "arXiv 2211.01095")

    def __init__(self, momentum: float = 1.0, lower_order_final: bool = True):
        if not 0 < momentum <= 1:
            raise ValueError(f"dpmpp_2m momentum must be in (0, 1], got {momentum}")
        self.momentum, self.lower_order_final = float(momentum), bool(lower_order_final)

    def options(self):
        return {"momentum": self.momentum, "lower_order_final": self.lower_order_final}

    def init(self, path, grid):
        return {**super().init(path, grid), "prev": None, "velocity": None}

    def step(self, i, x, state, denoise, noise):
        p, q = state["pts"][i], state["pts"][i + 1]
        d = denoise(x, p.t)
        m0, h, prev = d.x0, _h(p, q), state["prev"]
        val = m0
        if prev is not None and math.isfinite(h) and math.isfinite(prev[0]) and _order_cap(self, state, i) >= 2:
            c = 0.5 * h / (p.lam - prev[0])
            val = torch.add(m0 * (1 + c), prev[1], alpha=-c)  # m0 + D1/2
        velocity = state["velocity"]
        if self.momentum < 1:
            velocity = val if velocity is None else (1 - self.momentum) * velocity + self.momentum * val
            val = velocity
        if d.eps is None:  # (σ_t/σ_s) x_s + α_t (1 − e^{−h}) val: the m0 terms of the form below cancel
            x = torch.add(x * (q.sigma / p.sigma), val, alpha=-q.alpha * math.expm1(-h))
        else:
            x = q.alpha * m0 + q.sigma * _eps(x, d, p) - q.alpha * math.expm1(-h) * (val - m0)
        prev = (p.lam, d.x0_hist if d.x0_hist is not None else m0)
        return x, {**state, "prev": prev, "velocity": velocity}


class DPMpp3M(Solver):
    """DPM-Solver++(3M) (Lu et al. 2022, arXiv 2211.01095), data prediction, multistep.

    ``D1_0 = (m_0 − m_1)/r_0``, ``D1_1 = (m_1 − m_2)/r_1``, ``D1 = D1_0 + r_0/(r_0 + r_1)(D1_0 − D1_1)``,
    ``D2 = (D1_0 − D1_1)/(r_0 + r_1)``; ``x_t = α_t m_0 + σ_t ε̂ + α_t (A1 D1 + c2 D2)`` with
    ``A1 = 1 − (1 − e^{−h})/h`` and ``A2 = 1/2 − (e^{−h} − 1 + h)/h²``.

    ``variant="published"`` (default): ``c2 = A2``, as in the DPM-Solver reference code, k-diffusion and diffusers.
    ``variant="taylor"``: ``c2 = 2·A2``. D2 estimates ``h² m''/2`` while the exact integral's second-order term is
    ``h² A2 m''``, so the published coefficient is only second order in the limit; measured on the exact testbed
    (tests/test_convergence.py) the published variant's error falls ~4× per halving of h, the Taylor one ~8×. At
    practical step counts the published one is the more accurate at equal NFE in 13 of 15 (path, budget) cells of
    benchmarks/out/solver_table.md (every path at 10 and 20 NFE; e.g. flow, 20 NFE: 6.9e−3 against 1.0e−2), hence
    the default.
    The Taylor variant also warms up so as not to spoil its order: with no usable history it takes a
    second-order single step (DPM-Solver++(2S) with r = 1, one extra NFE), then 2M, then 3M. The published
    variant warms up with orders 1, 2 like the references. ``lower_order_final`` (default, as diffusers): with
    fewer than 15 steps the last step is first order and the one before it second order. 1 NFE per step (+1 for
    the Taylor warm-up).
    """

    name, order = "dpmpp_3m", 3
    paper = ("Lu et al. 2022, DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models, "
             "arXiv 2211.01095")

    def __init__(self, variant: str = "published", lower_order_final: bool = True):
        if variant not in ("taylor", "published"):
            raise ValueError(f"{self.name} variant must be 'taylor' or 'published', got {variant!r}")
        self.variant, self.lower_order_final = variant, bool(lower_order_final)

    def options(self):
        return {"variant": self.variant, "lower_order_final": self.lower_order_final}

    def init(self, path, grid):
        return {**super().init(path, grid), "hist": ()}  # up to two (λ, m) of the previous steps

    def step(self, i, x, state, denoise, noise):
        p, q = state["pts"][i], state["pts"][i + 1]
        d = denoise(x, p.t)
        m0, h, e = d.x0, _h(p, q), _eps(x, d, p)
        cap = _order_cap(self, state, i)
        usable = [(lam, m) for lam, m in state["hist"] if math.isfinite(lam)][-(cap - 1):] if cap > 1 else []
        state = {**state, "hist": (*state["hist"], (p.lam, m0))[-2:]}
        base = q.alpha * m0 + q.sigma * e
        if q.sigma == 0 or cap == 1 or not math.isfinite(h) or (not usable and self.variant == "published"):
            return base, state  # h = ∞ (from α = 0, flow's t = 1): DDIM, exact in that limit, no warm-up NFE
        phi1 = -math.expm1(-h)  # 1 − e^{−h}
        if not usable:  # second-order single step: predictor to t, trapezoid in the data prediction
            m_t = denoise(base, q.t).x0
            return base + q.alpha * phi1 * 0.5 * (m_t - m0), state
        r0 = (p.lam - usable[-1][0]) / h
        d1_0 = (m0 - usable[-1][1]) / r0
        if len(usable) < 2:
            return base + q.alpha * phi1 * 0.5 * d1_0, state
        r1 = (usable[-1][0] - usable[-2][0]) / h
        d1_1 = (usable[-1][1] - usable[-2][1]) / r1
        D1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        D2 = (d1_0 - d1_1) / (r0 + r1)
        A1, A2 = 1 - phi1 / h, 0.5 - (h - phi1) / h**2
        c2 = 2 * A2 if self.variant == "taylor" else A2
        return base + q.alpha * (A1 * D1 + c2 * D2), state


class DPMpp2MSDE(Solver):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095; k-diffusion ``sample_dpmpp_2m_sde``).

    ``H = (1 + η) h``: ``x_t = α_t m_0 + σ_t e^{−ηh} ε̂ + α_t C + σ_t sqrt(1 − e^{−2ηh}) z`` with
    ``C = ½(1 − e^{−H}) D1`` ("midpoint", default) or ``(1 − (1 − e^{−H})/H) D1`` ("heun"), ``D1 = (m_0 − m_1)/r``.
    η = 1 is the reverse SDE; η = 0 gives 2M. First step first order (= DDPM for η = 1). 1 NFE per step.
    """

    name, order, stochastic = "dpmpp_2m_sde", 2, True
    paper = "Lu et al. 2022, DPM-Solver++, arXiv 2211.01095 (SDE variant as in k-diffusion)"

    def __init__(self, eta: float = 1.0, solver_type: str = "midpoint", s_noise: float = 1.0):
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
        self.eta, self.solver_type, self.s_noise = float(eta), solver_type, float(s_noise)

    def options(self):
        return {"eta": self.eta, "solver_type": self.solver_type, "s_noise": self.s_noise}

    def init(self, path, grid):
        return {**super().init(path, grid), "prev": None}

    def step(self, i, x, state, denoise, noise):
        p, q = state["pts"][i], state["pts"][i + 1]
        d = denoise(x, p.t)
        m0, h, e, prev = d.x0, _h(p, q), _eps(x, d, p), state["prev"]
        state = {**state, "prev": (p.lam, m0)}
        if q.sigma == 0:
            return q.alpha * m0, state
        eh = self.eta * h if math.isfinite(h) else math.inf
        H = h + eh
        out = q.alpha * m0 + q.sigma * math.exp(-eh) * e
        if prev is not None and math.isfinite(h) and math.isfinite(prev[0]):
            D1 = (m0 - prev[1]) * h / (p.lam - prev[0])
            phi = -math.expm1(-H)
            out = out + q.alpha * (0.5 * phi if self.solver_type == "midpoint" else 1 - phi / H) * D1
        if self.eta > 0:
            out = out + q.sigma * math.sqrt(-math.expm1(-2 * eh)) * self.s_noise * noise(x)
        return out, state


class DPMpp3MSDE(Solver):
    """SDE-DPM-Solver++(3M) (k-diffusion ``sample_dpmpp_3m_sde``), η = 1 by default.

    As ``dpmpp_2m_sde`` with the 3M correction ``α_t [A1(H) D1 + c2 D2]``, ``A1, A2`` at ``H = (1 + η) h``;
    ``variant`` as in ``dpmpp_3m`` but with the Taylor ``c2 = 2·A2(H)`` by default (``A2(H)`` published).
    Warm-up orders 1, 2.
    diffusers' order-3 "sde-dpmsolver++" uses ``(1 − e^{−2h} − 2h)/(2h)² − ½`` on D2 (the ½ with the wrong
    sign); it is not reproduced here. 1 NFE per step.
    """

    name, order, stochastic = "dpmpp_3m_sde", 3, True
    paper = "Lu et al. 2022, DPM-Solver++, arXiv 2211.01095 (SDE variant as in k-diffusion)"

    def __init__(self, eta: float = 1.0, variant: str = "taylor", s_noise: float = 1.0):
        if variant not in ("taylor", "published"):
            raise ValueError(f"dpmpp_3m_sde variant must be 'taylor' or 'published', got {variant!r}")
        self.eta, self.variant, self.s_noise = float(eta), variant, float(s_noise)

    def options(self):
        return {"eta": self.eta, "variant": self.variant, "s_noise": self.s_noise}

    def init(self, path, grid):
        return {**super().init(path, grid), "hist": ()}

    def step(self, i, x, state, denoise, noise):
        p, q = state["pts"][i], state["pts"][i + 1]
        d = denoise(x, p.t)
        m0, h, e = d.x0, _h(p, q), _eps(x, d, p)
        usable = [(lam, m) for lam, m in state["hist"] if math.isfinite(lam)] if math.isfinite(h) else []
        state = {**state, "hist": (*state["hist"], (p.lam, m0))[-2:]}
        if q.sigma == 0:
            return q.alpha * m0, state
        eh = self.eta * h if math.isfinite(h) else math.inf
        H = h + eh
        out = q.alpha * m0 + q.sigma * math.exp(-eh) * e
        if usable:
            phi1 = -math.expm1(-H)
            r0 = (p.lam - usable[-1][0]) / h
            d1_0 = (m0 - usable[-1][1]) / r0
            if len(usable) < 2:
                out = out + q.alpha * 0.5 * phi1 * d1_0
            else:
                r1 = (usable[-1][0] - usable[-2][0]) / h
                d1_1 = (usable[-1][1] - usable[-2][1]) / r1
                D1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                D2 = (d1_0 - d1_1) / (r0 + r1)
                A1, A2 = 1 - phi1 / H, 0.5 - (H - phi1) / H**2
                out = out + q.alpha * (A1 * D1 + (2 * A2 if self.variant == "taylor" else A2) * D2)
        if self.eta > 0:
            out = out + q.sigma * math.sqrt(-math.expm1(-2 * eh)) * self.s_noise * noise(x)
        return out, state


def _unipc_coefs(rks: list[float], h: float, variant: str, corrector: bool):
    """UniPC's ρ coefficients: solve ``R ρ = b`` with ``R_ij = r_j^(i−1)``, ``b_i = ψ_i i!/B(h)``."""
    hh = -h  # data prediction
    h_phi_1 = math.expm1(hh)
    B = hh if variant == "bh1" else h_phi_1
    order = len(rks) + 1
    rk = np.array(rks + [1.0])
    R, b, h_phi_k, fact = [], [], h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        R.append(rk ** (k - 1))
        b.append(h_phi_k * fact / B)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    R, b = np.array(R), np.array(b)
    if corrector:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
    else:
        rhos = np.array([]) if order == 1 else (np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]))
    return h_phi_1, B, rhos


class UniPC(Solver):
    """UniPC (Zhao et al. 2023, UniPC: A Unified Predictor-Corrector Framework, arXiv 2302.04867).

    Data-prediction multistep predictor UniP-p plus corrector UniC-p: after the model is evaluated at the
    predicted ``x_t``, that evaluation also corrects ``x_t`` (no extra NFE); the corrector is skipped after the
    last step. ``x_t = (σ_t/σ_s) x_s + α_t (1 − e^{−h}) m_0 − α_t B(h) Σ_k ρ_k D_k`` with
    ``D_k = (m_k − m_0)/r_k``, ρ from ``R ρ = b`` (see ``_unipc_coefs``). Defaults from diffusers and the paper:
    order 2, ``variant="bh2"`` (``B(h) = e^{−h} − 1``; "bh1" is ``B(h) = −h``). Order p + 1 with the corrector;
    the order used at a step is limited by the usable history. 1 NFE per step.
    UniC corrects the state the step receives, ``x_t + (x_t^c − x_t^p)``: equal to the reference's ``x_t^c`` when
    the state is the predictor's ``x_t^p``, and a change made to it between steps (a guidance displacement,
    ``it.x = ...``) is kept rather than overwritten.
    """

    name, order = "unipc", 2
    paper = ("Zhao et al. 2023, UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models, "
             "arXiv 2302.04867")

    def __init__(self, order: int = 2, variant: str = "bh2", corrector: bool = True):
        if order not in (1, 2, 3):
            raise ValueError(f"unipc order must be 1, 2 or 3, got {order}")
        if variant not in ("bh1", "bh2"):
            raise ValueError(f"unipc variant must be 'bh1' or 'bh2', got {variant!r}")
        self.p, self.variant, self.corrector = int(order), variant, bool(corrector)
        self.order = self.p + (1 if corrector else 0) if self.p < 3 else 3

    def options(self):
        return {"order": self.p, "variant": self.variant, "corrector": self.corrector}

    def init(self, path, grid):
        # hist: up to `order` (λ, m); last: (x_s, time point, order used, x_t^p) of the previous predictor step
        return {**super().init(path, grid), "hist": (), "last": None}

    def step(self, i, x, state, denoise, noise):
        p, q = state["pts"][i], state["pts"][i + 1]
        d = denoise(x, p.t)
        m_new, hist = d.x0, state["hist"]
        if state["last"] is not None and self.corrector:  # UniC: correct x_s with the evaluation just made
            x_prev, pp, order, x_pred = state["last"]
            h = _h(pp, p)
            if math.isfinite(h):
                rks, Ds = _diffs(hist[-order:], h)
                h_phi_1, B, rhos = _unipc_coefs(rks, h, self.variant, corrector=True)
                m0 = hist[-1][1]
                corr = sum(rho * dk for rho, dk in zip(rhos[:-1], Ds))
                x_c = ((p.sigma / pp.sigma) * x_prev - p.alpha * h_phi_1 * m0
                       - p.alpha * B * (corr + rhos[-1] * (m_new - m0)))
                x = x_c + (x - x_pred)  # exactly x_c when x is the predictor's state
        hist = (*hist, (p.lam, m_new))[-self.p:]
        h = _h(p, q)
        usable = 1
        while usable < len(hist) and math.isfinite(hist[-1 - usable][0]):
            usable += 1
        order = min(self.p, usable) if math.isfinite(h) else 1
        if order == 1:  # DPM-Solver-1; no B(h) term (B = −∞ for bh1 on a step to σ = 0)
            if d.eps is not None:
                out = q.alpha * m_new + q.sigma * d.eps
            else:
                out = (q.sigma / p.sigma) * x - q.alpha * math.expm1(-h) * m_new
        else:
            rks, Ds = _diffs(hist[-order:], h)  # UniP
            h_phi_1, B, rhos = _unipc_coefs(rks, h, self.variant, corrector=False)
            pred = sum(rho * dk for rho, dk in zip(rhos, Ds))
            out = (q.sigma / p.sigma) * x - q.alpha * h_phi_1 * m_new - q.alpha * B * pred
        return out, {**state, "hist": hist, "last": (x, p, order, out)}


def _diffs(hist: list, h: float):
    """``r_k = (λ_k − λ_0)/h`` and ``D_k = (m_k − m_0)/r_k`` for the history points before the newest."""
    lam0, m0 = hist[-1]
    rks = [(lam - lam0) / h for lam, _ in reversed(hist[:-1])]
    Ds = [(m - m0) / r for r, (_, m) in zip(rks, reversed(hist[:-1]))]
    return rks, Ds


class DEIS(Solver):
    """DEIS (Zhang & Chen 2023, Fast Sampling of Diffusion Models with Exponential Integrator, arXiv 2204.13902).

    Multistep exponential integrator on ε̂ in EDM coordinates, ``x̄_t = x̄_s + ∫_{ρ_s}^{ρ_t} ε̂(ρ) dρ`` with
    ``ρ = σ̄``; ε̂ is the Lagrange polynomial through the last ``order`` evaluations in ``log ρ``, integrated
    exactly (diffusers' "logrho" DEIS). Default order 2 (diffusers; the paper's best is 3). First step and
    steps from α = 0 are DDIM; ``lower_order_final`` as in ``dpmpp_3m``. 1 NFE per step.
    """

    name, order = "deis", 2
    paper = "Zhang & Chen 2023, Fast Sampling of Diffusion Models with Exponential Integrator, arXiv 2204.13902"

    def __init__(self, order: int = 2, lower_order_final: bool = True):
        if order not in (1, 2, 3):
            raise ValueError(f"deis order must be 1, 2 or 3, got {order}")
        self.order, self.lower_order_final = int(order), bool(lower_order_final)

    def options(self):
        return {"order": self.order, "lower_order_final": self.lower_order_final}

    def init(self, path, grid):
        return {**super().init(path, grid), "hist": ()}  # up to `order` (σ̄, ε̂)

    def step(self, i, x, state, denoise, noise):
        p, q = state["pts"][i], state["pts"][i + 1]
        d = denoise(x, p.t)
        e = _eps(x, d, p)
        state = {**state, "hist": (*state["hist"], (p.sigma_bar, e))[-self.order:]}
        usable = [(r, ek) for r, ek in state["hist"] if math.isfinite(r)][-_order_cap(self, state, i):]
        if len(usable) < 2 or not math.isfinite(p.sigma_bar):
            return q.alpha * d.x0 + q.sigma * e, state
        us = [math.log(r) for r, _ in usable]
        out = x / p.alpha
        for j, (_, ej) in enumerate(usable):
            out = out + (_int_poly_exp(_lagrange(us, j), q.sigma_bar)
                         - _int_poly_exp(_lagrange(us, j), p.sigma_bar)) * ej
        return q.alpha * out, state


def _lagrange(nodes: list[float], j: int) -> list[float]:
    """Coefficients (lowest degree first) of the Lagrange basis polynomial ℓ_j through ``nodes``."""
    coef = [1.0]
    for k, uk in enumerate(nodes):
        if k != j:
            scale = 1.0 / (nodes[j] - uk)
            coef = [(a * -uk + b) * scale for a, b in zip(coef + [0.0], [0.0] + coef)]
    return coef


def _int_poly_exp(coef: list[float], rho: float) -> float:
    """Antiderivative of ``P(log ρ) dρ`` at ρ, i.e. of ``P(u) e^u du``: ``ρ Σ_k (−1)^k P^(k)(log ρ)``; 0 at ρ = 0."""
    if rho == 0:
        return 0.0
    u, total, sign = math.log(rho), 0.0, 1.0
    while coef:
        total += sign * sum(c * u**i for i, c in enumerate(coef))
        coef = [i * c for i, c in enumerate(coef)][1:]
        sign = -sign
    return rho * total


class Restart(Solver):
    """Restart sampling (Xu et al. 2023, Restart Sampling for Improving Generative Processes, arXiv 2306.14878).

    Heun steps on the main grid; when the main pass reaches a restart interval's lower end (snapped to the
    nearest grid σ̄), repeat ``K`` times: jump forward with fresh noise to ``σ̄_max``
    (``x_b = (α_b/α_a) x_a + sqrt(σ_b² − (α_b/α_a)² σ_a²) z``) and re-solve back with Heun on an
    ``n``-point Karras grid. ``intervals`` is a list of ``(n, K, sigma_min, sigma_max)`` in σ̄; default
    ``[(3, 2, 0.06, 0.30)]`` (their CIFAR-10 example). The small churn inside restarts is not applied.
    NFE: ``2N − 1 + Σ K·2(n − 1)``.
    """

    name, order, stochastic, nfe_per_step = "restart", 2, True, 2
    paper = "Xu et al. 2023, Restart Sampling for Improving Generative Processes, arXiv 2306.14878"

    def __init__(self, intervals=((3, 2, 0.06, 0.30),), s_noise: float = 1.0):
        bad = ValueError(f"restart intervals must be a list of (n >= 2, K >= 0, 0 < sigma_min < sigma_max), "
                         f"e.g. [(3, 2, 0.06, 0.30)]; got {intervals!r}")
        if not isinstance(intervals, (list, tuple)):
            raise bad
        for iv in intervals:
            if (not isinstance(iv, (list, tuple)) or len(iv) != 4 or not all(isinstance(v, (int, float)) for v in iv)
                    or iv[0] < 2 or iv[1] < 0 or not 0 < iv[2] < iv[3]):
                raise bad
        self.intervals = [tuple(iv) for iv in intervals]
        self.s_noise = float(s_noise)

    def options(self):
        return {"intervals": self.intervals, "s_noise": self.s_noise}

    def init(self, path, grid):
        state = super().init(path, grid)
        pts = state["pts"]
        inner = [j for j in range(1, len(pts)) if 0 < pts[j].sigma_bar < math.inf]
        at: dict[int, list] = {}  # main-grid index -> [(K, restart sub-grid)]
        for n, k, lo, hi in self.intervals:
            if not inner:
                break
            j = min(inner, key=lambda j: abs(pts[j].sigma_bar - lo))  # snap σ̄_min to the main grid (σ > 0)
            if pts[j].sigma_bar >= hi:
                warnings.warn(f"restart interval {(n, k, lo, hi)} skipped: the grid's nearest sigma to {lo} is "
                              f"{pts[j].sigma_bar:.4g} >= sigma_max {hi}; use more steps or a Karras grid")
                continue
            sub = points(path, karras(path, n - 1, sigma_min=pts[j].sigma_bar, sigma_max=hi, append_zero=False))
            at.setdefault(j, []).append((k, sub))
        return {**state, "at": at}

    def step(self, i, x, state, denoise, noise):
        path = state["path"]
        x = heun_step(path, x, denoise, state["pts"][i], state["pts"][i + 1])
        for k, sub in state["at"].get(i + 1, []):
            for _ in range(k):
                a_lo, b_hi = sub[-1], sub[0]
                ratio = b_hi.alpha / a_lo.alpha
                x = ratio * x + math.sqrt(max(b_hi.sigma**2 - (ratio * a_lo.sigma) ** 2, 0.0)) * self.s_noise * noise(x)
                for p, q in zip(sub[:-1], sub[1:]):
                    x = heun_step(path, x, denoise, p, q)
        return x, state


SOLVERS: dict[str, type[Solver]] = {
    cls.name: cls
    for cls in (Euler, Heun, DDIM, DDPM, EulerAncestral, DPMpp2M, DPMpp3M, DPMpp2MSDE, DPMpp3MSDE, UniPC, DEIS, Restart,
                Midpoint)
}


def get_solver(solver: "str | Solver") -> Solver:
    """A solver from an instance, a name or a spec string like ``"ddim(eta=0.5)"``."""
    if isinstance(solver, Solver):
        return solver
    if isinstance(solver, type) and issubclass(solver, Solver):
        return solver()
    return build(solver, SOLVERS, "solver")


def most_accurate(path: str, nfe: int) -> tuple[str, dict] | None:
    """The ODE solver with the smallest error on the exact testbed at ``nfe`` NFE per sample on ``path``'s default
    grid, and its entry (steps, NFE, error), from the table benchmarks/solver_table.py measured and packaged in
    ``steer.solver_accuracy`` (paths: flow, vp-linear, vp-scaled-linear, vp-cosine, edm; NFE: 5, 10, 20)."""
    from .solver_accuracy import ACCURACY

    cells = ACCURACY.get(path, {}).get(nfe)
    if not cells:
        return None
    best = min(cells, key=lambda s: cells[s]["error"])
    return best, cells[best]


def solver_table() -> list[dict]:
    rows = []
    for name, cls in SOLVERS.items():
        s = cls()
        rows.append({"name": name, "order": s.order, "stochastic": s.stochastic, "nfe_per_step": s.nfe_per_step,
                     "defaults": s.options(), "paper": cls.paper})
    return rows
