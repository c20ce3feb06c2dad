r"""The symbols every derivation shares, with their assumptions declared.

``r`` is the density ratio :math:`r = p(x)/q(x)` with :math:`x \sim q`; ``t`` is :math:`\log r`.

>>> r.is_positive, t.is_real
(True, True)
"""

import sympy as sp

r = sp.Symbol("r", positive=True)
t = sp.Symbol("t", real=True)
u = sp.Symbol("u", positive=True)  # integration variable standing in for r
x = sp.Symbol("x", real=True)
delta = sp.Symbol("delta", real=True)
alpha = sp.Symbol("alpha", real=True)
lam = sp.Symbol("lambda", real=True)

__all__ = ["r", "t", "u", "x", "delta", "alpha", "lam"]
