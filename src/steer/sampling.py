"""The sampling loop: plan branches → one batched evaluation → combine → solver step (→ + gradient guidance's
displacement, computed at the step's first evaluation).

``sampler(...)`` is the open loop, an iterator over steps whose whole state (``x``, the solver's state, the guidance
state, the conditionings and per-item generators) can be read, replaced and reindexed between steps;
``sample(...)`` runs it to the end. The loop runs without autograd (only a branch that asks for gradients builds a
graph, and only for its own evaluation), on the device and in the dtype of the noise, draws noise per item when
seeded per item, and checks once per step that the state is finite, naming who made the first NaN or inf.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import cond as condlib
from .core import Branch, Ctx, Denoised, NonFiniteError, TimePoint, points, take
from .guidance import Guidance, parse as parse_guidance
from .models import hooks
from .solvers import Solver, get_solver

__all__ = ["sample", "sampler", "Sampler", "Step", "SampleResult", "NonFiniteError"]

CHECK_EVERY = 8  # steps between finite checks off CUDA


@dataclass(slots=True)
class Step:
    """One finished step of the open loop."""

    i: int
    t: float  # the time the step started from
    sigma: float  # σ̄ = σ/α there (k-diffusion's σ)
    x: torch.Tensor  # the state after the step
    x0: torch.Tensor  # the guided x̂0 the step used (its first evaluation)
    nfe: int  # network evaluations per sample so far

    @property
    def step(self) -> int:
        return self.i


StepInfo = Step


@dataclass
class SampleResult:
    x: torch.Tensor
    nfe: int  # network evaluations per sample (a CFG step counts 2)
    forward_passes: int  # batched model calls
    timesteps: torch.Tensor
    trajectory: list = field(default_factory=list)


def sample(model, noise: torch.Tensor | None = None, cond=None, uncond=None, guidance=None, negative=None,
           solver: "str | Solver" = "dpmpp_2m", steps: int = 25, timesteps=None, seed=None, generator=None,
           device=None, dtype=None, shape=None, progress: bool = False, callback: Callable | None = None,
           return_info: bool = False, keep_trajectory: bool = False):
    """Sample from ``model`` (a Denoiser) with optional guidance; the arguments are those of ``sampler``.

    ``callback(step)`` is called after every step with a ``Step``; when it returns a tensor, that tensor replaces
    the state. Returns the sample, or a ``SampleResult`` with NFE counts (and the states after every step with
    ``keep_trajectory=True``) when ``return_info=True``.
    """
    it = sampler(model, noise, cond, uncond, guidance, negative, solver, steps, timesteps, seed, generator, device,
                 dtype, shape, progress)
    traj = [it.x] if keep_trajectory else []
    for step in it:
        if callback is not None:
            new = callback(step)
            if isinstance(new, torch.Tensor):
                it.x = new
        if keep_trajectory:
            traj.append(it.x)
    return SampleResult(it.x, it.nfe, it.passes, it.timesteps, traj) if return_info else it.x


def sampler(model, noise: torch.Tensor | None = None, cond=None, uncond=None, guidance=None, negative=None,
            solver: "str | Solver" = "dpmpp_2m", steps: int = 25, timesteps=None, seed=None, generator=None,
            device=None, dtype=None, shape=None, progress: bool = False) -> "Sampler":
    """The open sampling loop: an iterator over the steps of sampling ``model`` (a Denoiser).

    ``noise`` is a standard normal draw (batch first); the loop starts from ``x = sqrt(α² + σ²)·noise`` at the
    first grid time (diffusers' ``init_noise_sigma``: 1 for VP and flow at t = 1, ``sqrt(σ_max² + 1)`` for EDM).
    Without ``noise`` it is drawn with ``shape`` (default: the batch of ``cond`` times ``model.sample_shape``).
    ``device`` and ``dtype`` default to the noise's, else the model's parameters', else the CPU and float32.
    Randomness (the noise and the noise of stochastic solvers): ``generator`` is a ``torch.Generator`` (one stream
    for the batch, as diffusers) or a list of one per item; ``seed`` an int (one CPU generator: the same numbers on
    every device) or a list of ints (one CPU generator per item). With one generator or seed per item, an item's
    sample does not depend on the batch it is in. Neither: torch's global generator.

    ``timesteps`` is an explicit decreasing list of t values that overrides ``steps``. ``guidance`` is ``None``
    (the conditional model alone), a spec string such as ``"cfg(scale=4)"`` or a guidance object; ``uncond`` is
    the unconditional (or negative) conditioning, default ``model.null_cond(cond)`` where the model has one;
    ``negative`` is a separate negative conditioning for methods that use three branches (``perp_neg``).

    Iterating yields a ``Step`` (``i, t, sigma, x, x0, nfe``) after each step. Between steps, ``it.x`` may be
    replaced and ``it.resample(index)`` reorders or repeats the rows of the whole state; after the loop ``it.x`` is
    the sample::

        it = steer.sampler(model, cond=labels, guidance="cfg(3)", steps=25, seed=0)
        for step in it:
            if step.i % 5 == 0:
                print(step.i, step.sigma, step.x0.std().item())
        x = it.x
    """
    return Sampler(model, noise, cond, uncond, guidance, negative, solver, steps, timesteps, seed, generator,
                   device, dtype, shape, progress)


class Sampler:
    """The state of one sampling call and the iterator over its steps (see ``sampler``)."""

    def __init__(self, model, noise, cond, uncond, guidance, negative, solver, steps, timesteps, seed, generator,
                 device, dtype, shape, progress):
        self.model, self.path = model, model.path
        self.solver = get_solver(solver)
        self.guide: Guidance | None = parse_guidance(guidance)
        self.timesteps = _grid(model, steps, timesteps)
        self.progress = progress
        noise, self.gens = _noise_and_generators(model, noise, cond, shape, seed, generator, device, dtype)
        batch = noise.shape[0]
        n_cond = condlib.batch_size(cond)
        if n_cond is not None and n_cond not in (1, batch):
            raise ValueError(f"cond has batch {n_cond} but noise has batch {batch}; they must match (or cond batch 1)")
        cond = condlib.expand(cond, batch)
        if self.guide is not None and uncond is None and hasattr(model, "null_cond"):
            uncond = model.null_cond(cond, batch)  # a method that needs it and finds none says so when it asks
        for name, c in (("uncond", uncond), ("negative", negative)):
            n = condlib.batch_size(c)
            if n is not None and n not in (1, batch):
                raise ValueError(f"{name} has batch {n} but noise has batch {batch}; they must match (or batch 1)")
        if self.guide is not None:
            self.guide.reset()
            self.guide.prepare(noise.device)
            if self.guide.needs_renoise and not self.solver.supports_renoise:
                raise ValueError(f"{self.guide!r} re-noises with its own estimate (CFG++'s ε̂_u), which solver "
                                 f"{self.solver.name!r} cannot use; use one of: ddim, ddpm, euler, euler_ancestral, "
                                 "dpmpp_2m")
            if self.guide.first_order_only and not (self.solver.order == 1 and self.solver.nfe_per_step == 1):
                raise ValueError(f"{self.guide!r} amplifies the tangential part of the sampler's update, which it "
                                 "reads from the guided x̂0 only for one-evaluation first-order solvers; solver "
                                 f"{self.solver.name!r} (order {self.solver.order}, {self.solver.nfe_per_step} "
                                 "evaluation(s) per step) combines several x̂0 into its update, so TAG there would not "
                                 "be the paper's method; use one of: euler, ddim, ddpm, euler_ancestral")
        conds = {"cond": cond, "uncond": condlib.expand(uncond, batch), "negative": condlib.expand(negative, batch)}
        self.solver_state = self.solver.init(self.path, self.timesteps)
        self.ev = _Evaluator(model, self.guide, self.path, conds, batch, self.solver_state["pts"])
        self.noise = self._draw
        self.recurrence = getattr(self.guide, "recurrence", 1) if self.guide is not None else 1
        self.ev.record("noise", noise)
        p0 = self.solver_state["pts"][0]
        self._x = noise * math.sqrt(p0.alpha**2 + p0.sigma**2)
        self.i = 0

    @property
    def nfe(self) -> int:
        return self.ev.nfe

    @property
    def passes(self) -> int:
        return self.ev.passes

    @property
    def x(self) -> torch.Tensor:
        """The state: the noise before the first step, the sample after the last."""
        return self._x

    @x.setter
    def x(self, value: torch.Tensor) -> None:
        if not isinstance(value, torch.Tensor) or value.shape != self._x.shape:
            raise ValueError(f"the new x must be a tensor of shape {tuple(self._x.shape)}, got "
                             f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
        self._x = value

    def __iter__(self):
        n = len(self.timesteps) - 1
        bar = _progress(n) if self.progress else None
        # Finite checks: on CUDA every step, read a step later (one wait per step, on the previous step only, so the
        # device never runs dry); elsewhere every CHECK_EVERY steps (the sum costs as much as a cheap model's step).
        # The records of unchecked steps are kept, so the error names the first source all the same.
        unchecked, queued, no_grad = [], [], torch.no_grad()
        try:
            while self.i < n:
                i, ev = self.i, self.ev
                ev.step, ev.first_x0 = i, None
                pts = self.solver_state["pts"]
                with no_grad:
                    x, state = self._x, self.solver_state
                    for r in range(self.recurrence):  # self-recurrence (UGD, TFG): re-noise back to t_i and repeat
                        if r:
                            x = _renoise(x, pts[i + 1], pts[i], self.noise)
                        ev.first = True
                        x, new_state = self.solver.step(i, x, state, ev.denoise, self.noise)
                        if ev.shift is not None:  # gradient guidance's displacement (Ctx.displace): S(x) + Δ
                            x, ev.shift = x + ev.shift, None
                    self.solver_state = new_state
                    ev.records.append(("solver", x))
                    unchecked.append((i, ev.records))
                    ev.records = []
                    last = i == n - 1
                    if last or x.is_cuda or len(unchecked) == CHECK_EVERY:
                        queued.append((_total(x), unchecked))
                        unchecked = []
                while queued and (last or len(queued) > x.is_cuda):
                    total, steps = queued.pop(0)
                    if not _finite(total):
                        _raise_first_nonfinite(steps)
                self._x, self.i = x, i + 1
                if bar is not None:
                    bar[0].update(bar[1], advance=1)
                p = self.solver_state["pts"][i]
                yield Step(i, p.t, p.sigma_bar, x, ev.first_x0, ev.nfe)
        finally:
            if bar is not None:
                bar[0].stop()

    @property
    def noise(self) -> Callable:
        """What draws the loop's fresh noise (stochastic solvers, re-noising, guidance): ``noise(like)`` returns
        standard normal noise shaped like ``like``; by default from the sampler's generators (per item when seeded
        per item). Assign another function to control the randomness (``steer.particles`` gives each condition's
        particles one stream)."""
        return self.ev.noise

    @noise.setter
    def noise(self, fn: Callable) -> None:
        if not callable(fn):
            raise ValueError(f"the sampler's noise must be a function like -> standard normal noise, got {fn!r}")
        self.ev.noise = fn

    def _draw(self, like: torch.Tensor) -> torch.Tensor:
        return _randn(like.shape, self.gens, like.device, like.dtype)

    def resample(self, index) -> None:
        """Reorder or repeat the rows of the whole sampler state by ``index`` (a 1-D integer tensor of row numbers,
        repeats allowed): ``x``, the solver's history, the guidance state, the conditionings and per-item
        generators. A repeated row's copies continue with independent random streams."""
        index = torch.as_tensor(index)
        if index.ndim != 1 or index.dtype.is_floating_point or index.dtype == torch.bool or len(index) == 0:
            raise ValueError(f"resample needs a non-empty 1-D integer tensor of row numbers, got {index.dtype} of "
                             f"shape {tuple(index.shape)}")
        rows = index.cpu()
        b = self._x.shape[0]
        if int(rows.min()) < 0 or int(rows.max()) >= b:
            raise ValueError(f"resample rows must lie in 0..{b - 1}, got {int(rows.min())}..{int(rows.max())}")
        index = index.to(self._x.device)
        self._x = take(self._x, index)
        self.solver_state = take(self.solver_state, index)
        ev = self.ev
        ev.gstate = take(ev.gstate, index)
        ev.conds = {k: condlib.take(c, index) for k, c in ev.conds.items()}
        ev.batch = len(index)
        if isinstance(self.gens, list):
            self.gens = _fork(self.gens, rows.tolist(), self.i)


