r"""Tabular autoregressive policies over V tokens and a fixed horizon T, and their exact sums.

A sequence :math:`y = (y_1, \dots, y_T)` is drawn token by token, :math:`y_t \sim q(\cdot \mid y_{<t})`.
The parameters :math:`\theta` of :class:`Autoregressive` are the logits of every prefix, one row of V logits per
prefix :math:`u = y_{<t}` (t = 1..T, the empty prefix included):

**File format** (``.npy``, what ``python -m klsym sequence --q-model`` reads): a float array of shape (P, V),

.. math:: P = 1 + V + V^2 + \dots + V^{T-1} = \frac{V^T - 1}{V - 1},

rows ordered by prefix length, then lexicographically by the prefix's tokens: the empty prefix is row 0,
prefix (a) is row 1 + a, prefix (a, b) is row 1 + V + a V + b, prefix :math:`(u_1..u_d)` is row
:math:`\text{offset}_d + \sum_i u_i V^{d-i}` with :math:`\text{offset}_d = (V^d - 1)/(V - 1)`. T and V follow from
the shape. Gradients with respect to the logits are flat vectors of length P V in the same row-major order.

**End of sequence** (optional, ``eos=TOKEN``; not stored in the file): a sequence stops at its first EOS token
(included) or after T tokens, so lengths vary from 1 to T. The rows of prefixes that contain EOS stay in the table
but are never reached (their probability is zero, and so is their gradient).

Exact quantities never loop over sequences in Python: every function works depth by depth on the
(V^d, V) block of rows of depth d (the children of a depth-d row are the rows of depth d + 1 in the same
order), so its cost is O(P V) and its memory a few arrays of the parameters' size. Only quantities of the
whole-sequence ratio :math:`\prod_t r_t` need all V^T sequences; there the leaves are the (V^{T-1}, V) block of
the last depth, evaluated in blocks of rows.

>>> q = Autoregressive.random(3, 2, seed=0)
>>> q.logits.shape, q.vocab_size, q.horizon, q.n_sequences
((4, 3), 3, 2, 9)
>>> q.row_of(()), q.row_of((2,))   # prefix (2) is row 1 + 2
(0, 3)
>>> Autoregressive(np.zeros((5, 3)))  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: autoregressive logits of shape (5, 3): 5 rows is not 1 + V + ... + V^(T-1) for V = 3 and any T ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy.special import log_softmax

from klsym.exact.families import real_array

#: Largest number V^T of token sequences analysed exactly (the same limit as the i.i.d. enumeration).
MAX_SEQUENCES = 4_194_304
#: Rows of the last depth evaluated at once where a whole-sequence function is applied to the leaves.
LEAF_BLOCK_ROWS = 1 << 14


def prefix_offsets(vocab_size: int, horizon: int) -> np.ndarray:
    r"""First row of each depth d = 0..T: :math:`\text{offset}_d = 1 + V + \dots + V^{d-1}`.

    >>> prefix_offsets(3, 3).tolist()
    [0, 1, 4, 13]
    """
    return np.concatenate([[0], np.cumsum(np.power(vocab_size, np.arange(horizon), dtype=np.int64))])


def horizon_of(n_rows: int, vocab_size: int) -> int | None:
    """The T with 1 + V + ... + V^(T-1) = n_rows, or None."""
    total, power, horizon = 0, 1, 0
    while total < n_rows:
        total, power, horizon = total + power, power * vocab_size, horizon + 1
    return horizon if total == n_rows and horizon >= 1 else None


@dataclass(frozen=True, eq=False)
class Autoregressive:
    r"""A tabular autoregressive policy: logits of every prefix, shape (P, V) (see the module docstring).

    Parameters
    ----------
    logits : array_like, shape (P, V)
        Finite real numbers; V >= 2, :math:`V^T \le` :data:`MAX_SEQUENCES`.
    eos : int, optional
        The end-of-sequence token (variable lengths); None for the fixed horizon T.

    Examples
    --------
    >>> q = Autoregressive.from_bigram(np.log([[0.9, 0.1], [0.2, 0.8]]), horizon=3)
    >>> round(float(np.exp(q.log_prob((0, 0, 1)))), 12)   # uniform first token, then the bigram table: .5 .9 .1
    0.045
    """

    logits: np.ndarray
    eos: int | None = None
    log_probs: np.ndarray = field(init=False, repr=False)
    name = "autoregressive"

    def __post_init__(self):
        logits = real_array(self.logits, "autoregressive logits")
        if logits.ndim != 2 or logits.shape[1] < 2 or logits.shape[0] < 1:
            raise ValueError(
                f"autoregressive logits must have shape (P, V) with V >= 2 tokens, got shape {logits.shape}"
            )
        n_rows, vocab = logits.shape
        horizon = horizon_of(n_rows, vocab)
        if horizon is None:
            valid = ", ".join(str(int(v)) for v in prefix_offsets(vocab, 4)[1:]) + ", ..."
            raise ValueError(
                f"autoregressive logits of shape {logits.shape}: {n_rows} rows is not "
                f"1 + V + ... + V^(T-1) for V = {vocab} and any T >= 1 (valid: {valid})"
            )
        if vocab**horizon > MAX_SEQUENCES:
            raise ValueError(
                f"V^T = {vocab}^{horizon} = {vocab**horizon:,} sequences exceed the exact limit {MAX_SEQUENCES:,}"
            )
        if np.isnan(logits).any():
            first = int(np.argwhere(np.isnan(logits))[0, 0])
            raise ValueError(f"autoregressive logits contain NaN (first at row {first})")
        if not np.isfinite(logits).all():
            raise ValueError(
                "autoregressive logits must be finite (an infinite logit makes a sequence KL "
                "infinite or a token impossible); use a large finite negative number instead"
            )
        if self.eos is not None:
            if (
                isinstance(self.eos, (bool, np.bool_))
                or not isinstance(self.eos, (int, np.integer))
                or not 0 <= self.eos < vocab
            ):
                raise ValueError(f"eos must be a token id in 0..{vocab - 1}, got {self.eos!r}")
            object.__setattr__(self, "eos", int(self.eos))
        logits.setflags(write=False)
        log_probs = log_softmax(logits, axis=-1)
        log_probs.setflags(write=False)
        object.__setattr__(self, "logits", logits)
        object.__setattr__(self, "log_probs", log_probs)

    # --- shape ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return int(self.logits.shape[1])

    @property
    def horizon(self) -> int:
        return horizon_of(self.logits.shape[0], self.vocab_size)

    @property
    def n_prefixes(self) -> int:
        return int(self.logits.shape[0])

    @property
    def n_sequences(self) -> int:
        return self.vocab_size**self.horizon

    @property
    def size(self) -> int:
        """Number of parameters P V (length of a flat gradient)."""
        return int(self.logits.size)

    @cached_property
    def offsets(self) -> np.ndarray:
        return prefix_offsets(self.vocab_size, self.horizon)

    @cached_property
    def probs(self) -> np.ndarray:
        probs = np.exp(self.log_probs)
        probs.setflags(write=False)
        return probs

    @cached_property
    def prefix_probs(self) -> np.ndarray:
        """Probability of every prefix (shape (P,), read-only): :func:`prefix_mass` computed once."""
        mass = prefix_mass(self)
        mass.setflags(write=False)
        return mass

    @cached_property
    def continuing(self) -> np.ndarray:
        """1.0 for the tokens after which the sequence goes on, 0.0 for EOS (shape (V,))."""
        out = np.ones(self.vocab_size)
        if self.eos is not None:
            out[self.eos] = 0.0
        out.setflags(write=False)
        return out

    def rows(self, depth: int) -> slice:
        """The rows of the prefixes of length ``depth`` (0 <= depth < T)."""
        return slice(int(self.offsets[depth]), int(self.offsets[depth + 1]))

    def row_of(self, prefix) -> int:
        """Row index of a prefix (a tuple of token ids, length < T)."""
        prefix = tuple(int(a) for a in prefix)
        if len(prefix) >= self.horizon or any(not 0 <= a < self.vocab_size for a in prefix):
            raise ValueError(f"{prefix} is not a prefix of length < {self.horizon} over {self.vocab_size} tokens")
        index = 0
        for a in prefix:
            index = index * self.vocab_size + a
        return int(self.offsets[len(prefix)]) + index

    def log_prob(self, sequence) -> float:
        r""":math:`\log q(y) = \sum_t \log q(y_t \mid y_{<t})` of one whole sequence."""
        sequence = tuple(int(a) for a in sequence)
        ends = [i for i, a in enumerate(sequence) if a == self.eos]
        complete = len(sequence) == self.horizon if not ends else ends[0] == len(sequence) - 1
        if not (complete and 1 <= len(sequence) <= self.horizon):
            raise ValueError(
                f"not a whole sequence: {sequence} (T = {self.horizon} tokens"
                + ("" if self.eos is None else f", or fewer ending at the first eos {self.eos}")
                + ")"
            )
        return float(sum(self.log_probs[self.row_of(sequence[:i]), a] for i, a in enumerate(sequence)))

    def check_pair(self, other, other_name: str = "p") -> None:
        """Raise one clear error when ``other`` (named ``other_name`` in it) cannot be paired with this policy."""
        name = other_name
        if not isinstance(other, Autoregressive):
            raise ValueError(f"q and {name} must both be Autoregressive, got {type(other).__name__}")
        if other.logits.shape != self.logits.shape:
            raise ValueError(
                f"q and {name} must have the same shape (V, T): q has V={self.vocab_size}, "
                f"T={self.horizon}; {name} has V={other.vocab_size}, T={other.horizon}"
            )
        if other.eos != self.eos:
            raise ValueError(f"q and {name} must have the same end-of-sequence token, got {self.eos} and {other.eos}")

    # --- constructors --------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path, eos: int | None = None) -> Autoregressive:
        """Read a (P, V) ``.npy`` file (the format in the module docstring)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"model file not found: {path}")
        try:
            data = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise ValueError(f"cannot read a (P, V) .npy array from {path}: {err}") from None
        return cls(data, eos)

    def save(self, path: str | Path) -> None:
        np.save(Path(path), np.asarray(self.logits))

    @classmethod
    def random(cls, vocab_size: int, horizon: int, seed: int = 0, scale: float = 1.0) -> Autoregressive:
        """Logits i.i.d. N(0, scale^2) for every prefix, from ``np.random.default_rng(seed)``."""
        vocab_size, horizon = _check_shape(vocab_size, horizon)
        rows = int(prefix_offsets(vocab_size, horizon)[-1])
        return cls(scale * np.random.default_rng(seed).standard_normal((rows, vocab_size)))

    @classmethod
    def from_bigram(cls, table, horizon: int, initial=None) -> Autoregressive:
        r"""A Markov (bigram) policy: :math:`q(y_t \mid y_{<t}) = \text{softmax}(\text{table}[y_{t-1}])`.

        ``table`` is (V, V) logits (row = previous token); ``initial`` the first token's logits (default uniform).
        """
        table = np.asarray(table, dtype=np.float64)
        if table.ndim != 2 or table.shape[0] != table.shape[1]:
            raise ValueError(f"a bigram table is (V, V) logits, got shape {table.shape}")
        vocab_size, horizon = _check_shape(table.shape[0], horizon)
        initial = np.zeros(vocab_size) if initial is None else np.asarray(initial, dtype=np.float64)
        if initial.shape != (vocab_size,):
            raise ValueError(f"initial logits must have shape ({vocab_size},), got {initial.shape}")
        # a depth-d prefix (d >= 1) ends with token (index mod V): rows of depth d cycle through the table
        blocks = [initial[None, :]] + [np.tile(table, (vocab_size ** (d - 1), 1)) for d in range(1, horizon)]
        return cls(np.concatenate(blocks))

    @classmethod
    def zipf(
        cls, vocab_size: int, horizon: int, exponent: float = 1.1, seed: int = 0, noise: float = 0.0
    ) -> Autoregressive:
        r"""LLM-shaped: each prefix's logits are :math:`-s \log(\text{rank})` over a random permutation of the
        tokens (every context prefers different tokens, with a Zipf tail), plus optional N(0, noise^2)."""
        vocab_size, horizon = _check_shape(vocab_size, horizon)
        rng = np.random.default_rng(seed)
        rows = int(prefix_offsets(vocab_size, horizon)[-1])
        ranks = rng.permuted(np.tile(np.arange(1, vocab_size + 1), (rows, 1)), axis=1)
        logits = -float(exponent) * np.log(ranks)
        if noise:
            logits = logits + noise * rng.standard_normal(logits.shape)
        return cls(logits)

    def tempered(self, temperature: float) -> Autoregressive:
        """The same policy at temperature tau: logits / tau."""
        temperature = float(temperature)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be positive and finite, got {temperature}")
        return Autoregressive(self.logits / temperature, self.eos)

    def perturbed(self, scale: float, seed: int = 0) -> Autoregressive:
        """The same policy with N(0, scale^2) noise added to every logit."""
        noise = np.random.default_rng(seed).standard_normal(self.logits.shape)
        return Autoregressive(self.logits + float(scale) * noise, self.eos)

    def interpolated(self, other: Autoregressive, weight: float) -> Autoregressive:
        """Logits (1 - weight) * self + weight * other: a path from self (0) to other (1)."""
        self.check_pair(other)
        return Autoregressive((1.0 - weight) * self.logits + weight * other.logits, self.eos)

    def with_eos(self, eos: int | None) -> Autoregressive:
        """The same logits with ``eos`` as the end-of-sequence token (None: fixed horizon)."""
        return Autoregressive(self.logits, eos)


