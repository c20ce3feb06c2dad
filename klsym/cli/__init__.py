"""Command line: ``python -m klsym COMMAND ...``.

Each module in :mod:`klsym.cli` registers one subcommand. Errors a user can cause (unknown
estimator, invalid sigma, malformed formula) print one line ``klsym: error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from klsym import __version__


class UserError(ValueError):
    """Bad input from the command line, reported in one line."""


def parse_pair(text: str, what: str = "MU,SIGMA") -> tuple[float, float]:
    """Parse ``"MU,SIGMA"`` into two floats, with a clear error.

    >>> parse_pair("0,1")
    (0.0, 1.0)
    """
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise UserError(f"expected {what} as two numbers separated by a comma, got {text!r}") from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors (invalid choice, missing value) on one line like every klsym error;
    ``--help`` still shows the usage. Subcommand parsers inherit it (argparse builds them with this class)."""

    def error(self, message: str):
        self.exit(2, f"klsym: error: {message}\n")


def add_format_argument(
    parser: argparse.ArgumentParser, default: str = "table", choices: tuple[str, ...] = ("json", "table")
) -> None:
    parser.add_argument("--format", choices=choices, default=default, help="output format")


def add_time_budget_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--time-budget",
        metavar="SECONDS",
        default=None,
        help="seconds the command may spend (default $KLSYM_TIME_BUDGET, else 30)",
    )


def within_budget(args, compute, what):
    """``compute()`` within the command's time budget; past it, one clear error naming ``what()``."""
    from klsym.derive.budget import BudgetExceeded, time_budget, time_budget_seconds

    seconds = time_budget_seconds(args.time_budget)
    try:
        with time_budget(seconds):
            return compute()
    except BudgetExceeded:
        raise UserError(
            f"the time budget of {seconds:g} s ran out while {what()}; give more with "
            "--time-budget SECONDS or $KLSYM_TIME_BUDGET"
        ) from None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command`` (a subcommand's module name) only that module is imported, so
    ``klsym exact ...`` does not pay for the imports of every other subcommand."""
    parser = ArgumentParser(
        prog="klsym", description="Monte Carlo estimators of KL divergence: derive, compute exactly, sample."
    )
    parser.add_argument("--version", action="version", version=f"klsym {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if command is None or info.name == command:
            importlib.import_module(f"{__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = argv[0] if argv and not argv[0].startswith("-") else None
    known = {info.name for info in pkgutil.iter_modules(__path__)}
    parser = build_parser(first if first in known else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except (ValueError, KeyError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"klsym: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
