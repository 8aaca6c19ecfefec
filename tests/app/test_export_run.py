"""A run's compressed model is exported as it was measured: its own bit widths and activation
quantizers, in the packed format and in ONNX (onnxruntime scores the reported accuracy)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from qready.app.cli import main
from qready.evaluate.metrics import evaluate
from qready.export import load_packed, read_packed_meta

RECIPE = {
    "name": "w3a3",
    "seed": 0,
    "model": {"name": "dwcnn", "args": {"width": 8}},
    "data": {"name": "digits"},
    "train": {"epochs": 1, "lr": 0.01, "batch_size": 64},
    "sweep": {"bits": [4], "ranges": ["minmax"]},
    "compress": {"method": "lsq", "w_bits": 3, "a_bits": 3, "epochs": 1, "lr": 0.001},
    "export": {"format": "packed"},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-run")
    recipe = root / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    assert main(["run", str(recipe), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


def _test_loader(run):
    from qready.app.stages import prepare
    from qready.recipe import load_recipe

    return prepare(load_recipe(RECIPE)).test_loader


def test_the_run_exports_what_it_measured(run) -> None:
    reported = json.loads((run / "compress.json").read_text())["row"]["accuracy"]
    path = run / "export" / "model.qready"
    assert len(read_packed_meta(path)["activations"]) > 0
    assert evaluate(load_packed(path), _test_loader(run))["accuracy"] == reported


def test_qready_export_of_the_compressed_model_to_onnx(run, tmp_path, capsys) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    reported = json.loads((run / "compress.json").read_text())["row"]["accuracy"]
    out = tmp_path / "m.onnx"
    assert main(["export", str(run / "compressed"), "--format", "onnx", "--out", str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    correct = total = 0
    for x, y in _test_loader(run):
        logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        correct += int((np.argmax(logits, axis=1) == y.numpy()).sum())
        total += len(y)
    assert 100.0 * correct / total == pytest.approx(reported, abs=1e-9)
    capsys.readouterr()
    for flag in (["--bits", "8"], ["--a-bits", "8"]):
        assert main(["export", str(run / "compressed"), *flag, "--out", str(tmp_path / "x.qready")]) == 2
        err = capsys.readouterr().err
        assert f"{flag[0]} 8 disagrees with" in err and "'lsq W3A3'" in err and err.count("\n") == 1
    assert main(["export", str(run / "compressed"), "--bits", "3", "--a-bits", "3",
                 "--out", str(tmp_path / "same.qready")]) == 0
