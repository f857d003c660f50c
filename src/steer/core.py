"""The vocabulary that solvers, guidance and the loop share.

- ``TimePoint``: a time on a path with its coefficients ``t, α, σ, σ̄ = σ/α, λ = log(α/σ), α̇, σ̇`` as Python floats,
  and the exact conversions between an x0 prediction and every other prediction kind at that point.
- ``Denoised``: what a denoiser call returns to a solver (the guided x̂0, optionally a separate re-noise estimate).
- ``Branch``: how the loop evaluates one branch of a guidance method.
- ``Ctx``: what a guidance method sees at one model evaluation.
- ``Modifier``: the base of the methods that change how a CFG term combines its two branches.
- ``take``: reorders or repeats the rows of a state (any nest of dicts, lists and tuples of batch-first tensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .prediction import KINDS

__all__ = ["TimePoint", "points", "Denoised", "Branch", "Ctx", "Modifier", "take", "NonFiniteError"]


class NonFiniteError(FloatingPointError):
    """A NaN or inf appeared while sampling; the message names who made it first."""


@dataclass(frozen=True, slots=True)
class TimePoint:
    """A time ``t`` on a path ``x_t = α x0 + σ ε`` with its coefficients (floats)."""

    t: float
    alpha: float
    sigma: float
    sigma_bar: float  # σ/α, the path-independent noise level (EDM's and k-diffusion's σ); inf where α = 0
    lam: float  # log(α/σ): −inf where α = 0, +inf where σ = 0
    d_alpha: float
    d_sigma: float

    def affine(self, kind: str) -> tuple[float, float]:
        """``(A, B)`` with ``y = A·x + B·x̂0`` for a prediction of ``kind`` at this point: ε = (x − α x̂0)/σ,
        v = α ε − σ x̂0, flow u = α̇ x̂0 + σ̇ ε, score = −ε/σ."""
        a, s, da, ds = self.alpha, self.sigma, self.d_alpha, self.d_sigma
        if kind == "x0":
            return 0.0, 1.0
        if kind == "eps":
            return 1 / s, -a / s
        if kind == "v":
            return a / s, -a * a / s - s
        if kind == "flow":
            return ds / s, da - ds * a / s
        if kind == "score":
            return -1 / s**2, a / s**2
        raise ValueError(f"unknown prediction kind {kind!r}; allowed: {', '.join(KINDS)}")

    def to(self, x0: torch.Tensor, kind: str, x: torch.Tensor) -> torch.Tensor:
        """The prediction of ``kind`` at ``(x, t)`` that corresponds to ``x0``."""
        if kind == "x0":
            return x0
        if kind == "eps":
            return self.eps(x, x0)
        A, B = self.affine(kind)
        return torch.add(x0 * B, x, alpha=A)

    def x0(self, y: torch.Tensor, kind: str, x: torch.Tensor) -> torch.Tensor:
        """x̂0 from a prediction ``y`` of ``kind`` at ``(x, t)`` (each in the form that stays finite in half
        precision: no ``x/σ`` intermediate)."""
        a, s, da, ds = self.alpha, self.sigma, self.d_alpha, self.d_sigma
        if kind == "x0":
            return y
        if kind == "eps":
            return torch.add(x, y, alpha=-s) / a
        if kind == "v":
            return torch.add(a * x, y, alpha=-s) / (a * a + s * s)
        if kind == "flow":  # rectified flow (σ̇ = 1, α σ̇ − σ α̇ = 1): x̂0 = x − t û, one operation
            out = torch.add(x if ds == 1 else ds * x, y, alpha=-s)
            den = ds * a - s * da
            return out if den == 1 else out / den
        if kind == "score":
            return torch.add(x, y, alpha=s * s) / a
        raise ValueError(f"unknown prediction kind {kind!r}; allowed: {', '.join(KINDS)}")

    def eps(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """ε̂ = (x − α x̂0)/σ."""
        return torch.add(x, x0, alpha=-self.alpha) / self.sigma


def points(path, ts) -> list[TimePoint]:
    """The time points of ``path`` at the times ``ts`` (computed in float64 on the CPU)."""
    ts = torch.as_tensor(ts, dtype=torch.float64).detach().cpu().reshape(-1)
    cols = [f(ts).tolist() for f in (path.alpha, path.sigma, path.d_alpha, path.d_sigma)]
    out = []
    for t, a, s, da, ds in zip(ts.tolist(), *cols):
        lam = math.inf if s == 0 else (-math.inf if a == 0 else math.log(a / s))
        out.append(TimePoint(t, a, s, math.inf if a == 0 else s / a, lam, da, ds))
    return out


@dataclass(slots=True)
class Denoised:
    """A denoiser's answer at ``(x, t)``: the (guided) x̂0 and, optionally, a separate noise estimate to re-noise
    with (CFG++: ε̂_u; None means ``(x − α x̂0)/σ``) and what multistep solvers remember instead of x̂0 (CFG++: D_u)."""

    x0: torch.Tensor
    eps: torch.Tensor | None = None
    x0_hist: torch.Tensor | None = None


@dataclass(frozen=True)
class Branch:
    """How the loop evaluates a branch: which conditioning, with which perturbation, through which model.

    ``grad=True`` evaluates the branch with autograd on, in its own forward pass, from an input that requires
    grad (``Ctx.inputs[name]``), at every evaluation; ``grad="first"`` only at the first evaluation of each solver
    step (``Ctx.first``; DPS, TFG), elsewhere without a graph like every other branch."""

    cond: str = "cond"
    perturbation: Any = None  # a steer.models.hooks.Perturbation
    model: Any = None  # None: the sampled model
    reference: str | None = None  # a branch whose rows the perturbation reads (NAG's negative), same batch
    grad: bool | str = False  # False, True or "first"


@dataclass
class Ctx:
    """What a guidance method sees at one model evaluation.

    ``state`` is the guidance state of this sampling call, keyed by the method object that owns an entry (APG's
    momentum, Adaptive Guidance's latch): batch-first tensors that ``take`` reindexes with the rest of the
    sampler state. ``evaluate({branch: x})`` runs extra evaluations (counted as NFEs). Gradient guidance reads
    ``conds`` (the target labels), ``grid`` and ``next`` (the time point the step ends at), ``noise`` and ``first``
    (whether this is the first evaluation of the solver step, at ``(x_i, grid[step])``), and may ``displace`` the
    state the step lands on."""

    x: torch.Tensor
    point: TimePoint
    step: int
    path: Any
    evaluate: Callable | None = None  # {branch: x} -> {branch: x0}
    prediction: str = "x0"  # the model's native output kind ("raw" space)
    raw: dict = field(default_factory=dict)  # id(x0 tensor) -> the raw model output it was converted from
    state: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)  # grad branches: name -> the input leaf that requires grad
    conds: dict = field(default_factory=dict)  # the conditionings: "cond", "uncond", "negative" (batch-first)
    grid: tuple = ()  # the sampling grid's time points; the current step runs from grid[step] to grid[step + 1]
    noise: Callable | None = None  # noise(like) draws standard normal noise with the sampler's per-item generators
    first: bool = True  # the first evaluation of the solver step (at x_i and grid[step]); later stages: False
    shift: torch.Tensor | None = None  # what ``displace`` collected at this evaluation

    def displace(self, delta: torch.Tensor) -> None:
        """Add ``delta`` to the state the current solver step lands on: the loop adds it after ``solver.step``
        (after a stochastic solver's noise): ``x_next = S(x) + Δ``. Only at the step's first evaluation."""
        if not self.first:
            raise RuntimeError("Ctx.displace: a displacement is computed once per step, at its first evaluation")
        self.shift = delta if self.shift is None else self.shift + delta

    @classmethod
    def at(cls, x: torch.Tensor, path, t: float, step: int = 0, evaluate: Callable | None = None,
           prediction: str = "x0") -> "Ctx":
        """The context at time ``t`` of ``path`` (for calling a guidance method by hand)."""
        return cls(x, points(path, [t])[0], step, path, evaluate, prediction)

    @property
    def sigma_bar(self) -> float:
        return self.point.sigma_bar

    @property
    def next(self) -> "TimePoint | None":
        """The time point the current solver step ends at (None without a grid)."""
        return self.grid[self.step + 1] if self.step + 1 < len(self.grid) else None

    def pred(self, preds: dict, name: str, space: str) -> torch.Tensor:
        """Branch ``name`` in ``space``: the model's own output when that is its native space, else converted."""
        kind = self.prediction if space == "raw" else space
        x0 = preds[name]
        if kind == self.prediction and id(x0) in self.raw:
            return self.raw[id(x0)]
        return self.to(x0, space)

    def space_at(self, space: str) -> str:
        """``space``, or x0 where it cannot represent x0: at α = 0 every ε (or score) prediction equals x/σ, so
        methods defined in ε space work in x0 space at that single point."""
        kind = self.prediction if space == "raw" else space
        return "x0" if self.point.alpha == 0 and kind in ("eps", "score") else space

    def affine(self, space: str) -> tuple[float, float]:
        return self.point.affine(self.prediction if space == "raw" else space)

    def to(self, x0: torch.Tensor, space: str) -> torch.Tensor:
        """Convert an x0 prediction at this point into ``space`` (x0, eps, v, flow, score or raw)."""
        return self.point.to(x0, self.prediction if space == "raw" else space, self.x)

    def x0(self, y: torch.Tensor, space: str) -> torch.Tensor:
        """Convert a prediction in ``space`` at this point back to x0."""
        return self.point.x0(y, self.prediction if space == "raw" else space, self.x)


class Modifier:
    """Changes how a CFG term combines its branches, in ``space``: ``guide(y_c, y_u, w, ctx)`` returns the guided
    prediction. A stateful modifier keeps its state in ``ctx.state[self]``."""

    space = "x0"
    name = "modifier"

    def guide(self, yc, yu, w, ctx: Ctx):
        raise NotImplementedError

    def options(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self):
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"


def take(state, index: torch.Tensor):
    """``state`` with the rows of every tensor chosen by ``index`` (repeats allowed); everything that is not a
    tensor (floats, strings, time points) is shared by all rows and passes through. Nests of dicts, lists and
    tuples are walked."""
    if isinstance(state, torch.Tensor):
        return state.index_select(0, index.to(state.device))
    if isinstance(state, dict):
        return {k: take(v, index) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(take(v, index) for v in state)
    return state
