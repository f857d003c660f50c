"""Sweep configurations: TOML files validated by pydantic, expanded into cells.

```toml
name = "guidance-scales"
models = ["digits-flow"]
solvers = ["dpmpp_2m"]
steps = [25]            # or nfe = [50]: per cell, the most steps whose NFE per sample fits the budget
seeds = [0, 1]
samples = 200
metrics = ["accuracy", "fd", "saturation"]

[[guidance]]
method = "cfg"
scale = [1.5, 3, 5]

[[guidance]]
method = "apg"
scale = [3, 5]
eta = 0
```

Each ``[[guidance]]`` entry names a registered method (or ``"none"``); its other keys are options, a list being a
grid of values. A bad file gives one line naming the file, the key and what is allowed.

A sweep may instead (or also) hold ``[[claims]]``: each a paper's claim stated as a comparison of two cells on one
testbed, with what the claim predicts of each metric; the report says whether the testbed reproduces it.

```toml
[[claims]]
id = "apg-saturation"
paper = "Eliminating Oversaturation and Artifacts of High Guidance Scales in Diffusion Models (arXiv 2410.02416)"
claim = "At a high scale APG oversaturates less than CFG at the same scale, at no loss of accuracy"
model = "digits-flow"
steps = 25
method = "apg(scale=8, eta=0, rescale=2.5)"
baseline = "cfg(scale=8)"
expect = [{ metric = "saturation", relation = "lower" },
          { metric = "accuracy", relation = "higher", margin = -0.01 }]
```

``relation = "lower"`` holds when mean(method) < mean(baseline) − margin; ``"higher"`` when mean(method) >
mean(baseline) + margin (means over the seeds; a negative margin allows that much slack). With two seeds or more, an
expectation whose mean difference (beyond the margin) is within two standard errors of the difference is called
inconclusive rather than held or failed.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .. import __version__
from ..guidance import REGISTRY, parse
from ..models import MODELS
from ..solvers import get_solver
from ..spec import format_spec
from .metrics import METRICS, check_metrics, family

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Sweep", "Claim", "Cell", "ConfigError", "load_sweep", "claim_cells", "PRESETS"]

PRESETS = ("demo", "guidance-scales", "solvers", "claims")


class ConfigError(ValueError):
    """A sweep configuration that cannot run; the message is one line naming the file and the key."""


def _check_models(models):
    for m in models:
        if m not in MODELS:
            raise ValueError(f"unknown model {m!r}; allowed: {', '.join(sorted(MODELS))}")


def _check_solvers(solvers):
    for s in solvers:
        get_solver(s)  # raises a ValueError naming what is allowed


class Expect(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: str
    relation: Literal["lower", "higher"]
    margin: float = 0.0

    @field_validator("metric")
    @classmethod
    def _metric(cls, v):
        if v not in METRICS:
            raise ValueError(f"unknown metric {v!r}; allowed: {', '.join(METRICS)}")
        return v

    def holds(self, method: float, baseline: float) -> bool:
        if self.relation == "lower":
            return method < baseline - self.margin
        return method > baseline + self.margin


class Claim(BaseModel):
    """A paper's claim as a comparison of two cells (method and baseline) on one testbed."""

    model_config = ConfigDict(extra="forbid")

    id: str
    paper: str
    claim: str
    model: str
    solver: str = "dpmpp_2m"
    baseline_solver: str | None = None  # default: solver
    steps: int | None = Field(default=None, ge=1)
    nfe: int | None = Field(default=None, ge=1)
    samples: int | None = Field(default=None, ge=1)  # default: the sweep's
    method: str
    baseline: str
    expect: list[Expect] = Field(min_length=1)

    @field_validator("model")
    @classmethod
    def _model(cls, v):
        _check_models([v])
        return v

    @field_validator("solver", "baseline_solver")
    @classmethod
    def _solver(cls, v):
        _check_solvers([v] if v is not None else [])
        return v

    @field_validator("method", "baseline")
    @classmethod
    def _spec(cls, v):
        if v != "none":
            parse(v)
        return v

    @model_validator(mode="after")
    def _budget(self):
        if self.steps is not None and self.nfe is not None:
            raise ValueError(f"claim {self.id!r}: give steps or nfe, not both")
        if self.steps is None and self.nfe is None:
            self.steps = 25
        return self


