"""A command's time budget (``--time-budget``, ``$KLSYM_TIME_BUDGET``) and time limits on single SymPy calls,
by SIGALRM in the main thread. No SymPy here: every command's CLI wraps its work in :func:`time_budget`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager

#: Seconds a whole command may spend deriving (``--time-budget``, ``$KLSYM_TIME_BUDGET``).
DEFAULT_TIME_BUDGET = 30.0
_deadlines: list[float] = []  # stack of absolute deadlines (time.monotonic), innermost last
_budget: list[float] = []  # the command's deadline, if one is running


class BudgetExceeded(BaseException):
    """The command's time budget ran out. A BaseException, so SymPy's and our ``except Exception``
    fallbacks cannot swallow it: it reaches the step that reports it."""


def time_budget_seconds(value=None) -> float:
    """The budget in seconds: ``value`` if given, else ``$KLSYM_TIME_BUDGET``, else 30.

    >>> time_budget_seconds("2.5")
    2.5
    """
    raw = value if value is not None else os.environ.get("KLSYM_TIME_BUDGET", DEFAULT_TIME_BUDGET)
    try:
        seconds = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"time budget must be a number of seconds, got {raw!r}") from None
    if not (seconds > 0 and seconds < 1e6):
        raise ValueError(f"time budget must be positive and below 1e6 seconds, got {raw!r}")
    return seconds


def _signals_usable() -> bool:
    return threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM")


def _arm() -> None:
    """Point the interval timer at the nearest deadline (or switch it off)."""
    if not _deadlines:
        signal.setitimer(signal.ITIMER_REAL, 0)
        return
    signal.setitimer(signal.ITIMER_REAL, max(min(_deadlines) - time.monotonic(), 1e-4))


def _on_alarm(signum, frame):
    now = time.monotonic()
    if _budget and now >= _budget[-1]:
        signal.setitimer(signal.ITIMER_REAL, 0.05)  # keep firing until a step handler stops it
        raise BudgetExceeded
    raise TimeoutError


@contextmanager
def time_limit(seconds: float):
    """Abort the enclosed SymPy call with ``TimeoutError`` after ``seconds`` (main thread only;
    elsewhere no limit). Nests: an inner limit never extends or cancels an outer one."""
    if not _signals_usable():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    _deadlines.append(time.monotonic() + seconds)
    _arm()
    try:
        yield
    finally:
        _deadlines.pop()
        _arm()
        if not _deadlines:
            signal.signal(signal.SIGALRM, previous)


_time_limit = time_limit


@contextmanager
def time_budget(seconds: float | None = None):
    """Run a command within a time budget: past it, :class:`BudgetExceeded` is raised in the main
    thread (see :func:`guarded` to turn it into an "undecided" verdict or a clear error)."""
    if not _signals_usable() or _budget:
        yield
        return
    deadline = time.monotonic() + time_budget_seconds(seconds)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    depth = len(_deadlines)
    _budget.append(deadline)
    _deadlines.append(deadline)
    _arm()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)  # first: nothing may fire during the cleanup
        del _deadlines[depth:]
        _budget.pop()
        _arm()
        signal.signal(signal.SIGALRM, previous)


def budget_spent() -> bool:
    return bool(_budget) and time.monotonic() >= _budget[-1]


def guarded(step: str, compute, undecided):
    """``compute()``, or ``undecided(reason)`` when the command's time budget runs out in it.

    The reason names the step: ``"undecided: convexity did not finish within the time budget"``.
    """
    if budget_spent():
        return undecided(f"undecided: {step} skipped, the time budget was spent")
    try:
        return compute()
    except BudgetExceeded:
        signal.setitimer(signal.ITIMER_REAL, 0)  # stop the repeating alarm; later steps are skipped
        return undecided(f"undecided: {step} did not finish within the time budget")


def budget_left() -> float | None:
    """Seconds left in the running budget (None when none runs)."""
    return _budget[-1] - time.monotonic() if _budget else None


__all__ = [
    "DEFAULT_TIME_BUDGET",
    "BudgetExceeded",
    "time_budget_seconds",
    "time_limit",
    "time_budget",
    "budget_spent",
    "guarded",
    "budget_left",
]
