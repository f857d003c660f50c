"""Testbeds: exact Gaussian mixtures (``gmm``)."""
