"""Particle steering on the open loop: an SMC engine and the methods built on it.

Layout: ``G`` conditions (groups) × ``R`` rows per condition, row ``g·R + r``. Every group has its own random
streams (the initial noise and solver noise of each of its rows, and its resampling uniforms) derived from its
seed alone, and resamples on its own, so a condition's result depends only on the condition and its seed: it is
invariant to the order and batching of conditions when ``seed`` is a list with one seed per condition (an int
``seed`` gives group ``g`` the seed ``(seed, g)``).

The engine (:class:`SMC`) keeps per-particle log-weights (float32, float64 for float64 states), adds
increments, and resamples a group (multinomial, systematic, stratified or residual; :func:`resample_index`)
when its schedule says so: every step, at fixed steps, or when the effective sample size
``ESS = 1/Σ w̄²`` falls below ``threshold·K``. Weights are carried (accumulated) across steps without resampling
and reset to zero after one. Resampling reindexes the whole sampler state (``Sampler.resample``: x, solver
history, guidance state, conditionings, per-row generators); duplicated rows continue with independent noise.
At most one host read per step (the log-weights, when a resampling decision or the indices need them).

Methods (each also reachable as ``steer.smc(model, method=..., ...)``):

- :func:`fk_steering`  Feynman–Kac steering (Singhal et al. 2025, arXiv 2501.06848)
- :func:`fkc`          Feynman–Kac correctors (Skreta et al. 2025, arXiv 2503.02819)
- :func:`svdd`         soft value-based decoding (Li et al. 2024, arXiv 2408.08252)
- :func:`best_of_n`    best-of-N / random search (Ma et al. 2025, arXiv 2501.09732)
- :func:`noise_search` random or zero-order search over initial noises (Ma et al. 2025, arXiv 2501.09732)

Rewards are plain callables on a batch of x0 returning one value per row (higher is better); see
``steer.rewards`` for the testbeds' rewards.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import cond as condlib
from .core import Ctx, Denoised
from .guidance import Guidance, parse as parse_guidance
from .guidance.cfg import CFG
from .sampling import Sampler, _model_param, sampler
from .solvers import DDIM, DDPM, DPMpp2MSDE, DPMpp3MSDE, EulerAncestral, get_solver

__all__ = ["smc", "SMCResult", "SMC", "RESAMPLERS", "resample_index", "normalize", "ess", "fk_potential",
           "fkc_increment", "fkc_bracket", "fk_steering", "fkc", "svdd", "best_of_n", "noise_search", "METHODS"]

RESAMPLERS = ("multinomial", "systematic", "stratified", "residual")


# ---------------------------------------------------------------------------------------------------
# Weights and resampling (host side, float64)


def normalize(log_w: torch.Tensor) -> torch.Tensor:
    """Normalised log-weights ``log w̄ = log w − logsumexp(log w)`` along the last dimension, computed in float32 or
    better. A group whose weights are all zero (all ``−inf``) becomes uniform; NaN is an error."""
    lw = log_w.float() if log_w.dtype in (torch.float16, torch.bfloat16) else log_w
    top = lw.amax(dim=-1, keepdim=True)
    dead = torch.isneginf(top)
    lw = torch.where(dead, torch.zeros_like(lw), lw - torch.where(dead, torch.zeros_like(top), top))  # max 0: exact
    return lw - torch.logsumexp(lw, dim=-1, keepdim=True)


def ess(log_w: torch.Tensor) -> torch.Tensor:
    """Effective sample size ``1/Σ w̄²`` along the last dimension (between 1 and K)."""
    return torch.exp(-torch.logsumexp(2 * normalize(log_w), dim=-1))


def resample_index(weights: torch.Tensor, n: int, scheme: str, generator=None) -> torch.Tensor:
    """``n`` ancestor indices drawn from normalised ``weights`` by ``scheme``: weights ``[K]`` give ``[n]``, weights
    ``[G, K]`` give ``[G, n]`` with group g's uniforms from ``generator[g]`` (a list of CPU generators, or one).

    - multinomial: ``n`` iid draws from the categorical (inverse CDF of iid uniforms).
    - systematic: one uniform ``U``, points ``(U + i)/n`` (Kitagawa 1996; FKC's ``sample_cat_sys``); each
      count is ``⌊n w_i⌋`` or ``⌈n w_i⌉``.
    - stratified: one uniform per stratum, points ``(i + U_i)/n``; each count within 1 of ``[⌊n w_i⌋, ⌈n w_i⌉]``.
    - residual: ``⌊n w_i⌋`` copies each, the remaining ``n − Σ⌊n w_i⌋`` drawn multinomially from the residual
      weights ``n w_i − ⌊n w_i⌋`` (Liu & Chen 1998).

    All four give expected counts ``n w_i``. Computed on the CPU in float64.
    """
    if scheme not in RESAMPLERS:
        raise ValueError(f"unknown resampling scheme {scheme!r}; allowed: {', '.join(RESAMPLERS)}")
    w = weights.detach().to("cpu", torch.float64)
    one = w.ndim == 1
    w = w[None] if one else w
    G = w.shape[0]
    gens = generator if isinstance(generator, (list, tuple)) else [generator] * G
    w = w / w.sum(1, keepdim=True)

    def draw(cdf, u):
        cdf = cdf.clone()
        cdf[:, -1] = 1.0
        return torch.searchsorted(cdf, u.contiguous(), right=True).clamp_(max=w.shape[1] - 1)

    def rand(k):
        return torch.stack([torch.rand(k, generator=g, dtype=torch.float64) for g in gens])

    grid = torch.arange(n, dtype=torch.float64)
    if scheme == "multinomial":
        out = draw(torch.cumsum(w, 1), rand(n))
    elif scheme == "systematic":
        out = draw(torch.cumsum(w, 1), (rand(1) + grid) / n)
    elif scheme == "stratified":
        out = draw(torch.cumsum(w, 1), (rand(n) + grid) / n)
    else:
        rows = []
        for g in range(G):
            counts = torch.floor(n * w[g])
            rest = n - int(counts.sum())
            fixed = torch.repeat_interleave(torch.arange(w.shape[1]), counts.long())
            if rest > 0:
                resid = (n * w[g] - counts).clamp_(min=0)
                u = torch.rand(rest, generator=gens[g], dtype=torch.float64)
                fixed = torch.cat([fixed, draw(torch.cumsum(resid / resid.sum(), 0)[None], u[None])[0]])
            rows.append(fixed)
        out = torch.stack(rows)
    return out[0] if one else out


# ---------------------------------------------------------------------------------------------------
# The engine


class SMC:
    """Log-weights of ``groups × particles`` rows of a sampler, with resampling per group.

    ``schedule``: ``"every"`` (resample at every check), a float threshold ``τ`` (resample a group when its
    ``ESS < τ·K``) or a collection of step indices (resample exactly there). ``generators``: one CPU generator per
    group for the resampling uniforms. Diagnostics per check: ESS and log-weight spread (max − min over particles
    with non-zero weight) before any resampling, and whether each group resampled.
    """

    def __init__(self, groups: int, particles: int, scheme: str = "systematic", schedule="every",
                 generators: list | None = None, device=None, dtype=torch.float32):
        if scheme not in RESAMPLERS:
            raise ValueError(f"unknown resampling scheme {scheme!r}; allowed: {', '.join(RESAMPLERS)}")
        if isinstance(schedule, str):
            if schedule != "every":
                raise ValueError(f"schedule must be 'every', an ESS threshold in (0, 1] or a list of steps, got "
                                 f"{schedule!r}")
        elif isinstance(schedule, (int, float)) and not isinstance(schedule, bool):
            if not 0 < schedule <= 1:
                raise ValueError(f"an ESS threshold schedule must lie in (0, 1] (a fraction of K), got {schedule}")
            schedule = float(schedule)
        else:
            schedule = frozenset(int(s) for s in schedule)
        self.G, self.K, self.scheme, self.schedule = groups, particles, scheme, schedule
        self.gens = generators if generators is not None else [None] * groups
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.log_w = torch.zeros(groups, particles, device=device, dtype=dtype)
        self.steps: list[int] = []
        self._ess: list = []
        self._spread: list = []
        self._resampled: list = []

    def add(self, increment: torch.Tensor) -> None:
        """Multiply the weights by ``exp(increment)`` (one value per row, group-major)."""
        self.log_w = self.log_w + increment.detach().reshape(self.G, self.K).to(self.log_w)

    def _record(self, i: int, log_w: torch.Tensor, resampled) -> None:
        finite = torch.where(torch.isneginf(log_w), log_w.amax(-1, keepdim=True), log_w)
        self.steps.append(i)
        self._ess.append(ess(log_w))
        self._spread.append(finite.amax(-1) - finite.amin(-1))
        self._resampled.append(resampled)

    def _host(self) -> torch.Tensor:
        lw = self.log_w.detach().to("cpu", torch.float64)  # the one host read of a step
        if torch.isnan(lw).any():
            bad = sorted(set(torch.nonzero(torch.isnan(lw))[:, 0].tolist()))
            raise FloatingPointError(f"particle log-weights became NaN in condition(s) {bad[:8]}: the reward or "
                                     "the weight increments returned NaN")
        return lw

    def check(self, i: int, sampler_: Sampler | None = None, force: bool = False) -> torch.Tensor | None:
        """Resample the groups whose schedule fires at step ``i`` (all of them with ``force``); reindex
        ``sampler_`` and return the row index used (None when no group resampled)."""
        if not force and isinstance(self.schedule, frozenset) and i not in self.schedule:
            self._record(i, self.log_w, torch.zeros(self.G, dtype=torch.bool))
            return None
        lw = self._host()
        if force or not isinstance(self.schedule, float):
            fire = torch.ones(self.G, dtype=torch.bool)
        else:
            fire = ess(lw) < self.schedule * self.K
        self._record(i, lw, fire)
        if not bool(fire.any()):
            return None
        w = normalize(lw).exp()
        index = torch.arange(self.G * self.K).reshape(self.G, self.K)
        groups = torch.nonzero(fire)[:, 0]
        picked = resample_index(w[groups], self.K, self.scheme, [self.gens[g] for g in groups.tolist()])
        index[groups] = groups[:, None] * self.K + picked
        index = index.reshape(-1)
        keep = fire.to(self.log_w.device)[:, None]
        self.log_w = torch.where(keep, torch.zeros_like(self.log_w), self.log_w)
        if sampler_ is not None:
            sampler_.resample(index)
        return index

    def diagnostics(self) -> dict:
        """``steps`` and per-check tensors ``[checks, G]``: ``ess``, ``spread``, ``resampled``."""
        if not self.steps:
            empty = torch.zeros(0, self.G)
            return {"steps": [], "ess": empty, "spread": empty, "resampled": empty.bool()}
        return {"steps": list(self.steps), "ess": torch.stack([e.cpu().double() for e in self._ess]),
                "spread": torch.stack([s.cpu().double() for s in self._spread]),
                "resampled": torch.stack([r.cpu() for r in self._resampled])}


# ---------------------------------------------------------------------------------------------------
# Result and shared set-up


@dataclass
class SMCResult:
    """What a particle method returns.

    ``samples``: the output, group-major (``[G·K, ...]`` for population outputs, ``[G, ...]`` for one per
    condition). ``particles`` ``[G, K, ...]``: the final population before any output resampling or selection,
    with its normalised ``log_weights`` ``[G, K]`` and final ``rewards`` ``[G, K]`` (None without a reward).
    ``diagnostics``: ``steps`` and ``[checks, G]`` tensors ``ess``, ``spread`` (log-weight max − min) and
    ``resampled``. ``nfe``: network evaluations in total (every row, every branch); ``nfe_per_condition`` the
    same divided by G.
    """

    samples: torch.Tensor
    log_weights: torch.Tensor
    particles: torch.Tensor
    rewards: torch.Tensor | None
    diagnostics: dict
    nfe: int
    groups: int
    method: str
    options: dict = field(default_factory=dict)
    wall_time: float = 0.0

    @property
    def nfe_per_condition(self) -> float:
        return self.nfe / self.groups

    @property
    def ess(self) -> torch.Tensor:
        return self.diagnostics["ess"]


@dataclass
class _Setup:
    G: int
    seeds: list[int]
    cond: object
    uncond: object
    negative: object
    item_shape: tuple
    device: object
    dtype: object


def _derive(seed: int, *keys: int) -> int:
    """An independent 63-bit seed for the stream named by ``keys`` under ``seed`` (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0]) & (2**63 - 1)


