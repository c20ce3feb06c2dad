r"""Distribution families for the sampler q and the reference p.

A family is three things: a log-density, a sampler and the score
:math:`s(x) = \nabla_\theta \log q_\theta(x)` with respect to its own parameters. Everything in
:mod:`klsym.exact.expectations` and the Monte Carlo engine is written against that interface, so a new family
(Student-t, Laplace) plugs in without touching estimator code.

>>> q, p = Gaussian(0.0, 1.0), Gaussian(1.0, 1.1)
>>> q.param_names
('mu', 'sigma')
>>> round(float(log_ratio(p, q, np.array(0.0))), 6)   # t(0) = log p(0) - log q(0)
-0.508533

Bad parameters give one clear error:

>>> Gaussian(0.0, -1.0)
Traceback (most recent call last):
...
ValueError: Gaussian sigma must be positive and finite, got -1.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from array_api_compat import array_namespace

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_SQRT_HALF = math.sqrt(0.5)


def _ndtr_scalar(z: float) -> float:
    """Standard normal CDF, as cephes' ``ndtr``: erf near 0, erfc of |z| in the tails (no cancellation)."""
    if math.isnan(z):
        return z
    x = z * _SQRT_HALF
    if abs(x) < _SQRT_HALF:
        return 0.5 + 0.5 * math.erf(x)
    tail = 0.5 * math.erfc(abs(x))
    return 1.0 - tail if x > 0 else tail


#: The standard normal CDF, elementwise (the exact layer needs it at a few points; SciPy's import costs 0.2 s).
ndtr = np.vectorize(_ndtr_scalar, otypes=[np.float64])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    r""":math:`x - \log \sum e^x` of a 1-D array, as ``scipy.special.log_softmax`` computes it (the same numbers):
    shifted by the largest finite-or-not maximum (0 if that is not finite).

    >>> log_softmax(np.array([1000.0, 1.0]))
    array([   0., -999.])
    """
    top = np.max(logits, keepdims=True)
    top[~np.isfinite(top)] = 0
    shifted = logits - top
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.sum(np.exp(shifted), keepdims=True))


def _finite_float(value, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a real number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite, got {number}")
    return number


def real_array(values, what: str) -> np.ndarray:
    """``values`` as a new float64 array, or one clear error naming ``what``."""
    try:
        return np.array(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an array of real numbers") from None


@dataclass(frozen=True)
class Gaussian:
    r"""The 1-D normal distribution :math:`\mathcal{N}(\mu, \sigma^2)`; parameters :math:`\theta = (\mu, \sigma)`.

    Parameters
    ----------
    mu : float
        Mean (finite).
    sigma : float
        Standard deviation (positive and finite).

    Examples
    --------
    >>> g = Gaussian(0.0, 2.0)
    >>> g.score(np.array([2.0]))            # d/dmu = (x-mu)/sigma^2, d/dsigma = -1/sigma + (x-mu)^2/sigma^3
    array([[0.5, 0. ]])
    """

    mu: float
    sigma: float
    name = "gaussian"
    param_names = ("mu", "sigma")

    def __post_init__(self):
        mu = _finite_float(self.mu, "Gaussian mu")
        try:
            sigma = float(self.sigma)
        except (TypeError, ValueError):
            raise ValueError(f"Gaussian sigma must be a real number, got {self.sigma!r}") from None
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"Gaussian sigma must be positive and finite, got {sigma}")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)

    @property
    def params(self) -> tuple[float, float]:
        return (self.mu, self.sigma)

    @property
    def loc_scale(self) -> tuple[float, float]:
        """A location and scale for quadrature grids (z = (x - loc) / scale)."""
        return (self.mu, self.sigma)

    def standardize(self, x):
        return (x - self.mu) / self.sigma

    def log_prob(self, x):
        r""":math:`\log \mathcal{N}(x; \mu, \sigma^2)`, works for float64 and longdouble arrays."""
        z = self.standardize(x)
        return -0.5 * z * z - math.log(self.sigma) - _LOG_SQRT_2PI

    def sample(self, rng: np.random.Generator, size) -> np.ndarray:
        return rng.normal(self.mu, self.sigma, size)

    def mass_between(self, x_lo, x_hi):
        r""":math:`P(x_{lo} < X < x_{hi})` without cancellation in either tail (``ndtr`` of the smaller side)."""
        z_lo, z_hi = self.standardize(np.asarray(x_lo, float)), self.standardize(np.asarray(x_hi, float))
        right = ndtr(-z_lo) - ndtr(-z_hi)
        return np.where(z_lo > 0, right, ndtr(z_hi) - ndtr(z_lo))

    def score(self, x):
        r"""Score, shape ``x.shape + (2,)``: :math:`((x-\mu)/\sigma^2,\ ((x-\mu)^2/\sigma^2 - 1)/\sigma)`.

        Works on the array's own library (NumPy, CuPy), so the Monte Carlo engine's CuPy path can use it.
        """
        xp = np if isinstance(x, (np.ndarray, np.generic, list, tuple, float, int)) else array_namespace(x)
        z = self.standardize(xp.asarray(x))
        return xp.stack([z / self.sigma, (z * z - 1.0) / self.sigma], axis=-1)


