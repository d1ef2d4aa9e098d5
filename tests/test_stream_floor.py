"""benchmarks/stream_floor.py: its native pass moves the bytes it says it moves (the outputs are the known sums), and
the floors it reports are the bytes per agent over the measured speed."""

from __future__ import annotations

import ctypes
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="needs a C++ compiler")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import stream_floor  # noqa: E402


@pytest.mark.parametrize("threads,tile", [(1, 256), (2, 100)])
def test_the_pass_writes_each_output_as_the_inputs_sum_times_its_number(threads, tile):
    library = stream_floor.load()
    n, inputs, outputs = 5_003, 3, 2  # (n: not a multiple of the tile)
    x = [torch.rand(n) for _ in range(inputs)]
    y = [torch.full((n,), float("nan")) for _ in range(outputs)]
    ins = (ctypes.c_void_p * inputs)(*(t.data_ptr() for t in x))
    outs = (ctypes.c_void_p * outputs)(*(t.data_ptr() for t in y))
    seconds = library.agenttensor_stream_pass(n, inputs, ins, outputs, outs, tile, threads, 2)
    assert seconds > 0
    total = (x[0] + x[1]) + x[2]  # the pass's order of additions
    for q, out in enumerate(y):
        assert torch.equal(out, total * float(q + 1))


def test_a_run_reports_every_case_and_each_pass_floor(tmp_path, monkeypatch):
    out = tmp_path / "floor.json"
    monkeypatch.setattr(sys, "argv", ["stream_floor.py", "--agents", "20000", "--arrays", "2,9", "--tiles", "64",
                                      "--repeats", "1", "--threads", "1", "--out", str(out)])
    stream_floor.main()
    result = json.loads(out.read_text())
    assert [(c["arrays"], c["inputs"], c["outputs"], c["bytes_per_agent"]) for c in result["cases"]] == [
        (2, 1, 1, 12), (9, 6, 3, 48)]
    assert all(c["gb_per_s"] > 0 for c in result["cases"])
    speed = {c["arrays"]: c["gb_per_s"] for c in result["cases"]}
    for name, floor in result["floors"].items():
        p = stream_floor.PASSES[name]
        assert floor["bytes_per_agent"] == pytest.approx(
            sum(p["read"].values()) + sum(p["written_in_place"].values()) + 2 * sum(p["written_fresh"].values()))
        nearest = min(speed, key=lambda a: (abs(a - p["arrays"]), a))
        assert floor["gb_per_s"] == speed[nearest]
        assert floor["floor_ms"] == pytest.approx(floor["bytes_per_agent"] * 20000 / speed[nearest] / 1e6)
    assert result["floors_total_ms"] == pytest.approx(sum(f["floor_ms"] for f in result["floors"].values()))


def test_bad_arguments_are_refused(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["stream_floor.py", "--arrays", "1"])
    with pytest.raises(SystemExit) as stop:
        stream_floor.main()
    assert stop.value.code == 2