def _check_shape(vocab_size, horizon) -> tuple[int, int]:
    for value, what in ((vocab_size, "V (vocabulary size)"), (horizon, "T (horizon)")):
        if isinstance(value, (bool, np.bool_)) or int(value) != value:
            raise ValueError(f"{what} must be an integer, got {value!r}")
    vocab_size, horizon = int(vocab_size), int(horizon)
    if vocab_size < 2 or horizon < 1:
        raise ValueError(f"need V >= 2 tokens and T >= 1 positions, got V={vocab_size}, T={horizon}")
    if vocab_size**horizon > MAX_SEQUENCES:
        raise ValueError(
            f"V^T = {vocab_size}^{horizon} = {vocab_size**horizon:,} sequences exceed the exact limit {MAX_SEQUENCES:,}"
        )
    return vocab_size, horizon


# --- exact sums, depth by depth ----------------------------------------------------------------


def prefix_mass(policy: Autoregressive) -> np.ndarray:
    r"""Probability of every prefix under ``policy``, shape (P,): :math:`q(u_1..u_d) = \prod_i q(u_i \mid u_{<i})`."""
    probs = policy.probs
    mass = np.empty(policy.n_prefixes)
    mass[0] = 1.0
    for depth in range(1, policy.horizon):
        parent = policy.rows(depth - 1)
        mass[policy.rows(depth)] = (mass[parent, None] * probs[parent] * policy.continuing).ravel()
    return mass