class _Evaluator:
    """The loop's model evaluations: path coefficients per time, branches batched into one forward pass per
    network (perturbed branches on their own rows, steer.models.hooks; branches that need gradients in a pass of
    their own), conversion to x0, guidance, NFE counts, and the tensors to blame for a NaN."""

    def __init__(self, model, guide: Guidance | None, path, conds: dict, batch: int, grid_points: list):
        self.model, self.guide, self.path, self.conds, self.batch = model, guide, path, conds, batch
        self.nfe = self.passes = self.step = 0
        self.first_x0 = None
        self.first = True  # the next evaluation is the first of its solver step
        self.shift: torch.Tensor | None = None  # the step's displacement (Ctx.displace), added after solver.step
        self.gstate: dict = {}  # the guidance state (APG momentum, Adaptive latch), keyed by its owner
        self.raw: dict = {}  # id(x0 of a branch) -> the model output it came from (methods in the model's own space)
        self.inputs: dict = {}  # grad branches: name -> input leaf
        self.grid = tuple(grid_points)  # the solver's time points (Ctx.grid, Ctx.next)
        self.noise: Callable | None = None  # the sampler's noise (per-item generators)
        self.pts: dict[float, TimePoint] = {}
        for p in grid_points:
            self._check_point(p)
            self.pts[p.t] = p
        self.tvec: dict = {}
        self.records: list = []  # (who, tensor) made during the current step, in order
        self.specs = guide.branch_specs() if guide is not None else {}
        for name, spec in self.specs.items():
            if spec.model is not None and spec.model.path.name != path.name:
                raise ValueError(f"branch {name!r} uses a model on path {spec.model.path.name!r}; the sampled model "
                                 f"is on {path.name!r}: they must share the path")

    def record(self, who, tensor) -> None:
        self.records.append((who, tensor))

    def point(self, t: float) -> TimePoint:
        p = self.pts.get(t)
        if p is None:
            p = points(self.path, [t])[0]
            self._check_point(p)
            self.pts[t] = p
        return p

    def _check_point(self, p: TimePoint) -> None:
        if p.alpha == 0 and self.model.prediction in ("eps", "score"):
            raise NonFiniteError(f"cannot recover x0 from a {self.model.prediction!r} prediction at t={p.t:.6g} "
                                 "where alpha = 0: start the grid below t=1 or use a model predicting flow, v or x0")

    def _t(self, t: float, x: torch.Tensor) -> torch.Tensor:
        """t for a batch like x, in float32 (float64 for float64 states); the grid's times for a batch size are
        made in one operation the first time that batch size is seen."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        key = (x.shape[0], x.device, dtype)
        cache = self.tvec.get(key)
        if cache is None:
            ts = list(self.pts)
            rows = torch.tensor(ts, dtype=dtype)[:, None].repeat(1, x.shape[0]).to(x.device, non_blocking=True)
            cache = self.tvec[key] = dict(zip(ts, rows.unbind(0)))
        if t not in cache:
            cache[t] = torch.full((x.shape[0],), t, device=x.device, dtype=dtype)
        return cache[t]

    def _forward(self, net, xb, p: TimePoint, cb, names, rows=None, refs=None) -> torch.Tensor:
        if rows:
            with hooks.perturb(net, rows, refs):
                out = net(xb, self._t(p.t, xb), cb)
        else:
            out = net(xb, self._t(p.t, xb), cb)
        self.passes += 1
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model returned a {type(out).__name__}; a Denoiser must return one tensor shaped like "
                            "its input (a diffusers model: return model(...).sample or "
                            "model(..., return_dict=False)[0])")
        if out.shape != xb.shape:
            raise ValueError(f"model returned shape {tuple(out.shape)} for input {tuple(xb.shape)}; they must match")
        self.records.append((("model", self.step, p.sigma_bar, names), out.detach()))  # no graph kept past the step
        return out

    def evaluate(self, xs: dict[str, torch.Tensor], p: TimePoint, first: bool = False) -> dict[str, torch.Tensor]:
        """x0 predictions of the branches in ``xs`` (each with its own state), one forward pass per network;
        ``first``: this is the first evaluation of a solver step (``Branch(grad="first")`` runs with autograd)."""
        spec = lambda n: self.specs.get(n, Branch(n))  # noqa: E731
        groups: dict[tuple, list[str]] = {}
        for n in xs:
            if self.conds.get(spec(n).cond) is None and spec(n).cond != "cond":
                hint = " (this model has no null_cond)" if spec(n).cond == "uncond" else ""
                raise ValueError(f"{self.guide!r} needs the {spec(n).cond!r} conditioning: pass {spec(n).cond}= to "
                                 f"sample(){hint}")
            grad = spec(n).grad is True or (spec(n).grad == "first" and first)
            groups.setdefault((id(spec(n).model), grad), []).append(n)
        result: dict[str, torch.Tensor] = {}
        b = self.batch
        for (_, grad), names in groups.items():
            net, k = spec(names[0]).model or self.model, len(names)
            with torch.enable_grad() if grad else torch.no_grad():
                parts = [xs[n].detach().requires_grad_() if grad else xs[n] for n in names]
                if grad:
                    self.inputs.update(zip(names, parts))
                xb = parts[0] if k == 1 else torch.cat(parts)
                cb = (self.conds[spec(names[0]).cond] if k == 1
                      else condlib.cat([self.conds[spec(n).cond] for n in names]))
                rows = {(i * b, (i + 1) * b): spec(n).perturbation for i, n in enumerate(names) if spec(n).perturbation}
                refs = {(i * b, (i + 1) * b): (names.index(spec(n).reference) * b,
                                               (names.index(spec(n).reference) + 1) * b)
                        for i, n in enumerate(names) if spec(n).reference in names}
                out = self._forward(net, xb, p, cb, names, rows, refs)
                self.nfe += k
                x0 = p.x0(out, net.prediction, xb)
                for n, x0n, outn in zip(names, x0.chunk(k), out.chunk(k)):
                    result[n] = x0n
                    if net is self.model:
                        self.raw[id(x0n)] = outn
        return result

    def denoise(self, x: torch.Tensor, t: float) -> Denoised:
        """What a solver calls: the (guided) x0 at ``(x, t)``."""
        p = self.pts.get(t) or self.point(t)
        first, self.first = self.first, False
        if self.guide is None:  # fast path: one branch; an ε-model's own ε̂ is passed on (it is (x − α x̂0)/σ)
            out = self._forward(self.model, x, p, self.conds["cond"], ("cond",))
            self.nfe += 1
            d = Denoised(p.x0(out, self.model.prediction, x), out if self.model.prediction == "eps" else None)
        else:
            self.raw.clear()
            self.inputs.clear()
            ctx = Ctx(x, p, self.step, self.path, lambda xs: self.evaluate(xs, p, first), self.model.prediction,
                      self.raw, self.gstate, self.inputs, self.conds, self.grid, self.noise, first)
            names = self.guide.branches(ctx)
            preds = self.evaluate({n: x for n in names}, p, first) if names else {}
            with torch.enable_grad() if self.inputs else contextlib.nullcontext():  # a grad branch's graph goes on
                res = self.guide.combine(preds, ctx)
            self.raw.clear()  # the grad branch's graph is freed with the evaluation, not kept to the next one
            self.inputs.clear()
            d = res if isinstance(res, Denoised) else Denoised(res)
            d = Denoised(*(None if v is None else v.detach().to(x.dtype) for v in (d.x0, d.eps, d.x0_hist)))
            self.record(("guidance", self.step, p.sigma_bar), d.x0)
            if ctx.shift is not None:
                self.shift = ctx.shift.detach().to(x.dtype)
                self.record(("guidance", self.step, p.sigma_bar), self.shift)
        if self.first_x0 is None:
            self.first_x0 = d.x0
        return d


def _renoise(x: torch.Tensor, a: TimePoint, b: TimePoint, noise) -> torch.Tensor:
    """The forward kernel from level ``a`` back up to the noisier ``b``: ``x_b = (α_b/α_a) x_a + sqrt(σ_b² −
    (α_b/α_a)² σ_a²) z`` (reference notes D3; on VP it is ``sqrt(ā_b/ā_a) x_a + sqrt(1 − ā_b/ā_a) z``)."""
    r = b.alpha / a.alpha
    return r * x + math.sqrt(max(b.sigma**2 - (r * a.sigma) ** 2, 0.0)) * noise(x)


def _total(x: torch.Tensor):
    """The sum of a step's state, accumulated in float32 or better (no half-precision overflow): finite iff the state
    is (up to a float32 overflow of a finite sum, which the exact check in ``_raise_first_nonfinite`` clears).

    On CUDA it is copied to pinned host memory behind an event, so reading it a step later waits for that step
    only; ``float(tensor)`` would synchronise the whole stream, the step queued since included, and leave the device
    idle while the host prepares the next one."""
    total = x.sum(dtype=torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x.sum()
    if not total.is_cuda:
        return total
    host = torch.empty((), dtype=total.dtype, pin_memory=True)
    host.copy_(total, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _finite(total) -> bool:
    if isinstance(total, tuple):
        total[1].synchronize()
        total = total[0]
    return math.isfinite(total)


def _raise_first_nonfinite(steps: list) -> None:
    """A state's sum was not finite: blame the first record (in order of the steps) that is not."""
    for step, records in steps:
        for who, tensor in records:
            if not bool(torch.isfinite(tensor).all()):
                raise NonFiniteError(_blame(who, step))


