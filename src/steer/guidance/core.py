"""The guidance model: terms, modifiers, output modifiers and their stacking.

At each model evaluation the loop builds a ``Ctx`` (the state ``x_t``, its time and path coefficients), asks the
guidance for the ``branches`` it needs, evaluates them in one batched forward pass, converts every prediction to
x0 and calls ``combine``. Methods defined in another space (ε, v, flow velocity) convert with ``ctx.to`` and
``ctx.x0``, which are exact and affine at fixed ``(x_t, t)``.

A **term** guides with the difference of two branches (``cond`` − ``uncond`` for the CFG family) and returns the
guided x0 it would give alone. A **stack** (``a + b``) sums the terms' deviations from the conditional
prediction, ``D = D_c + Σ_i (T_i − D_c)``, then applies the **output modifiers** in a fixed order: zero-init
(skips everything), rescale, TAG, dynamic thresholding. Every term has a guidance interval: it is active only when
``sigma_lo < σ̄ ≤ sigma_hi`` (σ̄ = σ/α, the path-independent noise level, of the evaluation; ``rule="step"``: of
the solver step's start, for all its evaluations), and a term with effective scale 1
is inactive; inactive terms request no branch, so the unconditional pass is skipped. Last, the **correctors**
(gradient guidance, ``steer.guidance.gradient``) move the result, in the order given.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import numbers
import reprlib
import types
import typing
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

from ..core import Ctx, Denoised
from ..prediction import KINDS
from ..spec import format_spec, is_literal, parse_spec

__all__ = ["Ctx", "Guidance", "Term", "OutputModifier", "Corrector", "Stack", "interval", "parse", "REGISTRY",
           "register", "SPACES"]

SPACES = ("raw", *KINDS)  # where a method may combine predictions; "raw" is the model's own output kind


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
    first_order_only = False  # defined on the update of a one-evaluation first-order solver (TAG)
    recurrence = 1  # solver steps per grid step, re-noised back in between (UGD's and TFG's self-recurrence)
    _spec: tuple[str, dict] | None = None  # (method, options given) when built by a registered constructor

    def reset(self) -> None:
        """Called at the start of every sampling call (restarts random streams such as TPG's shuffle). State that
        lives across steps (momentum, latches) is kept in ``ctx.state``, not in the object."""

    def prepare(self, device: torch.device) -> None:
        """Called at the start of every sampling call with the device of the state (moves named guide models)."""

    def bind(self, stack: "Stack") -> None:
        """Called after ``reset`` with the stack this method samples in (SAG's ``source='auto'`` looks for CFG)."""

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
        """The spec string of the registered call that built this object (``parse`` reads it back), or, for an
        object built from its class or with a value a spec cannot hold (a model, a function), a description of
        its options in the same form."""
        if self._spec is not None and all(map(is_literal, self._spec[1].values())):
            return format_spec(*self._spec)
        return self._describe()

    def _describe(self) -> str:
        return format_spec(self.name, self.options())

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

    def __init__(self, scale: float, sigma_lo: float = 0.0, sigma_hi: float = math.inf,
                 schedule: str | Callable | None = None, when: tuple[float, float] | None = None, clamp: float = 2.0,
                 rule: str = "sigma"):
        check_options(self.name, Term.__init__, scale=scale, sigma_lo=sigma_lo, sigma_hi=sigma_hi, schedule=schedule,
                      when=when, clamp=clamp, rule=rule)
        check_choice(self.name, "rule", rule, ("sigma", "step"))
        self.rule = rule
        if when is not None and (sigma_lo, sigma_hi) != (0.0, math.inf):
            raise ValueError(f"{self.name}: give the guidance interval either as when=(lo, hi) or as sigma_lo= and "
                             "sigma_hi=, not both")
        if clamp != 2.0 and schedule != "clamp_linear":
            raise ValueError(f"{self.name}: clamp is the floor of schedule='clamp_linear' and does nothing with "
                             f"schedule={schedule!r}")
        self.scale = float(scale)
        self.sigma_lo, self.sigma_hi = interval(*when) if when is not None else interval(sigma_lo, sigma_hi)
        from .schedules import get_schedule

        try:
            self.schedule = get_schedule(schedule, clamp)
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None

    def in_interval(self, ctx: Ctx) -> bool:
        """Whether this evaluation lies in the guidance interval. ``rule="sigma"`` (default): its own σ̄, so the two
        evaluations of a Heun step may differ at the interval's edges; ``rule="step"``: the σ̄ the solver step
        starts at (``ctx.grid[ctx.step]``), for every evaluation of the step, as the official guidance-interval
        sampler (kynkaat/guidance-interval ``sampling/edm_sampler.py``: step indices, guided Euler and Heun
        evaluations alike). Without a grid (a method called by hand) both read the evaluation's σ̄."""
        sigma = ctx.grid[ctx.step].sigma_bar if self.rule == "step" and ctx.step < len(ctx.grid) else ctx.sigma_bar
        return _in(self.sigma_lo, self.sigma_hi, sigma)

    def weight(self, ctx: Ctx) -> float:
        if not self.in_interval(ctx):
            return 1.0
        return self.scale if self.schedule is None else self.schedule(self.scale, ctx.sigma_bar)

    def active(self, ctx: Ctx) -> bool:
        if not self.in_interval(ctx):
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
        if self.rule != "sigma":
            out["rule"] = self.rule
        if self.schedule is not None:
            out["schedule"] = getattr(self.schedule, "fn", self.schedule.name)  # a custom schedule: the function
            if self.schedule.name == "clamp_linear":
                out["clamp"] = self.schedule.clamp
        return out


class OutputModifier(Guidance):
    """Transforms the combined x0 (rescale, TAG, dynamic thresholding). ``order`` fixes the stacking order."""

    order = 50

    def apply(self, d: torch.Tensor, preds: dict[str, torch.Tensor], ctx: Ctx) -> torch.Tensor:
        raise NotImplementedError

    def combine(self, preds, ctx):
        return self.apply(preds["cond"], preds, ctx)


class Corrector(Guidance):
    """Gradient guidance (classifier, DPS, universal, TFG, FlowChef): moves the guided prediction after the terms and
    output modifiers, ``correct(d, preds, ctx) -> Denoised``. A correction that moves the state the step lands on
    (DPS, TFG, FlowChef) computes it at the step's first evaluation (``ctx.first``) and hands it to the loop with
    ``ctx.displace``, so it runs with every solver. Alone, the base is the conditional prediction."""

    base = "cond"

    def branches(self, ctx):
        return (self.base,)

    def combine(self, preds, ctx):
        return self.correct(Denoised(preds[self.base]), preds, ctx)

    def correct(self, d: Denoised, preds: dict, ctx: Ctx) -> Denoised:
        raise NotImplementedError


class Stack(Guidance):
    """Terms, output modifiers and correctors applied together (``a + b``); see the module docstring for the
    order. Correctors come last, in the order given; the stack's recurrence is the largest of its parts'."""

    name = "stack"

    def __init__(self, parts: list[Guidance]):
        flat: list[Guidance] = []
        for p in parts:
            flat.extend(p.parts if isinstance(p, Stack) else [p])
        self.parts = flat
        self._shown = [q for p in parts for q in (p._shown if isinstance(p, Stack) and p._spec is None else [p])]
        self.terms = [p for p in flat if not isinstance(p, (OutputModifier, Corrector))]
        self.correctors = [p for p in flat if isinstance(p, Corrector)]
        if any(c.base != "cond" for c in self.correctors):
            raise ValueError("a corrector on the unconditional prediction (classifier(unconditional=True)) guides "
                             "that prediction alone; it cannot be stacked")
        self.recurrence = max(p.recurrence for p in flat)
        self.outputs = sorted((p for p in flat if isinstance(p, OutputModifier)), key=lambda p: p.order)
        pairs = [(t.pos, t.neg) for t in self.terms if isinstance(t, Term)]
        dup = {pn for pn in pairs if pairs.count(pn) > 1}
        if dup:
            raise ValueError(f"cannot stack two terms on the same branch pair {sorted(dup)[0]}: their guidance would "
                             "be counted twice; use one term with a modifier instead")
        if sum(p.needs_renoise for p in flat) > 1:
            raise ValueError("at most one method in a stack may set the re-noise estimate (cfgpp)")
        self.needs_renoise = any(p.needs_renoise for p in flat)
        self.first_order_only = any(p.first_order_only for p in flat)
        for p in flat:
            p.bind(self)

    def reset(self):
        for p in self.parts:
            p.reset()
        for p in self.parts:
            p.bind(self)

    def prepare(self, device):
        for p in self.parts:
            p.prepare(device)

    def branch_specs(self):
        out = {}
        for p in self.parts:
            for name, spec in p.branch_specs().items():
                if name in out and out[name].grad is True and spec.grad == "first":
                    spec = dataclasses.replace(spec, grad=True)  # a part needs its graph at every evaluation
                out[name] = spec
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
            d = Denoised(d, renoise.eps, renoise.x0_hist)
        for c in self.correctors:
            d = c.correct(d if isinstance(d, Denoised) else Denoised(d), preds, ctx)
        return d

    def _describe(self):
        return " + ".join(map(repr, self._shown))


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
    defaults: dict = field(default_factory=dict)  # the constructor's own options
    options: dict = field(default_factory=dict)  # every option it accepts (with the term's, given **kwargs), default


REGISTRY: dict[str, MethodInfo] = {}


def register(name: str, *, family: str, paper: str, arxiv: str, space: str, extra_nfe: str,
             defaults_source: str, needs_hooks: bool = False, notes: str = ""):
    """Decorator: make a constructor reachable by its spec name and listed by ``steer methods``.

    The registered constructor checks the type of every option, and the object it returns remembers the call (the
    options that differ from their defaults), which is what its ``repr`` prints. A constructor's ``**kwargs`` stand
    for the options of ``Term`` (``sigma_lo``, ``sigma_hi``, ``when``, ``schedule``, ``clamp``).
    """

    def deco(fn):
        params = inspect.signature(fn).parameters
        own = {k: p.default for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        options = dict(own)
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            options.update({k: v for k, v in _TERM_OPTIONS.items() if k not in own})
        hints = {**_hints(Term.__init__), **_hints(fn)}
        hints = {k: hints.get(k) for k in options}

        @functools.wraps(fn)
        def make(*args, **kwargs):
            given = _bind(name, list(own), options, args, kwargs)
            for k, v in given.items():
                check_option(name, k, v, hints[k])
            changed = {k: v for k, v in given.items() if not _is_default(v, options[k])}
            guidance = fn(**{k: v for k, v in given.items() if k in own or k in changed})
            guidance._spec = (name, changed)
            return guidance

        REGISTRY[name] = MethodInfo(name, make, family, paper, arxiv, space, extra_nfe, needs_hooks, defaults_source,
                                    notes, {k: v for k, v in own.items() if v is not inspect.Parameter.empty},
                                    options)
        return make

    return deco


_TERM_OPTIONS = {k: p.default for k, p in inspect.signature(Term.__init__).parameters.items()
                 if k not in ("self", "scale")}


@functools.lru_cache(maxsize=None)
def _hints(fn) -> dict:
    try:
        return typing.get_type_hints(fn)
    except (NameError, TypeError):  # an annotation that does not evaluate here: no type check from it
        return {}


def _bind(method: str, positional: list[str], options: dict, args: tuple, kwargs: dict) -> dict:
    """The options of a call, by name, in the order of ``options``; unknown or repeated options raise."""
    if len(args) > len(positional):
        raise ValueError(f"{method} takes at most {len(positional)} positional arguments, got {len(args)}")
    given = dict(zip(positional, args))
    for k, v in kwargs.items():
        if k not in options:
            close = difflib.get_close_matches(k, options, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{method} has no option {k!r}{hint}; options: {', '.join(options)}")
        if k in given:
            raise ValueError(f"{method} got {k!r} twice, by position and by name")
        given[k] = v
    return {k: given[k] for k in options if k in given}


def _is_default(value, default) -> bool:
    if value is default:
        return True
    if not (is_literal(value) and is_literal(default)):
        return False
    return (type(value) is type(default) or _numbers(value, default)) and value == default


def _numbers(*values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def check_option(method: str, option: str, value, hint) -> None:
    """Raise a ValueError naming the method and the option when ``value`` does not fit the type ``hint``
    (numbers, integers, booleans, strings, None, lists and tuples of them, functions; any other class is left to
    the constructor)."""
    if hint is not None and not _fits(value, hint):
        raise ValueError(f"{method}: {option} must be {_type_name(hint)}, got {reprlib.repr(value)} "
                         f"({type(value).__name__})")


def check_options(method: str, fn, **values) -> None:
    """``check_option`` for each of ``values``, with the type hints of ``fn``."""
    hints = _hints(fn)
    for k, v in values.items():
        check_option(method, k, v, hints.get(k))


def check_choice(method: str, option: str, value, allowed) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{method}: {option} must be one of {', '.join(map(repr, allowed))}, got "
                         f"{reprlib.repr(value)}")


def _fits(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_fits(value, h) for h in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint in (bool, str):
        return isinstance(value, hint)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_fits, value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    if hint is Callable or origin is typing.get_origin(Callable):
        return callable(value)
    return True


def _type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        names = [_type_name(h) for h in args]
        return ", ".join(names[:-1]) + " or " + names[-1]
    if origin in (list, tuple):
        kind = "list" if origin is list else "tuple"
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a {kind} of {len(args)} {_plural(args[0])}" if len(set(args)) == 1 else f"a {kind}"
        return f"a {kind} of {_plural(args[0])}" if args else f"a {kind}"
    names = {float: "a number", int: "an integer", bool: "True or False", str: "a string", type(None): "None"}
    if hint in names:
        return names[hint]
    if hint is Callable or origin is typing.get_origin(Callable):
        return "a function"
    return getattr(hint, "__name__", str(hint))


def _plural(hint) -> str:
    return {float: "numbers", int: "integers", bool: "booleans", str: "strings"}.get(hint, "values")


def _build(name: str, args: tuple, kwargs: dict) -> Guidance:
    if name not in REGISTRY:
        raise ValueError(f"unknown guidance method {name!r}; allowed: {', '.join(sorted(REGISTRY))}")
    info = REGISTRY[name]
    if len(args) > 1:
        first = next(iter(info.options))
        raise ValueError(f"{name} takes at most 1 positional argument ({first}) in a spec, got {len(args)}: "
                         f"give the others by name, {name}({first}=..., option=value, ...); "
                         f"options: {', '.join(info.options)}")
    try:
        return info.make(*args, **kwargs)
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
