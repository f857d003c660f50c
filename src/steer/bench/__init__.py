"""The benchmark harness: sweeps described in TOML (``config``), run cell by cell into a resumable SQLite store
(``store``, ``runner``).

A sweep expands into **cells** (model × solver × steps × guidance spec × seed); a cell is keyed by the hash of its
canonical configuration, so a cell already in the database is never run again, and a sweep killed at any moment
resumes where it stopped.
"""

from .config import Cell, ConfigError, Sweep, load_sweep
from .runner import run
from .store import Store

__all__ = ["Cell", "ConfigError", "Sweep", "load_sweep", "run", "Store"]
