"""Simulate: the streaming Monte Carlo engine on NumPy (or CuPy), with reproducible blocks."""
