"""``klsym mc``: the JSON contract, the table, categorical logits files, one-line errors."""

import json

import numpy as np
import pytest

from klsym.cli import main
from klsym.exact.expectations import estimator_stats
from klsym.exact.families import Categorical, Gaussian


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_json_contract_and_means_against_exact(capsys):
    n = 100_000
    out = _json(
        capsys,
        [
            "mc",
            "--q",
            "0,1",
            "--p",
            "1,1",
            "--n",
            "1e5",
            "--seed",
            "3",
            "--estimators",
            "k1,k3",
            "--quiet",
            "--format",
            "json",
        ],
    )
    assert {"n", "seed", "seconds", "backend", "estimators"} <= set(out)
    assert (out["n"], out["seed"], out["backend"]) == (n, 3, "numpy")
    for name, entry in out["estimators"].items():
        assert {"mean", "std", "se", "min", "max", "frac_negative"} <= set(entry)
        exact = estimator_stats(name, Gaussian(0, 1), Gaussian(1, 1))
        assert abs(entry["mean"] - exact["mean"]) < 5 * exact["std"] / np.sqrt(n)


def test_chunk_and_threads_do_not_change_the_output(capsys):
    base = [
        "mc",
        "--q",
        "0,1",
        "--p",
        "0.5,1.2",
        "--n",
        "150000",
        "--seed",
        "1",
        "--estimators",
        "k3,k4",
        "--quiet",
        "--format",
        "json",
    ]
    a = _json(capsys, base + ["--chunk", "1000", "--threads", "1"])
    b = _json(capsys, base + ["--chunk", "1000000", "--threads", "2"])
    assert a["estimators"] == b["estimators"]


def test_categorical_with_gradient_and_crosscheck(capsys, tmp_path):
    rng = np.random.default_rng(0)
    q_file = tmp_path / "q.txt"
    np.savetxt(q_file, rng.normal(size=12))
    np.save(tmp_path / "p.npy", rng.normal(size=12))
    out = _json(
        capsys,
        [
            "mc",
            "--q-logits",
            str(q_file),
            "--p-logits",
            str(tmp_path / "p.npy"),
            "--n",
            "50000",
            "--estimators",
            "k1,k3",
            "--gradient",
            "loss,full",
            "--crosscheck",
            "--quiet",
            "--format",
            "json",
        ],
    )
    assert len(out["gradients"]["k3"]["full"]["mean"]["logits"]) == 12  # labelled, as in `gradient`
    assert out["crosscheck"]["passed"] is True
    assert Categorical.from_file(q_file).size == 12


def test_table_output(capsys):
    assert main(["mc", "--q", "0,1", "--p", "1,1", "--n", "2000", "--estimators", "k1", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "frac_negative" in text and "KL(q||p)" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--q", "0,1", "--p", "1,0", "--n", "10"], "Gaussian sigma must be positive"),
        (["--q", "0,1", "--n", "10"], "both --q and --p are required"),
        (["--q", "0,1", "--p", "1,1", "--n", "10", "--positions", "2"], "--positions must be 1"),
        (["--q", "0,1", "--p", "1,1", "--n", "10", "--estimators", "k7"], "unknown estimator 'k7'"),
        (["--q", "0,1", "--p", "1,1", "--n", "10", "--gradient", "pathwise"], "unknown gradient mode"),
        (["--q", "0,1", "--p", "1,1", "--n", "10", "--quantiles", "2"], "quantile levels must lie in"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, message):
    assert main(["mc", "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("klsym: error:") and message in err and "\n" not in err


def test_non_integer_n_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["mc", "--q", "0,1", "--p", "1,1", "--n", "1.5"])
    assert exit_info.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err
