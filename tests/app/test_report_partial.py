"""`qready report` on a grid that has not finished: the finished experiments, the rest marked."""

from __future__ import annotations

import json

import yaml

from qready.app.cli import main


def test_report_of_a_partial_grid(tmp_path, capsys) -> None:
    recipe = {"name": "g", "model": {"name": "mlp"}, "data": {"name": "digits"}, "grid": {"seed": [0, 1, 2]}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    rows = [{"label": "FP", "w_bits": None, "a_bits": None, "range": "minmax", "accuracy": 97.0, "loss": 0.1},
            {"label": "W4", "w_bits": 4, "a_bits": None, "range": "minmax", "accuracy": 95.5, "loss": 0.2}]
    (tmp_path / "seed=0").mkdir()
    (tmp_path / "seed=0" / "sweep.json").write_text(json.dumps(rows))
    (tmp_path / "seed=1").mkdir()  # started, nothing finished
    assert main(["report", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "2 of them not finished yet" in report and "seed=1, seed=2" in report
    assert "1 of 3 (missing: not finished)" in report and "95.50" in report
    assert "not finished" in (tmp_path / "report.html").read_text()
