"""The guidance model: terms, modifiers, output modifiers and their stacking.

At each model evaluation the loop builds a ``Ctx`` (the state ``x_t``, its time and path coefficients), asks the
guidance for the ``branches`` it needs, evaluates them in one batched forward pass, converts every prediction to
x0 and calls ``combine``. Methods defined in another space (ε, v, flow velocity) convert with ``ctx.to`` and
``ctx.x0``, which are exact and affine at fixed ``(x_t, t)``.

A **term** guides with the difference of two branches (``cond`` − ``uncond`` for the CFG family) and returns the
guided x0 it would give alone. A **stack** (``a + b``) sums the terms' deviations from the conditional
prediction, ``D = D_c + Σ_i (T_i − D_c)``, then applies the **output modifiers** in a fixed order: zero-init
(skips everything), rescale, TAG, dynamic thresholding. Every term has a guidance interval: it is active only when
``sigma_lo < σ̄ ≤ sigma_hi`` (σ̄ = σ/α, the path-independent noise level), and a term with effective scale 1
is inactive; inactive terms request no branch, so the unconditional pass is skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..paths import Path
from ..prediction import KINDS
from ..solvers import Denoised
from ..spec import parse_spec

__all__ = ["Ctx", "Guidance", "Term", "OutputModifier", "Stack", "interval", "parse", "REGISTRY", "register"]


@dataclass
class Ctx:
    """What a guidance method sees at one model evaluation."""

    x: torch.Tensor
    t: float
    sigma: float  # σ̄ = σ/α (inf at α = 0)
    a: float
    s: float
    da: float
    ds: float
    step: int
    path: Path
    evaluate: Callable | None = None  # {branch: x} -> {branch: x0}; extra NFEs, counted by the loop
    prediction: str = "x0"  # the model's native output kind ("raw" space)
    raw: dict = field(default_factory=dict)  # id(x0 tensor) -> the raw model output it was converted from

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
        return "x0" if self.a == 0 and kind in ("eps", "score") else space

    def affine(self, space: str) -> tuple[float, float]:
        """(A, B) with ``y = A·x + B·x̂0`` for a prediction in ``space`` at this point: ε = (x − α x̂0)/σ,
        v = α ε − σ x̂0, flow u = α̇ x̂0 + σ̇ ε, score = −ε/σ."""
        space = self.prediction if space == "raw" else space
        a, s, da, ds = self.a, self.s, self.da, self.ds
        table = {"x0": (0.0, 1.0), "eps": (1 / s, -a / s), "v": (a / s, -a * a / s - s),
                 "flow": (ds / s, da - ds * a / s), "score": (-1 / s**2, a / s**2)}
        if space not in table:
            raise ValueError(f"unknown space {space!r}; allowed: raw, {', '.join(KINDS)}")
        return table[space]

    def to(self, x0: torch.Tensor, space: str) -> torch.Tensor:
        """Convert an x0 prediction at this point into ``space`` (x0, eps, v, flow, score or raw)."""
        A, B = self.affine(space)
        return x0 if A == 0.0 and B == 1.0 else torch.add(x0 * B, self.x, alpha=A)

    def x0(self, y: torch.Tensor, space: str) -> torch.Tensor:
        """Convert a prediction in ``space`` at this point back to x0."""
        A, B = self.affine(space)
        return y if A == 0.0 and B == 1.0 else torch.add(y * (1 / B), self.x, alpha=-A / B)


def _in(lo: float, hi: float, sigma: float) -> bool:
    return lo < sigma <= hi


def interval(sigma_lo: float = 0.0, sigma_hi: float = math.inf) -> tuple[float, float]:
    """A guidance interval ``(sigma_lo, sigma_hi]`` in σ̄ (Kynkäänniemi et al. 2024, arXiv 2404.07724)."""
    if not 0 <= sigma_lo < sigma_hi:
        raise ValueError(f"a guidance interval needs 0 <= sigma_lo < sigma_hi, got ({sigma_lo}, {sigma_hi}]")
    return (float(sigma_lo), float(sigma_hi))


class Guidance:
    """Base class of everything ``sample(guidance=...)`` accepts."""

    name = "guidance"
    needs_renoise = False  # returns a separate re-noise estimate (CFG++)

    def reset(self) -> None:
        """Called at the start of every sampling call (clears state such as momentum)."""

    def skip_all(self, ctx: Ctx) -> bool:
        """True when this evaluation needs no network output at all (CFG-Zero*'s zero-init)."""
        return False

    def branch_specs(self) -> dict:
        """Branches other than cond/uncond/negative: ``{name: Branch(cond, perturbation, model)}``."""
        return {}

    def branches(self, ctx: Ctx) -> tuple[str, ...]:
        return ("cond",)

    def combine(self, preds: dict[str, torch.Tensor], ctx: Ctx):
        return preds["cond"]

    def __add__(self, other: "Guidance") -> "Stack":
        if not isinstance(other, Guidance):
            return NotImplemented
        return Stack([self, other])

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{self.name}({opts})"

    def options(self) -> dict:
        return {}


class Term(Guidance):
    """Guidance by the difference of two branches ``pos`` − ``neg`` with a w-form scale.

    ``guide(y_pos, y_neg, w, ctx)`` returns the guided prediction in ``self.space``; the default is
    ``y_neg + w (y_pos − y_neg)``. ``schedule`` maps ``(w, σ̄)`` to the effective scale; outside the interval
    ``(sigma_lo, sigma_hi]`` the effective scale is 1 (the conditional prediction, no ``neg`` branch).
    """

    pos, neg, space = "cond", "uncond", "x0"
    always_neg = False  # evaluate neg even at scale 1 (CFG++ re-noises with it)

    def __init__(self, scale: float, sigma_lo: float = 0.0, sigma_hi: float = math.inf, schedule=None,
                 when: tuple[float, float] | None = None, clamp: float = 2.0):
        self.scale = float(scale)
        self.sigma_lo, self.sigma_hi = interval(*when) if when is not None else interval(sigma_lo, sigma_hi)
        from .schedules import get_schedule

        self.schedule = get_schedule(schedule, clamp)

    def weight(self, ctx: Ctx) -> float:
        if not _in(self.sigma_lo, self.sigma_hi, ctx.sigma):
            return 1.0
        return self.scale if self.schedule is None else self.schedule(self.scale, ctx.sigma)

    def active(self, ctx: Ctx) -> bool:
        if not _in(self.sigma_lo, self.sigma_hi, ctx.sigma):
            return False
        return self.always_neg or self.weight(ctx) != 1.0

    def branches(self, ctx):
        return (self.pos, self.neg) if self.active(ctx) else (self.pos,)

    def guide(self, y_pos, y_neg, w: float, ctx: Ctx):
        return y_neg + w * (y_pos - y_neg)

    def combine(self, preds, ctx):
        if not self.active(ctx):
            return preds[self.pos]
        space = ctx.space_at(self.space)
        yp, yn = ctx.pred(preds, self.pos, space), ctx.pred(preds, self.neg, space)
        return ctx.x0(self.guide(yp, yn, self.weight(ctx), ctx), space)

    def options(self):
        out = {"scale": self.scale}
        if (self.sigma_lo, self.sigma_hi) != (0.0, math.inf):
            out.update(sigma_lo=self.sigma_lo, sigma_hi=self.sigma_hi)
        if self.schedule is not None:
            out["schedule"] = self.schedule.name
        return out


class OutputModifier(Guidance):
    """Transforms the combined x0 (rescale, TAG, dynamic thresholding). ``order`` fixes the stacking order."""

    order = 50

    def apply(self, d: torch.Tensor, preds: dict[str, torch.Tensor], ctx: Ctx) -> torch.Tensor:
        raise NotImplementedError

    def combine(self, preds, ctx):
        return self.apply(preds["cond"], preds, ctx)


class Stack(Guidance):
    """Terms and output modifiers applied together (``a + b``); see the module docstring for the order."""

    name = "stack"

    def __init__(self, parts: list[Guidance]):
        flat: list[Guidance] = []
        for p in parts:
            flat.extend(p.parts if isinstance(p, Stack) else [p])
        self.parts = flat
        self.terms = [p for p in flat if not isinstance(p, OutputModifier)]
        self.outputs = sorted((p for p in flat if isinstance(p, OutputModifier)), key=lambda p: p.order)
        pairs = [(t.pos, t.neg) for t in self.terms if isinstance(t, Term)]
        dup = {pn for pn in pairs if pairs.count(pn) > 1}
        if dup:
            raise ValueError(f"cannot stack two terms on the same branch pair {sorted(dup)[0]}: their guidance would "
                             "be counted twice; use one term with a modifier instead")
        if sum(p.needs_renoise for p in flat) > 1:
            raise ValueError("at most one method in a stack may set the re-noise estimate (cfgpp)")
        self.needs_renoise = any(p.needs_renoise for p in flat)

    def reset(self):
        for p in self.parts:
            p.reset()

    def branch_specs(self):
        out = {}
        for p in self.parts:
            out.update(p.branch_specs())
        return out

    def skip_all(self, ctx):
        return any(p.skip_all(ctx) for p in self.parts)

    def branches(self, ctx):
        if self.skip_all(ctx):
            return ()
        names = ["cond"]
        for p in self.parts:
            names += [b for b in p.branches(ctx) if b not in names]
        return tuple(names)

    def combine(self, preds, ctx):
        if self.skip_all(ctx):
            return next(p for p in self.parts if p.skip_all(ctx)).combine({}, ctx)
        base = preds["cond"]
        d, renoise = base, None
        for term in self.terms:
            r = term.combine(preds, ctx)
            if isinstance(r, Denoised):
                renoise, r = r, r.x0
            d = d + (r - base)
        for out in self.outputs:
            d = out.apply(d, preds, ctx)
        if renoise is not None:
            return Denoised(d, renoise.eps, renoise.x0_hist)
        return d

    def __repr__(self):
        return " + ".join(map(repr, self.parts))


# ---------------------------------------------------------------------------------------------------
# Registry and spec strings


@dataclass
class MethodInfo:
    name: str
    make: Callable
    family: str
    paper: str
    arxiv: str
    space: str
    extra_nfe: str
    needs_hooks: bool = False
    defaults_source: str = ""
    notes: str = ""
    defaults: dict = field(default_factory=dict)


REGISTRY: dict[str, MethodInfo] = {}


def register(name: str, *, family: str, paper: str, arxiv: str, space: str, extra_nfe: str,
             defaults_source: str, needs_hooks: bool = False, notes: str = ""):
    """Decorator: make a constructor reachable by its spec name and listed by ``steer methods``."""

    def deco(fn):
        import inspect

        defaults = {k: v.default for k, v in inspect.signature(fn).parameters.items()
                    if v.default is not inspect.Parameter.empty}
        REGISTRY[name] = MethodInfo(name, fn, family, paper, arxiv, space, extra_nfe, needs_hooks, defaults_source,
                                    notes, defaults)
        return fn

    return deco


def _build(name: str, args: tuple, kwargs: dict) -> Guidance:
    if name not in REGISTRY:
        raise ValueError(f"unknown guidance method {name!r}; allowed: {', '.join(sorted(REGISTRY))}")
    try:
        return REGISTRY[name].make(*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad options for guidance {name!r}: {e}") from e


def parse(spec: "str | Guidance | None") -> Guidance | None:
    """A guidance from ``None``, an instance or a spec string such as ``"cfg(scale=4)"`` or
    ``"apg(scale=10, eta=0) + dynamic_threshold(percentile=0.995)"``."""
    if spec is None or isinstance(spec, Guidance):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"guidance must be a spec string or a Guidance, got {type(spec).__name__}")
    parts = _split_plus(spec)
    built = [_build(*parse_spec(p)) for p in parts]
    return built[0] if len(built) == 1 else Stack(built)


def _split_plus(spec: str) -> list[str]:
    """Split a spec on top-level ``+`` (not inside parentheses, brackets or strings)."""
    parts, depth, quote, cur = [], 0, None, ""
    for ch in spec:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "+" and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    parts.append(cur)
    if any(not p.strip() for p in parts):
        raise ValueError(f"cannot parse guidance spec {spec!r}: empty part around '+'")
    return [p.strip() for p in parts]