def _blame(who, step: int) -> str:
    if who == "noise":
        return "the input noise contains NaN or inf"
    if who == "solver":
        return f"the solver update made NaN or inf at step {step} (the model outputs and the guidance were finite)"
    kind, i, sigma, *rest = who
    if kind == "model":
        return f"model returned NaN or inf at step {i} (sigma={sigma:.6g}) in branch(es) {', '.join(rest[0])}"
    return (f"the guidance made NaN or inf at step {i} (sigma={sigma:.6g}) from finite model outputs; "
            "check the method's options (in half precision, a method that overflows is a bug: please report it)")


def _grid(model, steps, timesteps) -> torch.Tensor:
    if timesteps is None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        return model.path.default_grid(steps)
    if isinstance(timesteps, torch.Tensor):  # on any device: the grid is host-side configuration
        grid = timesteps.detach().to("cpu", torch.float64).flatten()
    else:
        grid = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
    if len(grid) < 2:
        raise ValueError(f"timesteps needs at least 2 values (start … end), got {len(grid)}")
    if not torch.all(grid[1:] < grid[:-1]):
        raise ValueError("timesteps must be strictly decreasing t values from noise (t near 1) to data (t near 0)")
    if grid[0] > 1 or grid[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, 1], got {grid[0]:.4g} … {grid[-1]:.4g}")
    return grid


