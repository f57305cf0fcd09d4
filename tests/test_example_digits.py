"""examples/train_digits.py --quick: every method trains, the plot and the table are written."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest

pytest.importorskip("sklearn", reason="the digits example needs scikit-learn (pip install curvlib[examples])")
pytest.importorskip("matplotlib", reason="the digits example needs matplotlib (pip install curvlib[examples])")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_digits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_plot_and_table(tmp_path):
    example = load_example()
    results = example.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    assert set(results) == {"SGD", "Adam", "KFAC-expand", "KFAC-reduce", "AdaHesScale", "KFAC-reduce-f10"}
    for method, r in results.items():
        assert len(r["accuracy"]) == 2 and len(r["loss"]) == 1, method  # initial + one epoch
        assert math.isfinite(r["loss"][0]) and 0 < r["loss"][0] < 10, f"{method}: loss {r['loss'][0]}"
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"]), method
    png = tmp_path / "digits.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "results.md").read_text()
    for method in results:
        assert f"| {method} |" in table


def test_epochs_to_target():
    example = load_example()
    assert example.first_epoch_reaching([0.1, 0.5, 0.9, 0.95], 0.9) == 2
    assert example.first_epoch_reaching([0.1, 0.5], 0.9) is None
