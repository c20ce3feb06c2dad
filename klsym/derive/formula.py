r"""Parse a user's estimator formula into SymPy without evaluating anything as Python.

The string is parsed by :mod:`ast` and rebuilt node by node from a whitelist: the symbol ``r``
(the ratio p/q), ``t`` (shorthand for ``log(r)``), the functions ``log``, ``exp``, ``sqrt``, ``Abs``,
numbers, ``+ - * / **`` (``^`` is read as a power) and parentheses. Anything else is refused with a
:class:`FormulaError` naming the offending piece; nothing reaches ``eval`` or ``sympify``.

>>> parse_formula("r - 1 - log(r)")
r - log(r) - 1
>>> parse_formula("0.5*t^2")
log(r)**2/2
>>> parse_formula("sqrt(r - 1)")
Traceback (most recent call last):
...
klsym.derive.formula.FormulaError: malformed formula 'sqrt(r - 1)': sqrt(r - 1) is not real for r < 1
>>> parse_formula("__import__('os')")
Traceback (most recent call last):
...
klsym.derive.formula.FormulaError: malformed formula "__import__('os')": function '__import__' is not allowed (allowed: Abs, exp, log, sqrt)
"""

from __future__ import annotations

import ast

import sympy as sp

from klsym.derive.symbols import r

MAX_LENGTH = 500
MAX_NUMBER = 10**6
MAX_DEPTH = 40

_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a**b,
}


class FormulaError(ValueError):
    """A formula string that is not a whitelisted expression in r."""


