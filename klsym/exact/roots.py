r"""Brent's root finder on a bracket, in Python: the exact layer refines a few sign changes per call, and
importing :mod:`scipy.optimize` for them would cost more (about 0.5 s) than everything else ``klsym exact`` does
with a warm cache.

:func:`brentq` follows SciPy's ``brentq`` (``scipy/optimize/Zeros/brentq.c``) step by step, so it returns the
same float (a test compares them bit for bit).

>>> brentq(lambda x: x * x - 2.0, 0.0, 2.0, xtol=1e-15, rtol=1e-15)
1.414213562373095
"""
from __future__ import annotations

import math
from collections.abc import Callable


def brentq(f: Callable[[float], float], a: float, b: float, xtol: float = 2e-12, rtol: float = 8.881784197001252e-16,
           maxiter: int = 100) -> float:
    r"""A root of ``f`` in :math:`[a, b]`, where ``f(a)`` and ``f(b)`` differ in sign: inverse quadratic
    interpolation, secant or bisection steps, stopping when the bracket is below
    :math:`(x_{tol} + r_{tol} |x|) / 2`. ``RuntimeError`` after ``maxiter`` steps, ``ValueError`` without a sign
    change (as SciPy)."""
    xpre, xcur = float(a), float(b)
    xblk = fblk = spre = scur = 0.0
    fpre, fcur = float(f(xpre)), float(f(xcur))
    if fpre == 0:
        return xpre
    if fcur == 0:
        return xcur
    if math.copysign(1.0, fpre) == math.copysign(1.0, fcur):
        raise ValueError("f(a) and f(b) must have different signs")
    for _ in range(maxiter):
        if fpre != 0 and fcur != 0 and math.copysign(1.0, fpre) != math.copysign(1.0, fcur):
            xblk, fblk = xpre, fpre
            spre = scur = xcur - xpre
        if abs(fblk) < abs(fcur):
            xpre, xcur, xblk = xcur, xblk, xcur
            fpre, fcur, fblk = fcur, fblk, fcur
        delta = (xtol + rtol * abs(xcur)) / 2
        sbis = (xblk - xcur) / 2
        if fcur == 0 or abs(sbis) < delta:
            return xcur
        if abs(spre) > delta and abs(fcur) < abs(fpre):
            if xpre == xblk:  # interpolate
                stry = -fcur * (xcur - xpre) / (fcur - fpre)
            else:  # extrapolate
                dpre = (fpre - fcur) / (xpre - xcur)
                dblk = (fblk - fcur) / (xblk - xcur)
                stry = -fcur * (fblk * dblk - fpre * dpre) / (dblk * dpre * (fblk - fpre))
            if 2 * abs(stry) < min(abs(spre), 3 * abs(sbis) - delta):  # good short step
                spre, scur = scur, stry
            else:  # bisect
                spre = scur = sbis
        else:  # bisect
            spre = scur = sbis
        xpre, fpre = xcur, fcur
        xcur += scur if abs(scur) > delta else (delta if sbis > 0 else -delta)
        fcur = float(f(xcur))
    raise RuntimeError(f"brentq did not converge in {maxiter} iterations")


__all__ = ["brentq"]
