"""Gaussian probability paths ``x_t = α(t)·x0 + σ(t)·ε`` with continuous ``t ∈ [0, 1]``, ``t = 1`` noise.

Every path gives ``α``, ``σ``, the half log-SNR ``λ = log(α/σ)``, the path-independent noise level
``σ̄ = σ/α = exp(−λ)`` (EDM's and k-diffusion's σ), their inverses, and time grids. Scalars are
computed in float64.

- ``VP``: variance preserving, ``α² + σ² = 1``, from a discrete ``alphas_cumprod`` of length T (the
  0..T−1 timesteps diffusers models expect). Discrete timestep τ sits at ``t = (τ + 1)/T`` and t = 0 is
  clean data; ``log α`` is linear in t between knots (the convention of DPM-Solver's discrete schedule).
  Named schedules ``"vp-linear"``, ``"vp-scaled-linear"``, ``"vp-cosine"`` reproduce diffusers'
  ``linear``, ``scaled_linear`` and ``squaredcos_cap_v2`` float32 tables.
- ``EDM``: ``α = 1``, ``σ = σ_max · t`` (``"edm"``, σ_max = 80).
- ``Flow``: rectified flow, ``α = 1 − t``, ``σ = t``; ``shift`` only moves the default time grid
  (``t' = s·t / (1 + (s − 1)·t)``, SD3's shift), never the ODE.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "Path", "VP", "EDM", "Flow", "get_path", "PATH_NAMES",
    "uniform_t", "karras", "uniform_lambda", "flow_shift", "make_grid", "GRID_KINDS",
]


def _f64(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


class Path:
    """Base class. Subclasses define ``log_alpha(t)`` and ``sigma(t)`` (and their inverses)."""

    name: str = "path"
    kind: str = ""
    t_min: float = 0.0  # smallest t with σ > 0 the model was trained on (for grids)

    def alpha(self, t) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def log_alpha(self, t) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t) -> torch.Tensor:
        raise NotImplementedError

    def lam(self, t) -> torch.Tensor:
        """Half log-SNR ``λ = log(α/σ)``: ``−inf`` where α = 0, ``+inf`` where σ = 0."""
        t = _f64(t)
        return self.log_alpha(t) - torch.log(self.sigma(t))

    def sigma_bar(self, t) -> torch.Tensor:
        """The path-independent noise level ``σ̄ = σ/α = exp(−λ)``."""
        return torch.exp(-self.lam(t))

    def t_from_lambda(self, lam) -> torch.Tensor:
        raise NotImplementedError

    def t_from_sigma_bar(self, s) -> torch.Tensor:
        s = _f64(s)
        return self.t_from_lambda(-torch.log(s))

    def d_alpha(self, t) -> torch.Tensor:
        raise NotImplementedError

    def d_sigma(self, t) -> torch.Tensor:
        raise NotImplementedError

    def sigma_bar_range(self) -> tuple[float, float]:
        """(σ̄_min, σ̄_max) the model covers: the default range of Karras and log-SNR grids."""
        return float(self.sigma_bar(self.t_min)), float(self.sigma_bar(self.t_max_finite))

    t_max_finite: float = 1.0  # largest t with finite λ

    def default_grid(self, steps: int) -> torch.Tensor:
        return uniform_t(self, steps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class VP(Path):
    """Variance-preserving path from a discrete ``alphas_cumprod`` table (see module docstring)."""

    kind = "vp"

    def __init__(self, alphas_cumprod, name: str = "vp"):
        ac = np.asarray(alphas_cumprod, dtype=np.float64)
        if ac.ndim != 1 or len(ac) < 2 or not np.all((ac > 0) & (ac < 1)) or np.any(np.diff(ac) >= 0):
            raise ValueError("alphas_cumprod must be a 1-D strictly decreasing table with values in (0, 1)")
        self.name = name
        self.T = len(ac)
        self.alphas_cumprod = torch.from_numpy(ac)
        self._knots_t = torch.from_numpy(np.arange(0, self.T + 1, dtype=np.float64) / self.T)
        self._knots_la = torch.from_numpy(np.concatenate([[0.0], 0.5 * np.log(ac)]))
        self._on: dict = {}  # device -> (knots_t, knots_la) there, so t can live on any device
        self.t_min = 1.0 / self.T
        self.t_max_finite = 1.0

    def _knots(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device.type == "cpu":
            return self._knots_t, self._knots_la
        if device not in self._on:
            self._on[device] = (self._knots_t.to(device), self._knots_la.to(device))
        return self._on[device]

    def log_alpha(self, t):
        t = _f64(t)
        kt, kl = self._knots(t.device)
        i = torch.clamp(torch.searchsorted(kt, t.reshape(-1).contiguous(), right=True) - 1, 0, self.T - 1)
        t0, t1, l0, l1 = kt[i], kt[i + 1], kl[i], kl[i + 1]
        out = l0 + (l1 - l0) * (t.reshape(-1) - t0) / (t1 - t0)
        return out.reshape(t.shape)

    def _slope(self, t):
        t = _f64(t)
        kt, kl = self._knots(t.device)
        i = torch.clamp(torch.searchsorted(kt, t.reshape(-1).contiguous(), right=True) - 1, 0, self.T - 1)
        return ((kl[i + 1] - kl[i]) / (kt[i + 1] - kt[i])).reshape(t.shape)

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))

    def t_from_lambda(self, lam):
        lam = _f64(lam)
        la = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2 * lam)  # log α for α² + σ² = 1
        kt, kl = self._knots(lam.device)  # kl decreasing
        x = la.reshape(-1)
        j = torch.clamp(torch.searchsorted(-kl, (-x).contiguous(), right=True) - 1, 0, self.T - 1)
        t = kt[j] + (x - kl[j]) * (kt[j + 1] - kt[j]) / (kl[j + 1] - kl[j])
        return t.reshape(lam.shape)

    def d_alpha(self, t):
        return self.alpha(t) * self._slope(t)

    def d_sigma(self, t):
        a = self.alpha(t)
        return -a * self.d_alpha(t) / self.sigma(t)

    def timestep(self, t) -> torch.Tensor:
        """The (fractional) discrete timestep τ = t·T − 1 a diffusers model expects at time t."""
        return _f64(t) * self.T - 1


def _betas_to_alphas_cumprod(betas: torch.Tensor) -> np.ndarray:
    # float32 cumprod, as diffusers computes it, so our tables match a diffusers scheduler's bit for bit
    return torch.cumprod(1.0 - betas.to(torch.float32), dim=0).double().numpy()


def vp_linear(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> VP:
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    return VP(_betas_to_alphas_cumprod(betas), name="vp-linear")


def vp_scaled_linear(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> VP:
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    return VP(_betas_to_alphas_cumprod(betas), name="vp-scaled-linear")


def vp_cosine(T: int = 1000, max_beta: float = 0.999) -> VP:
    """Nichol & Dhariwal's cosine schedule, ``ā(t) = f(t)/f(0)``, ``f = cos²((t + 0.008)/1.008 · π/2)``."""
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
    return VP(_betas_to_alphas_cumprod(torch.tensor(betas, dtype=torch.float32)), name="vp-cosine")