class Grammar:
    r"""A whitelist of names and functions, and the one parser of user and framework expressions.

    The text is parsed by :mod:`ast` and rebuilt node by node: whitelisted names, numbers, calls of
    whitelisted functions (``{name: (sympy_function, arity)}``), ``+ - * / **`` (``^`` is read as ``**``) and
    parentheses. Anything else is refused with ``error`` naming the offending piece; nothing reaches ``eval``
    or ``sympify``. ``check_power(base, exponent)`` and ``check_call(name, args)`` add a grammar's own rules.
    """

    def __init__(
        self,
        names: dict,
        functions: dict,
        error: type[ValueError],
        what: str,
        *,
        max_length: int = MAX_LENGTH,
        max_number: float | None = MAX_NUMBER,
        max_depth: int = MAX_DEPTH,
        check_power=None,
        check_call=None,
    ):
        self.names, self.functions, self.error, self.what = names, functions, error, what
        self.max_length, self.max_number, self.max_depth = max_length, max_number, max_depth
        self.check_power, self.check_call = check_power, check_call

    def parse(self, text: str) -> sp.Expr:
        error, what = self.error, self.what
        if not isinstance(text, str):
            raise error(f"{what} must be a string, got {type(text).__name__}")
        if len(text) > self.max_length:
            raise error(f"{what} is longer than {self.max_length} characters")
        if not text.strip():
            raise error(f"{what} is empty")
        foreign = next((ch for ch in text if not ch.isascii() or (not ch.isprintable() and not ch.isspace())), None)
        if foreign is not None:
            # Python folds full-width and other compatibility letters into ASCII names (NFKC): 'ｒ' would
            # silently become r. Refuse instead of guessing.
            raise error(
                f"malformed {what} {text!r}: character {foreign!r} (U+{ord(foreign):04X}) is not "
                "ASCII; write it with ASCII letters, digits and + - * / ** ( )"
            )
        try:
            tree = ast.parse(text.replace("^", "**").strip(), mode="eval")
        except SyntaxError as err:
            raise error(f"malformed {what} {text!r}: not an expression ({err.msg})") from None
        try:
            expr = self._build(tree.body, 0)
        except self.error as err:
            raise error(f"malformed {what} {text!r}: {err}") from None
        if not isinstance(expr, sp.Expr) or expr.has(sp.zoo, sp.nan):
            raise error(f"malformed {what} {text!r}: it does not define a finite expression")
        return expr

    def _build(self, node: ast.AST, depth: int) -> sp.Expr:
        error = self.error
        if depth > self.max_depth:
            raise error("expression is nested too deeply")
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise error(f"constant {value!r} is not a number")
            if self.max_number is not None and abs(value) > self.max_number:
                raise error(f"number {value!r} is larger than {self.max_number}")
            if value != value or abs(value) == float("inf"):
                raise error(f"constant {value!r} is not a finite number")
            return sp.Rational(repr(value))
        if isinstance(node, ast.Name):
            if node.id not in self.names:
                raise error(f"unknown name {node.id!r} (allowed: {', '.join(sorted(self.names))})")
            return self.names[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = self._build(node.left, depth + 1), self._build(node.right, depth + 1)
            if isinstance(node.op, ast.Pow) and self.check_power is not None:
                self.check_power(left, right)
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand = self._build(node.operand, depth + 1)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                raise error("only plain function calls such as log(r) are allowed")
            if node.func.id not in self.functions:
                allowed = ", ".join(sorted(self.functions))
                raise error(f"function {node.func.id!r} is not allowed (allowed: {allowed})")
            function, arity = self.functions[node.func.id]
            if node.keywords or len(node.args) != arity:
                count = "one argument" if arity == 1 else f"{arity} arguments"
                raise error(f"{node.func.id} takes exactly {count}")
            args = [self._build(a, depth + 1) for a in node.args]
            if self.check_call is not None:
                self.check_call(node.func.id, args)
            return function(*args)
        if isinstance(node, ast.Attribute):
            raise error("attribute access is not allowed")
        if isinstance(node, ast.Lambda):
            raise error("lambda expressions are not allowed")
        raise error(f"{type(node).__name__} is not allowed")


def _check_power(base: sp.Expr, exponent: sp.Expr) -> None:
    if exponent.is_number and abs(exponent) > 100:
        raise FormulaError("exponents larger than 100 are not allowed")
    if not exponent.is_integer:
        _require_real(sp.Pow(base, exponent, evaluate=False), base)


def _check_call(name: str, args) -> None:
    if name in ("log", "sqrt"):
        _require_real(sp.Function(name)(args[0]), args[0])


#: The grammar of estimator formulas k(r): ``r``, ``t`` (= log r), ``pi``, ``E``; log, exp, sqrt, Abs.
FORMULA = Grammar(
    {"r": r, "t": sp.log(r), "pi": sp.pi, "E": sp.E},
    {"log": (sp.log, 1), "exp": (sp.exp, 1), "sqrt": (sp.sqrt, 1), "Abs": (sp.Abs, 1)},
    FormulaError,
    "formula",
    check_power=_check_power,
    check_call=_check_call,
)


def parse_formula(text: str) -> sp.Expr:
    r"""Return the SymPy expression of ``text``, an estimator k(r) written in r (or t = log r).

    >>> parse_formula("log((r-1)**2 + 1)")
    log((r - 1)**2 + 1)
    >>> parse_formula("r.__class__")
    Traceback (most recent call last):
    ...
    klsym.derive.formula.FormulaError: malformed formula 'r.__class__': attribute access is not allowed
    """
    return FORMULA.parse(text)


#: Seconds allowed to SymPy for deciding where an argument of log, sqrt or a fractional power is negative.
REALITY_SECONDS = 2.0
_PROBES = [
    sp.Rational(1, 10**6),
    sp.Rational(1, 100),
    sp.Rational(1, 2),
    sp.Rational(9, 10),
    sp.Integer(1),
    sp.Rational(11, 10),
    sp.Integer(2),
    sp.Integer(10),
    sp.Integer(10**6),
]


def _require_real(shown: sp.Expr, argument: sp.Expr) -> None:
    """Refuse ``log(a)``, ``sqrt(a)``, ``a**c`` (c not an integer) where a < 0 for some r > 0.

    An estimator is a real function of r on the whole of r > 0: ``log(-r)`` (= log r + i pi) and
    ``sqrt(r - 1)`` (imaginary for r < 1) are refused with the region where they are not real.
    """
    if argument.is_nonnegative or not argument.has(r) and argument.is_number and argument >= 0:
        return
    if argument.is_number:
        raise FormulaError(f"{sp.sstr(shown)} is not real")
    region = None
    try:
        from klsym.derive.symbolic import time_limit  # the symbolic layer imports this module: import late

        with time_limit(REALITY_SECONDS):
            region = sp.solveset(argument < 0, r, sp.Interval.open(0, sp.oo))
    except Exception:  # undecidable or too slow for SymPy: decide at probe points below
        region = None
    if region is not None and region is not sp.S.EmptySet and not isinstance(region, sp.ConditionSet):
        raise FormulaError(f"{sp.sstr(shown)} is not real for {_describe(region)}")
    if region is None or isinstance(region, sp.ConditionSet):
        for point in _PROBES:
            value = argument.subs(r, point)
            if value.is_number and value.is_extended_real and bool(value < 0):
                raise FormulaError(f"{sp.sstr(shown)} is not real at r = {sp.sstr(point)}")


def _describe(region: sp.Set) -> str:
    """``r < 1``, ``2 < r < 3``, ``r > 5``: a subset of r > 0 in words."""
    parts = region.args if isinstance(region, sp.Union) else (region,)
    words = []
    for part in parts:
        if isinstance(part, sp.Interval):
            low = "" if part.start == 0 else f"{sp.sstr(part.start)} {'<=' if not part.left_open else '<'} "
            high = "" if part.end == sp.oo else f" {'<=' if not part.right_open else '<'} {sp.sstr(part.end)}"
            words.append(f"{low}r{high}" if low or high else "any r > 0")
        else:
            words.append(f"r in {sp.sstr(part)}")
    return " or ".join(words)


__all__ = ["FormulaError", "parse_formula"]