def _model_param(model):
    """The first parameter of the model (or of the network it wraps), or None."""
    for obj in (model, getattr(model, "net", None), getattr(model, "fn", None)):
        params = getattr(obj, "parameters", None)
        if callable(params):
            try:
                return next(iter(params()))
            except (StopIteration, TypeError):
                continue
    return None


def _noise_and_generators(model, noise, cond, shape, seed, generator, device, dtype):
    if seed is not None and generator is not None:
        raise ValueError("pass seed= or generator=, not both")
    if seed is not None:
        seeds = seed if isinstance(seed, (list, tuple)) else [seed]
        if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
            raise ValueError(f"seed must be an int or a list of ints (one per item), got {seed!r}")
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        generator = gens if isinstance(seed, (list, tuple)) else gens[0]
    if generator is not None:
        items = generator if isinstance(generator, (list, tuple)) else [generator]
        if not items or not all(isinstance(g, torch.Generator) for g in items):
            raise ValueError(f"generator must be a torch.Generator or a list of them (one per item), got {generator!r}")
        generator = list(generator) if isinstance(generator, (list, tuple)) else generator
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.float16, got {dtype!r}")
    param = _model_param(model)
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.ndim < 1:
            raise ValueError("noise must be a floating tensor with a batch dimension")
        noise = noise.to(device=device or noise.device, dtype=dtype or noise.dtype)
    else:
        if shape is None:
            item = getattr(model, "sample_shape", None)
            n = condlib.batch_size(cond)
            n = len(generator) if n is None and isinstance(generator, list) else n
            if item is None or n is None:
                raise ValueError("pass noise=, or shape= (or a cond with a batch and a model with sample_shape)")
            shape = (n, *item)
        device = (torch.device(device) if device is not None
                  else param.device if param is not None else torch.device("cpu"))
        if dtype is None:
            dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    batch = noise.shape[0] if noise is not None else shape[0]
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(f"{len(generator)} generators (or seeds) for a batch of {batch}: give one per item")
    if noise is None:
        noise = _randn(tuple(shape), generator, device, dtype)
    return noise, generator