class EDM(Path):
    """Variance exploding path of EDM (Karras et al. 2022): ``α = 1``, ``σ = σ_max·t``."""

    kind = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.name = "edm"
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.t_min = self.sigma_min / self.sigma_max
        self.t_max_finite = 1.0

    def log_alpha(self, t):
        return torch.zeros_like(_f64(t))

    def sigma(self, t):
        return _f64(t) * self.sigma_max

    def t_from_lambda(self, lam):
        return torch.exp(-_f64(lam)) / self.sigma_max

    def d_alpha(self, t):
        return torch.zeros_like(_f64(t))

    def d_sigma(self, t):
        return torch.full_like(_f64(t), self.sigma_max)

    def default_grid(self, steps: int) -> torch.Tensor:
        return karras(self, steps)


class Flow(Path):
    """Rectified flow (Liu et al. 2022; SD3, Flux): ``α = 1 − t``, ``σ = t``, velocity ``u = ε − x0``.

    ``shift`` (SD3's time shift, arXiv 2403.03206) moves the default grid only.
    """

    kind = "flow"

    def __init__(self, shift: float = 1.0):
        if shift <= 0:
            raise ValueError(f"flow shift must be > 0, got {shift}")
        self.shift = float(shift)
        self.name = "flow" if shift == 1.0 else f"flow(shift={shift:g})"
        self.t_min = 1e-3
        self.t_max_finite = 1.0 - 1e-3

    def log_alpha(self, t):
        return torch.log1p(-_f64(t))

    def sigma(self, t):
        return _f64(t)

    def t_from_lambda(self, lam):
        return torch.sigmoid(-_f64(lam))

    def d_alpha(self, t):
        return torch.full_like(_f64(t), -1.0)

    def d_sigma(self, t):
        return torch.ones_like(_f64(t))

    def default_grid(self, steps: int) -> torch.Tensor:
        return flow_shift(uniform_t(self, steps), self.shift)