class Sweep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    models: list[str] | None = Field(default=None, min_length=1)
    solvers: list[str] = Field(default=["dpmpp_2m"], min_length=1)
    steps: list[int] | None = Field(default=None, min_length=1)
    nfe: list[int] | None = Field(default=None, min_length=1)
    seeds: list[int] = Field(default=[0], min_length=1)
    samples: int = Field(default=100, ge=1)
    metrics: list[str] = Field(default=["accuracy"], min_length=1)
    guidance: list[dict] = Field(default=[{"method": "none"}], min_length=1)
    claims: list[Claim] = []

    @field_validator("models")
    @classmethod
    def _models(cls, v):
        _check_models(v or [])
        return v

    @field_validator("solvers")
    @classmethod
    def _solvers(cls, v):
        _check_solvers(v)
        return v

    @field_validator("steps", "nfe")
    @classmethod
    def _steps(cls, v, info):
        if v is not None and any(s < 1 for s in v):
            raise ValueError(f"{info.field_name} must be integers >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _steps_or_nfe(self):
        if self.steps is not None and self.nfe is not None:
            raise ValueError("steps, nfe: give steps = [...] or nfe = [...] (an NFE budget per sample), not both")
        if self.steps is None and self.nfe is None:
            self.steps = [25]
        if self.models is None and not self.claims:
            raise ValueError("models, claims: give models = [...] (a grid) or [[claims]] entries")
        if len({c.id for c in self.claims}) < len(self.claims):
            raise ValueError("claims: claim ids must be unique")
        return self

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v):
        unknown = [m for m in v if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric {unknown[0]!r}; allowed: {', '.join(METRICS)}")
        return v

    @field_validator("guidance")
    @classmethod
    def _guidance(cls, v):
        for entry in v:
            for spec in _expand_guidance(entry):
                if spec != "none":
                    parse(spec)  # raises a ValueError naming the method, the option and what is allowed
        return v


def _expand_guidance(entry: dict) -> list[str]:
    """The spec strings of one ``[[guidance]]`` entry: the product of its list-valued options."""
    if "method" not in entry:
        raise ValueError(f"each [[guidance]] entry needs method = NAME (one of none, {', '.join(sorted(REGISTRY))})")
    method = entry["method"]
    if method != "none" and method not in REGISTRY:
        raise ValueError(f"unknown guidance method {method!r}; allowed: none, {', '.join(sorted(REGISTRY))}")
    options = {k: v if isinstance(v, list) else [v] for k, v in entry.items() if k != "method"}
    if any(len(v) == 0 for v in options.values()):
        raise ValueError(f"guidance {method!r}: an option has an empty list of values (an empty grid)")
    if method == "none":
        if options:
            raise ValueError(f"guidance 'none' takes no options, got {', '.join(options)}")
        return ["none"]
    return [format_spec(method, dict(zip(options, combo))) for combo in itertools.product(*options.values())]


@dataclass(frozen=True)
class Cell:
    """One unit of work: a model sampled with one solver, step count, guidance spec and seed."""

    model: str
    solver: str
    steps: int | None  # None: the most steps that fit the NFE budget
    nfe: int | None
    guidance: str
    seed: int
    samples: int
    metrics: tuple[str, ...]

    def config(self) -> dict:
        budget = {"steps": self.steps} if self.nfe is None else {"nfe": self.nfe}
        return {"model": self.model, "solver": self.solver, **budget, "guidance": self.guidance, "seed": self.seed,
                "samples": self.samples, "metrics": list(self.metrics), "steer": __version__}

    @property
    def key(self) -> str:
        """The hash of the canonical configuration (sorted JSON, including steer's version) and of steer's source
        code, so a cell computed by other code is computed again rather than reused."""
        text = json.dumps({**self.config(), "code": code_hash()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@functools.cache
def code_hash() -> str:
    """A hash of the steer package's Python sources and shipped weights (paths and contents)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".pt") and "__pycache__" not in p.parts):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def claim_cells(sweep: Sweep, claim: Claim) -> tuple[list[Cell], list[Cell]]:
    """The method's and the baseline's cells of a claim, one per seed. Their metrics are every metric that applies
    to the model, so claims on the same testbed share cells."""
    metrics = tuple(k for k, (fams, _) in METRICS.items() if family(claim.model) in fams)

    def one(spec, solver):
        return [Cell(claim.model, solver, claim.steps, claim.nfe, spec, seed, claim.samples or sweep.samples, metrics)
                for seed in sweep.seeds]

    return one(claim.method, claim.solver), one(claim.baseline, claim.baseline_solver or claim.solver)


def cells(sweep: Sweep) -> list[Cell]:
    out = []
    if sweep.models is not None:
        specs = [s for entry in sweep.guidance for s in _expand_guidance(entry)]
        budgets = [(n, None) for n in sweep.steps] if sweep.steps is not None else [(None, b) for b in sweep.nfe]
        out = [Cell(m, s, n, b, g, seed, sweep.samples, tuple(sweep.metrics))
               for m, s, (n, b), g, seed in itertools.product(sweep.models, sweep.solvers, budgets, specs, sweep.seeds)]
    for claim in sweep.claims:
        for cell in (c for group in claim_cells(sweep, claim) for c in group):
            if cell not in out:
                out.append(cell)
    for cell in out:
        check_metrics(cell.model, cell.metrics)
    for claim in sweep.claims:
        for e in claim.expect:
            check_metrics(claim.model, [e.metric])
    return out


def load_sweep(source: "str | Path") -> tuple[Sweep, list[Cell]]:
    """A sweep from a TOML file or a preset name (``steer.bench.config.PRESETS``), and its cells."""
    path = Path(source)
    if not path.exists() and str(source) in PRESETS:
        text, label = resources.files("steer.bench.presets").joinpath(f"{source}.toml").read_text(), f"preset {source}"
    elif path.exists():
        text, label = path.read_text(), str(path)
    else:
        raise ConfigError(f"{source}: no such file, and not a preset (presets: {', '.join(PRESETS)})")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{label}: not valid TOML ({e})") from None
    try:
        sweep = Sweep(**data)
        return sweep, cells(sweep)
    except ValidationError as e:
        err = e.errors()[0]
        loc = list(err["loc"])
        owner = Sweep
        if loc[:1] == ["claims"] and len(loc) > 1 and isinstance(loc[1], int):
            entry = data["claims"][loc[1]]
            loc[:2] = [f"claims[{entry.get('id', loc[1]) if isinstance(entry, dict) else loc[1]}]"]
            owner = Expect if "expect" in loc and isinstance(loc[-2], int) else Claim
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown key; allowed: {', '.join(owner.model_fields)}"
        where = ".".join(str(p) for p in loc)
        raise ConfigError(f"{label}: {where}: {msg}" if where else f"{label}: {msg}") from None
    except ValueError as e:
        raise ConfigError(f"{label}: {e}") from None