#: Rows whose centred logit difference stays within this radius get their log-ratio through expm1/log1p.
STABLE_LOG_RATIO_RADIUS = 1.0


def log_ratio_with_error(q: Autoregressive, p: Autoregressive) -> tuple[np.ndarray, np.ndarray]:
    r"""The per-token log-ratio :math:`t(u, a) = \log p(a|u) - \log q(a|u)` (shape (P, V)) computed without
    cancellation near q = p, and a bound of its rounding error in units of the machine epsilon.

    The difference of the two log-softmaxes has an error of :math:`\epsilon |\log q|` (O(1)), far above t itself
    when q is close to p. With the logit difference :math:`d = z_p - z_q`, centred by its q-mean
    (:math:`d' = d - \sum_a q_a d_a`; a softmax is shift invariant),

    .. math:: t = d' - \operatorname{log1p}\Big(\textstyle\sum_a q_a \operatorname{expm1}(d'_a) / \sum_a q_a\Big)

    is accurate to :math:`\epsilon \max_a |d_a|`. Rows with :math:`\max_a |d'_a| >` :data:`STABLE_LOG_RATIO_RADIUS`
    (no cancellation to avoid there) use the log-softmax difference, error :math:`\epsilon (|\log p| + |\log q|)`.

    >>> p = Autoregressive.random(3, 2, seed=0); q = p.perturbed(1e-9, seed=1)
    >>> t = log_ratio(q, p); exact = np.log(p.probs.astype(np.longdouble)) - np.log(q.probs.astype(np.longdouble))
    >>> bool(np.max(np.abs(t - exact)) < 1e-9 * 1e-6)   # the log-softmax difference is off by ~1e-16
    True
    """
    q.check_pair(p)
    difference = p.logits - q.logits
    probs = q.probs
    total = np.sum(probs, axis=-1, keepdims=True)  # 1 up to rounding: divide it out so a constant shift cancels
    centred = difference - np.sum(probs * difference, axis=-1, keepdims=True) / total
    near = np.max(np.abs(centred), axis=-1, keepdims=True) <= STABLE_LOG_RATIO_RADIUS
    small = np.where(near, centred, 0.0)
    shift = np.log1p(np.sum(probs * np.expm1(small), axis=-1, keepdims=True) / total)
    t = np.where(near, small - shift, p.log_probs - q.log_probs)
    row_scale = np.max(np.abs(difference), axis=-1, keepdims=True)
    error = np.where(near, 2.0 * row_scale + np.abs(shift), np.abs(p.log_probs) + np.abs(q.log_probs)) + np.abs(t)
    return t, error