def _setup(model, cond, uncond, negative, seed, n, shape, device, dtype) -> _Setup:
    G = condlib.batch_size(cond)
    if isinstance(seed, (list, tuple)):
        if G is not None and len(seed) != G:
            raise ValueError(f"seed has {len(seed)} entries for {G} conditions: give one seed per condition")
        G = len(seed) if G is None else G
    if G is None or (G == 1 and n is not None):
        G = n if n is not None else 1
    if not isinstance(G, int) or G < 1:
        raise ValueError(f"the number of conditions must be a positive int, got {G!r}")
    if seed is None:
        seeds = [int(s) for s in torch.randint(0, 2**62, (G,))]
    elif isinstance(seed, (list, tuple)):
        seeds = list(seed)
    else:
        seeds = [_derive(seed, g) if isinstance(seed, int) and seed >= 0 else seed for g in range(G)]
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seed must be a non-negative int or a list of them (one per condition), got {seed!r}")
    item = tuple(shape) if shape is not None else getattr(model, "sample_shape", None)
    if item is None:
        raise ValueError("pass shape= (the shape of one sample) for a model without sample_shape")
    for name, c in (("cond", cond), ("uncond", uncond), ("negative", negative)):
        b = condlib.batch_size(c)
        if b is not None and b not in (1, G):
            raise ValueError(f"{name} has batch {b} for {G} conditions; it must have one row per condition or one")
    return _Setup(G, seeds, condlib.expand(cond, G), condlib.expand(uncond, G), condlib.expand(negative, G), item,
                  device, dtype)


