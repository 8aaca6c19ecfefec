"""Progress in logs and CI: when stdout is not a terminal, every epoch writes one line (loss,
metrics, ETA) to the log."""

from __future__ import annotations

import subprocess
import sys

import yaml

from qready.train.stats import format_duration, format_epoch


def test_format_duration_and_eta() -> None:
    assert [format_duration(s) for s in (9, 75, 4000)] == ["9s", "1m15s", "1h06m"]
    line = format_epoch({"epoch": 0, "train_loss": 1.0, "train_acc": 50.0, "lr": 0.1, "time_s": 30.0}, 3)
    assert line.endswith("(30.0s) ETA 1m00s")
    assert "ETA" not in format_epoch({"epoch": 2, "time_s": 30.0}, 3)


def test_epoch_lines_in_the_log_when_stdout_is_a_pipe(tmp_path) -> None:
    recipe = {"name": "p", "seed": 0, "model": {"name": "mlp", "args": {"hidden": [16]}}, "data": {"name": "digits"},
              "train": {"epochs": 2, "lr": 0.01, "batch_size": 256}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    done = subprocess.run([sys.executable, "-m", "qready", "train", str(tmp_path / "r.yaml"), "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "qready.train" in line]
    assert len(lines) == 2 and "epoch 1/2" in lines[0] and "val_acc=" in lines[0] and "ETA" in lines[0], lines
