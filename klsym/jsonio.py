"""Strict JSON output: stable keys, non-finite floats written as "inf", "-inf", "nan".

>>> dumps({"a": float("inf"), "b": [float("nan"), 1.5]})
'{\\n  "a": "inf",\\n  "b": [\\n    "nan",\\n    1.5\\n  ]\\n}'
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import numpy as np


def to_jsonable(obj: Any) -> Any:
    """Convert NumPy/SymPy values to plain JSON types; non-finite floats become strings."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)) or obj is None:
        return None if obj is None else bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    sympy = sys.modules.get("sympy")  # a SymPy object exists only where SymPy was imported
    if sympy is not None and isinstance(obj, sympy.Basic):
        return sympy.sstr(obj)
    return obj


def dumps(obj: Any) -> str:
    """Serialise with :func:`to_jsonable`; ``allow_nan=False`` guarantees strict JSON."""
    return json.dumps(to_jsonable(obj), indent=2, allow_nan=False)


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain aligned text table (floats with 6 significant digits).

    >>> print(format_table([{"name": "k1", "mean": 0.5}, {"name": "k2", "mean": float("inf")}]))
    name  mean
    ----  ----
    k1    0.5
    k2    inf
    """
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def cell(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return f"{float(v):.6g}"
        return "-" if v is None else str(v)

    table = [[str(c) for c in columns]] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


__all__ = ["to_jsonable", "dumps", "format_table"]
