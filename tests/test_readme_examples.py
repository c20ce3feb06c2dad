"""Every command line in README.md does what the README says (issue 11).

- An example introduced by "(`python -m klsym ...`):" or "From `python -m klsym ...`:" and followed by a
  fenced block is run and its output compared with the block (whitespace runs and dash rules ignored;
  a line holding "..." must contain each of its pieces).
- Every other complete `python -m klsym ...` in backticks is run and must exit 0.
- Every synopsis line (the fenced block of "The command line") may only name options the command accepts.
"""

import re
import shlex
from pathlib import Path

import pytest

from klsym.cli import build_parser, main
from klsym.paths import ROOT

README = (Path(ROOT) / "README.md").read_text()
_EXAMPLE = re.compile(r"`(python -m klsym [^`]+)`\)?:\s*\n+```[a-z]*\n(.*?)```", re.S)
_INLINE = re.compile(r"`(python -m klsym [^`]+)`")
_PLACEHOLDER = re.compile(r"[A-Z]{2,}|\[|\||\.\.\.")  # MU,SIGMA  FILE  [--opt]  a|b  ...


def _examples():
    return [(command, block) for command, block in _EXAMPLE.findall(README)]


def _runnable_inline():
    with_output = {command for command, _ in _examples()}
    return sorted({c for c in _INLINE.findall(README) if c not in with_output and not _PLACEHOLDER.search(c)})


def _synopsis_lines():
    section = README.split("## The command line", 1)[1]
    block = section.split("```", 2)[1]
    return [line.split("  (")[0].strip() for line in block.splitlines() if line.startswith("python -m klsym")]


def _argv(command):
    return shlex.split(command)[3:]


def _normalise(text):
    lines = [" ".join(line.split()) for line in text.strip().splitlines()]
    return [line for line in lines if line and set(line) - set("- ")]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KLSYM_CACHE_DIR", str(tmp_path))


def test_readme_has_examples():
    assert _examples() and _runnable_inline() and _synopsis_lines()


@pytest.mark.parametrize("command, expected", _examples(), ids=[c for c, _ in _examples()])
def test_example_output(command, expected, capsys):
    assert main(_argv(command)) == 0
    got = _normalise(capsys.readouterr().out)
    for line in _normalise(expected):
        if "..." in line:
            pieces = [piece.strip(" `") for piece in line.split("...") if piece.strip(" `")]
            assert any(all(piece in out for piece in pieces) for out in got), line
        else:
            assert line in got, f"README line not in the output of {command!r}:\n{line}\n---\n" + "\n".join(got)


@pytest.mark.parametrize("command", _runnable_inline())
def test_inline_command_runs(command, capsys):
    assert main(_argv(command)) == 0, capsys.readouterr().err


def _accepted_options(command: str) -> set:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {option for action in sub._actions for option in action.option_strings}


@pytest.mark.parametrize("line", _synopsis_lines())
def test_synopsis_names_only_accepted_options(line):
    words = shlex.split(line)[3:]
    named = {option.split("=")[0] for w in words for option in re.findall(r"--[a-z][a-z-]*", w)}
    for command in words[0].split("|"):  # "gradient|exact|mc ...": each command must accept them all
        accepted = _accepted_options(command)
        assert named <= accepted, (line, command, named - accepted)
