"""CLI subcommands: each module defines ``register(subparsers)``; :mod:`klsym.cli` finds them."""
