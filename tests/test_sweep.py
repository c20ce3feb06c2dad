"""klsym sweep on Dask: every point equals the single-process engine bit for bit, also when a worker dies
mid-sweep; failed tasks are retried and reported, never dropped."""

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from klsym.simulate import sweep as sweep_module
from klsym.simulate.montecarlo import gradient, run
from klsym.simulate.sweep import gaussian_pairs, llm_pairs, load_spec, sweep

distributed = pytest.importorskip("distributed")

BLOCK = 65536
VALUE_KEYS = ("mean", "se", "std", "min", "max", "frac_negative", "n_nonfinite")
SPEC = {
    "pairs": gaussian_pairs([0.3], [1.0, 1.4])
    + llm_pairs([1.0], [0.7], vocab=12)
    + [{"q_logits": [0.0, 0.0, 0.0], "p_logits": [0.0, 1.0, float("-inf")]}],  # p(x) = 0 < q(x): t = -inf
    "estimators": ["k1", "k3", "k4"],
    "n": 3 * BLOCK + 77,
    "seed": 11,
    "gradient": "loss,full",
    "task_size": BLOCK,  # one RNG block per task: many tasks, merged in block order
}


def _two_workers(processes: bool):
    """A module-scoped client of a 2-worker LocalCluster (worker processes, or threads in this process)."""

    @pytest.fixture(scope="module")
    def fixture():
        with distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=processes, dashboard_address=None, silence_logs=50
        ) as cluster:
            with distributed.Client(cluster) as client:
                yield client

    return fixture


client = _two_workers(processes=True)  # a worker process can be killed
threaded_client = _two_workers(processes=False)  # monkeypatched task functions reach in-process workers


def _assert_equals_single_process(spec, rows, gradients=True):
    points = load_spec(spec).points
    assert sorted({row["point"] for row in rows}) == [p.index for p in points]
    for point in points:
        reference = run(point.q, point.p, list(point.estimators), point.n, point.seed)["estimators"]
        grads = (
            gradient(point.q, point.p, list(point.estimators), point.n, point.seed, modes=point.modes)["gradients"]
            if gradients
            else None
        )
        mine = [row for row in rows if row["point"] == point.index]
        assert [row["estimator"] for row in mine] == list(point.estimators)
        for row in mine:
            expected = reference[row["estimator"]]
            assert row["seed"] == spec["seed"] + point.index
            # bit for bit (assert_equal: NaN equals NaN, as where k1 = +inf makes a batch mean undefined)
            np.testing.assert_equal({k: row[k] for k in VALUE_KEYS}, {k: expected[k] for k in VALUE_KEYS})
            np.testing.assert_equal({level: row[f"q{level}"] for level in expected["quantiles"]}, expected["quantiles"])
            np.testing.assert_equal(row["batch_mean_std"], expected["batch"]["mean_std"])
            if gradients:
                for mode in point.modes:
                    np.testing.assert_equal(row[f"grad_{mode}"], grads[row["estimator"]][mode]["mean"].tolist())
                    np.testing.assert_equal(row[f"grad_{mode}_se"], grads[row["estimator"]][mode]["se"].tolist())


def test_every_point_equals_the_single_process_engine(client):
    result = sweep(SPEC, client=client, progress=False)
    assert result.complete and result.failures == []
    _assert_equals_single_process(SPEC, result.rows)
    gaussian = [row for row in result.rows if row["family"] == "gaussian"]
    assert all(row["exact_mean"] is not None and abs(row["z"]) < 5 for row in gaussian if row["estimator"] != "k4")
    assert {row["scale_ratio"] for row in gaussian} == {1.0, 1.4}
    categorical = [row for row in result.rows if row["family"] == "categorical"]
    assert [row.get("temperature") for row in categorical] == [1.0] * 3 + [None] * 3  # tags of llm_pairs only
    zero_mass = [row for row in categorical if row["point"] == 3]
    assert [row["n_nonfinite"] > 0 for row in zero_mass] == [True, True, False]  # k1, k3 = +inf; k4 finite


@pytest.mark.parametrize("task_blocks", [1, 3, 8, 20])
def test_tasks_hold_the_blocks_asked_for_and_every_block_once(task_blocks):
    point = load_spec({**SPEC, "n": 20 * BLOCK + 5, "task_size": task_blocks * BLOCK}).points[0]
    tasks = sweep_module.plan_tasks(point, task_blocks * BLOCK)
    blocks = [key for task in tasks for chunk in task for key, _ in chunk]
    assert blocks == [(b,) for b in range(21)]  # in order, each once (the last one partial)
    sizes = [sum(size for chunk in task for _, size in chunk) for task in tasks]
    assert max(sizes) <= task_blocks * BLOCK  # never more than asked for: a dead worker loses little
    assert sizes[0] > task_blocks * BLOCK / 2  # and not much less (whole chunks)