def log_ratio(q: Autoregressive, p: Autoregressive) -> np.ndarray:
    r""":math:`\log p(a|u) - \log q(a|u)`, shape (P, V), without cancellation near q = p
    (see :func:`log_ratio_with_error`)."""
    return log_ratio_with_error(q, p)[0]


def probability_difference(q: Autoregressive, p: Autoregressive, t: np.ndarray | None = None) -> np.ndarray:
    r""":math:`q(a|u) - p(a|u) = -q(a|u)\, \operatorname{expm1}(t)`, shape (P, V), accurate near q = p
    (``t`` = :func:`log_ratio`, computed when not given)."""
    t = log_ratio(q, p) if t is None else t
    near = np.abs(t) <= STABLE_LOG_RATIO_RADIUS
    return np.where(near, -q.probs * np.expm1(np.where(near, t, 0.0)), q.probs - p.probs)


def conditional_kls(q: Autoregressive, p: Autoregressive) -> dict:
    r"""Per prefix u, :math:`KL(q(\cdot|u) \| p(\cdot|u))` and :math:`KL(p(\cdot|u) \| q(\cdot|u))`, shape (P,).

    Written as q-expectations of the non-negative k3 and rev_k3 (:math:`\sum_a q_a (r_a - 1) = 0`), so no
    cancellation near q = p: :math:`KL(q_u\|p_u) = \mathbb{E}_q[r - 1 - \log r]`,
    :math:`KL(p_u\|q_u) = \mathbb{E}_q[r \log r - r + 1]`.
    """
    from klsym.derive.estimators import get_estimator  # the registry's stable forms (expm1, Taylor near 0)

    t = log_ratio(q, p)
    return {
        "KL(q||p)": np.sum(q.probs * get_estimator("k3").numeric(t), axis=-1),
        "KL(p||q)": np.sum(q.probs * get_estimator("rev_k3").numeric(t), axis=-1),
    }