class _GroupNoise:
    """The noise of a sampler whose rows form G groups of R: group g draws its R rows at once from its own
    generator, so a group's noise depends on its seed only, and rows duplicated by resampling get fresh draws."""

    def __init__(self, gens: list, rows: int):
        self.gens, self.rows = gens, rows

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        z = torch.cat([torch.randn((self.rows, *like.shape[1:]), generator=g, dtype=torch.float32) for g in self.gens])
        return z.to(device=like.device, dtype=like.dtype, non_blocking=True)


def _group_gens(s: _Setup, stream: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(_derive(seed, stream)) for seed in s.seeds]


def _sampler(model, s: _Setup, R: int, guidance, solver, steps, timesteps, stream: int = 0, noise=None):
    """The open loop over G·R rows (group-major) with per-group noise streams; ``noise`` (standard normal,
    ``[G·R, ...]``) defaults to the groups' first draws."""
    gens = _group_gens(s, stream)
    if noise is None:
        noise = _GroupNoise(gens, R)(torch.empty(s.G * R, *s.item_shape))
    param = _model_param(model)
    device = s.device if s.device is not None else (param.device if param is not None else noise.device)
    dtype = s.dtype if s.dtype is not None else (param.dtype if param is not None and param.is_floating_point()
                                                 else noise.dtype)
    index = torch.arange(s.G).repeat_interleave(R)
    take = lambda c: None if c is None else condlib.take(c, index)  # noqa: E731
    it = sampler(model, noise.to(device, dtype), cond=take(s.cond), uncond=take(s.uncond), guidance=guidance,
                 negative=take(s.negative), solver=solver, steps=steps, timesteps=timesteps)
    it.noise = _GroupNoise(gens, R)  # one stream per group (the loop's own is one per batch or per row)
    return it


def _reward(reward: Callable, x0: torch.Tensor) -> torch.Tensor:
    if reward is None:
        raise ValueError("this method needs reward= (a callable on a batch of x0 returning one value per row)")
    r = reward(x0)
    if not isinstance(r, torch.Tensor):
        r = torch.as_tensor(r)
    r = r.reshape(-1)
    if r.shape[0] != x0.shape[0]:
        raise ValueError(f"the reward returned {r.shape[0]} values for a batch of {x0.shape[0]}; it must return one "
                         "per row")
    return r.to(x0.device, torch.float64 if x0.dtype == torch.float64 else torch.float32)


def _check_stochastic(solver, method: str):
    s = get_solver(solver)
    if not s.stochastic:
        raise ValueError(f"{method} needs a stochastic solver (resampled copies of a particle must diverge); "
                         f"{s!r} is deterministic: use ddim(eta=1), ddpm, euler_ancestral or dpmpp_2m_sde")
    return s


