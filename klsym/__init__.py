"""klsym: Monte Carlo estimators of KL divergence, derived, computed exactly and sampled."""

__version__ = "0.1.0"
