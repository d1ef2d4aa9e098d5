"""CLI: outputs, bit-identical reruns, one-line errors for bad input."""

import json
import subprocess
import sys

import polars as pl
import pytest

from agenttensor.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "agenttensor", *args], capture_output=True, text=True, timeout=600)


def test_run_writes_outputs_and_is_bit_identical(tmp_path):
    args = ["run", "models/seir", "--population", "synthetic:20000", "--steps", "25", "--seed", "0:2",
            "--set", "R0=3", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    a = (tmp_path / "a" / "results.parquet").read_bytes()
    assert a == (tmp_path / "b" / "results.parquet").read_bytes()
    table = pl.read_parquet(tmp_path / "a" / "results.parquet")
    assert {"step", "seed", "S", "E", "I", "R", "new_infections"} <= set(table.columns)
    assert table.height == 25 * 2
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["params"]["R0"] == 3.0 and summary["seeds"] == [0, 1] and "agenttensor_version" in summary
    assert (tmp_path / "a" / "plot.png").stat().st_size > 1000
    by_group = pl.read_parquet(tmp_path / "a" / "results_by_group.parquet")
    assert "group" in by_group.columns
    # a different seed gives a different trajectory
    assert main(["run", "models/seir", "--population", "synthetic:20000", "--steps", "25", "--seed", "7", "--set",
                 "R0=3", "--no-progress", "--out", str(tmp_path / "c")]) == 0
    c = pl.read_parquet(tmp_path / "c" / "results.parquet")
    assert not c["I"].equals(table.filter(pl.col("seed") == 0)["I"])


@pytest.mark.parametrize("args, message", [
    (["--set", "R00=3"], "unknown parameter 'R00'"),
    (["--set", "R0=nan"], "R0 is nan"),
    (["--set", "infectious_days=-2"], "below its minimum"),
    (["--set", "R0=abc"], "cannot read 'abc'"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--device", "tpu9"], "device"),
    (["--cuda-graphs"], "cuda_graphs needs a CUDA device"),
    (["--cuda-graphs", "--mode", "straight-through"], "cuda_graphs: hard mode only"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--population", "/nonexistent/pop"], "no population at /nonexistent/pop"),
])
def test_bad_input_is_one_clear_line(args, message):
    proc = run_cli("run", "models/seir", "--steps", "3", "--population", "synthetic:1000", "--no-progress", "--out",
                   "/tmp/agenttensor-cli-bad", *args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_model_dir():
    proc = run_cli("run", "models/does-not-exist")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