@dataclass(frozen=True, eq=False)
class Categorical:
    r"""A categorical distribution over ``V`` tokens given by logits; parameters :math:`\theta` = the logits.

    ``-inf`` logits are allowed (tokens of probability zero); NaN, ``+inf`` and all ``-inf`` are not.

    Examples
    --------
    >>> c = Categorical([0.0, 0.0, -np.inf])
    >>> c.probs
    array([0.5, 0.5, 0. ])
    >>> Categorical([-np.inf, -np.inf])
    Traceback (most recent call last):
    ...
    ValueError: Categorical logits are all -inf: no token has positive probability
    """

    logits: np.ndarray
    log_probs: np.ndarray = field(init=False, repr=False)
    name = "categorical"

    def __post_init__(self):
        logits = real_array(self.logits, "Categorical logits")
        if logits.ndim != 1 or logits.size == 0:
            raise ValueError(f"Categorical logits must be a non-empty 1-D array, got shape {logits.shape}")
        if np.isnan(logits).any():
            raise ValueError("Categorical logits contain NaN")
        if np.isposinf(logits).any():
            raise ValueError("Categorical logits contain +inf")
        if np.isneginf(logits).all():
            raise ValueError("Categorical logits are all -inf: no token has positive probability")
        logits.setflags(write=False)
        log_probs = log_softmax(logits)
        log_probs.setflags(write=False)
        object.__setattr__(self, "logits", logits)
        object.__setattr__(self, "log_probs", log_probs)

    @classmethod
    def from_file(cls, path: str | Path) -> Categorical:
        """Read logits from a ``.npy`` file (1-D) or a text file of whitespace-separated numbers."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"logits file not found: {path}")
        try:
            data = np.load(path) if path.suffix == ".npy" else np.array(path.read_text().split(), dtype=np.float64)
        except ValueError as err:
            raise ValueError(f"cannot read logits from {path}: {err}") from None
        data = np.asarray(data)
        if data.ndim != 1:  # a (batch, vocab) array is many distributions, not one: never flatten it
            raise ValueError(
                f"logits file {path} holds an array of shape {data.shape}; one distribution "
                "needs a 1-D array of logits (one per token)"
            )
        return cls(data)

    @property
    def size(self) -> int:
        return int(self.logits.size)

    @property
    def probs(self) -> np.ndarray:
        return np.exp(self.log_probs)

    def log_prob(self, x):
        return self.log_probs[np.asarray(x)]

    def sample(self, rng: np.random.Generator, size) -> np.ndarray:
        return rng.choice(self.size, size=size, p=self.probs)

    def score(self, x) -> np.ndarray:
        r"""Score wrt the logits, shape ``x.shape + (V,)``: one-hot(x) minus the probabilities (small V only)."""
        x = np.asarray(x)
        out = -np.broadcast_to(self.probs, x.shape + (self.size,)).copy()
        np.put_along_axis(out, x[..., None], np.take_along_axis(out, x[..., None], -1) + 1.0, -1)
        return out


def log_ratio(p, q, x):
    r"""The log-ratio :math:`t(x) = \log p(x) - \log q(x)`.

    For two Gaussians it is computed as :math:`\log(\sigma_q/\sigma_p) + (z_q - z_p)(z_q + z_p)/2`
    with :math:`z_q - z_p = ((x - \mu_q)(\sigma_p - \sigma_q)/\sigma_q + \mu_p - \mu_q) / \sigma_p`
    and :math:`\log(\sigma_q/\sigma_p) = -\operatorname{log1p}((\sigma_p - \sigma_q)/\sigma_q)`: no
    cancellation when p is close to q (the differences of nearby parameters are exact in floating point).

    >>> sigma_p = 1.0 + 1e-8                 # at x = mu: t = -log(sigma_p), to the last bit
    >>> float(log_ratio(Gaussian(0.0, sigma_p), Gaussian(0.0, 1.0), np.array(0.0))) == -math.log1p(sigma_p - 1.0)
    True
    """
    if isinstance(p, Gaussian) and isinstance(q, Gaussian):
        # augmented operations: on arrays they reuse two temporaries (the same IEEE operations, so the same
        # bits as the formula written out), on scalars they just rebind
        centred = x - q.mu
        with np.errstate(over="ignore", invalid="ignore"):
            difference = centred * ((p.sigma - q.sigma) / q.sigma)
            difference += p.mu - q.mu
            difference /= p.sigma  # z_q - z_p
            centred /= q.sigma  # z_q
            centred *= 2
            centred -= difference
            difference *= 0.5
            difference *= centred
            difference += _log_sigma_ratio(q.sigma, p.sigma)
            return difference
    return p.log_prob(x) - q.log_prob(x)


def _log_sigma_ratio(sigma_q: float, sigma_p: float) -> float:
    r""":math:`\log(\sigma_q / \sigma_p)` accurate when the sigmas are close and finite when they are far apart."""
    if 0.5 < sigma_p / sigma_q < 2.0:
        return -math.log1p((sigma_p - sigma_q) / sigma_q)
    return math.log(sigma_q) - math.log(sigma_p)


def check_same_family(q, p) -> None:
    """Raise a clear error when q and p cannot form a pair (different families or vocab sizes)."""
    if type(q) is not type(p):
        raise ValueError(f"q and p must be of the same family, got {type(q).__name__} and {type(p).__name__}")
    if isinstance(q, Categorical) and q.size != p.size:
        raise ValueError(f"q and p must have the same vocabulary size, got {q.size} and {p.size}")


__all__ = ["Gaussian", "Categorical", "log_ratio", "check_same_family"]
