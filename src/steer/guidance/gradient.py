"""Gradient guidance: classifier guidance, DPS, universal guidance, TFG and FlowChef.

Each is a ``Corrector``: after the terms of a stack (``cfg(3) + classifier(2, classifier=...)``) it acts on the
guided prediction ``d = (x̂0, ε̂)`` at ``(x_t, t)``, with every solver. Two kinds of action, in the notation
``x_t = α x0 + σ ε``:

- a **score shift** by ``g`` (classifier guidance, universal guidance's forward step), at every evaluation:
  ``x̂0 += (σ²/α) g``, ``ε̂ −= σ g``, consistent with ``x_t`` (Dhariwal & Nichol's DDIM form, ``ε̂ − σ g``);
- a **state displacement** Δ (DPS, TFG, FlowChef), the papers' ``x_{i−1} = S(x_i) + Δ``: computed once per solver
  step, at its first evaluation (at ``x_i`` and the grid time ``t_i``, which is where the papers differentiate),
  and added by the loop to the state the step lands on (``Ctx.displace``), after a stochastic solver's noise. The
  solver takes its ordinary step with the unmodified prediction (clipped where the method clips), so a multi-stage
  step (heun, midpoint, restart, …) evaluates its later stages without a graph and without guidance, and the
  displacement does not enter a multistep solver's x̂0 history (dpmpp_2m/3m, unipc, deis extrapolate the denoiser's
  own predictions; the state they continue from carries Δ, and UniPC's corrector keeps it). On a DDIM-type step
  (ddim, ddpm, euler, euler_ancestral) this is the same as moving x̂0 by ``Δ/α_next`` with ε̂ held, the form the
  papers write. Nothing of it survives a step (``Sampler.resample`` has nothing to reindex).

Gradients through the denoiser come from the open loop's gradient branch: the conditional prediction is evaluated
with autograd on, from a leaf ``ctx.inputs["cond"]`` (one activation graph per evaluation, freed when the
evaluation ends; DPS and TFG build it at the first evaluation of a step only, universal guidance at every one;
every other branch has none). In a stack with CFG the gradient goes through the conditional
prediction alone (through the guided one it would need the unconditional branch's graph too); the conditional
branch then runs in a pass of its own, the unconditional one without a graph. Gradients of a loss on x̂0 alone
(classifier, FlowChef, TFG's and universal's x0 steps) need no graph of the network. Losses are per sample and
reduced in float32 or better; the gradient of their sum is each sample's own gradient (no batch-coupled norms,
unlike the DPS reference code).

Objectives: ``operator=`` and ``y=`` (``steer.operators``, or its spec string; y a tensor, batch-first or
broadcastable, or a nested list, which a spec string can hold) give the measurement residual ``r = y − A(x̂0)``;
one measurement per row is part of the sampler's state (``resample`` takes it along); ``loss=`` is any callable
``x0 -> [B]`` per-sample loss (lower is better).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .. import operators as ops
from ..core import Branch, Ctx, Denoised
from .core import Corrector, check_choice, register

__all__ = ["Classifier", "DPS", "Universal", "TFG", "FlowChef", "classifier", "dps", "universal", "tfg", "flowchef",
           "score_shift"]


def _sum(v: torch.Tensor) -> torch.Tensor:
    """Per-sample sum over the non-batch dimensions, in float32 or better ([B])."""
    v = v.float() if v.dtype in (torch.float16, torch.bfloat16) else v
    return v.flatten(1).sum(1)


def _sq(v: torch.Tensor) -> torch.Tensor:
    return _sum(v * v)


def score_shift(d: Denoised, g: torch.Tensor, ctx: Ctx) -> Denoised:
    """``d`` guided by the score ``g`` added to ``∇ log p_t``: ``x̂0 + (σ²/α) g``, ``ε̂ − σ g``. At α = 0 (pure
    noise) x̂0 cannot move (its coefficient is infinite): the prediction passes unchanged."""
    a, s = ctx.point.alpha, ctx.point.sigma
    if a == 0:
        return d
    g = g.to(d.x0.dtype)
    return Denoised(d.x0 + (s * s / a) * g, None if d.eps is None else d.eps - s * g, d.x0_hist)


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().requires_grad_()


def _grad(total: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(total, leaf, retain_graph=True)
    return g


def _objective(method: str, loss, operator, y):
    """``(loss, A, y)``: a per-sample loss callable, or an operator with its measurement; one of the two."""
    operator = ops.parse(operator)
    if loss is not None:
        if operator is not None or y is not None:
            raise ValueError(f"{method}: give loss= or operator= with y=, not both")
        if not callable(loss):
            raise ValueError(f"{method}: loss must be a function x0 -> per-sample loss [B], got {loss!r}")
        return loss, None, None
    if operator is None or y is None:
        raise ValueError(f"{method} needs operator= (e.g. steer.operators.Downsample(2) or 'downsample(2)') and y= "
                         f"(the measurement tensor), or loss= (a function x0 -> per-sample loss)")
    if not callable(operator):
        raise ValueError(f"{method}: operator must be callable, got {operator!r}")
    if isinstance(y, (list, tuple)):  # a literal in a spec string
        y = torch.tensor(y, dtype=torch.float32)
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{method}: y must be the measurement tensor (batch-first), got {type(y).__name__}")
    return None, operator, y


def _residual(operator, y: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    ax = operator(x0)
    return y.to(device=ax.device, dtype=ax.dtype) - ax


def _measurement(g, ctx: Ctx, x0: torch.Tensor) -> torch.Tensor | None:
    """``g.y`` with one row per sample, kept in the guidance state (``ctx.state``), so that resampling the sampler's
    rows takes each row's measurement along; None with ``loss=``."""
    if g.y is None:
        return None
    y = ctx.state.get((g, "y"))
    if y is None:
        shape = g.operator(x0.detach()).shape
        try:
            y = torch.broadcast_to(g.y.to(x0.device), shape)
        except RuntimeError:
            raise ValueError(f"{g.name}: y of shape {tuple(g.y.shape)} does not match the operator's output "
                             f"{tuple(shape)} for a batch of {shape[0]}: give one row per sample or a broadcastable "
                             "measurement") from None
        ctx.state[(g, "y")] = y
    return y


