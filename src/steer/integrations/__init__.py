"""Bridges between steer and other libraries (optional dependencies are imported lazily)."""