def _finish(eng: SMC, it: Sampler, G: int, K: int, rewards, output: str, method: str, options: dict, t0: float
            ) -> SMCResult:
    x = it.x
    parts = x.reshape(G, K, *x.shape[1:])
    lw = eng._host()
    log_w = normalize(lw)
    if output == "weighted":
        samples = x
    elif output == "resample":
        index = (torch.arange(G)[:, None] * K + resample_index(log_w.exp(), K, eng.scheme, eng.gens)).reshape(-1)
        samples = x.index_select(0, index.to(x.device))
    elif output == "best":
        if rewards is None:
            raise ValueError(f"{method}: output='best' needs a reward")
        samples = parts[torch.arange(G, device=x.device), rewards.reshape(G, K).argmax(1)]
    else:
        raise ValueError(f"output must be 'resample', 'weighted' or 'best', got {output!r}")
    nfe = it.nfe * x.shape[0]
    return SMCResult(samples, log_w, parts, None if rewards is None else rewards.reshape(G, K), eng.diagnostics(),
                     nfe, G, method, options, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------
# FK steering


def fk_potential(kind: str, r: torch.Tensor, r_prev: torch.Tensor, log_prod: torch.Tensor, lmbda: float,
                 final: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One FK-steering potential: ``(log G, stored reward)`` from the reward ``r`` of this step, the particle's
    stored reward ``r_prev`` and ``log_prod``, the log of the product of the potentials already applied along its
    ancestry.

    - ``diff``: ``log G = λ (r − r_prev)``, stored ``r`` (telescopes to ``λ r(x0)``).
    - ``max``: stored ``max(r, r_prev)``, ``log G = λ·stored``.
    - ``sum``: stored ``r + r_prev``, ``log G = λ·stored``.

    At the final step ``max`` and ``sum`` use ``log G = λ r − log_prod`` so that the product along every path is
    ``exp(λ r(x0))``.
    """
    if kind == "diff":
        return lmbda * (r - r_prev), r
    if kind == "max":
        stored = torch.maximum(r, r_prev)
    elif kind == "sum":
        stored = r + r_prev
    else:
        raise ValueError(f"unknown FK potential {kind!r}; allowed: diff, max, sum")
    return (lmbda * r - log_prod if final else lmbda * stored), stored


def fk_steering(model, cond=None, uncond=None, guidance=None, particles: int = 4, solver="ddim(eta=1)",
                steps: int = 25, seed=None, reward: Callable | None = None, potential: str = "diff",
                lmbda: float = 10.0, every: int = 1, start: int = 0, ess_threshold: float | None = 0.5,
                resampler: str = "multinomial", output: str = "resample", n: int | None = None, negative=None,
                timesteps=None, shape=None, device=None, dtype=None) -> SMCResult:
    """Feynman–Kac steering (Singhal, Horvitz, Teehan, Ren, Yu, Cho & Ranganath 2025, "A General Framework for
    Inference-time Scaling and Steering of Diffusion Models", arXiv 2501.06848).

    Target ``p(x0 | c) exp(λ r(x0)) / Z`` with the base sampler (any stochastic solver and guidance) as the
    proposal. At potential steps ``start, start + every, …`` and at the last step, the reward of the guided x̂0
    that produced each child (the parent's x̂0; the final sample at the last step) gives a potential
    (:func:`fk_potential`: ``diff``, ``max`` or ``sum``; the product along a path is ``exp(λ r(x0))``). Weights
    multiply across steps (kept when a resampling is skipped: the reference code drops them) and reset after a
    resampling; with ``ess_threshold=τ`` a group resamples when ``ESS < τ·K``, with None at every potential
    step. ``output``: ``"resample"`` (K equally weighted samples per condition), ``"weighted"`` (the particles,
    with ``log_weights``), ``"best"`` (the highest final reward per condition, the paper's best-of-particles).

    Defaults from zacharyhorvitz/Fk-Diffusion-Steering: λ = 10, K = 4 (launch.sh), potential ``diff``
    (launch_eval_runs.py), multinomial resampling and ESS < K/2 for adaptive resampling (fkd_class.py), DDIM
    η = 1. The stored reward starts at 0 (``reward_min_value``) for ``diff`` and ``sum``; for ``max`` it starts at
    −∞ (the reference's 0 would switch the potential off for rewards ≤ 0). Cost: K× the base sampler's NFE, plus
    one reward call per potential step.
    """
    t0 = time.perf_counter()
    _check_stochastic(solver, "fk_steering")
    if potential not in ("diff", "max", "sum"):
        raise ValueError(f"unknown FK potential {potential!r}; allowed: diff, max, sum")
    if not isinstance(every, int) or every < 1 or not isinstance(start, int) or start < 0:
        raise ValueError(f"every must be an int >= 1 and start an int >= 0, got every={every!r}, start={start!r}")
    K = _particles(particles)
    s = _setup(model, cond, uncond, negative, seed, n, shape, device, dtype)
    it = _sampler(model, s, K, guidance, solver, steps, timesteps)
    eng = SMC(s.G, K, resampler, "every" if ess_threshold is None else ess_threshold, _group_gens(s, 1),
              it.x.device, it.x.dtype)
    rows = s.G * K
    r_prev = torch.full((rows,), -math.inf if potential == "max" else 0.0, device=it.x.device,
                        dtype=eng.log_w.dtype)
    log_prod = torch.zeros_like(r_prev)
    last = len(it.timesteps) - 2
    r = None
    for step in it:
        final = step.i == last
        if not final and (step.i < start or (step.i - start) % every):
            continue
        r = _reward(reward, it.x if final else step.x0).to(r_prev.dtype)
        log_g, r_prev = fk_potential(potential, r, r_prev, log_prod, lmbda, final)
        eng.add(log_g)
        log_prod = log_prod + log_g
        if not final:
            index = eng.check(step.i, it)
            if index is not None:
                index = index.to(r_prev.device)
                r_prev, log_prod = r_prev[index], log_prod[index]
    opts = dict(potential=potential, lmbda=lmbda, every=every, start=start, ess_threshold=ess_threshold,
                resampler=resampler, output=output, particles=K)
    return _finish(eng, it, s.G, K, r, output, "fk_steering", opts, t0)


def _particles(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"particles must be an int >= 1, got {k!r}")
    return k


# ---------------------------------------------------------------------------------------------------
# FK correctors


def fkc_bracket(eps: dict[str, torch.Tensor], betas: dict[str, float]) -> torch.Tensor:
    """``B = ‖Σ β_i ε_i‖² − Σ β_i ‖ε_i‖²`` per row, as ``(S − 1) Σ β_i‖ε_i‖² − ½ Σ_ij β_i β_j ‖ε_i − ε_j‖²``
    (``S = Σ β_i``; no cancellation for CFG, where it is ``w(w − 1)‖ε_c − ε_u‖²``), in float32 or better."""
    names = list(betas)
    e = {k: eps[k].flatten(1).double() if eps[k].dtype == torch.float64 else eps[k].flatten(1).float() for k in names}
    first = e[names[0]]
    B = torch.zeros(first.shape[0], device=first.device, dtype=first.dtype)
    S = sum(betas.values())
    if S != 1:
        B = B + (S - 1) * sum(betas[k] * e[k].square().sum(1) for k in names)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            B = B - betas[names[a]] * betas[names[b]] * (e[names[a]] - e[names[b]]).square().sum(1)
    return B


def fkc_increment(eps: dict[str, torch.Tensor], betas: dict[str, float], lam: float, lam_next: float
                  ) -> torch.Tensor:
    """FKC's log-weight increment over one step, left-point rule (the reference's): ``B·(1 − e^{−h})``.

    The weight of the target ``q_t ∝ Π_i p_{i,t}^{β_i}`` simulated with the reverse SDE driven by
    ``s̄ = Σ β_i s_i`` (full diffusion g²) is, up to particle-independent constants (Skreta et al., derived from
    the Fokker–Planck equations), ``d log w = (g²/2)(‖Σ β_i s_i‖² − Σ β_i ‖s_i‖²) dτ``. With ``s = −ε/σ`` and
    ``g² = −2σ² dλ/dt`` this is ``B dλ`` (:func:`fkc_bracket`). ``1 − e^{−h} = (σ̄ − σ̄_next)/σ̄`` (h =
    ``λ_next − λ``) is the measure of the reference's Euler rule ``−w(w−1)‖s_c − s_u‖² σ̄ dσ̄``
    (martaskrt/fkc-diffusion, edm_sampler_new) written for any path; it is finite on a last step to σ = 0.
    """
    h = lam_next - lam
    return fkc_bracket(eps, betas) * (1.0 if math.isinf(h) else -math.expm1(-h))


class _Experts(Guidance):
    """The Tweedie x̂0 of the combined score ``Σ β_i s_i``: ``ε̂ = Σ β_i ε̂_i``, ``x̂0 = (x − σ ε̂)/α = Σ β_i x̂0_i +
    (1 − Σβ) x/α`` (``Σ β_i x̂0_i`` alone is right only when Σβ = 1); records the ε of every branch at the first
    evaluation of each step for the FKC weights (in float32 or better)."""

    name = "fkc_experts"

    def __init__(self, betas: dict[str, float]):
        self.betas = betas
        self.eps: dict | None = None
        self._step = -1

    def reset(self):
        self.eps, self._step = None, -1

    def branches(self, ctx):
        return tuple(self.betas)

    def combine(self, preds, ctx):
        x0 = sum(b * preds[k] for k, b in self.betas.items())
        S = sum(self.betas.values())
        if S != 1:
            x0 = x0 + ((1 - S) / ctx.point.alpha) * ctx.x
        if ctx.step != self._step:
            self._step = ctx.step
            self.eps = {k: self._eps(preds[k], ctx) for k in self.betas}
        return x0

    @staticmethod
    def _eps(x0: torch.Tensor, ctx) -> torch.Tensor:
        """ε̂ of a branch in float32 or better, from the model's own output where there is one: the weights use
        differences ε̂_i − ε̂_j, which a half-precision x̂0 (rounded to its scale, not the difference's) loses at low
        noise, and which a half-precision ε̂ loses at high noise."""
        up = (lambda v: v) if ctx.x.dtype == torch.float64 else (lambda v: v.float())  # noqa: E731
        x, raw = up(ctx.x), ctx.raw.get(id(x0))
        x0 = up(x0) if raw is None else ctx.point.x0(up(raw), ctx.prediction, x)
        return ctx.point.eps(x, x0)


_FKC_SOLVERS = "ddpm, ddim(eta=1), euler_ancestral(eta=1), dpmpp_2m_sde(eta=1), dpmpp_3m_sde(eta=1)"


def _fkc_solver_ok(s) -> bool:
    if isinstance(s, DDPM):
        return True
    if isinstance(s, DDIM):
        return s.eta == 1 and not s.time_shift
    if isinstance(s, EulerAncestral):
        return s.eta == 1 and s.s_noise == 1
    if isinstance(s, (DPMpp2MSDE, DPMpp3MSDE)):
        return s.eta == 1 and s.s_noise == 1
    return False


def fkc(model, cond=None, uncond=None, guidance="cfg(scale=3)", particles: int = 8, solver="dpmpp_2m_sde",
        steps: int = 50, seed=None, reward=None, beta: float = 1.0, experts: dict | None = None,
        schedule="every", resampler: str = "systematic", rule: str = "trapezoid", output: str = "resample",
        n: int | None = None, negative=None, timesteps=None, shape=None, device=None, dtype=None) -> SMCResult:
    """Feynman–Kac correctors (Skreta, Akhound-Sadegh, Ohanesian, Bondesan, Aspuru-Guzik, Doucet, Brekelmans,
    Tong & Neklyudov 2025, "Feynman-Kac Correctors in Diffusion: Annealing, Guidance, and Product of Experts",
    arXiv 2503.02819).

    Samples ``q_0 ∝ Π_i p_i(x)^{β_i}`` by simulating the reverse SDE with the combined score ``Σ β_i s_i`` and
    weighting the particles by :func:`fkc_increment` at every step (and resampling): the CFG-tilted target
    ``p(x)^{1−w} p(x|c)^w`` for ``guidance="cfg(scale=w)"`` (β_u = 1 − w, β_c = w), geometric mixtures of
    experts with ``experts={"cond": β1, "negative": β2}`` and ``negative=`` a second conditioning (``guidance``
    is then ignored); ``beta`` multiplies every β (tempering, e.g. ``experts={"cond": 1}, beta=2`` for
    ``p(x|c)²``). Plain CFG's ODE or SDE samples neither target (reference notes D5). Exponents need not sum to 1
    (Σβ > 0): the combined score's x̂0 is ``Σ β_i x̂0_i + (1 − Σβ) x/α`` and the start, drawn from the loop's
    ``ρ_T = N(0, α² + σ²)``, is weighted by ``ρ_T^{Σβ−1}``, the ratio to ``q_T ∝ Π p_i,T^β_i`` where every p_i,T is
    close to ρ_T. The weights are those of the continuous-time SMC, consistent as K grows; at small K the estimates
    lean towards the unweighted SDE (tempering β = 2 on the exact testbed, each condition's weighted std: 0.26 with
    K = 8, 0.31 with 32, 0.344 with 256 and 1024, exact 0.354, the SDE alone 0.29; benchmarks/fkc_exact.py).
    The weights use ε̂ in float32 from the model's own output; an x0-predicting model in bfloat16 cannot resolve
    ε̂_c − ε̂_u at low noise (use float32 there).

    The weights assume the reverse SDE with the full diffusion, so only solvers that simulate it are allowed:
    ``ddpm``, ``ddim(eta=1)``, ``euler_ancestral(eta=1)``, ``dpmpp_2m_sde(eta=1)`` (default), ``dpmpp_3m_sde(eta=1)``;
    any path. The first-order ancestral steps (ddpm, ddim) are further from the SDE at a given step count than
    ``dpmpp_2m_sde`` (on the exact testbed at 100 steps ddpm leaves a visible bias, 2M-SDE does not).
    ``rule``: how ``∫ B dλ`` is taken over a step (:func:`fkc_bracket`, :func:`fkc_increment`): ``"trapezoid"``
    (default) averages B at the step's two ends, B of the new state being added at the next evaluation (a
    potential of the parent and the child; B = 0 at σ = 0 when Σβ = 1), each end weighted by ``1 − e^{−h}``;
    ``"left"`` is the reference's left-point rule exactly.
    Defaults from martaskrt/fkc-diffusion (edm_sampler_new, generate_images.sh): systematic resampling at
    every step, 8 particles per condition. Not reproduced: the reference centres each increment and clamps it to
    [−1, 1] (a stabiliser that biases the weights) and clips resampling weights at 1e−6. Cost: that of the
    guidance (CFG: 2 NFE per step per particle); the weights are free.
    """
    t0 = time.perf_counter()
    s_ = get_solver(solver)
    if not _fkc_solver_ok(s_):
        raise ValueError(f"fkc's weights assume the reverse SDE with the full diffusion; solver {s_!r} does not "
                         f"simulate it. Use one of: {_FKC_SOLVERS}")
    if experts is None:
        g = parse_guidance(guidance)
        if g is None:
            betas = {"cond": 1.0}
        elif (type(g) is CFG and g.modifier is None and g.schedule is None
              and (g.sigma_lo, g.sigma_hi) == (0.0, math.inf)):
            betas = {"cond": g.scale, "uncond": 1.0 - g.scale}
        else:
            raise ValueError(f"fkc corrects plain CFG towards p(x)^(1-w) p(x|c)^w; {g!r} is not plain cfg(scale=w) "
                             "(no modifier, schedule or interval). For other targets pass experts={branch: beta}")
    else:
        if not experts or any(k not in ("cond", "uncond", "negative") for k in experts):
            raise ValueError(f"experts must map some of 'cond', 'uncond', 'negative' to exponents, got {experts!r}")
        betas = {k: float(v) for k, v in experts.items()}
    betas = {k: beta * b for k, b in betas.items() if b != 0}
    S = sum(betas.values())
    if S <= 0:
        raise ValueError(f"fkc's exponents must sum to a positive number (the target Π p_i^β_i must be normalisable "
                         f"near pure noise), got {betas} summing to {S:g}")
    if rule not in ("trapezoid", "left"):
        raise ValueError(f"fkc rule must be 'trapezoid' or 'left', got {rule!r}")
    K = _particles(particles)
    s = _setup(model, cond, uncond, negative, seed, n, shape, device, dtype)
    guide = _Experts(betas)
    it = _sampler(model, s, K, guide, s_, steps, timesteps)
    eng = SMC(s.G, K, resampler, schedule, _group_gens(s, 1), it.x.device, it.x.dtype)
    pts = it.solver_state["pts"]
    if S != 1 and pts[0].alpha == 0:
        raise ValueError(f"fkc with exponents summing to {S:g} (not 1) needs a grid that starts below pure noise: at "
                         "α = 0 the combined score's x̂0 is undefined. Pass timesteps= starting at a finite σ̄, e.g. "
                         "steer.paths.karras(model.path, steps, sigma_max=80)")
    if S != 1:  # start from q_T ∝ Π p_i,T^β_i ≈ ρ_T^S, with ρ_T = N(0, α² + σ²) the loop's start: weight ρ_T^(S−1)
        z = it.x.flatten(1).double() if it.x.dtype == torch.float64 else it.x.flatten(1).float()
        eng.add(-(S - 1) * z.square().sum(1) / (2 * (pts[0].alpha ** 2 + pts[0].sigma ** 2)))
    f = [1.0 if math.isinf(q.lam - p.lam) else -math.expm1(-(q.lam - p.lam)) for p, q in zip(pts, pts[1:])]
    last = len(f) - 1
    for step in it:
        i, B = step.i, fkc_bracket(guide.eps, betas)
        if rule == "left":
            eng.add(B * f[i])
        else:  # B_i closes interval i − 1 and opens interval i; B = 0 at σ = 0 (Σβ = 1: ε_i − ε_j → 0)
            eng.add(B * 0.5 * ((f[i - 1] if i else 0.0) + f[i]))
        if i != last:
            eng.check(i, it)
    opts = dict(betas=betas, schedule=schedule, resampler=resampler, rule=rule, output=output, particles=K)
    return _finish(eng, it, s.G, K, None, output, "fkc", opts, t0)


# ---------------------------------------------------------------------------------------------------
# SVDD


class _Select(Guidance):
    """SVDD's selection inside the evaluation: of the M candidate rows of each particle, keep the one whose x̂0
    has the highest value (or one drawn from ``softmax(v/α)``) and hand its (x̂0, ε̂) to every row, so the
    ancestral solver step draws M fresh children of the chosen candidate."""

    name = "svdd_select"

    def __init__(self, inner: Guidance | None, reward, M: int, alpha: float, gens: list, K: int):
        self.inner, self.reward, self.M, self.alpha, self.gens, self.K = inner, reward, M, alpha, gens, K
        self.values: torch.Tensor | None = None

    def reset(self):
        if self.inner is not None:
            self.inner.reset()

    def prepare(self, device):
        if self.inner is not None:
            self.inner.prepare(device)

    def branch_specs(self):
        return self.inner.branch_specs() if self.inner is not None else {}

    def branches(self, ctx):
        return self.inner.branches(ctx) if self.inner is not None else ("cond",)

    def combine(self, preds, ctx: Ctx):
        d = self.inner.combine(preds, ctx) if self.inner is not None else preds["cond"]
        x0, eps = (d.x0, d.eps) if isinstance(d, Denoised) else (d, None)
        eps = ctx.point.eps(ctx.x, x0) if eps is None else eps
        v = _reward(self.reward, x0).reshape(-1, self.M)
        self.values = v
        if self.alpha == 0:
            pick = v.argmax(1)
        else:
            probs = torch.softmax(v.double().cpu() / self.alpha, 1)
            pick = torch.stack([torch.multinomial(p, 1, generator=self.gens[j // self.K])[0]
                                for j, p in enumerate(probs)]).to(v.device)
        rows = torch.arange(v.shape[0], device=v.device) * self.M + pick
        rows = rows.repeat_interleave(self.M)
        return Denoised(x0.index_select(0, rows), eps.index_select(0, rows))


def svdd(model, cond=None, uncond=None, guidance=None, particles: int = 1, solver="ddim(eta=1)", steps: int = 25,
         seed=None, reward: Callable | None = None, candidates: int = 20, alpha: float = 0.0,
         n: int | None = None, negative=None, timesteps=None, shape=None, device=None, dtype=None) -> SMCResult:
    """SVDD-PM, soft value-based decoding (Li, Zhao, Uehara et al. 2024, "Derivative-Free Guidance in Continuous
    and Discrete Diffusion Models with Soft Value-Based Decoding", arXiv 2408.08252).

    Per particle and step: draw M = ``candidates`` children ``x_{t−1}^{(m)} ~ p(·|x_t)`` of the current state,
    value each by the reward of its x̂0 (the posterior-mean value estimate, "PM"), keep
    ``x^{(ζ)}``, ``ζ ~ Categorical(softmax(v/α))``; α = 0 (default, the image code) is the argmax. Here the
    candidates are the rows of the loop: the evaluation of step i values the M candidates, and the selected
    one's (x̂0, ε̂) drives all M rows of the ancestral step, which therefore draws the M children of the next step
    (the reference recomputes the selected candidate's evaluation; we reuse it). Needs an ancestral solver whose
    step depends on x only through (x̂0, ε̂): ``ddim(eta>0)``, ``ddpm``, ``euler_ancestral``.

    Defaults: M = 20, α = 0, DDIM η = 1 (masa-ue/SVDD-image, sd_pipeline.py). ``particles`` runs that many
    independent chains per condition (``samples``: ``[G·K, ...]``). Cost: M NFE per step per chain (× the
    guidance's branches) and M reward calls per step.
    """
    t0 = time.perf_counter()
    s_ = _check_stochastic(solver, "svdd")
    if not (isinstance(s_, (DDIM, DDPM, EulerAncestral)) and not getattr(s_, "time_shift", False)):
        raise ValueError(f"svdd selects among candidates through the ancestral step's (x0, eps); solver {s_!r} "
                         "uses more than that: use ddim(eta=1), ddpm or euler_ancestral")
    M, K = _particles(candidates), _particles(particles)
    if alpha < 0:
        raise ValueError(f"svdd alpha must be >= 0 (0 = argmax), got {alpha}")
    s = _setup(model, cond, uncond, negative, seed, n, shape, device, dtype)
    start = _GroupNoise(_group_gens(s, 0), K)(torch.empty(s.G * K, *s.item_shape)).repeat_interleave(M, 0)
    sel = _Select(parse_guidance(guidance), reward, M, float(alpha), _group_gens(s, 1), K)
    it = _sampler(model, s, K * M, sel, s_, steps, timesteps, stream=3, noise=start)
    for _ in it:
        pass
    x = it.x[::M]
    r = _reward(reward, x)
    eng = SMC(s.G, K, "systematic", "every", None, x.device, x.dtype)
    res = SMCResult(x, normalize(eng.log_w), x.reshape(s.G, K, *x.shape[1:]), r.reshape(s.G, K),
                    eng.diagnostics(), it.nfe * it.x.shape[0], s.G, "svdd",
                    dict(candidates=M, alpha=alpha, particles=K), time.perf_counter() - t0)
    return res


# ---------------------------------------------------------------------------------------------------
# Search


def _run_noises(model, s: _Setup, noise, guidance, solver, steps, timesteps, stream, R):
    it = _sampler(model, s, R, guidance, solver, steps, timesteps, stream, noise=noise)
    for _ in it:
        pass
    return it.x, it.nfe * it.x.shape[0]


def best_of_n(model, cond=None, uncond=None, guidance=None, particles: int = 4, solver="dpmpp_2m",
              steps: int = 25, seed=None, reward: Callable | None = None, n: int | None = None, negative=None,
              timesteps=None, shape=None, device=None, dtype=None) -> SMCResult:
    """Best-of-N (random search in Ma et al. 2025, "Inference-Time Scaling for Diffusion Models beyond Scaling
    Denoising Steps", arXiv 2501.09732): sample N = ``particles`` initial noises per condition, run the full
    sampler on each, keep the one with the highest reward. A deterministic solver makes the noise determine the
    sample (the paper's setting). ``samples`` ``[G, ...]``; ``particles`` and ``rewards`` hold all N, and
    ``log_weights`` is 0 for the chosen one and −∞ elsewhere. Cost: N× the sampler's NFE + N reward calls.
    """
    t0 = time.perf_counter()
    N = _particles(particles)
    s = _setup(model, cond, uncond, negative, seed, n, shape, device, dtype)
    x, nfe = _run_noises(model, s, None, guidance, solver, steps, timesteps, 0, N)
    r = _reward(reward, x).reshape(s.G, N)
    best = r.argmax(1)
    parts = x.reshape(s.G, N, *x.shape[1:])
    log_w = torch.full((s.G, N), -math.inf, dtype=torch.float64)
    log_w[torch.arange(s.G), best.cpu()] = 0.0
    samples = parts[torch.arange(s.G, device=x.device), best]
    return SMCResult(samples, log_w, parts, r, _no_diag(s.G), nfe, s.G, "best_of_n", dict(particles=N),
                     time.perf_counter() - t0)


def _no_diag(G):
    return SMC(G, 1).diagnostics()


def _neighbours(pivot: torch.Tensor, count: int, cosine: float, gen: torch.Generator) -> torch.Tensor:
    """``count`` points at cosine ``cosine`` from ``pivot`` with its norm: ``‖n‖(c u + sqrt(1 − c²) w)``, ``w`` a
    random unit direction orthogonal to ``u = n/‖n‖``."""
    flat = pivot.reshape(-1).double().cpu()
    norm = flat.norm()
    u = flat / norm
    z = torch.randn(count, flat.numel(), generator=gen, dtype=torch.float64)
    w = z - (z @ u)[:, None] * u[None]
    w = w / w.norm(dim=1, keepdim=True)
    out = norm * (cosine * u[None] + math.sqrt(1 - cosine**2) * w)
    return out.reshape(count, *pivot.shape).float()


def noise_search(model, cond=None, uncond=None, guidance=None, kind: str = "random", budget: int = 8,
                 neighbors: int = 4, cosine: float = 0.95, solver="dpmpp_2m", steps: int = 25, seed=None,
                 reward: Callable | None = None, n: int | None = None, negative=None, timesteps=None, shape=None,
                 device=None, dtype=None) -> SMCResult:
    """Search over initial noises (Ma et al. 2025, "Inference-Time Scaling for Diffusion Models beyond Scaling
    Denoising Steps", arXiv 2501.09732). ``budget`` is the number of full sampling runs per condition.

    - ``kind="random"``: random search, i.e. best-of-N with N = ``budget``.
    - ``kind="zero_order"``: zero-order search. Round 0 samples ``neighbors`` random noises and takes the best as
      the pivot; every further round samples ``neighbors`` noises around the pivot and moves the pivot to the
      best of them if it beats the pivot (``budget // neighbors`` rounds in all). Neighbours keep the pivot's
      norm at cosine ``cosine`` to it, as in the sayakpaul/tt-scale-flux reproduction (4 neighbours, cosine
      0.95); the paper's own neighbourhood size was not published with code. Where that reproduction restarts
      from fresh noise after a round without improvement, we keep the pivot (the best so far is never lost).

    ``samples`` ``[G, ...]`` (the best found), ``rewards`` ``[G, 1]``; ``diagnostics["best_reward"]`` ``[rounds,
    G]``. Cost: ``budget``× the sampler's NFE (rounded down to whole rounds) + as many reward calls.
    """
    if kind == "random":
        return best_of_n(model, cond, uncond, guidance, budget, solver, steps, seed, reward, n, negative, timesteps,
                         shape, device, dtype)
    if kind != "zero_order":
        raise ValueError(f"noise_search kind must be 'random' or 'zero_order', got {kind!r}")
    if not 0 < cosine < 1:
        raise ValueError(f"cosine must lie in (0, 1), got {cosine}")
    t0 = time.perf_counter()
    m = _particles(neighbors)
    if budget < m:
        raise ValueError(f"budget {budget} is less than one round of {m} neighbours")
    s = _setup(model, cond, uncond, negative, seed, n, shape, device, dtype)
    gens = _group_gens(s, 5)
    pivot = torch.stack([torch.randn(m, *s.item_shape, generator=g) for g in gens]).flatten(0, 1)
    best_x = best_r = best_noise = None
    nfe, history = 0, []
    for rnd in range(budget // m):
        if rnd > 0:
            pivot = torch.cat([_neighbours(best_noise[g], m, cosine, gens[g]) for g in range(s.G)])
        x, used = _run_noises(model, s, pivot.to(s.device or "cpu", s.dtype or torch.float32), guidance, solver,
                              steps, timesteps, 6 + rnd, m)
        nfe += used
        r = _reward(reward, x).reshape(s.G, m)
        top = r.argmax(1)
        xs, ns = x.reshape(s.G, m, *x.shape[1:]), pivot.reshape(s.G, m, *pivot.shape[1:])
        cand_x, cand_r = xs[torch.arange(s.G, device=x.device), top], r.max(1).values
        cand_n = ns[torch.arange(s.G), top.cpu()]
        if best_r is None:
            best_x, best_r, best_noise = cand_x, cand_r, cand_n
        else:
            better = cand_r > best_r
            best_x = torch.where(better.reshape(-1, *[1] * (x.ndim - 1)), cand_x, best_x)
            best_noise = torch.where(better.cpu().reshape(-1, *[1] * (x.ndim - 1)), cand_n, best_noise)
            best_r = torch.where(better, cand_r, best_r)
        history.append(best_r.detach().cpu().double())
    diag = _no_diag(s.G)
    diag["best_reward"] = torch.stack(history)
    return SMCResult(best_x, torch.zeros(s.G, 1, dtype=torch.float64), best_x[:, None], best_r[:, None], diag, nfe,
                     s.G, "noise_search", dict(kind=kind, budget=budget, neighbors=m, cosine=cosine),
                     time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------
# One entry point


METHODS: dict[str, Callable] = {"fk_steering": fk_steering, "fkc": fkc, "svdd": svdd, "best_of_n": best_of_n,
                                "noise_search": noise_search}


def smc(model, cond=None, uncond=None, guidance=None, method: str = "fkc", particles: int | None = None,
        solver=None, steps: int | None = None, seed=None, reward: Callable | None = None, **options) -> SMCResult:
    """Run a particle method on ``model``: ``method`` is one of ``fk_steering``, ``fkc``, ``svdd``,
    ``best_of_n``, ``noise_search`` (their docstrings give the options, defaults and costs).

    ``particles`` is K per condition (SVDD: independent chains; best-of-N: N; noise search: use ``budget=``);
    ``solver`` and ``steps`` default to the method's, and so does ``guidance`` for ``fkc`` (``cfg(scale=3)``; for
    the conditional model alone, tempered or in a product, pass ``experts=`` instead). ``cond`` holds one row per
    condition (``n=`` conditions without one), ``seed`` an int or one int per condition (then each condition's
    result depends only on it).
    Returns an :class:`SMCResult` (``.samples``, ``.log_weights``, ``.particles``, ``.rewards``,
    ``.diagnostics``, ``.nfe``)::

        res = steer.smc(model, cond=labels, guidance="cfg(scale=3)", method="fkc", particles=8, steps=50, seed=0)
        res = steer.smc(model, cond=labels, method="fk_steering", reward=steer.rewards.digit_log_prob(3),
                        particles=8, lmbda=10, seed=0)
    """
    if method not in METHODS:
        raise ValueError(f"unknown particle method {method!r}; allowed: {', '.join(METHODS)}")
    kwargs = dict(options)
    if particles is not None:
        if method == "noise_search":
            raise ValueError("noise_search takes budget= (full sampling runs per condition), not particles=")
        kwargs["particles"] = particles
    for key, val in (("solver", solver), ("steps", steps), ("seed", seed)):
        if val is not None:
            kwargs[key] = val
    if reward is not None:
        if method == "fkc":
            raise ValueError("fkc takes no reward (its target is set by the guidance or experts)")
        kwargs["reward"] = reward
    if guidance is not None and method == "fkc" or method != "fkc":
        kwargs["guidance"] = guidance
    try:
        return METHODS[method](model, cond, uncond, **kwargs)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise ValueError(f"{method}: {e}") from None
        raise