def _shown(operator):
    """An operator as its spec string (which ``steer.operators.parse`` reads back), else the object."""
    return repr(operator) if isinstance(operator, ops.Operator) else operator


def _clip(x0: torch.Tensor, clip: bool) -> torch.Tensor:
    return x0.clamp(-1, 1) if clip else x0


def _need_next(method: str, ctx: Ctx):
    if ctx.next is None:
        raise ValueError(f"{method} needs the time point its step ends at: call it from steer.sample / "
                         "steer.sampler (or give Ctx a grid)")
    return ctx.next


# ---------------------------------------------------------------------------------------------------


class Classifier(Corrector):
    """Classifier guidance (Dhariwal & Nichol 2021, Diffusion Models Beat GANs on Image Synthesis, arXiv 2105.05233).

    ``∇ log p_t(x) += s ∇_{x_t} log p_φ(c | x_t, t)``: a score shift (``ε̂ − σ s g``, the paper's Algorithm 2 on
    every path; ``x̂0 + (σ²/α) s g``). Space: x_t. The classifier is noise-aware: ``classifier(x_t, t, path)``
    returns logits (or log-probabilities) ``[B, C]`` with ``t`` the loop's time (a float) and ``path`` the model's
    path, e.g. ``GaussianMixture.classifier_log_probs`` (exact) or ``"digits"`` (the shipped noise-conditional digit
    classifier). The target class is ``label`` or else the ``cond`` labels of the call. ``unconditional=True``
    guides the unconditional prediction (the paper's unconditional ImageNet model), alone only.
    Cost: 1 NFE plus 1 classifier forward and backward (no backward through the denoiser); the gradient is taken
    in float32. Default s = 1.0: the reference script's classifier_scale (ImageNet 64/256 conditional models;
    the unconditional 256 model uses 10). With s = 1 and the exact classifier on the unconditional model, the
    sampled distribution is the exact ``p(x0 | c)``.
    """

    name = "classifier"

    def __init__(self, scale: float = 1.0, classifier: Callable | str | None = None, label: int | None = None,
                 unconditional: bool = False):
        if classifier is None:
            raise ValueError("classifier guidance needs classifier=, a function (x_t, t, path) -> logits [B, C] "
                             "(e.g. gmm.classifier_log_probs), or 'digits' for the shipped noise-conditional digit "
                             "classifier")
        self.classifier_name = classifier if isinstance(classifier, str) else None
        if isinstance(classifier, str):
            if classifier != "digits":
                raise ValueError(f"classifier: unknown classifier name {classifier!r}; allowed: 'digits' (or pass a "
                                 "function)")
            from ..testbeds import digits

            classifier = digits.load("noisy-classifier")
        if not callable(classifier):
            raise ValueError(f"classifier: classifier must be callable (x_t, t, path) -> logits, got {classifier!r}")
        self.scale, self.classifier, self.label, self.unconditional = float(scale), classifier, label, unconditional
        self.base = "uncond" if unconditional else "cond"

    def prepare(self, device):
        if self.classifier_name is not None and hasattr(self.classifier, "to"):
            self.classifier = self.classifier.to(device)

    def labels(self, ctx: Ctx, batch: int, device) -> torch.Tensor:
        if self.label is not None:
            return torch.full((batch,), self.label, dtype=torch.long, device=device)
        cond = ctx.conds.get("cond")
        if not isinstance(cond, torch.Tensor) or cond.is_floating_point() and not torch.equal(cond, cond.round()):
            raise ValueError("classifier guidance reads the target class from cond= (integer labels [B]) or label=; "
                             f"got cond={type(cond).__name__}")
        return cond.reshape(-1).long().to(device).expand(batch)

    def gradient(self, ctx: Ctx) -> torch.Tensor:
        """``∇_{x_t} log p(c | x_t)`` per sample (float32 or better)."""
        with torch.enable_grad():
            x = _leaf(ctx.x.float() if ctx.x.dtype in (torch.float16, torch.bfloat16) else ctx.x)
            logits = self.classifier(x, ctx.point.t, ctx.path)
            logp = torch.log_softmax(logits.float() if logits.dtype != torch.float64 else logits, dim=1)
            y = self.labels(ctx, x.shape[0], logp.device)
            return _grad(logp.gather(1, y[:, None]).sum(), x)

    def correct(self, d, preds, ctx):
        if self.scale == 0 or ctx.point.alpha == 0:  # at α = 0, p(c | x_t) is the prior: zero gradient
            return d
        return score_shift(d, self.scale * self.gradient(ctx), ctx)

    def options(self):
        return {"scale": self.scale, "classifier": self.classifier_name or self.classifier, "label": self.label,
                "unconditional": self.unconditional}


