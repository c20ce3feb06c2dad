"""``klsym cite [KEY...]``: BibTeX for klsym and the works it reproduces or discusses (``data/references.bib``).

>>> entries = parse_bibtex("@misc{a,\\n  title = {A {KL} note},\\n  year = {2020}\\n}\\n")
>>> entries[0].key, entries[0].fields["title"], entries[0].fields["year"]
('a', 'A {KL} note', '2020')
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from klsym.cli import UserError
from klsym.paths import DATA_DIR

REFERENCES_FILE = DATA_DIR / "references.bib"
_ENTRY_START = re.compile(r"^@(\w+)\s*\{\s*([^,\s]+)\s*,", re.M)
_FIELD = re.compile(r"^\s*([A-Za-z][\w-]*)\s*=\s*", re.M)


@dataclass
class BibEntry:
    """One BibTeX entry: its type, key, fields (outer braces removed) and its text as written."""

    kind: str
    key: str
    text: str
    fields: dict[str, str] = field(default_factory=dict)


def _braced(text: str, start: int) -> tuple[str, int]:
    """The balanced ``{...}`` group opening at ``text[start]``: (content, index after it)."""
    depth = 0
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[start + 1 : index], index + 1
    raise ValueError(f"unbalanced braces after {text[start : start + 40]!r}")


def _fields(body: str) -> dict[str, str]:
    fields, position = {}, 0
    while (match := _FIELD.search(body, position)) is not None:
        value_start = match.end()
        if body[value_start] == "{":
            value, position = _braced(body, value_start)
        else:  # bare value: a number or a macro such as mar
            end = body.find(",", value_start)
            end = len(body) if end < 0 else end
            value, position = body[value_start:end].strip(), end
        fields[match.group(1).lower()] = value
    return fields


def parse_bibtex(text: str) -> list[BibEntry]:
    """Entries of a BibTeX file (``%`` comment lines between entries are ignored)."""
    entries = []
    for match in _ENTRY_START.finditer(text):
        body, end = _braced(text, text.index("{", match.start()))
        fields = _fields(body[body.index(",") + 1 :])
        entries.append(BibEntry(match.group(1).lower(), match.group(2), text[match.start() : end], fields))
    return entries


_ACCENTS = {"'": "\u0301", "`": "\u0300", '"': "\u0308", "^": "\u0302", "~": "\u0303"}


def plain_text(value: str) -> str:
    r"""A BibTeX field as plain text: accents composed, braces dropped.

    >>> plain_text(r"Munos, R{\'e}mi and {KL} {RL}")
    'Munos, Rémi and KL RL'
    """
    import unicodedata

    def accent(match: re.Match) -> str:
        return unicodedata.normalize("NFC", match.group(2) + _ACCENTS[match.group(1)])

    value = re.sub(r"\\(['`\"^~])\{?([A-Za-z])\}?", accent, value)
    return unicodedata.normalize("NFC", value.replace("{", "").replace("}", ""))


def load_references() -> list[BibEntry]:
    return parse_bibtex(REFERENCES_FILE.read_text(encoding="utf-8"))


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "cite",
        help="BibTeX for klsym and the works it reproduces (data/references.bib)",
        description="Print BibTeX entries: klsym itself, Schulman 2020, Zhang 2025, Yang 2025, Tang & Munos 2025, "
        "Liu et al. 2025, Shah et al. 2025 and the RL frameworks whose KL settings klsym analyses. "
        "No KEY: all of them.",
    )
    parser.add_argument("keys", nargs="*", metavar="KEY", help="entry keys (see --list)")
    parser.add_argument("--list", action="store_true", help="list the keys with their titles")
    parser.set_defaults(func=run)


def run(args) -> int:
    entries = load_references()
    by_key = {entry.key: entry for entry in entries}
    if args.list:
        width = max(len(key) for key in by_key)
        for entry in entries:
            print(f"{entry.key.ljust(width)}  {plain_text(entry.fields.get('title', ''))}")
        return 0
    unknown = [key for key in args.keys if key not in by_key]
    if unknown:
        raise UserError(f"unknown reference key(s) {', '.join(map(repr, unknown))}; known: {', '.join(by_key)}")
    chosen = [by_key[key] for key in args.keys] if args.keys else entries
    print("\n\n".join(entry.text for entry in chosen))
    return 0
