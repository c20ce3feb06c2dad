r"""Gradient modes and the per-sample gradient weight of each (no SymPy: the exact layer and the Monte Carlo
engine both use them).

Theta the parameters of the sampler q, samples held fixed: ``loss`` = E[grad_theta k(r(x))] (pathwise),
``reward`` = E[k(r(x)) grad_theta log q_theta(x)] (k as a stop-gradient reward), ``full`` = loss + reward.

>>> MODES
('loss', 'reward', 'full')
"""

from __future__ import annotations

#: Gradient modes, theta the parameters of q and samples held fixed (see :func:`gradient_weights`).
MODES = ("loss", "reward", "full")


def gradient_weights(value, slope, t, modes=MODES) -> dict:
    r"""The weight :math:`w(t)` of the per-sample gradient :math:`w(t)\, \nabla_\theta \log q_\theta(x)`, per mode.

    With :math:`t = \log p(x) - \log q_\theta(x)`, :math:`\nabla_\theta t = -\nabla_\theta \log q_\theta`, so

    .. math::

        w_{loss} = -\frac{d k_{sur}}{dt}(t), \qquad w_{reward} = k(e^t), \qquad w_{full} = w_{loss} + w_{reward}.

    The one place this rule is written: the exact layer and the Monte Carlo engine both call it.

    Parameters
    ----------
    value, slope : callable
        :math:`t \mapsto k(e^t)` and :math:`t \mapsto \frac{d}{dt} k_{sur}(e^t)`, compiled for the array's
        library (:attr:`Estimator.numeric`, :attr:`Estimator.numeric_dt` or a backend's).
    t : array
        Log-ratios.
    modes : sequence of str
        Any of ``loss``, ``reward``, ``full``.

    >>> import numpy as np
    >>> from klsym.derive.estimators import get_estimator
    >>> k3 = get_estimator("k3")
    >>> w = gradient_weights(k3.numeric, k3.numeric_dt, np.array([0.0, np.log(2.0)]))
    >>> [float(v) for v in w["loss"]], [round(float(v), 6) for v in w["full"]]
    ([-0.0, -1.0], [0.0, -0.693147])
    """
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise ValueError(f"unknown gradient mode(s) {unknown}; choose from: {', '.join(MODES)}")
    out = {}
    if "loss" in modes or "full" in modes:
        out["loss"] = -slope(t)
    if "reward" in modes or "full" in modes:
        out["reward"] = value(t)
    if "full" in modes:
        out["full"] = out["loss"] + out["reward"]
    return {mode: out[mode] for mode in modes}


__all__ = ["MODES", "gradient_weights"]
