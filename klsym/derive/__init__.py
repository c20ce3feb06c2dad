"""Derive: SymPy. Estimators k(r), divergence generators, the formula parser, the symbolic analysis
(f(1..3), convexity, non-negativity, value and implied gradient divergences) and Gaussian closed forms."""