def per_position_kls(q: Autoregressive, p: Autoregressive) -> dict:
    r"""Position t's share of each sequence KL: :math:`\mathbb{E}_{y_{<t} \sim q}[KL(q_t \| p_t)]` and
    :math:`\mathbb{E}_{y_{<t} \sim p}[KL(p_t \| q_t)]` (the chain rule of KL: they add up to the sequence KLs)."""
    conditional = conditional_kls(q, p)
    weights = {"KL(q||p)": q.prefix_probs, "KL(p||q)": p.prefix_probs}
    return {
        label: np.array([float(np.sum((weights[label] * conditional[label])[q.rows(d)])) for d in range(q.horizon)])
        for label in conditional
    }


def sequence_kls(q: Autoregressive, p: Autoregressive) -> dict:
    r"""KL(q||p) and KL(p||q) of the sequence distributions (chain rule over the prefixes).

    >>> q = Autoregressive.random(2, 3, seed=1); sequence_kls(q, q)
    {'KL(q||p)': 0.0, 'KL(p||q)': 0.0}
    """
    return {label: float(values.sum()) for label, values in per_position_kls(q, p).items()}


def to_go(policy: Autoregressive, immediate: np.ndarray) -> np.ndarray:
    r"""Backward DP: :math:`C(u, a) = c(u, a) + \mathbb{E}_q[\sum_{s > t} c_s \mid y_{\le t} = (u, a)]`, shape (P, V).

    ``immediate`` is c on every (prefix, token), shape (P, V); the expectation is over the continuation drawn
    from ``policy``. :math:`\sum_a q(a|\emptyset) C(\emptyset, a) = \mathbb{E}_q[\sum_t c_t]`.
    """
    probs, horizon, vocab = policy.probs, policy.horizon, policy.vocab_size
    total = np.array(immediate, dtype=np.float64, copy=True)
    for depth in range(horizon - 2, -1, -1):
        children = total[policy.rows(depth + 1)]
        expected_child = np.sum(probs[policy.rows(depth + 1)] * children, axis=-1)
        total[policy.rows(depth)] += expected_child.reshape(vocab**depth, vocab) * policy.continuing
    return total


