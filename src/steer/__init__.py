"""steer: inference-time steering of diffusion and flow-matching models."""

from . import paths, prediction
from .models import Denoiser, denoiser
from .paths import get_path
from .sampling import NonFiniteError, SampleResult, sample
from .solvers import SOLVERS, get_solver

__version__ = "0.1.0"

__all__ = ["sample", "denoiser", "Denoiser", "get_path", "get_solver", "SOLVERS", "SampleResult",
           "NonFiniteError", "paths", "prediction"]