PATH_NAMES = ("flow", "vp-linear", "vp-scaled-linear", "vp-cosine", "edm")


def get_path(path: "str | Path", **kwargs) -> Path:
    """A path by name (``"flow"``, ``"vp-linear"``, ``"vp-scaled-linear"``, ``"vp-cosine"``, ``"edm"``)."""
    if isinstance(path, Path):
        return path
    makers = {"flow": Flow, "vp-linear": vp_linear, "vp-scaled-linear": vp_scaled_linear,
              "vp-cosine": vp_cosine, "edm": EDM}
    if path not in makers:
        raise ValueError(f"unknown path {path!r}; allowed: {', '.join(PATH_NAMES)}")
    return makers[path](**kwargs)


# ---------------------------------------------------------------------------------------------------
# Time grids: decreasing float64 tensors of steps + 1 values of t.


def _check_steps(steps: int) -> None:
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def uniform_t(path: Path, steps: int, t_max: float = 1.0, t_min: float = 0.0) -> torch.Tensor:
    """Uniform in t from ``t_max`` to ``t_min`` (on VP: diffusers' "trailing" spacing)."""
    _check_steps(steps)
    return torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64)


def karras(path: Path, steps: int, sigma_min: float | None = None, sigma_max: float | None = None,
           rho: float = 7.0, append_zero: bool = True) -> torch.Tensor:
    """Karras et al. (arXiv 2206.00364) ρ-spacing in σ̄; with ``append_zero`` the last step goes to σ = 0."""
    _check_steps(steps)
    lo, hi = path.sigma_bar_range()
    sigma_min = lo if sigma_min is None else sigma_min
    sigma_max = hi if sigma_max is None else sigma_max
    n = steps if append_zero else steps + 1
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = path.t_from_sigma_bar(s)
    return torch.cat([t, t.new_zeros(1)]) if append_zero else t


def uniform_lambda(path: Path, steps: int, t_max: float | None = None, t_min: float | None = None,
                   append_zero: bool = True) -> torch.Tensor:
    """Uniform in log-SNR λ (DPM-Solver's "logSNR" spacing)."""
    _check_steps(steps)
    t_max = path.t_max_finite if t_max is None else t_max
    t_min = path.t_min if t_min is None else t_min
    n = steps if append_zero else steps + 1
    lam = torch.linspace(float(path.lam(t_max)), float(path.lam(t_min)), n, dtype=torch.float64)
    t = path.t_from_lambda(lam)
    return torch.cat([t, t.new_zeros(1)]) if append_zero else t


def flow_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift ``t' = s·t / (1 + (s − 1)·t)``; equals ``λ' = λ − log s`` and Flux's ``μ = log s``."""
    t = _f64(t)
    return shift * t / (1 + (shift - 1) * t)


GRID_KINDS = ("default", "uniform", "karras", "logsnr")


def make_grid(path: Path, steps: int, kind: str = "default") -> torch.Tensor:
    if kind == "default":
        _check_steps(steps)
        return path.default_grid(steps)
    grids = {"uniform": uniform_t, "karras": karras, "logsnr": uniform_lambda}
    if kind not in grids:
        raise ValueError(f"unknown grid {kind!r}; allowed: {', '.join(GRID_KINDS)}")
    return grids[kind](path, steps)
