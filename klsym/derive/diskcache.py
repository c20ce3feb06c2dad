"""A JSON disk cache for derivations: keyed by the klsym and SymPy versions, the inputs, and the
source of the modules that derive them (so a derivation is recomputed when its code changes). SymPy's
version is read from its ``release.py`` without importing SymPy, so a warm read costs no SymPy import.

Location: ``$KLSYM_CACHE_DIR``, default ``~/.cache/klsym``. A cache that cannot be written (a
read-only home) is skipped silently; the callers keep their own in-process caches.

>>> key = cache_key(["k3"], [__file__])
>>> len(key), key == cache_key(["k3"], [__file__]), key == cache_key(["k2"], [__file__])
(24, True, False)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any

from klsym import __version__


def cache_dir() -> Path:
    return Path(os.environ.get("KLSYM_CACHE_DIR", Path.home() / ".cache" / "klsym"))


@cache
def source_digest(path: str) -> str:
    """A module's source, hashed once per process."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@cache
def sympy_release() -> str:
    """Digest of SymPy's ``release.py`` (its version), found without importing SymPy."""
    return source_digest(str(Path(importlib.util.find_spec("sympy").origin).with_name("release.py")))


def cache_key(parts: Iterable[str], sources: Iterable[str]) -> str:
    """Hash of the versions, ``parts`` (the inputs) and the source files ``sources``."""
    text = "|".join([__version__, sympy_release(), *parts, *(source_digest(str(s)) for s in sources)])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cached_json(prefix: str, key: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per key: read ``PREFIX-KEY.json`` from the cache or write it there."""
    path = cache_dir() / f"{prefix}-{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    result = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(result))
        os.replace(temporary, path)  # readers never see a half-written file
    except OSError:
        pass
    return result


__all__ = ["cache_dir", "source_digest", "sympy_release", "cache_key", "cached_json"]


class _NotStored(Exception):
    def __init__(self, result):
        super().__init__("result not stored")
        self.result = result


def cached_json_if(prefix: str, key: str, compute: Callable[[], Any], store: Callable[[Any], bool]) -> Any:
    """:func:`cached_json`, except that a computed result for which ``store(result)`` is false is returned without
    being written (a derivation the time budget cut short must be redone, not read back)."""

    def checked():
        result = compute()
        if not store(result):
            raise _NotStored(result)
        return result

    try:
        return cached_json(prefix, key, checked)
    except _NotStored as not_stored:
        return not_stored.result
