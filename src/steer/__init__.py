"""steer: inference-time steering of diffusion and flow-matching models."""

from . import particles, paths, prediction, rewards  # noqa: E402  (particle steering: steer.smc)
from .core import NonFiniteError
from .models import Denoiser, denoiser
from .particles import SMCResult, smc
from .paths import get_path
from .sampling import Sampler, SampleResult, Step, sample, sampler
from .solvers import SOLVERS, get_solver
from .testbeds import digits, gmm  # noqa: F401  (they register their models by name)

__version__ = "0.1.0"

__all__ = ["sample", "sampler", "Sampler", "Step", "denoiser", "Denoiser", "get_path", "get_solver", "SOLVERS",
           "SampleResult", "NonFiniteError", "paths", "prediction", "smc", "SMCResult", "particles", "rewards"]