def _randn(shape, gens, device, dtype) -> torch.Tensor:
    """Standard normal noise drawn in float32 (the same numbers for every dtype) from ``gens``: None (torch's
    global generator), one generator (one draw for the batch) or one per item (each item its own draw)."""
    if gens is None:
        z = torch.randn(shape, device=device, dtype=torch.float32)
    elif isinstance(gens, torch.Generator):
        z = torch.randn(shape, generator=gens, device=gens.device, dtype=torch.float32)
    else:
        z = torch.stack([torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in gens])
    return z.to(device=device, dtype=dtype, non_blocking=True)


def _fork(gens: list, rows: list[int], step: int) -> list:
    """Generators for the resampled rows: a row's first copy continues its stream; further copies get new streams
    seeded from (its initial seed, step, copy number), so duplicated particles diverge reproducibly."""
    seen: dict[int, int] = {}
    out = []
    for r in rows:
        k = seen.get(r, 0)
        seen[r] = k + 1
        if k == 0:
            g = torch.Generator(device=gens[r].device)
            g.set_state(gens[r].get_state())
        else:
            g = torch.Generator(device=gens[r].device)
            g.manual_seed(hash((gens[r].initial_seed(), step, k)) & (2**63 - 1))
        out.append(g)
    return out


def _progress(total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prog = Progress(TextColumn("sampling"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True)
    prog.start()
    return prog, prog.add_task("sampling", total=total)
