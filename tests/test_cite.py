"""``klsym cite`` (data/references.bib), CITATION.cff, and the ``framework`` prefix listing."""

import json
import re

import pytest
import yaml

from klsym import __version__
from klsym.cli import main
from klsym.cli.cite import load_references, parse_bibtex
from klsym.paths import ROOT

REQUIRED = {
    "klsym": None,
    "schulman2020kl": None,
    "zhang2025k4": None,
    "yang2025klgradient": None,
    "tang2025pitfalls": "2506.09477",
    "liu2025rethinking": "2510.01555",
    "shah2025comedy": "2512.21852",
}
FRAMEWORK_KEYS = ["verl", "openrlhf", "trl", "nemorl", "slime", "roll", "openinstruct", "areal"]


@pytest.fixture(scope="module")
def references():
    return {entry.key: entry for entry in load_references()}


def test_every_source_has_an_entry(references):
    assert set(REQUIRED) | set(FRAMEWORK_KEYS) <= set(references)
    for key, arxiv in REQUIRED.items():
        assert references[key].fields.get("title") and references[key].fields.get("author"), key
        if arxiv is not None:
            assert references[key].fields["eprint"] == arxiv
            assert references[key].fields["url"].endswith(arxiv)
    assert len(references) == len(load_references())  # keys are unique


def test_framework_entries_point_at_the_crosswalk_repositories(references):
    from klsym.rl.frameworks import load_settings

    repos = {setting.repo for setting in load_settings()}
    urls = {entry.fields.get("url", "") for entry in references.values()}
    missing = [repo for repo in repos if f"https://github.com/{repo}" not in urls]
    assert not missing, f"frameworks.json repositories without a references.bib entry: {missing}"


def test_klsym_version_is_current(references):
    assert references["klsym"].fields["version"] == __version__
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["version"] == __version__


def test_citation_cff_is_valid_cff_1_2_0():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0"
    assert isinstance(cff["message"], str) and cff["message"]
    assert isinstance(cff["title"], str) and cff["title"]
    assert cff["authors"] and all(("name" in a) or ("family-names" in a) for a in cff["authors"])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(cff["date-released"]))
    for reference in cff.get("references", []):
        assert {"type", "title", "authors"} <= set(reference)


def test_parser_handles_nested_braces_and_bare_values():
    text = "% comment\n@misc{k,\n  title = {A {KL} {RL} note},\n  month = mar,\n  year = 2020\n}\n"
    (entry,) = parse_bibtex(text)
    assert entry.kind == "misc" and entry.fields == {"title": "A {KL} {RL} note", "month": "mar", "year": "2020"}
    assert entry.text.startswith("@misc{k,") and entry.text.endswith("}")


def test_cli_prints_every_entry(capsys, references):
    assert main(["cite"]) == 0
    out = capsys.readouterr().out
    assert len(parse_bibtex(out)) == len(references)


def test_cli_selects_and_lists(capsys):
    assert main(["cite", "tang2025pitfalls"]) == 0
    (entry,) = parse_bibtex(capsys.readouterr().out)
    assert entry.key == "tang2025pitfalls"
    assert main(["cite", "--list"]) == 0
    assert "A Comedy of Estimators" in capsys.readouterr().out


def test_cli_unknown_key_is_one_line(capsys):
    assert main(["cite", "nope2099"]) == 2
    err = capsys.readouterr().err
    assert "unknown reference key(s) 'nope2099'" in err and err.strip().count("\n") == 0


# --- framework NAME: a prefix lists every setting of every matching framework -------------------------


def test_framework_prefix_lists_all_trl_settings(capsys):
    from klsym.rl.frameworks import load_settings

    assert main(["framework", "trl", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    expected = [(s.framework, s.setting) for s in load_settings() if s.framework.startswith("trl")]
    assert [(row["framework"], row["setting"]) for row in rows] == expected
    assert len({framework for framework, _ in expected}) > 1


def test_framework_exact_name_still_shows_its_default(capsys):
    assert main(["framework", "verl", "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["framework"] == "verl" and row["setting"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["framework", "trl", "--setting", "default"], "names several frameworks"),
        (["framework", "zzz"], "unknown framework 'zzz'"),
    ],
)
def test_framework_bad_name_is_one_line(capsys, args, message):
    assert main(args) == 2
    assert message in capsys.readouterr().err