class _NetworkGradient(Corrector):
    """A corrector that differentiates through the conditional prediction (its branch runs with autograd on, at
    every evaluation, or with ``grad = "first"`` at the first evaluation of each solver step)."""

    grad: bool | str = True

    def branch_specs(self):
        return {"cond": Branch("cond", grad=self.grad)}

    def x0_graph(self, preds, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditional x̂0 with its graph, and the leaf x_t it was computed from."""
        leaf = ctx.inputs.get("cond")
        if leaf is None or not preds["cond"].requires_grad:
            raise RuntimeError(f"{self.name}: the conditional branch carries no graph; sample through steer.sample / "
                               "steer.sampler, which evaluates it with autograd on")
        return preds["cond"], leaf


class DPS(_NetworkGradient):
    """DPS: diffusion posterior sampling (Chung et al., ICLR 2023, Diffusion Posterior Sampling for General Noisy
    Inverse Problems, arXiv 2209.14687).

    ``x_{i−1} = S(x_i, x̂0) − ζ ∇_{x_i} ‖y − A(x̂0(x_i))‖`` with S the sampler's step (the paper's ancestral DDPM
    step; any solver here) and the norm **per sample** (the reference code takes one norm of the whole batch's
    residual, which couples the samples of a batch: a recorded deviation). The reference's ζ multiplies the gradient
    of the unsquared norm; the paper's ``ζ'/‖r‖ · ∇‖r‖²`` is the same with ζ = 2ζ'. Space: x_t, through the
    denoiser (a VJP). The displacement ``−ζ g`` is computed at the step's first evaluation (x_i, t_i) and added to
    the state the step lands on, after the noise (see the module docstring); S steps with the unmodified x̂0, which
    is also what a multistep solver keeps in its history. ``clip=True`` clamps x̂0 to [−1, 1] for the step (every
    evaluation) and the loss (the reference's clip_denoised for images). Cost: 1 VJP per step (not per
    evaluation) on top of the solver's NFE; one activation graph per step.
    Defaults: ζ = 1.0 (the reference configs: 0.3 for super-resolution and deblurring, 0.5 for random inpainting,
    1.0 for phase retrieval, all at 1000 DDPM steps; fewer steps need larger ζ).
    """

    name = "dps"

    def __init__(self, zeta: float = 1.0, operator=None, y: torch.Tensor | list | None = None, clip: bool = False):
        _, self.operator, self.y = _objective("dps", None, operator, y)
        self.zeta, self.clip = float(zeta), clip
        self.grad = "first" if self.zeta else False  # ζ = 0: no gradient, no graph

    def correct(self, d, preds, ctx):
        d = Denoised(_clip(d.x0, self.clip), d.eps, d.x0_hist)
        if self.zeta == 0 or not ctx.first:
            return d
        x0, leaf = self.x0_graph(preds, ctx)
        r = _residual(self.operator, _measurement(self, ctx, x0), _clip(x0, self.clip))
        norm = torch.linalg.vector_norm(r.float().flatten(1) if r.dtype != torch.float64 else r.flatten(1), dim=1)
        ctx.displace(-self.zeta * _grad(norm.sum(), leaf))
        return d

    def options(self):
        return {"zeta": self.zeta, "operator": _shown(self.operator), "clip": self.clip}


class Universal(_NetworkGradient):
    """Universal guidance (Bansal et al. 2023, Universal Guidance for Diffusion Models, arXiv 2302.07121).

    Forward guidance: ``ε̂ += s σ ∇_{x_t} ℓ(x̂0(x_t))`` (the paper's ``s(t) = s·sqrt(1 − ᾱ_t)`` on VP; a score shift
    by ``−s ∇ℓ``, through the denoiser). Backward guidance (``backward_steps`` = m > 0): m Adam steps (``lr``) on
    ``ℓ(x̂0 + Δ)`` from the forward-guided x̂0, each sample stopping once its loss is below ``cutoff``; ε̂ is then
    re-derived from the new x̂0 (the paper's ``ε̃ = ε̂ − sqrt(ᾱ/(1−ᾱ)) Δ``). Self-recurrence: each step is taken
    ``recurrence`` = k times, re-noised back to t in between with the one-step forward kernel. ``clip=True`` clamps
    x̂0 to [−1, 1] in the backward steps (the reference, images). Space: x_t (forward), x0 (backward).
    Cost per step: k × (1 NFE + 1 VJP + m loss forward/backward); one activation graph at a time.
    Defaults: s = 5, k = 5 (README, ImageNet CLIP guidance); m = 0 (backward guidance off; the ImageNet scripts use
    m = 1 with Adam lr = 1e−3 when on), cutoff 1e−5 (reference loss_cutoff).
    """

    name = "universal"

    def __init__(self, forward_scale: float = 5.0, backward_steps: int = 0, recurrence: int = 5, loss=None,
                 operator=None, y: torch.Tensor | list | None = None, lr: float = 1e-3, cutoff: float = 1e-5,
                 clip: bool = False):
        if backward_steps < 0 or recurrence < 1:
            raise ValueError(f"universal: backward_steps must be >= 0 and recurrence >= 1, got {backward_steps}, "
                             f"{recurrence}")
        self.loss, self.operator, self.y = _objective("universal", loss, operator, y)
        self.forward_scale, self.backward_steps, self.recurrence = float(forward_scale), backward_steps, recurrence
        self.grad = bool(self.forward_scale)  # only forward guidance differentiates through the network
        self.lr, self.cutoff, self.clip = float(lr), float(cutoff), clip

    def losses(self, x0: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.loss is not None:
            return self.loss(x0)
        return _sq(_residual(self.operator, y, x0))

    def correct(self, d, preds, ctx):
        y = _measurement(self, ctx, d.x0)
        if self.forward_scale != 0 and ctx.point.alpha != 0:
            x0, leaf = self.x0_graph(preds, ctx)
            d = score_shift(d, -self.forward_scale * _grad(self.losses(x0, y).sum(), leaf), ctx)
        if self.backward_steps:
            d = Denoised(self.backward(d.x0.detach(), y), None, d.x0_hist)
        return d

    def backward(self, x0: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Adam (β = 0.9, 0.999, ε = 1e−8, as torch.optim.Adam) on ``ℓ(x0)``, elementwise, so per sample; a sample
        whose loss is below ``cutoff`` keeps its value for that iteration (its moments still update, as in the
        reference, which reverts the sample after the optimiser's step)."""
        dtype = x0.dtype
        z = x0.float() if dtype in (torch.float16, torch.bfloat16) else x0  # Adam's v = grad² underflows in half
        m, v = torch.zeros_like(z), torch.zeros_like(z)
        for k in range(1, self.backward_steps + 1):
            z = _clip(z, self.clip)
            with torch.enable_grad():
                leaf = _leaf(z)
                loss = self.losses(leaf, y)
                grad = _grad(loss.sum(), leaf)
            active = (loss.detach() >= self.cutoff).view(-1, *[1] * (z.ndim - 1))
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad * grad
            step = self.lr * (m / (1 - 0.9**k)) / ((v / (1 - 0.999**k)).sqrt() + 1e-8)
            z = torch.where(active, z - step, z)
        return _clip(z, self.clip).to(dtype)

    def options(self):
        return {"forward_scale": self.forward_scale, "backward_steps": self.backward_steps,
                "recurrence": self.recurrence, "loss": self.loss, "operator": _shown(self.operator), "lr": self.lr,
                "clip": self.clip}


def _schedule_weights(grid, kind: str) -> list[float]:
    """TFG's step-size weights over the grid's steps: ``a_t = ᾱ_t/ᾱ_{t−1} = (α_t/α_next)²`` ("increase"),
    ``1 − a_t`` ("decrease") or 1 ("constant"), normalised to mean 1 over the steps."""
    a = [(p.alpha / q.alpha) ** 2 if q.alpha > 0 else 0.0 for p, q in zip(grid[:-1], grid[1:])]
    w = {"increase": a, "decrease": [1 - v for v in a], "constant": [1.0] * len(a)}[kind]
    total = sum(w)
    return [v * len(w) / total if total > 0 else 0.0 for v in w]


class TFG(_NetworkGradient):
    """TFG: Training-Free Guidance (Ye et al., NeurIPS 2024, TFG: Unified Training-Free Guidance for Diffusion Models,
    arXiv 2409.15761).

    With the smoothed objective ``L̃(x0) = log (1/n) Σ_i f(x0 + γ_t δ_i)`` (log f = −loss; n = ``n_mc`` noises
    ``δ_i`` drawn once per step, ``γ_t = γ sqrt(1 − ᾱ_t)``, generally ``γ σ/sqrt(α² + σ²)``), one step at t:
    mean guidance ``Δ_t = ρ_t ∇_{x_t} L̃(x̂0(x_t))`` (through the denoiser), variance guidance ``Δ_0`` from
    ``iterations`` steps ``Δ_0 += μ_t ∇_{x0} L̃(x̂0 + Δ_0)`` (no network), and
    ``x_{t−1} = DDIM(x_t, x̂0) + Δ_t/sqrt(a_t) + sqrt(ᾱ_{t−1}) Δ_0``; with any solver S here,
    ``x_next = S(x_t, x̂0) + α_next (Δ_t/α_t + Δ_0)`` (exactly the paper's terms on VP, ``α_next/α_t = 1/sqrt(a_t)``),
    the displacement computed at the step's first evaluation and added to the state the step lands on (see the
    module docstring; S steps with the clipped, unmoved x̂0). ``recurrence`` repeats each step, re-noised in
    between, each repeat with its own displacement. ``ρ_t, μ_t`` follow ``schedule`` ("increase": ∝ a_t; mean 1
    over the grid's steps). ``clip=True`` (the reference default) clamps x̂0 to [−1, 1] (every evaluation). Space:
    x_t (mean) and x0 (variance). Cost per step: recurrence × (the solver's NFE + 1 VJP + n f-evaluations +
    iterations × n f forward/backward); one activation graph.
    Defaults: ρ = 1, μ = 1, γ = 0.01, n = 4, recurrence = 1, iterations = 1, clip = True (utils/configs.py).
    """

    name = "tfg"

    def __init__(self, rho: float = 1.0, mu: float = 1.0, gamma: float = 0.01, recurrence: int = 1,
                 iterations: int = 1, loss=None, operator=None, y: torch.Tensor | list | None = None, n_mc: int = 4,
                 schedule: str = "increase", clip: bool = True):
        check_choice("tfg", "schedule", schedule, ("increase", "decrease", "constant"))
        if recurrence < 1 or iterations < 0 or n_mc < 1 or gamma < 0:
            raise ValueError(f"tfg: recurrence >= 1, iterations >= 0, n_mc >= 1 and gamma >= 0 are required, got "
                             f"{recurrence}, {iterations}, {n_mc}, {gamma}")
        self.loss, self.operator, self.y = _objective("tfg", loss, operator, y)
        self.rho, self.mu, self.gamma = float(rho), float(mu), float(gamma)
        self.grad = "first" if self.rho else False  # only mean guidance differentiates through the network
        self.recurrence, self.iterations, self.n_mc, self.schedule, self.clip = (recurrence, iterations, n_mc,
                                                                                  schedule, clip)
        self._weights: tuple | None = None

    def log_f(self, x0: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.loss is not None:
            return -self.loss(x0)
        return -_sq(_residual(self.operator, y, x0))

    def smoothed(self, x0: torch.Tensor, delta: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor:
        """``L̃(x0)`` per sample: the log-mean-exp of log f over the n perturbed copies."""
        if delta is None:
            return self.log_f(x0, y)
        lf = torch.stack([self.log_f(x0 + d, y) for d in delta])
        return torch.logsumexp(lf, dim=0) - math.log(len(delta))

    def steps(self, ctx: Ctx) -> tuple[float, float]:
        key = (id(ctx.grid), len(ctx.grid))
        if self._weights is None or self._weights[0] != key:
            w = _schedule_weights(ctx.grid, self.schedule)
            self._weights = (key, w)
        w = self._weights[1][ctx.step]
        return self.rho * w, self.mu * w

    def correct(self, d, preds, ctx):
        q = _need_next("tfg", ctx)
        x0c = _clip(d.x0, self.clip)
        d = Denoised(x0c, d.eps, d.x0_hist)
        if not ctx.first:
            return d
        rho, mu = self.steps(ctx)
        y = _measurement(self, ctx, x0c)
        p = ctx.point
        gamma = self.gamma * p.sigma / math.hypot(p.alpha, p.sigma)
        delta = None
        if gamma > 0:
            draw = ctx.noise or torch.randn_like
            delta = gamma * torch.stack([draw(x0c) for _ in range(self.n_mc)])
        dx0 = torch.zeros_like(x0c)
        if rho != 0 and p.alpha != 0:
            x0g, leaf = self.x0_graph(preds, ctx)
            dx0 = dx0 + (rho / p.alpha) * _grad(self.smoothed(_clip(x0g, self.clip), delta, y).sum(), leaf)
        if mu != 0 and self.iterations:
            with torch.enable_grad():
                new = x0c.detach()
                for _ in range(self.iterations):
                    z = _leaf(new)
                    new = new + mu * _grad(self.smoothed(z, delta, y).sum(), z)
            dx0 = dx0 + (new - x0c.detach())
        ctx.displace(q.alpha * dx0)
        return d

    def reset(self):
        self._weights = None

    def options(self):
        return {"rho": self.rho, "mu": self.mu, "gamma": self.gamma, "recurrence": self.recurrence,
                "iterations": self.iterations, "loss": self.loss, "operator": _shown(self.operator), "n_mc": self.n_mc,
                "schedule": self.schedule, "clip": self.clip}


class FlowChef(Corrector):
    """FlowChef (Patel et al., ICCV 2025, Steering Rectified Flow Models in the Vector Field for Controlled Image
    Generation, arXiv 2412.00100).

    Gradient skipping on a rectified flow (``α = 1 − t``, ``σ = t``): with the velocity û held fixed,
    ``x̂0(x) = x − t û`` so ``∇_{x_t} ℓ(x̂0) = ∇_{x̂0} ℓ``; the state moves ``x_t ← x_t − s ∇_{x̂0} ℓ(x̂0)`` and the
    step is taken with the same, un-recomputed û: ``x_next = S(x_t) − s ∇_{x̂0} ℓ``. With any solver S here, that
    displacement is computed at the step's first evaluation and added to the state the step lands on (see the
    module docstring): on Euler (the paper's sampler) exactly ``x_t − s∇ + (t' − t) û``; a stochastic solver adds
    it after its noise. No step on the last interval (the reference skips it). The loss with ``operator=``/``y=``
    is the per-sample mean squared residual ``mean((A(x̂0) − y)²)`` (the reference averages over the batch as well,
    so its gradient shrinks as 1/batch: a recorded deviation). Space: x_t (= x0 gradient). Cost: the solver's NFE +
    1 loss forward/backward per step, no backward through the network (memory at inference level). Default
    s = 100 (the reference's argparse default; its inverse-problem script passes 500).
    """

    name = "flowchef"

    def __init__(self, scale: float = 100.0, loss=None, operator=None, y: torch.Tensor | list | None = None):
        self.loss, self.operator, self.y = _objective("flowchef", loss, operator, y)
        self.scale = float(scale)

    def losses(self, x0, y: torch.Tensor | None):
        if self.loss is not None:
            return self.loss(x0)
        r = _residual(self.operator, y, x0)
        return _sq(r) / r[0].numel()

    def correct(self, d, preds, ctx):
        q = _need_next("flowchef", ctx)
        path = ctx.path
        if getattr(path, "kind", None) != "flow":
            raise ValueError(f"flowchef steers rectified-flow models (path 'flow', alpha = 1 - t, sigma = t); this "
                             f"model is on path {path.name!r}: use dps or tfg instead")
        if q.sigma == 0 or self.scale == 0 or not ctx.first:
            return d
        y = _measurement(self, ctx, d.x0)
        with torch.enable_grad():
            z = _leaf(d.x0)
            ctx.displace(-self.scale * _grad(self.losses(z, y).sum(), z))
        return d

    def options(self):
        return {"scale": self.scale, "loss": self.loss, "operator": _shown(self.operator)}


# ---------------------------------------------------------------------------------------------------
# Registry


@register("classifier", family="gradient",
          paper="Dhariwal & Nichol 2021, Diffusion Models Beat GANs on Image Synthesis", arxiv="2105.05233",
          space="x_t (score shift)", extra_nfe="0 (+1 classifier forward/backward)",
          defaults_source="s = 1.0: guided-diffusion classifier_sample.py (classifier_scale)")
def classifier(scale: float = 1.0, classifier: Callable | str | None = None, label: int | None = None,
               unconditional: bool = False) -> Classifier:
    return Classifier(scale, classifier, label, unconditional)


@register("dps", family="gradient",
          paper="Chung et al. 2023, Diffusion Posterior Sampling for General Noisy Inverse Problems",
          arxiv="2209.14687", space="x_t (through the denoiser)", extra_nfe="0 (+1 VJP per step)",
          defaults_source="ζ = 1.0: the reference configs use 0.3-1.0 at 1000 DDPM steps",
          notes="per-sample residual norms (the reference code's norm couples the batch)")
def dps(zeta: float = 1.0, operator=None, y: torch.Tensor | list | None = None, clip: bool = False) -> DPS:
    return DPS(zeta, operator, y, clip)


@register("universal", family="gradient", paper="Bansal et al. 2023, Universal Guidance for Diffusion Models",
          arxiv="2302.07121", space="x_t (forward) and x0 (backward)",
          extra_nfe="k−1 with recurrence k (and 1 VJP per evaluation)",
          defaults_source="s = 5, k = 5: the README's ImageNet CLIP guidance; m = 0 (backward off), lr 1e-3")
def universal(forward_scale: float = 5.0, backward_steps: int = 0, recurrence: int = 5, loss=None, operator=None,
              y: torch.Tensor | list | None = None, lr: float = 1e-3, cutoff: float = 1e-5,
              clip: bool = False) -> Universal:
    return Universal(forward_scale, backward_steps, recurrence, loss, operator, y, lr, cutoff, clip)


@register("tfg", family="gradient",
          paper="Ye et al. 2024, TFG: Unified Training-Free Guidance for Diffusion Models", arxiv="2409.15761",
          space="x_t (mean) and x0 (variance)", extra_nfe="k−1 steps with recurrence k (and 1 VJP per step)",
          defaults_source="ρ = μ = 1, γ = 0.01, n = 4, recurrence = iterations = 1: utils/configs.py")
def tfg(rho: float = 1.0, mu: float = 1.0, gamma: float = 0.01, recurrence: int = 1, iterations: int = 1,
        loss=None, operator=None, y: torch.Tensor | list | None = None, n_mc: int = 4, schedule: str = "increase",
        clip: bool = True) -> TFG:
    return TFG(rho, mu, gamma, recurrence, iterations, loss, operator, y, n_mc, schedule, clip)


@register("flowchef", family="gradient",
          paper="Patel et al. 2025, Steering Rectified Flow Models in the Vector Field for Controlled Image "
                "Generation", arxiv="2412.00100", space="x_t = x0 (gradient skipping, flow models)",
          extra_nfe="0 (no network backward)",
          defaults_source="s = 100: the reference's gradient_scale default (its inverse-problem script: 500)")
def flowchef(scale: float = 100.0, loss=None, operator=None, y: torch.Tensor | list | None = None) -> FlowChef:
    return FlowChef(scale, loss, operator, y)
