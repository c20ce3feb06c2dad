"""Setup contract: pyproject and environment.yml agree; commands in README exist; CLI basics."""

import re
import subprocess
import sys
import tomllib

import yaml

import klsym
from klsym.paths import ROOT


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _spec(requirement: str) -> str:
    return requirement.strip()[len(_name(requirement)) :].replace(" ", "")


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str) and not d.startswith(("python", "pip"))]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "conda-forge" in env["channels"]
    assert {_name(d): _spec(d) for d in conda} == {_name(d): _spec(d) for d in project["dependencies"]}
    assert "-e ." in pip


def test_version_and_help():
    assert re.fullmatch(r"\d+\.\d+\.\d+", klsym.__version__)
    out = subprocess.run([sys.executable, "-m", "klsym", "--help"], capture_output=True, text=True, check=True)
    assert "derive" in out.stdout


def test_readme_names_the_make_targets_that_exist():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("test", "report", "lab", "help"):
        assert f"make {target}" in readme
        assert re.search(rf"^{target}:.*## ", makefile, re.M)


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
