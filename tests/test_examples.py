"""The runnable examples run and report agreement with their own references."""

import pathlib
import runpy
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script", ["quickstart.py", "custom_extension.py"])
def test_example_runs(script, capsys):
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    out = capsys.readouterr().out
    assert "False" not in out, out
    assert "True" in out, out


def test_profile_example(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["profile_model.py", "--quick", "--out", str(tmp_path / "hot.png")])
    runpy.run_path(str(EXAMPLES / "profile_model.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "True" in out and "False" not in out and (tmp_path / "hot.png").exists()
