"""`klsym exact` / `klsym gradient`: the strict-JSON contract, tables, categorical files, one-line errors."""

import json

import numpy as np
import pytest

from klsym.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_exact_json_contract(capsys):
    code, out, _ = _run(
        capsys,
        "exact",
        "--q",
        "0,1",
        "--p",
        "1,1",
        "--estimators",
        "k1,k3,k4",
        "--expr",
        "(r-1)**2/2",
        "--format",
        "json",
    )
    assert code == 0
    data = json.loads(out)
    assert data["family"] == "gaussian" and data["q"] == [0.0, 1.0] and data["p"] == [1.0, 1.0]
    assert data["kl"] == {"KL(q||p)": 0.5, "KL(p||q)": 0.5}
    assert list(data["estimators"]) == ["k1", "k3", "k4", "(r-1)**2/2"]
    for entry in data["estimators"].values():
        assert {"mean", "std", "second_moment", "prob_negative", "method"} <= set(entry)
    assert data["estimators"]["k4"]["method"] == "quadrature"
    assert data["estimators"]["k1"]["method"] == "closed_form"
    # k1 = -t with t ~ N(-1/2, 1): std 1, P(k1 < 0) = P(t > 0)
    assert data["estimators"]["k1"]["std"] == pytest.approx(1.0, rel=1e-13)


def test_exact_json_writes_infinite_values_as_strings(capsys):
    _, out, _ = _run(capsys, "exact", "--q", "0,1", "--p", "0,2", "--estimators", "k3", "--format", "json")
    entry = json.loads(out)["estimators"]["k3"]
    assert entry["second_moment"] == "inf" and entry["std"] == "inf"


def test_exact_table_is_default(capsys):
    code, out, _ = _run(capsys, "exact", "--q", "0,1", "--p", "1,1", "--estimators", "k2")
    assert code == 0 and "KL(q||p) = 0.5" in out and "closed_form" in out


def test_gradient_json_contract(capsys):
    code, out, _ = _run(capsys, "gradient", "--q", "0,1", "--p", "1,1.1", "--estimators", "k2,k3", "--format", "json")
    assert code == 0
    data = json.loads(out)
    assert data["true"]["KL(q||p)"]["mu"] == pytest.approx(-1 / 1.21, rel=1e-12)
    assert data["true"]["KL(p||q)"]["sigma"] == pytest.approx(-1.21, rel=1e-12)
    assert set(data["estimators"]["k3"]) >= {"loss", "reward", "full"}
    assert data["estimators"]["k3"]["loss"]["mu"] == pytest.approx(-1.0, rel=1e-12)


def test_categorical_files(tmp_path, capsys):
    np.save(tmp_path / "q.npy", np.array([0.0, 1.0, 2.0]))
    (tmp_path / "p.txt").write_text("1.0 0.0 0.5")
    code, out, _ = _run(
        capsys,
        "exact",
        "--q-logits",
        str(tmp_path / "q.npy"),
        "--p-logits",
        str(tmp_path / "p.txt"),
        "--format",
        "json",
    )
    assert code == 0
    data = json.loads(out)
    assert data["family"] == "categorical" and data["estimators"]["k1"]["method"] == "exact_sum"
    code, out, _ = _run(
        capsys,
        "gradient",
        "--q-logits",
        str(tmp_path / "q.npy"),
        "--p-logits",
        str(tmp_path / "p.txt"),
        "--format",
        "json",
        "--estimators",
        "k3",
    )
    grads = json.loads(out)
    assert len(grads["estimators"]["k3"]["loss"]["logits"]) == 3  # labelled, as in `mc`
    assert sum(grads["true"]["KL(q||p)"]["logits"]) == pytest.approx(0.0, abs=1e-15)  # softmax gradients sum to 0
    code, out, _ = _run(
        capsys,
        "gradient",
        "--q-logits",
        str(tmp_path / "q.npy"),
        "--p-logits",
        str(tmp_path / "p.txt"),
        "--estimators",
        "k3",
    )
    assert code == 0 and "norm" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["exact", "--q", "0,-1", "--p", "1,1"], "sigma must be positive"),
        (["exact", "--q", "0,nan", "--p", "1,1"], "sigma must be positive"),
        (["exact", "--q", "0", "--p", "1,1"], "MU,SIGMA"),
        (["exact", "--q", "0,1"], "both --q and --p"),
        (["exact"], "give either"),
        (["exact", "--q", "0,1", "--p", "1,1", "--estimators", "k9"], "unknown estimator"),
        (["gradient", "--q", "0,1", "--p", "1,1", "--expr", "r +* 2", "--estimators", ""], "formula"),
        (["exact", "--q-logits", "missing.npy", "--p-logits", "missing.npy"], "not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("klsym: error:") and message in err and err.count("\n") == 1


def test_mismatched_vocab_is_one_line_error(tmp_path, capsys):
    (tmp_path / "q.txt").write_text("0 1")
    (tmp_path / "p.txt").write_text("0 1 2")
    code, _, err = _run(capsys, "exact", "--q-logits", str(tmp_path / "q.txt"), "--p-logits", str(tmp_path / "p.txt"))
    assert code == 2 and "vocabulary size" in err
