"""The sampling loop: plan branches → one batched evaluation → combine → solver step → callbacks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import cond as condlib
from .guidance import Branch, Ctx, Guidance, parse as parse_guidance
from .models import hooks
from .prediction import _x0
from .solvers import Denoised, Solver, get_solver

__all__ = ["sample", "SampleResult", "StepInfo", "NonFiniteError"]


class NonFiniteError(FloatingPointError):
    """The model returned NaN or inf."""


@dataclass
class StepInfo:
    step: int
    t: float
    sigma: float  # σ̄ = σ/α at the start of the step
    x: torch.Tensor  # the state after the step
    nfe: int


@dataclass
class SampleResult:
    x: torch.Tensor
    nfe: int  # network evaluations per sample (a CFG step counts 2)
    forward_passes: int  # batched model calls
    timesteps: torch.Tensor
    trajectory: list = field(default_factory=list)


def _grid(model, steps, timesteps) -> torch.Tensor:
    if timesteps is None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        return model.path.default_grid(steps)
    grid = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
    if len(grid) < 2:
        raise ValueError(f"timesteps needs at least 2 values (start … end), got {len(grid)}")
    if not torch.all(grid[1:] < grid[:-1]):
        raise ValueError("timesteps must be strictly decreasing t values from noise (t near 1) to data (t near 0)")
    if grid[0] > 1 or grid[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, 1], got {grid[0]:.4g} … {grid[-1]:.4g}")
    return grid


def sample(model, noise: torch.Tensor | None = None, cond=None, uncond=None, guidance=None, negative=None,
           solver: "str | Solver" = "dpmpp_2m", steps: int = 25, timesteps=None, seed: int | None = None,
           progress: bool = False, callback: Callable[[StepInfo], None] | None = None, shape=None,
           return_info: bool = False, keep_trajectory: bool = False):
    """Sample from ``model`` (a Denoiser) with optional guidance.

    ``noise`` is a standard normal draw (batch first); the loop starts from ``x = sqrt(α² + σ²)·noise`` at the
    first grid time (diffusers' ``init_noise_sigma``: 1 for VP and flow at t = 1, ``sqrt(σ_max² + 1)`` for EDM).
    Without ``noise``, it is drawn from ``seed`` with ``shape`` (default: the batch of ``cond`` times
    ``model.sample_shape``). ``timesteps`` is an explicit decreasing list of t values that overrides ``steps``;
    the result is the solver state at the last one. ``guidance`` is ``None`` (the conditional model alone), a
    spec string such as ``"cfg(scale=4)"`` or a guidance object; ``uncond`` is the unconditional (or
    negative) conditioning, default ``model.null_cond(cond)`` where the model has one; ``negative`` is a separate
    negative conditioning for methods that use three branches (``perp_neg``).

    Returns the sample, or a ``SampleResult`` with NFE counts when ``return_info=True``.
    """
    path = model.path
    solver = get_solver(solver)
    guide: Guidance | None = parse_guidance(guidance)
    grid = _grid(model, steps, timesteps)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=noise.device if noise is not None else "cpu").manual_seed(int(seed))

    if noise is None:
        if shape is None:
            item = getattr(model, "sample_shape", None)
            n = condlib.batch_size(cond)
            if item is None or n is None:
                raise ValueError("pass noise=, or shape= (or a cond with a batch and a model with sample_shape)")
            shape = (n, *item)
        noise = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
    batch = noise.shape[0]
    n_cond = condlib.batch_size(cond)
    if n_cond is not None and n_cond not in (1, batch):
        raise ValueError(f"cond has batch {n_cond} but noise has batch {batch}; they must match (or cond batch 1)")
    cond = condlib.expand(cond, batch)
    if guide is not None and uncond is None:
        if not hasattr(model, "null_cond"):
            raise ValueError(f"{guide!r} needs an unconditional branch: pass uncond= (this model has no null_cond)")
        uncond = model.null_cond(cond, batch)
    if guide is not None:
        guide.reset()
        if guide.needs_renoise and not solver.supports_renoise:
            raise ValueError(f"{guide!r} re-noises with its own estimate, which solver {solver.name!r} cannot use; "
                             "use one of: ddim, ddpm, euler, euler_ancestral, dpmpp_2m")
    conds = {"cond": cond, "uncond": condlib.expand(uncond, batch), "negative": condlib.expand(negative, batch)}
    ev = _Evaluator(model, guide, grid, conds, batch)

    def randn(like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=gen, dtype=like.dtype, device=like.device)

    x = noise * float(torch.sqrt(path.alpha(grid[0]) ** 2 + path.sigma(grid[0]) ** 2))
    solver.start(path, grid)
    traj = [x] if keep_trajectory else []
    bar = _progress(len(grid) - 1) if progress else None
    try:
        for i in range(len(grid) - 1):
            ev.step = i
            x = solver.step(i, x, ev.denoise, randn)
            if keep_trajectory:
                traj.append(x)
            if callback is not None:
                callback(StepInfo(i, float(grid[i]), float(path.sigma_ve(grid[i])), x, ev.nfe))
            if bar is not None:
                bar[0].update(bar[1], advance=1)
    finally:
        if bar is not None:
            bar[0].stop()
    return SampleResult(x, ev.nfe, ev.passes, grid, traj) if return_info else x


class _Evaluator:
    """The loop's model evaluations: path coefficients per time, branches batched into one forward pass per
    network (perturbed branches on their own rows, steer.models.hooks), conversion to x0, guidance, NFE counts."""

    def __init__(self, model, guide: Guidance | None, grid: torch.Tensor, conds: dict, batch: int):
        self.model, self.guide, self.conds, self.batch = model, guide, conds, batch
        self.path = model.path
        self.nfe = self.passes = self.step = 0
        self.raw: dict = {}  # id(x0 of a branch) -> the model output it came from (methods in the model's own space)
        self.coefs: dict[float, tuple] = {}  # t -> (α, σ, σ̄, α̇, σ̇) as floats; the grid's filled in one call
        p = self.path
        for t, a, s, da, ds in zip(grid.tolist(), *(f(grid).tolist() for f in (p.alpha, p.sigma, p.d_alpha, p.d_sigma))):
            if a > 0 or model.prediction not in ("eps", "score"):
                self.coefs[t] = (a, s, s / a if a else math.inf, da, ds)
        self.specs = guide.branch_specs() if guide is not None else {}
        for name, spec in self.specs.items():
            if spec.model is not None and spec.model.path.name != p.name:
                raise ValueError(f"branch {name!r} uses a model on path {spec.model.path.name!r}; the sampled model "
                                 f"is on {p.name!r}: they must share the path")

    def at(self, t: float) -> tuple:
        if t not in self.coefs:
            tt = torch.tensor(t, dtype=torch.float64)
            a, s = float(self.path.alpha(tt)), float(self.path.sigma(tt))
            if a == 0 and self.model.prediction in ("eps", "score"):
                raise NonFiniteError(f"cannot recover x0 from a {self.model.prediction!r} prediction at t={t:.6g} "
                                     "where alpha = 0: start the grid below t=1 or use a model predicting flow, v or x0")
            self.coefs[t] = (a, s, s / a if a else math.inf, float(self.path.d_alpha(tt)), float(self.path.d_sigma(tt)))
        return self.coefs[t]

    def _forward(self, net, xb, t: float, cb, rows=None, refs=None) -> torch.Tensor:
        tb = torch.full((xb.shape[0],), t, dtype=xb.dtype, device=xb.device)
        if rows:
            with hooks.perturb(net, rows, refs):
                out = net(xb, tb, cb)
        else:
            out = net(xb, tb, cb)
        self.passes += 1
        if out.shape != xb.shape:
            raise ValueError(f"model returned shape {tuple(out.shape)} for input {tuple(xb.shape)}; they must match")
        if not torch.isfinite(out.sum()) and not torch.isfinite(out).all():  # the sum is the cheap check
            raise NonFiniteError(f"model returned NaN or inf at step {self.step} (t={t:.6g}, sigma={self.at(t)[2]:.6g})")
        return out

    def evaluate(self, xs: dict[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
        """x0 predictions of the branches in ``xs`` (each with its own state), one forward pass per network."""
        a, s, _, da, ds = self.at(t)
        spec = lambda n: self.specs.get(n, Branch(n))  # noqa: E731
        groups: dict[int, list[str]] = {}
        for n in xs:
            if self.conds.get(spec(n).cond) is None and spec(n).cond != "cond":
                raise ValueError(f"{self.guide!r} needs the {spec(n).cond!r} conditioning: pass {spec(n).cond}= to sample()")
            groups.setdefault(id(spec(n).model), []).append(n)
        result: dict[str, torch.Tensor] = {}
        b = self.batch
        for names in groups.values():
            net, k = spec(names[0]).model or self.model, len(names)
            xb = xs[names[0]] if k == 1 else torch.cat([xs[n] for n in names])
            cb = self.conds[spec(names[0]).cond] if k == 1 else condlib.cat([self.conds[spec(n).cond] for n in names])
            rows = {(i * b, (i + 1) * b): spec(n).perturbation for i, n in enumerate(names) if spec(n).perturbation}
            refs = {(i * b, (i + 1) * b): (names.index(spec(n).reference) * b, (names.index(spec(n).reference) + 1) * b)
                    for i, n in enumerate(names) if spec(n).reference in names}
            out = self._forward(net, xb, t, cb, rows, refs)
            self.nfe += k
            x0 = _x0(out, net.prediction, xb, a, s, da, ds)
            for n, x0n, outn in zip(names, x0.chunk(k), out.chunk(k)):
                result[n] = x0n
                if net is self.model:
                    self.raw[id(x0n)] = outn
        return result

    def denoise(self, x: torch.Tensor, t: float) -> Denoised:
        """What a solver calls: the (guided) x0 at ``(x, t)``."""
        a, s, sigma, da, ds = self.at(t)
        if self.guide is None:  # fast path: one branch; an ε-model's own ε̂ is passed on (it is (x − α x̂0)/σ)
            out = self._forward(self.model, x, t, self.conds["cond"])
            self.nfe += 1
            return Denoised(_x0(out, self.model.prediction, x, a, s, da, ds), out if self.model.prediction == "eps" else None)
        self.raw.clear()
        ctx = Ctx(x, t, sigma, a, s, da, ds, self.step, self.path, lambda xs: self.evaluate(xs, t),
                  self.model.prediction, self.raw)
        names = self.guide.branches(ctx)
        res = self.guide.combine(self.evaluate({n: x for n in names}, t) if names else {}, ctx)
        return res if isinstance(res, Denoised) else Denoised(res)


def _progress(total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prog = Progress(TextColumn("sampling"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True)
    prog.start()
    return prog, prog.add_task("sampling", total=total)
