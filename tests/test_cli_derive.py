"""``klsym derive``: the JSON contract and one-line errors."""

import json
import subprocess
import sys

import pytest

from klsym.cli import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "klsym", *args], capture_output=True, text=True)


def test_derive_json_contract(capsys):
    assert main(["derive", "k1", "k3", "--expr", "r - 1", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == ["k1", "k3", "r - 1"]
    k1 = rows[0]
    assert (k1["f1"], k1["df1"], k1["d2f1"], k1["nonnegative"]) == ("0", "-1", "1", False)
    assert k1["gradient"]["loss"]["divergence"] == "zero"
    assert rows[1]["gradient"]["loss"]["divergence"] == "KL(p||q)"


def test_derive_latex_and_table(capsys):
    assert main(["derive", "k2", "--format", "latex"]) == 0
    assert r"\begin{tabular}" in capsys.readouterr().out
    assert main(["derive", "k2"]) == 0
    assert "KL(q||p)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["derive", "k9"], "unknown estimator 'k9'"),
        (["derive", "--expr", "__import__('os')"], "function '__import__' is not allowed"),
        (["derive", "--expr", "r.real"], "attribute access is not allowed"),
    ],
)
def test_bad_input_gives_one_line(args, message):
    result = _run(*args)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr
    assert "Traceback" not in result.stderr