def test_a_killed_worker_mid_sweep_still_gives_the_full_identical_result(client):
    spec = {
        "pairs": gaussian_pairs([0.2, 0.6], [1.0, 1.2]),
        "estimators": ["k1", "k2", "k3"],
        "n": 20 * BLOCK,
        "seed": 3,
        "task_size": BLOCK,
    }
    outcome = {}
    runner = threading.Thread(
        target=lambda: outcome.update(result=sweep(spec, client=client, progress=False, exact=False))
    )
    pids = client.run(os.getpid)
    runner.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until tasks are under way, then kill one worker process
        done = sum(len(keys) for keys in client.has_what().values())
        if done >= 3:
            break
        time.sleep(0.05)
    assert runner.is_alive(), "the sweep ended before a worker could be killed"
    victim = sorted(pids)[0]
    os.kill(pids[victim], signal.SIGKILL)
    runner.join(timeout=300)
    assert not runner.is_alive()
    result = outcome["result"]
    assert result.complete
    assert len(result.rows) == 4 * 3
    _assert_equals_single_process(spec, result.rows, gradients=False)
    client.wait_for_workers(2, timeout=60)


_FAILED = set()


def flaky_run_blocks(point, chunks):
    """Fails the first time it sees point 1's first task."""
    if point.index == 1 and chunks[0][0][0] == (0,) and (point.index, "once") not in _FAILED:
        _FAILED.add((point.index, "once"))
        raise RuntimeError("injected failure")
    return ORIGINAL(point, chunks)


def broken_run_blocks(point, chunks):
    if point.index == 1:
        raise RuntimeError("always fails")
    return ORIGINAL(point, chunks)


ORIGINAL = sweep_module.run_blocks


def test_a_failed_task_is_retried_and_reported(threaded_client, monkeypatch):
    monkeypatch.setattr(sweep_module, "run_blocks", flaky_run_blocks)
    spec = {**SPEC, "pairs": SPEC["pairs"][:2], "gradient": None}
    result = sweep(spec, client=threaded_client, progress=False, exact=False)
    assert result.complete
    assert [(f["point"], f["attempt"], f["final"]) for f in result.failures] == [(1, 1, False)]
    assert "injected failure" in result.failures[0]["error"]
    _assert_equals_single_process(spec, result.rows, gradients=False)


def test_a_task_that_keeps_failing_is_reported_not_dropped(threaded_client, monkeypatch):
    monkeypatch.setattr(sweep_module, "run_blocks", broken_run_blocks)
    spec = {**SPEC, "pairs": SPEC["pairs"][:2], "gradient": None, "n": BLOCK}
    result = sweep(spec, client=threaded_client, progress=False, exact=False, retries=1)
    assert not result.complete
    assert [(f["point"], f["attempt"], f["final"]) for f in result.failures] == [(1, 1, False), (1, 2, True)]
    assert {row["point"] for row in result.rows} == {0}


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"pairs": []}, "non-empty list"),
        ({"pairs": [{"q": [0, 1]}]}, "Gaussian pair needs"),
        ({"pairs": [{"q": [0, 1], "p": [1, -1]}]}, r"sigma must be positive and finite, got -1"),  # names the sigma
        ({"pairs": [{"q": [0, -1], "p": [0, 1]}]}, r"sigma must be positive and finite, got -1"),
        ({"pairs": [{"q": [0, float("nan")], "p": [0, 1]}]}, r"sigma must be positive and finite, got nan"),
        ({"pairs": [{"q": [0, 1], "p": [1, 1]}], "estimators": "k9"}, "unknown estimator"),
        ({"pairs": [{"q": [0, 1], "p": [1, 1]}], "n": 0}, "n must be"),
        ({"pairs": [{"q": [0, 1], "p": [1, 1]}], "colour": 1}, "unknown spec keys"),
    ],
)
def test_bad_specs_are_one_clear_error(spec, message):
    with pytest.raises((ValueError, KeyError), match=message):
        load_spec(spec)


def test_cli_writes_csv_and_json(tmp_path):
    spec = {"pairs": gaussian_pairs([0.5], [1.0]), "estimators": ["k1", "k3"], "n": 1000, "seed": 4}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "klsym", "sweep", "--spec", str(path), "--workers", "1", "--quiet"]
    out = subprocess.run(command + ["--format", "json"], capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    direct = subprocess.run(
        [
            sys.executable,
            "-m",
            "klsym",
            "mc",
            "--q",
            "0,1",
            "--p",
            "0.5,1",
            "--n",
            "1000",
            "--seed",
            "4",
            "--estimators",
            "k1,k3",
            "--format",
            "json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    mc = json.loads(direct)["estimators"]
    assert [(row["estimator"], row["mean"], row["std"]) for row in rows] == [
        (name, mc[name]["mean"], mc[name]["std"]) for name in ("k1", "k3")
    ]
    csv_file = tmp_path / "rows.csv"
    subprocess.run(command + ["--format", "csv", "--out", str(csv_file)], check=True, capture_output=True)
    table = list(csv.DictReader(csv_file.open()))
    assert list(table[0])[:3] == ["point", "pair", "family"] and len(table) == 2
    assert [float(row["mean"]) for row in table] == [row["mean"] for row in rows]  # repr round-trips
    assert json.loads(table[0]["q"]) == [0.0, 1.0]