def score_gradient(policy: Autoregressive, mass: np.ndarray, weights: np.ndarray) -> np.ndarray:
    r"""Rows :math:`m(u)\, \mathbb{E}_{a \sim q(\cdot|u)}[w(u, a)\, \nabla_{\theta_u} \log q(a|u)]
    = m(u)\, q(b|u) (w(u, b) - \sum_a q(a|u) w(u, a))`, flat (P V,).

    The softmax score of token a w.r.t. row u's logits is :math:`e_a - q(\cdot|u)`; written centred, a weight
    that is constant over a row gives exactly zero.
    """
    probs = policy.probs
    centred = weights - np.sum(probs * weights, axis=-1, keepdims=True)
    return (mass[:, None] * probs * centred).ravel()


def prefix_sums(policy: Autoregressive, per_token: np.ndarray) -> np.ndarray:
    r""":math:`\sum_{s \le d} c(u_{<s}, u_s)` along every prefix :math:`u` of length d, shape (P,), 0 at the root.

    With ``per_token = p.log_probs - q.log_probs`` it is the prefix's log-ratio; with an estimator's values, the
    penalty already collected before position d + 1.
    """
    out = np.zeros(policy.n_prefixes)
    for depth in range(1, policy.horizon):
        parent = policy.rows(depth - 1)
        out[policy.rows(depth)] = (out[parent, None] + per_token[parent]).ravel()
    return out


def whole_sequence_expectations(q: Autoregressive, p: Autoregressive, function) -> np.ndarray:
    r""":math:`A(u, a) = \mathbb{E}_q[f(\log R(y)) \mid y_{\le t} = (u, a)]` for every (prefix, token), shape (P, V),
    where :math:`\log R = \sum_{t=1}^T \log r_t` is the whole-sequence log-ratio.

    The leaves (all V^T sequences) are the last depth's (V^{T-1}, V) block, evaluated :data:`LEAF_BLOCK_ROWS` rows at
    a time; the depths above are conditional expectations (a backward pass). :math:`\sum_a q(a|\emptyset)
    A(\emptyset, a) = \mathbb{E}_q[f(\log R)]`.
    """
    token_t = log_ratio(q, p)
    prefix_t = prefix_sums(q, token_t)
    out = np.empty(q.logits.shape)
    last = q.rows(q.horizon - 1)
    for start in range(last.start, last.stop, LEAF_BLOCK_ROWS):
        block = slice(start, min(start + LEAF_BLOCK_ROWS, last.stop))
        out[block] = np.asarray(function(prefix_t[block, None] + token_t[block]), dtype=np.float64)
    if q.eos is not None:  # a sequence also ends at EOS: (u, eos) is a leaf at every depth
        inner = slice(0, last.start)
        out[inner, q.eos] = np.asarray(function(prefix_t[inner] + token_t[inner, q.eos]), dtype=np.float64)
    probs, vocab = q.probs, q.vocab_size
    going_on = q.continuing > 0
    for depth in range(q.horizon - 2, -1, -1):
        children = q.rows(depth + 1)
        expected = np.sum(probs[children] * out[children], axis=-1).reshape(vocab**depth, vocab)
        out[q.rows(depth), :] = np.where(going_on, expected, out[q.rows(depth)])
    return out


__all__ = [
    "Autoregressive",
    "MAX_SEQUENCES",
    "STABLE_LOG_RATIO_RADIUS",
    "prefix_offsets",
    "prefix_mass",
    "log_ratio",
    "log_ratio_with_error",
    "probability_difference",
    "conditional_kls",
    "per_position_kls",
    "sequence_kls",
    "to_go",
    "score_gradient",
    "prefix_sums",
    "whole_sequence_expectations",
]
